"""Kill a training run with SIGKILL, resume it, and check it against an uninterrupted run.

    python -m launch.resume_check --config configs/tiny.toml --nproc 4 --out runs/resume \\
        --kill-after 12 [--seed 0] [--section.field=value ...]

Three real multi-process runs of `mmpt train` under torchrun, all with the same config:
  reference  train.steps steps, uninterrupted (its own checkpoint directory);
  killed     SIGKILLed (the whole process group, no clean-up) once it has logged a step drawn
             from [kill_after + 1, steps - 1] by a seeded generator (so reruns kill at the same
             step);
  resumed    the same command again: it resumes from the newest complete checkpoint.
Then it prints a per-step loss table and exits 0 only if every step logged by the killed and the
resumed run has exactly (bit for bit) the reference's loss and grad norm, and the final state
fingerprints (model + optimizer, every rank) are equal. The quickstart and tests/test_resume.py
use these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def start_run(name: str, out: Path, config: str, overrides: list[str], nproc: int,
              env: dict | None = None, max_restarts: int = 0) -> subprocess.Popen:
    """Start `torchrun -m train.cli train` in its own process group; log to OUT/NAME.log.

    The run directory is OUT/NAME; the checkpoint directory comes from the overrides/config.
    With max_restarts > 0 torchrun restarts the whole group after a rank fails (the trainer then
    resumes from the newest complete checkpoint)."""
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "train.cli",
           "train", "--config", config,
           *overrides, f"--train.run_dir={run_dir}"]
    log = open(out / f"{name}.log", "ab")
    # A fresh TCPStore per restart attempt, as launch/slurm/train.sbatch explains (a restarted
    # group could otherwise read the previous attempt's gloo bootstrap addresses).
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)
    log.close()
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may contain spaces
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank, no clean-up at all. torchrun starts each rank in a new
    session, so the ranks are found by walking the process tree, not by process group."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_until(proc: subprocess.Popen, ready, timeout: float, what: str) -> None:
    """Poll ready() until true; fail if the run exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir)]
    except FileNotFoundError:
        return []


def finish(proc: subprocess.Popen, name: str, out: Path, timeout: float) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise TimeoutError(f"run {name} did not finish within {timeout:.0f} s "
                           f"(log: {out / (name + '.log')})") from None
    if rc != 0:
        tail = (out / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"run {name} failed with status {rc}; log tail:\n{tail}")


def kill_step(seed: int, kill_after: int, steps: int) -> int:
    """The step after which the killed run dies: seeded, in [kill_after + 1, steps - 1]."""
    if not 0 < kill_after < steps - 1:
        raise ValueError(f"--kill-after={kill_after} must be in [1, train.steps - 2 = {steps - 2}]")
    return random.Random(seed).randint(kill_after + 1, steps - 1)


def compare(reference: Path, runs: list[Path]) -> tuple[str, list[str]]:
    """(loss table, mismatches): every step each run logged vs the reference's record."""
    ref = {r["step"]: r for r in read_metrics(reference)}
    logs = [{r["step"]: r for r in read_metrics(d)} for d in runs]
    head = f"{'step':>5} {'reference':>12} " + " ".join(f"{d.name:>12}" for d in runs) + "  match"
    lines, bad = [head], []
    for step in sorted(ref):
        cells, ok = [], True
        for d, log in zip(runs, logs):
            rec = log.get(step)
            if rec is None:
                cells.append(f"{'':>12}")
                continue
            same = rec["loss"] == ref[step]["loss"] and rec["grad_norm"] == ref[step]["grad_norm"]
            ok &= same
            cells.append(f"{rec['loss']:>12.6f}")
            if not same:
                bad.append(f"step {step}: {d.name} loss {rec['loss']!r} grad_norm "
                           f"{rec['grad_norm']!r}, reference {ref[step]['loss']!r} "
                           f"{ref[step]['grad_norm']!r}")
        lines.append(f"{step:>5} {ref[step]['loss']:>12.6f} " + " ".join(cells) +
                     ("  yes" if ok else "  NO"))
    return "\n".join(lines), bad


BREAKDOWN = (("loss", "loss"), ("text", "loss_text"), ("image", "loss_image"),
             ("video", "loss_video"), ("interl.", "loss_interleaved"),
             ("caption", "loss_caption"))


def breakdown_table(run_dir: Path) -> str:
    """Per-step training and validation loss by modality (the columns logged at all)."""
    records = read_metrics(run_dir)
    cols = [(name, key) for name, key in BREAKDOWN] + \
        [(f"val {name}" if key != "loss" else "val_loss", f"val_{key}") for name, key in BREAKDOWN]
    cols = [(n, k) for n, k in cols if any(k in r for r in records)]
    lines = [f"{'step':>5} " + " ".join(f"{n:>11}" for n, _ in cols)]
    for r in records:
        lines.append(f"{r['step']:>5} " + " ".join(
            f"{r[k]:>11.4f}" if k in r else f"{'':>11}" for _, k in cols))
    return "\n".join(lines)


def final_fingerprints(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "final-state.json").read_text())["fingerprints"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.resume_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--out", required=True, help="directory for the runs, logs and checkpoints")
    ap.add_argument("--kill-after", type=int, required=True,
                    help="kill at a seeded random step after this one")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill step")
    ap.add_argument("--checkpoint-dir", default="",
                    help="checkpoints of the killed/resumed run (default OUT/ckpt; s3:// works)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args, overrides = ap.parse_known_args(argv)
    from train.config import load_config

    cfg = load_config(args.config, overrides)
    steps = cfg.train.steps
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint_dir or str(out / "ckpt")
    at = kill_step(args.seed, args.kill_after, steps)

    print(f"[resume-check] reference run: {steps} steps, uninterrupted", flush=True)
    t0 = time.monotonic()
    ref = start_run("reference", out, args.config,
                    [*overrides, f"--checkpoint.dir={out / 'reference-ckpt'}"], args.nproc)
    finish(ref, "reference", out, args.timeout)
    print(f"[resume-check] reference done in {time.monotonic() - t0:.0f} s", flush=True)

    print(f"[resume-check] killed run: SIGKILL after step {at} (seed {args.seed})", flush=True)
    run_args = [*overrides, f"--checkpoint.dir={ckpt}"]
    killed = start_run("killed", out, args.config, run_args, args.nproc)
    wait_until(killed, lambda: at in logged_steps(out / "killed"), args.timeout, f"step {at}")
    kill_group(killed)
    print(f"[resume-check] killed (SIGKILL) after step {at}; resuming from {ckpt}", flush=True)
    resumed = start_run("resumed", out, args.config, run_args, args.nproc)
    finish(resumed, "resumed", out, args.timeout)
    for line in (out / "resumed.log").read_text(errors="replace").splitlines():
        if "resumed from" in line or "skipped:" in line:
            print(f"[resume-check] {line.strip()}")

    print("[resume-check] loss by modality, training and validation (reference run):")
    print(breakdown_table(out / "reference"))
    table, bad = compare(out / "reference", [out / "killed", out / "resumed"])
    print(table)
    same_state = final_fingerprints(out / "reference") == final_fingerprints(out / "resumed")
    print(f"[resume-check] final model + optimizer state (sha256 per rank) equal: {same_state}")
    if bad or not same_state:
        print("[resume-check] MISMATCH:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print("[resume-check] every step of the killed and resumed runs matches the reference "
          "bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
