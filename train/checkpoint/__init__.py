"""Sharded, resumable checkpoints (DCP over our object store; local directory or S3).

    from train.checkpoint import CheckpointManager, training_state, restore_rng
    mgr = CheckpointManager(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last,
                            async_save=True)                # save returns once state is on the host
    state = training_state(model, optimizer, rank)          # flat, layout-independent keys
    loaded = mgr.resume(state)         # None: start fresh; newer checkpoints are quarantined
                                       # (load_latest: the same load, for tools that only read)
    if loaded: restore_rng(state, rank, loaded.missing); step = loaded.step; loader.load_state_dict(loaded.meta["loader"])
    ...
    mgr.save(step, training_state(model, optimizer, rank), meta={"loader": loader.state_dict()})
    ...
    mgr.close()                                             # the last save committed, every rank
"""

from train.checkpoint.manager import CheckpointManager, CheckpointWriteError, Loaded, step_dir
from train.checkpoint.state import (fill_masters, model_tensors, optimizer_tensors, restore_rng,
                                    rng_tensors, training_state)
from train.checkpoint.storage import CorruptCheckpoint

__all__ = ["CheckpointManager", "CheckpointWriteError", "CorruptCheckpoint", "Loaded",
           "fill_masters", "model_tensors", "optimizer_tensors", "restore_rng", "rng_tensors", "step_dir",
           "training_state"]
