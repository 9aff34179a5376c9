"""Dependencies point one way: config and model at the bottom, parallel/ above them, the training
loop (train/step.py, train/trainer.py, checkpoints, metrics) above that, launchers on top.

Every import statement of those modules, module level or inside a function, is read with `ast`
(nothing is imported to check), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO_PACKAGES = {"bench", "data", "launch", "parallel", "tests", "train"}

# What each layer may import from the repository: module prefixes, and single names of modules
# that hold more than the layer needs. parallel/ takes from train/optim only the global
# grad-norm clip (ZeRO-1) and the Muon/AdamW role of a parameter (its memory count), never the
# optimizer choice, the lr schedule or QK-Clip: those belong to the loop.
# train/errors.py (the user-facing error types) imports nothing and sits below everything.
LAYERS = {
    "train/errors.py": ((), {}),
    "train/config.py": (("train.errors", "train.config_checks"), {}),
    "train/config_checks.py": (("train.errors", "train.config"), {}),  # Config as a type only
    "train/model": (("train.errors", "train.config", "train.model"), {}),
    "parallel": (("parallel", "train.errors", "train.config", "train.model",
                  "train.optim.grad_norm"), {"train.optim.muon": {"uses_muon"}}),
    # the data plane knows nothing of the parallel layout: the train layer hands the loader
    # what this rank reads (train/reading.py)
    "data": (("data", "train.errors", "train.config"), {}),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, imported names) of every import of a repository module in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            out.append((node.lineno, module, tuple(a.name for a in node.names)))
    return sorted(imp for imp in out if imp[1].split(".")[0] in REPO_PACKAGES)


def violations(path: Path, prefixes: tuple[str, ...], names: dict[str, set[str]]) -> list[str]:
    bad = []
    for line, module, imported in repo_imports(path):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            continue
        if module in names and imported and set(imported) <= names[module]:
            continue
        what = f"{module} ({', '.join(imported)})" if imported else module
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {what}")
    return bad


def layer_files(layer: str) -> list[Path]:
    target = ROOT / layer
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
    files = layer_files(layer)
    assert files, f"no modules under {layer}"
    prefixes, names = LAYERS[layer]
    bad = [v for f in files for v in violations(f, prefixes, names)]
    assert bad == [], "\n".join(bad)


def test_the_check_sees_imports_at_any_depth_and_relative_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "parallel").mkdir()
    (tmp_path / "train" / "model").mkdir(parents=True)
    bad = tmp_path / "parallel" / "bad.py"
    bad.write_text("import torch\nfrom parallel.mesh import build_mesh\nfrom . import zero\n"
                   "from train.optim.grad_norm import clip_grad_norm_\n"
                   "from train.optim.schedule import set_lr\n"
                   "def f():\n    from train.trainer import Trainer\n"
                   "    import train.checkpoint\n")
    assert violations(bad, *LAYERS["parallel"]) == [
        "parallel/bad.py:5 imports train.optim.schedule (set_lr)",
        "parallel/bad.py:7 imports train.trainer (Trainer)",
        "parallel/bad.py:8 imports train.checkpoint",
    ]
    model = tmp_path / "train" / "model" / "bad.py"
    model.write_text("from ..config import Config\nfrom ..trainer import Trainer\n"
                     "from .moe import MoE\n")
    assert violations(model, *LAYERS["train/model"]) == [
        "train/model/bad.py:2 imports train.trainer (Trainer)"]
