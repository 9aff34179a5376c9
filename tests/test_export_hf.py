"""`mmpt export-hf` / `mmpt import-hf`: a trained checkpoint becomes a transformers Kimi-K2.5
directory that `from_pretrained` loads with the same weights and logits, and that directory
becomes a checkpoint the trainer continues from."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra

from tests.corpus_fixtures import make_dataset  # noqa: E402
from tests.dist import run_distributed  # noqa: E402
from train.checkpoint import model_tensors  # noqa: E402
from train.cli import main as mmpt  # noqa: E402
from train.config import load_config  # noqa: E402
from train.hf_export import load_model  # noqa: E402
from train.metrics import read_metrics  # noqa: E402
from train.model.hf_kimi import state_dict_to_hf  # noqa: E402

TINY = "configs/tiny.toml"


def _cfg(ds, run_dir, ckpt, steps):
    return load_config(TINY, [
        f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
        "--data.global_batch_size=4", "--data.image_max_pixels=12544",
        "--data.video_max_pixels=3136", "--data.video_max_frames=8", f"--train.steps={steps}",
        f"--train.run_dir={run_dir}", f"--checkpoint.dir={ckpt}", "--checkpoint.every=2"])


def _train(rank, world, cfg):
    """Train; returns the model tensors as the first step found them (after any resume)."""
    from train.trainer import Trainer

    seen = {}

    class Recording(Trainer):
        def train_step(self, batch):
            if not seen:
                seen.update({k: t.clone() for k, t in model_tensors(self.pieces).items()})
            return super().train_step(batch)

    Recording(cfg).fit()
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ds = make_dataset(root / "data")
    run_distributed(_train, 1, _cfg(ds, root / "run", root / "ckpt", 2), timeout=240)
    return ds, root


def test_export_loads_with_from_pretrained_and_gives_our_logits(trained, tmp_path):
    ds, root = trained
    assert mmpt(["export-hf", str(root / "ckpt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert list((tmp_path / "hf").glob("*.safetensors"))
    assert json.loads((tmp_path / "hf" / "mmpt_export.json").read_text())["step"] == 2

    hf = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32).eval()
    ours, cfg, step = load_model(str(root / "ckpt"))
    assert step == 2
    expected = state_dict_to_hf(ours.state_dict(), cfg)
    got = hf.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k

    ids = torch.randint(5, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        mine = ours.eval()(ids, position_ids=torch.arange(24).expand(2, 24),
                           doc_ids=torch.zeros(2, 24, dtype=torch.long))
    assert ((mine - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_import_makes_a_checkpoint_training_continues_from(trained, tmp_path, capsys):
    ds, root = trained
    assert mmpt(["export-hf", str(root / "ckpt"), str(tmp_path / "hf")]) == 0
    assert mmpt(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported"),
                 "--config", TINY]) == 0
    capsys.readouterr()
    # never over an existing checkpoint root: a one-line error, status 2
    assert mmpt(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    trained_model, _, _ = load_model(str(root / "ckpt"))
    expected = model_tensors(trained_model)
    cfg = _cfg(ds, tmp_path / "run", tmp_path / "imported", 2)
    [start] = run_distributed(_train, 1, cfg, timeout=240)
    assert start.keys() == expected.keys()
    for k in expected:  # the first step starts from exactly the exported weights
        assert torch.equal(start[k], expected[k]), k
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    events = [json.loads(x)["event"] for x in (tmp_path / "run" / "metrics.jsonl")
              .read_text().splitlines() if '"event"' in x]
    assert any("fresh optimizer state" in e for e in events), events
    assert (tmp_path / "imported" / "step-00000002" / "COMMITTED").is_file()
