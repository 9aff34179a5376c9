"""Faults for the kill / restart tests, injected into the real `mmpt train` from outside it.

A test starts the run as users do (torchrun or sbatch, `-m train.cli train`) with `env(...)` in
its environment: that puts tests/inject first on PYTHONPATH, whose sitecustomize calls `install`
in every Python process of the run, and sets the faults:

  MMPT_PAUSE_BEFORE_COMMIT=N  rank 0 stops just before it commits checkpoint N (it writes
                              RUN_DIR/paused-before-commit-N and sleeps), so a test can SIGKILL
                              the run mid-write;
  MMPT_PAUSE_DURING_WRITE=N   every rank's background writer stops at its first data part of
                              checkpoint N (writing RUN_DIR/paused-during-write-N) while training
                              goes on;
  MMPT_CRASH_AT_STEP=N        the last rank exits with status 3 before step N (once a checkpoint
                              in flight is committed, so where the restart resumes from is fixed),
                              in the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0),
                              so `torchrun --max-restarts` restarts the group.

`install` wraps the store of the trainer's checkpoint manager and the trainer's step; without
any of these variables it changes nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INJECT = Path(__file__).resolve().parent / "inject"
PAUSE_ENV = "MMPT_PAUSE_BEFORE_COMMIT"
PAUSE_WRITE_ENV = "MMPT_PAUSE_DURING_WRITE"
CRASH_ENV = "MMPT_CRASH_AT_STEP"


def env(pause_before_commit: int | None = None, pause_during_write: int | None = None,
        crash_at_step: int | None = None) -> dict[str, str]:
    """Environment for a run with these faults (the repository and tests/inject on the path)."""
    out = {"PYTHONPATH": os.pathsep.join([str(INJECT), str(REPO)])}
    for name, value in ((PAUSE_ENV, pause_before_commit), (PAUSE_WRITE_ENV, pause_during_write),
                        (CRASH_ENV, crash_at_step)):
        if value is not None:
            out[name] = str(value)
    return out


def _stop(flag: Path) -> None:
    flag.write_text(f"{os.getpid()}\n")
    while True:  # until SIGKILL
        time.sleep(1)


class PauseBeforeCommit:
    """Store wrapper: the put of step's COMMITTED marker never happens."""

    def __init__(self, store, key: str, flag: Path):
        self._store, self._key, self._flag = store, key, flag

    def put(self, key, data, *args, **kwargs):
        if key == self._key:
            _stop(self._flag)
        return self._store.put(key, data, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


class PauseDuringWrite:
    """Store wrapper: the first data part of one step is never written."""

    def __init__(self, store, prefix: str, flag: Path):
        self._store, self._prefix, self._flag = store, prefix, flag

    def open_upload(self, key, size, part_size):
        upload = self._store.open_upload(key, size, part_size)
        if not key.startswith(self._prefix):
            return upload
        flag = self._flag

        class Paused:
            def write(self, offset, data):
                _stop(flag)

            def __getattr__(self, name):
                return getattr(upload, name)

        return Paused()

    def __getattr__(self, name):
        return getattr(self._store, name)


def install() -> None:
    """Wrap the trainer's checkpoint manager and step with the faults the environment asks for."""
    pause, pause_write, crash = (os.environ.get(k) for k in (PAUSE_ENV, PAUSE_WRITE_ENV, CRASH_ENV))
    if not (pause or pause_write or crash):
        return
    import train.trainer as trainer
    from train.checkpoint import step_dir

    make_manager = trainer.checkpoint_manager

    def checkpoint_manager(cfg):
        mgr = make_manager(cfg)
        run_dir = Path(cfg.train.run_dir)
        if mgr is not None and pause:
            mgr.store = PauseBeforeCommit(mgr.store, f"{step_dir(int(pause))}/COMMITTED",
                                          run_dir / f"paused-before-commit-{int(pause)}")
        if mgr is not None and pause_write:
            mgr.store = PauseDuringWrite(mgr.store, f"{step_dir(int(pause_write))}/data-",
                                         run_dir / f"paused-during-write-{int(pause_write)}")
        return mgr

    trainer.checkpoint_manager = checkpoint_manager
    if not crash:
        return
    train_step = trainer.Trainer.train_step

    def crashing_train_step(self, batch):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and self.step + 1 == int(crash):
            if self.ckpt is not None:  # the crash lands after the checkpoint in flight committed
                self.wait_for_checkpoint()
                self.ckpt.close()
            if self.rank == self.world - 1:
                print(f"rank {self.rank}: injected crash before step {self.step + 1} "
                      f"({CRASH_ENV})", flush=True)
                os._exit(3)
        return train_step(self, batch)

    trainer.Trainer.train_step = crashing_train_step
