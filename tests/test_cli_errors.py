"""Bad input to `mmpt train`, `mmpt data inspect`, `mmpt export-hf` and `mmpt import-hf` reaches the
user as one line naming the file or field and what to do (exit status 2), with the traceback only
under MMPT_DEBUG=1; under torchrun only rank 0 reports an error every rank hit.

The commands run in-process through `train.cli.main` (one rank, no torchrun) on the real small
corpus; one case runs 2 ranks under torchrun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.resume_check import start_run
from tests.corpus_fixtures import make_dataset, make_tokenizer
from tests.dist import free_port
from train import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
ONE_RANK = ["--parallel.pp=1", "--parallel.virtual_stages=1", "--parallel.dp=1", "--parallel.ep=1"]
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The dataset plus the damaged or mismatched inputs the cases point at."""
    root = tmp_path_factory.mktemp("cli-errors")
    ds = make_dataset(root)
    out = {"ds": ds, "root": root}

    changed = root / "ds-changed"  # one source's catalog cut short after the manifest was written
    changed.mkdir()
    for f in Path(ds.url).rglob("*"):
        if f.is_file():
            (changed / f.relative_to(ds.url)).parent.mkdir(parents=True, exist_ok=True)
            (changed / f.relative_to(ds.url)).write_bytes(f.read_bytes())
    catalog = sorted(changed.rglob("catalog.cols"))[0]
    catalog.write_bytes(catalog.read_bytes()[:-8])
    out["changed"], out["catalog"] = changed, catalog

    out["other_tok"] = make_tokenizer(ds.corpus, root / "tok-1024", vocab_size=1024)

    from train.checkpoint import CheckpointManager, model_tensors
    from train.config import load_config
    from train.model import build_model

    small = load_config(TINY, ["--model.hidden_size=64"])  # another model size
    CheckpointManager(str(root / "ckpt-small")).save(1, model_tensors(build_model(small)))

    (root / "ckpt-file").write_text("not a directory\n")
    (root / "empty").mkdir()
    no_weights = root / "hf-config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    truncated = root / "hf-truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(truncated / "model.safetensors"))
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    return out


def _train(x, tmp_path, *extra):
    ds = x["ds"]
    return ["train", "--config", TINY, f"--data.manifest={ds.url}",
            f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64", "--data.global_batch_size=4",
            "--data.image_max_pixels=12544", "--data.video_max_pixels=3136",
            "--data.video_max_frames=8", *ONE_RANK, "--train.steps=1",
            f"--train.run_dir={tmp_path / 'run'}", *extra]


# case -> (argv builder, strings the one error line must contain)
CASES = {
    "train: missing manifest": (
        lambda x, t: _train(x, t, f"--data.manifest={t / 'no-dataset'}"),
        ["no-dataset/manifest.json", "data.manifest"]),
    "train: changed catalog": (
        lambda x, t: _train(x, t, f"--data.manifest={x['changed']}"),
        ["catalog.cols", "the manifest says", "re-ingest"]),
    "train: tokenizer file missing": (
        lambda x, t: _train(x, t, f"--data.tokenizer={t / 'nope.json'}"),
        ["nope.json", "data.tokenizer"]),
    "train: another tokenizer": (
        lambda x, t: _train(x, t, f"--data.tokenizer={x['other_tok']}"),
        ["tok-1024/tokenizer.json", "data.tokenizer", "fingerprint"]),
    "train: checkpoint of another model size": (
        lambda x, t: _train(x, t, f"--checkpoint.dir={x['root'] / 'ckpt-small'}"),
        ["ckpt-small", "step-00000001", "model config differs", "checkpoint.dir"]),
    "train: checkpoint dir is a file": (
        lambda x, t: _train(x, t, f"--checkpoint.dir={x['root'] / 'ckpt-file'}"),
        ["checkpoint.dir", "ckpt-file", "is a file"]),
    "data inspect: missing manifest": (
        lambda x, t: ["data", "inspect", "--manifest", str(t / "no-dataset"), "--config", TINY,
                      "--tokenizer", str(x["ds"].tokenizer), "--png", str(t / "seq.png")],
        ["no-dataset/manifest.json", "mmpt ingest"]),
    "export-hf: empty dir": (
        lambda x, t: ["export-hf", str(x["root"] / "empty"), str(t / "hf")],
        ["no complete checkpoint", "empty"]),
    "import-hf: no weights": (
        lambda x, t: ["import-hf", str(x["root"] / "hf-config-only"), str(t / "imported")],
        ["hf-config-only", "no *.safetensors"]),
    "import-hf: truncated safetensors": (
        lambda x, t: ["import-hf", str(x["root"] / "hf-truncated"), str(t / "imported")],
        ["hf-truncated/model.safetensors", "not a complete safetensors file"]),
}


@pytest.fixture
def single_process(monkeypatch):
    for name in RANK_ENV + (cli.DEBUG_ENV,):
        monkeypatch.delenv(name, raising=False)


def _the_error_line(err: str, command: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith(f"mmpt {command}: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_file_or_field(case, inputs, tmp_path, capsys,
                                                         single_process):
    argv_of, needles = CASES[case]
    argv = argv_of(inputs, tmp_path)
    assert cli.main(argv) == 2
    line = _the_error_line(capsys.readouterr().err, argv[0])
    for needle in needles:
        assert needle in line, line


def test_unreachable_store_is_one_line(inputs, tmp_path, capsys, single_process, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    argv = ["data", "inspect", "--manifest", "s3://mmpt-nowhere/ds", "--config", TINY,
            "--tokenizer", str(inputs["ds"].tokenizer), "--png", str(tmp_path / "seq.png")]
    assert cli.main(argv) == 2
    line = _the_error_line(capsys.readouterr().err, "data")
    assert "s3://mmpt-nowhere/ds/manifest.json" in line and "127.0.0.1" in line


def test_debug_flag_adds_the_traceback(inputs, tmp_path, capsys, single_process, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(["export-hf", str(inputs["root"] / "empty"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "newest_config" in err
    assert err.rstrip().splitlines()[-1].startswith("mmpt export-hf: error: no complete checkpoint")


def test_an_error_re_raised_from_a_loader_worker_is_still_one_line(capsys, single_process):
    """torch's DataLoader re-raises a worker's exception with the worker's traceback in the
    message; the line shows only the original message."""
    from data.shards import ShardError

    wrapped = ShardError("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback "
                         "(most recent call last):\n  File \"data/loader.py\", line 1, in x\n"
                         "data.shards.ShardError: s3://b/ds/manifest.json: missing dataset manifest")
    assert cli.report_user_error("train", wrapped) == 2
    err = capsys.readouterr().err
    assert err == "mmpt train: error: s3://b/ds/manifest.json: missing dataset manifest\n"


def test_under_torchrun_only_rank_0_reports_an_error_every_rank_hit(inputs, tmp_path):
    """2 ranks, both hit the missing manifest: one error line (rank 0's), no rank traceback."""
    ds = inputs["ds"]
    proc = start_run("two", tmp_path, TINY, [
        f"--data.manifest={tmp_path / 'no-dataset'}", f"--data.tokenizer={ds.tokenizer}",
        "--data.seq_len=64", "--data.global_batch_size=4", "--parallel.pp=1",
        "--parallel.virtual_stages=1", "--parallel.dp=2", "--parallel.ep=1", "--train.steps=1"],
        2, env={cli.DEBUG_ENV: ""})
    assert proc.wait(timeout=240) != 0
    log = (tmp_path / "two.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if "mmpt train: " in line and "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("mmpt train: error: "), log
    assert "no-dataset/manifest.json" in errors[0], log
    # torchrun's own failure report is its business; no rank printed a traceback of our code
    assert str(ROOT / "data") not in log and str(ROOT / "train") not in log, log
