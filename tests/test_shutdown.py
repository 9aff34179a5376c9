"""A run that finishes its steps exits 0 on every rank.

4 torchrun ranks at PP1 x DP4 with DEP (EP 4 and EP 1, alternately), the tiny model on the real
small corpus, several runs in a row: each must exit with status 0 (torchrun's status is non-zero
when any rank's is) and no rank may abort. Before `mmpt train` ended the process itself
(train/cli.py, "Shutdown"), a gloo worker thread that released a finished collective's tensors
after interpreter finalization had begun aborted its rank with "terminate called without an
active exception" (SIGABRT) in a fraction of these runs. That fraction depends on the machine's
load, so the test also checks, deterministically, the property that rules the race out: an
atexit hook installed into every rank from outside (sitecustomize) never runs, because no rank
enters interpreter finalization, while every rank still exits 0 with its output flushed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launch.resume_check import finish, start_run
from tests.corpus_fixtures import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
RUNS_EP = (4, 1, 4, 1)
STEPS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shutdown-data"))


def _finalization_hook(where: Path) -> Path:
    """A sitecustomize that makes every torchrun rank (RANK set; not the launcher) leave a file
    in `where` if its interpreter runs atexit handlers, i.e. enters finalization."""
    hook = where / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'RANK' in os.environ:\n"
        f"    path = os.path.join({str(where)!r}, 'finalized-rank-' + os.environ['RANK'])\n"
        "    atexit.register(lambda: open(path, 'w').close())\n")
    return hook


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dep_dp4_runs_exit_zero_on_every_rank(dataset, tmp_path):
    hook = _finalization_hook(tmp_path)
    for i, ep in enumerate(RUNS_EP):
        name = f"run{i}-ep{ep}"
        proc = start_run(name, tmp_path, TINY, [
            f"--data.manifest={dataset.url}", f"--data.tokenizer={dataset.tokenizer}",
            "--data.seq_len=64", "--data.global_batch_size=8", "--data.image_max_pixels=12544",
            "--data.video_max_pixels=3136", "--data.video_max_frames=8", "--parallel.pp=1",
            "--parallel.virtual_stages=1", "--parallel.dp=4", f"--parallel.ep={ep}",
            "--parallel.dep=true", f"--train.steps={STEPS}"], 4,
            env={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"})
        finish(proc, name, tmp_path, timeout=300)  # raises, with the log's tail, unless status 0
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "terminate called" not in log and "SIGABRT" not in log, log[-3000:]
        assert f"step {STEPS}/{STEPS}" in log  # flushed before the process ended
        final = json.loads((tmp_path / name / "final-state.json").read_text())
        assert final["step"] == STEPS and len(final["fingerprints"]) == 4
        finalized = sorted(p.name for p in tmp_path.glob("finalized-rank-*"))
        assert not finalized, f"{name}: ranks entered interpreter finalization: {finalized}"
