"""The training loop: data -> DEP -> PP/EP schedule -> MuonClip (+ QK-Clip) -> logging, checkpoints.

`run(cfg)` is what `mmpt train` calls on every rank once the default process group exists
(launch/train.py). Each step of `fit()`:

  1. next batch of this data-parallel replica (data/loader.py), read by this rank's role
     (train/reading.py: stage 0 the token ids, the last stage the targets, the media where they
     are encoded; every stage the layout, from the catalog);
  2. the step, `train.step.training_step`, one function that reads top to bottom: the lr of the
     step (a pure function of the step, train/optim/schedule) -> DEP vision forward -> the
     interleaved 1F1B schedule with expert all-to-alls -> DEP recompute + backward -> gradients
     reduced to their ZeRO-1 owners -> global grad norm and the bad-step decision -> the
     owners' MuonClip step and broadcast;
  3. still in `training_step`: QK-Clip of the MLA layers this rank holds (MAX of the per-head
     logits over the stage's DP group, live weights and fp32 masters alike), the router-bias
     update, and the step's statistics made equal on every rank;
  4. metrics on rank 0: loss, lr, grad norm, tokens/s, MFU (or achieved FLOP/s where the peak of
     the device is unknown), expert load max/mean, realised vision share, max attention logit,
     the loss per modality, role (caption / plain text) and source (train/metrics.py);
  every `train.eval_every` steps (and at the end): validation, a forward-only pass over the
     first `train.eval_batches` batches of the validation stream (`val_loss` and the same
     breakdown with a `val_` prefix); it leaves training exactly as it would be without it;
  5. every `checkpoint.every` steps (and at the end) a sharded checkpoint of model, optimizer,
     data-loader state, RNG states and step (train/checkpoint), resumed from at start.

Bad steps: a non-finite loss or gradient norm skips the update (no parameter, master,
optimizer-state or router-bias change; QK-Clip is skipped too: train/step.py); the loop counts
and logs the step, and `train.max_bad_steps` consecutive bad steps stop the run with
`BadStepsError`.

Steps are numbered 1..train.steps; a checkpoint of step N holds the state after N steps.
Checkpoints are asynchronous by default (checkpoint.async_save): a save stalls training only to
copy this rank's state to host memory, the write runs in the background, the next save and the
end of the run wait for it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data.vision import VisionPreprocess, normalize_patches
from parallel.mesh import build_mesh
from parallel.pieces import RankCoords, build_rank_pieces, materialize_pieces
from parallel.runtime import ParallelRuntime
from train.checkpoint import CheckpointManager, fill_masters, restore_rng, training_state
from train.config import Config
from train.errors import ConfigError, InvalidInput, UserError
from train.hf_export import WEIGHTS_ONLY
from train.metrics import CategoryNames, MetricsLogger, category_metrics
from train.model.flops import training_flops_per_token
from train.optim.muon import muonclip_factory
from train.optim.qk_clip import QKClip
from train.optim.schedule import schedule_multiplier
from train.reading import read_role, share_skips
from train.rng import seed_torch
from train.step import training_step

# Dense bf16 peak FLOP/s per GPU (no sparsity), from the vendors' data sheets; MFU is reported
# only where the device is known. H200 has the H100's compute (more, faster memory).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


class BadStepsError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
# What this rank holds, under full-model names
# ---------------------------------------------------------------------------------------------


def rank_pieces(rt: ParallelRuntime) -> list:
    """This rank's modules under full-model names (its pipeline chunks, the DEP encoder as
    ("vision.", encoder)): what checkpoints and fingerprints walk (train/checkpoint/state.py)."""
    return rt.stage_modules + ([("vision.", rt.dep.encoder)] if rt.dep is not None else [])


def state_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes of model/ and optim/ entries: equal = bit-identical state."""
    h = hashlib.sha256()
    for key in sorted(k for k in tensors if not k.startswith("rng/")):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Pieces of a step
# ---------------------------------------------------------------------------------------------


def runtime_batch(batch, device: torch.device, pre=None) -> dict:
    """A data.batch.Batch as the mapping the runtime takes (no vision: None; fields this
    rank's role did not read: None), on the device (collectives under NCCL need device
    tensors). uint8 pixels travel as they are and are normalised there with `pre`
    (data.vision.VisionPreprocess)."""
    has_vision = batch.grid_thw.shape[0] > 0
    b = batch.to(device, non_blocking=True) if device.type != "cpu" else batch
    pixels = b.pixel_patches
    if pixels is not None and pixels.dtype == torch.uint8:
        if pre is None:
            raise ValueError("uint8 pixel patches need the VisionPreprocess to normalise them")
        pixels = normalize_patches(pixels, pre)
    out = dict(input_ids=b.input_ids, position_ids=b.position_ids,
               doc_ids=b.doc_ids, labels=b.labels, loss_mask=b.loss_mask,
               pixel_patches=pixels if has_vision else None,
               grid_thw=b.grid_thw.long() if has_vision else None,
               vision_spans=getattr(b, "vision_spans", None) if has_vision else None,
               token_category=getattr(b, "token_category", None))
    if getattr(b, "global_items", None) is not None:  # DEP: the items this rank encodes
        out.update(pixel_items=b.pixel_items, global_items=b.global_items, pixel_patches=pixels)
    return out


def loader_categories(loader) -> CategoryNames | None:
    """Names of a loader's token categories (its catalog's sources), None for loaders that
    have none (test doubles)."""
    catalog = getattr(getattr(loader, "stream", None), "catalog", None)
    return CategoryNames(catalog.names, catalog.kinds) if catalog is not None else None


def check_tokenizer(cfg: Config, tokenizer) -> None:
    """The model's placeholder ids and vocabulary must be the ones the data was tokenized with."""
    m = cfg.model
    for field, role in (("image_token_id", "image"), ("video_token_id", "video")):
        want = tokenizer.special[role]
        if getattr(m, field) != want:
            raise ConfigError(f"model.{field}={getattr(m, field)} but the tokenizer "
                              f"{cfg.data.tokenizer} uses id {want} for its {role} placeholder")
    if tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids ({cfg.data.tokenizer})")


def checkpoint_manager(cfg: Config) -> CheckpointManager | None:
    if not cfg.checkpoint.dir:
        return None
    from data.store import StoreError, open_store

    c = cfg.checkpoint
    try:
        store = open_store(c.dir, **cfg.store.checkpoint_store_opts(c.concurrency))
    except StoreError as e:  # the store names the path; the field is known here
        raise ConfigError(f"checkpoint.dir={c.dir!r}: {e}") from None
    return CheckpointManager(store, keep_last=c.keep_last, async_save=c.async_save,
                             concurrency=c.concurrency, part_bytes=c.part_mib << 20,
                             object_bytes=c.object_mib << 20)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Everything one rank needs for training; `fit()` runs the loop (see the module docstring)."""

    def __init__(self, cfg: Config, make_loader: Callable | None = None):
        if not dist.is_initialized():
            raise RuntimeError("the trainer needs an initialised default process group "
                               "(run it through `mmpt train`)")
        if not cfg.data.manifest:
            raise ConfigError("data.manifest is empty: ingest a dataset (`mmpt ingest`) and pass "
                              "--data.manifest=URL")
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if cfg.train.device == "cuda" else torch.device("cpu"))
        self.dtype = getattr(torch, cfg.train.dtype)
        seed_torch(cfg.train.seed, self.rank)  # this rank's stream (train/rng.py)
        self.mesh = build_mesh(cfg, self.device.type)

        # Only this rank's pieces are ever allocated: built on the meta device, then materialised
        # with the whole model's initial values; the runtime casts them to train.dtype once
        # ZeRO-1 has taken its fp32 masters.
        pieces = build_rank_pieces(cfg, RankCoords.of_mesh(self.mesh))
        materialize_pieces(pieces, self.device, seed=cfg.train.seed,
                           init_std=cfg.model.init_std)
        self.rt = ParallelRuntime(cfg, pieces, self.mesh,
                                  make_optimizer=muonclip_factory(cfg.optim),
                                  dtype=self.dtype, device=self.device)
        self.pieces = rank_pieces(self.rt)
        # Each pipeline position clips its own layers; logits are MAXed over its DP group.
        self.qk_clip = QKClip(self.rt.stage_modules, cfg.optim.qk_clip_tau,
                              group=self.mesh.dp_group)

        if make_loader is None:
            from data.loader import DataLoaderWithState

            make_loader = DataLoaderWithState
        self.read = read_role(cfg, self.mesh)
        self.vision_pre = VisionPreprocess.from_config(cfg)  # normalises pixels on the device
        self.loader = make_loader(cfg, dp_rank=self.mesh.dp_rank, dp_size=cfg.parallel.dp,
                                  read=self.read)
        tokenizer = getattr(getattr(self.loader, "stream", None), "tokenizer", None)
        if tokenizer is not None:
            check_tokenizer(cfg, tokenizer)
        self.categories = loader_categories(self.loader)
        self.val_loader = self.val_categories = None
        if cfg.train.eval_every > 0:
            self.val_loader = make_loader(cfg, dp_rank=self.mesh.dp_rank,
                                          dp_size=cfg.parallel.dp, split="val", read=self.read)
            self.val_categories = loader_categories(self.val_loader)
        self.ckpt = checkpoint_manager(cfg)
        self._quarantine_seen = 0  # quarantine events already logged
        t = cfg.train
        self.logger = MetricsLogger(
            t.run_dir, t.steps, enabled=self.rank == 0,
            wandb=dict(project=t.wandb_project, mode=t.wandb_mode, config=cfg.to_dict())
            if t.wandb else None)
        self.step = 0
        self.resumed = False  # resume() ran (fit() calls it unless the caller did)
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.peak = peak_flops(self.device)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        return training_state(self.pieces, self.rt.zero, self.rank)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; returns whether one was loaded."""
        self.resumed = True
        if self.ckpt is None:
            return False
        state = self.state()
        # Optimizer entries may be absent only from a weights-only checkpoint (mmpt import-hf).
        loaded = self.ckpt.resume(state, optional=("rng/", "optim/", "master/"))
        for name, reason in self.ckpt.skipped:
            self.logger.event(f"checkpoint {name} skipped: {reason}")
        for name, where, reason in self.ckpt.quarantined:
            self.logger.event(f"checkpoint {name} quarantined as {where}: {reason}")
        self._quarantine_seen = len(self.ckpt.quarantined)
        if loaded is None:
            return False
        lacking = [k for k in loaded.missing if k.startswith(("optim/", "master/"))]
        if loaded.meta.get(WEIGHTS_ONLY):
            fill_masters(self.rt.zero, lacking)  # fresh optimizer state, masters = weights
            self.logger.event(f"starting from the weights of {loaded.meta.get('imported_from')} "
                              "with a fresh optimizer state")
        elif lacking:
            raise InvalidInput(f"checkpoint {self.ckpt.store.url}/{loaded.name} lacks optimizer "
                               f"state this layout needs, e.g. {lacking[:3]}")
        restore_rng(state, self.rank, loaded.missing)
        if "loader" in loaded.meta:
            self.loader.load_state_dict(loaded.meta["loader"])
        self.step = loaded.step
        self.bad_in_a_row = loaded.meta.get("bad_in_a_row", 0)
        self.skipped_steps = loaded.meta.get("skipped_steps", 0)
        self.logger.event(f"resumed from {self.ckpt.store.url}/{loaded.name} (step {self.step})")
        return True

    def save(self) -> None:
        meta = {"loader": self.loader.state_dict(), "bad_in_a_row": self.bad_in_a_row,
                "skipped_steps": self.skipped_steps, "config": self.cfg.to_dict()}
        self.wait_for_checkpoint()
        self.ckpt.save(self.step, self.state(), meta)
        if not self.ckpt.async_save:
            self._log_saved(self.ckpt.last_save)

    def wait_for_checkpoint(self) -> None:
        """Wait for the checkpoint being written in the background (if any) and log it."""
        done = self.ckpt.wait() if self.ckpt is not None else None
        if done is not None:
            self._log_saved(done)

    def _log_saved(self, done: dict) -> None:
        for old, where, reason in self.ckpt.quarantined[self._quarantine_seen:]:
            self.logger.event(f"checkpoint {old} quarantined as {where}: {reason}")
        self._quarantine_seen = len(self.ckpt.quarantined)
        written = done.get("commit_s", done.get("write_s", 0.0))
        self.logger.event(f"checkpoint {self.ckpt.store.url}/{done['name']} (training stalled "
                          f"{done['stall_s']:.2f} s, written in {written:.1f} s)")

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, batch) -> dict:
        """One step (train/step.py: lr, DEP, the PP/EP schedule, ZeRO-1, the bad-step decision,
        QK-Clip, router bias) and its metrics; "good": whether the update was applied."""
        cfg = self.cfg
        t0 = time.monotonic()
        mult = schedule_multiplier(self.step, cfg.optim, cfg.train.steps)
        counts = torch.tensor([  # vision placeholders and document tokens, from the layout
            float(batch.vision_spans[:, 2].sum()),
            float(batch.non_padding_tokens())], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=self.mesh.dp_group)
        skipped = self._share_skips(batch, self.loader)

        cats = self.categories
        out = training_step(self.rt, runtime_batch(batch, self.device, self.vision_pre),
                            lr_multiplier=mult,
                            qk_clip=self.qk_clip, num_categories=cats.count if cats else 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.monotonic() - t0

        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        tok_s = tokens / max(seconds, 1e-9)
        flops_s = tok_s * self.flops_per_token
        balance = max((s["max"] / s["mean"] for s in out.expert_load.values() if s["mean"] > 0),
                      default=float("nan"))
        metrics = {"loss": out.loss, "lr": cfg.optim.lr * mult, "grad_norm": out.grad_norm,
                   "tok_s": tok_s, "step_s": seconds, "flops_s": flops_s,
                   "expert_load_max_mean": balance,
                   "vision_share": float(counts[0] / counts[1]) if counts[1] > 0 else 0.0,
                   "max_logit": out.max_logit, "clipped_heads": out.clipped_heads,
                   "loss_tokens": out.loss_tokens, "skipped_steps": self.skipped_steps}
        if self.peak is not None:
            metrics["mfu"] = flops_s / (self.peak * self.world)
        if skipped:
            metrics["skipped_docs"] = skipped
        if out.category_loss is not None:
            metrics |= category_metrics(out.category_loss, cats)
        return metrics | {"good": out.good}

    def _share_skips(self, batch, loader) -> int:
        """The step's unreadable documents, counted once over the world and given no loss on
        every rank (train/reading.py); a loader without a catalog (a test double): this rank's."""
        stream = getattr(loader, "stream", None)
        if getattr(stream, "catalog", None) is None:
            return len(batch.skipped)
        return share_skips(batch, stream, self.device)

    def evaluate(self) -> dict:
        """Validation: the first train.eval_batches batches of the validation stream (the same
        ones every time), forward only. Nothing that training reads changes: not the weights,
        optimizer, router bias or expert-load counters (ParallelRuntime.evaluate), not the
        QK-Clip maxima, the training loader or the RNG states."""
        cfg, cats = self.cfg, self.val_categories
        t0 = time.monotonic()
        loss_sum, tokens, per_category = 0.0, 0, None
        self.val_loader.rewind()
        batches = iter(self.val_loader)
        with self.qk_clip.paused(), torch.random.fork_rng(
                devices=[self.device] if self.device.type == "cuda" else []):
            try:
                for _ in range(cfg.train.eval_batches):
                    batch = next(batches)
                    self._share_skips(batch, self.val_loader)
                    ev = self.rt.evaluate(runtime_batch(batch, self.device, self.vision_pre),
                                          cats.count if cats else 0)
                    loss_sum += ev.loss_sum
                    tokens += ev.loss_tokens
                    if ev.category_loss is not None:
                        per_category = (ev.category_loss if per_category is None
                                        else per_category + ev.category_loss)
            finally:
                getattr(batches, "close", lambda: None)()  # stops the loader's workers
        metrics = {"val_loss": loss_sum / tokens, "val_loss_tokens": tokens,
                   "val_s": time.monotonic() - t0}
        if per_category is not None:
            metrics |= category_metrics(per_category, cats, prefix="val_")
        return metrics

    def fit(self) -> dict:
        cfg = self.cfg
        if not self.resumed:
            self.resume()
        if self.step >= cfg.train.steps:
            self.logger.event(f"nothing to do: step {self.step} >= train.steps={cfg.train.steps}")
        batches = iter(self.loader)
        while self.step < cfg.train.steps:
            t0 = time.monotonic()
            batch = next(batches)
            data_s = time.monotonic() - t0  # waiting for the loader (tok_s excludes it)
            metrics = self.train_step(batch) | {"data_s": data_s}
            self.step += 1
            if metrics.pop("good"):
                self.bad_in_a_row = 0
            else:
                self.bad_in_a_row += 1
                self.skipped_steps += 1
                metrics["skipped_steps"] = self.skipped_steps
                self.logger.event(f"step {self.step}: non-finite loss {metrics['loss']} or grad "
                                  f"norm {metrics['grad_norm']}; update skipped "
                                  f"({self.bad_in_a_row} in a row, {self.skipped_steps} in all)")
                if self.bad_in_a_row >= cfg.train.max_bad_steps:
                    raise BadStepsError(
                        f"{self.bad_in_a_row} consecutive steps (up to step {self.step}) had a "
                        f"non-finite loss or gradient norm (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); stopping. Lower optim.lr / optim.adamw_lr, "
                        "check the data, or resume from an earlier checkpoint")
            every = cfg.train.eval_every
            evaluated = every > 0 and (self.step % every == 0 or self.step == cfg.train.steps)
            if evaluated:
                metrics |= self.evaluate()
            if (self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps
                    or evaluated):
                self.logger.log(self.step, metrics)
            if self.ckpt is not None and (self.step % cfg.checkpoint.every == 0
                                          or self.step == cfg.train.steps):
                self.save()
        if self.ckpt is not None:
            self.wait_for_checkpoint()
            self.ckpt.close()  # the last checkpoint is committed before any rank exits
        return self.finish()

    def finish(self) -> dict:
        """Gather every rank's state fingerprint into RUN_DIR/final-state.json (rank 0)."""
        prints = [None] * self.world
        dist.all_gather_object(prints, state_fingerprint(self.state()))
        result = {"step": self.step, "skipped_steps": self.skipped_steps, "world": self.world,
                  "layout": {k: getattr(self.cfg.parallel, k) for k in ("pp", "virtual_stages",
                                                                        "dp", "ep")},
                  "fingerprints": prints}
        if self.rank == 0:
            path = Path(self.cfg.train.run_dir) / "final-state.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
        self.logger.close()
        return result


def run(cfg: Config) -> dict:
    """Train cfg on the initialised default process group (one call per rank)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:  # flushed even when training fails (`mmpt train` ends without finalization)
        trainer.logger.close()
