"""Checkpoints <-> Hugging Face `transformers` directories (config.json + safetensors).

    mmpt export-hf CKPT OUT [--dtype bfloat16] [--config FILE]
        CKPT: a checkpoint root (local dir or s3://bucket/prefix, as `checkpoint.dir`); its newest
        complete checkpoint is exported. OUT then loads with
        `Kimi_K25ForConditionalGeneration.from_pretrained(OUT)` (vision on), or
        `DeepseekV3ForCausalLM.from_pretrained(OUT)` for a text-only model (vision.enabled=false).
    mmpt import-hf HF_DIR OUT [--config FILE] [--section.field=value ...]
        writes a weights-only checkpoint of step 0 under OUT (a checkpoint root); train from it
        with `mmpt train --config FILE --checkpoint.dir=OUT ...`: the trainer loads the weights,
        starts the optimizer state fresh (fp32 masters from the weights) and the data stream at
        its beginning. Model and vision sections come from HF_DIR's config.json; every other
        section from --config (the defaults when absent) and the overrides.

The model config of an export comes from the checkpoint itself (the trainer stores the run's
config in meta.json); --config overrides it, for checkpoints written by other tools. Weights are
converted by train/model/hf_kimi.py / hf_deepseek.py (names, stacked experts, MLA layout).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from train.checkpoint import CheckpointManager, model_tensors, step_dir
from train.config import Config, from_dict, load_config
from train.errors import ConfigError, InvalidInput, MissingInput, UserError
from train.model import build_model

WEIGHTS_ONLY = "weights_only"  # meta.json flag of an imported checkpoint


class CheckpointRootInUse(UserError, FileExistsError):
    """import-hf never writes over existing checkpoints."""


def newest_config(mgr: CheckpointManager) -> tuple[int, Config]:
    """Step and run config of the newest complete checkpoint under mgr's root."""
    for step in reversed(mgr.committed_steps()):
        if mgr.validate(step) is None:
            meta = json.loads(mgr.store.get(f"{step_dir(step)}/meta.json"))
            if "config" not in meta:
                raise ConfigError(f"{mgr.store.url}/{step_dir(step)}/meta.json holds no run "
                                  "config; pass --config FILE")
            return step, from_dict(meta["config"])
    raise MissingInput(f"no complete checkpoint under {mgr.store.url}: point export-hf at a "
                       "checkpoint.dir that a run saved into")


def load_model(root: str, cfg: Config | None = None):
    """(whole model with the newest checkpoint's weights, its config, its step)."""
    mgr = CheckpointManager(root, keep_last=1_000_000)  # never prunes: we only read
    step, stored = newest_config(mgr)
    cfg = cfg or stored
    model = build_model(cfg)
    loaded = mgr.load_latest(model_tensors(model))
    if loaded is None:
        raise MissingInput(f"no loadable checkpoint under {root} (see the skipped checkpoints "
                           "logged above)")
    return model, cfg, loaded.step


def hf_model(model, cfg: Config, dtype: torch.dtype):
    """The transformers model holding our weights (Kimi-K2.5, or DeepSeek-V3 if text-only)."""
    import transformers

    state = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.vision.enabled:
        from train.model.hf_kimi import config_to_hf, state_dict_to_hf

        hf = transformers.Kimi_K25ForConditionalGeneration(config_to_hf(cfg))
        hf_state = state_dict_to_hf(state, cfg)
    else:
        from train.model.hf_deepseek import config_to_hf, state_dict_to_hf

        hf = transformers.DeepseekV3ForCausalLM(config_to_hf(cfg.model))
        hf_state = state_dict_to_hf({k[3:]: v for k, v in state.items() if k.startswith("lm.")})
    hf = hf.float()
    hf.load_state_dict(hf_state, strict=True)
    return hf.to(dtype)


def export_hf(root: str, out: str | Path, *, dtype: torch.dtype = torch.float32,
              cfg: Config | None = None) -> Path:
    model, cfg, step = load_model(root, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = hf_model(model, cfg, dtype)
    hf.save_pretrained(out, safe_serialization=True)
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tok is not None and tok.is_file() and tok.name == "tokenizer.json":
        shutil.copy(tok, out / "tokenizer.json")  # the tokenizer the run trained with
    (out / "mmpt_export.json").write_text(json.dumps(
        {"checkpoint": str(root), "step": step, "dtype": str(dtype).removeprefix("torch.")},
        indent=1) + "\n")
    return out


def check_hf_dir(hf_dir: str | Path) -> None:
    """A transformers directory to import: config.json and complete safetensors weights."""
    from safetensors import safe_open

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise MissingInput(f"{d}/config.json not found: import-hf takes a transformers "
                           "directory (config.json + *.safetensors)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        raise MissingInput(f"{d} holds no *.safetensors weights (only config.json?): save the "
                           "model with save_pretrained(..., safe_serialization=True)")
    for f in weights:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise InvalidInput(f"{f}: not a complete safetensors file ({e}); copy or save it "
                               "again") from None


def import_hf(hf_dir: str | Path, out: str, base: Config | None = None) -> Config:
    """Write a weights-only checkpoint (step 0) of an HF Kimi-K2.5 / DeepSeek-V3 directory."""
    import transformers

    check_hf_dir(hf_dir)
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    base = base or Config()
    if hf_config.model_type == "kimi_k25":
        from train.model.hf_kimi import config_from_hf, state_dict_from_hf

        cfg = config_from_hf(hf_config, base)
        hf = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(hf_dir,
                                                                           dtype=torch.float32)
        state = state_dict_from_hf(hf.state_dict(), cfg)
    elif hf_config.model_type == "deepseek_v3":
        from train.model.hf_deepseek import config_from_hf, state_dict_from_hf

        raw = base.to_dict()
        raw["model"].update(config_from_hf(hf_config))
        raw["vision"]["enabled"] = False
        cfg = from_dict(raw)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        state = {"lm." + k: v for k, v in state_dict_from_hf(hf.state_dict()).items()}
    else:
        raise ConfigError(f"{hf_dir}: model_type {hf_config.model_type!r} is neither kimi_k25 "
                          "nor deepseek_v3")
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    mgr = CheckpointManager(out, keep_last=1_000_000)
    if mgr.committed_steps():
        raise CheckpointRootInUse(f"{out} already holds checkpoints; import into an empty "
                                  "location")
    mgr.save(0, model_tensors(model), meta={WEIGHTS_ONLY: True, "config": cfg.to_dict(),
                                            "imported_from": str(hf_dir)})
    return cfg


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmpt export-hf",
                                 description="Export the newest checkpoint as a transformers "
                                             "directory (config.json + safetensors).")
    ap.add_argument("checkpoint", help="checkpoint root: a local dir or s3://bucket/prefix")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--config", help="TOML config of the run (default: the one in the checkpoint)")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides) if (args.config or overrides) else None
    out = export_hf(args.checkpoint, args.out, dtype=_DTYPES[args.dtype], cfg=cfg)
    print(f"wrote {out} (from_pretrained loads it)")
    return 0


def import_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmpt import-hf",
                                 description="Make a checkpoint to continue pretraining from a "
                                             "transformers Kimi-K2.5 or DeepSeek-V3 directory.")
    ap.add_argument("hf_dir", help="directory with config.json + safetensors")
    ap.add_argument("out", help="checkpoint root to create (local dir or s3://bucket/prefix)")
    ap.add_argument("--config", help="TOML config for the non-model sections (data, parallel...)")
    args, overrides = ap.parse_known_args(argv)
    cfg = import_hf(args.hf_dir, args.out, load_config(args.config, overrides))
    print(f"wrote a weights-only checkpoint (step 0) to {args.out}; continue with: mmpt train "
          f"--config FILE --checkpoint.dir={args.out} (model: {cfg.model.num_layers} layers, "
          f"hidden {cfg.model.hidden_size}, vision {'on' if cfg.vision.enabled else 'off'})")
    return 0
