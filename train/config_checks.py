"""The rules a loaded config must meet, checked once when it is built (train.config.from_dict).

Each rule names its field, the bad value and what is allowed. Only facts the config alone
decides are checked here; what the machine supports (world size, torch build, device) is
checked where the settings are applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from train.errors import ConfigError

if TYPE_CHECKING:
    from train.config import Config


def _require(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}={value!r} is invalid: {allowed}")


def validate(cfg: Config) -> None:
    m, v, d, p, o, t, c = (cfg.model, cfg.vision, cfg.data, cfg.parallel, cfg.optim, cfg.train,
                           cfg.checkpoint)
    for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "num_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                 "topk_group", "max_position_embeddings", "rope_original_max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be > 0")
    for name in ("q_lora_rank", "n_shared_experts", "first_k_dense"):
        _require(getattr(m, name) >= 0, f"model.{name}", getattr(m, name), "must be >= 0")
    _require(m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", m.qk_rope_head_dim,
             "must be even (rotary pairs)")
    _require(m.first_k_dense <= m.num_layers, "model.first_k_dense", m.first_k_dense,
             f"must be <= model.num_layers={m.num_layers}")
    _require(m.num_experts_per_tok <= m.n_routed_experts, "model.num_experts_per_tok",
             m.num_experts_per_tok, f"must be <= model.n_routed_experts={m.n_routed_experts}")
    _require(m.n_routed_experts % m.n_group == 0, "model.n_group", m.n_group,
             f"must divide model.n_routed_experts={m.n_routed_experts}")
    _require(m.topk_group <= m.n_group, "model.topk_group", m.topk_group,
             f"must be <= model.n_group={m.n_group}")
    # Group-limited routing as in HF deepseek_v3: a group's score is the sum of its two best
    # experts, the best topk_group groups are kept, and the top-k experts are chosen among the
    # kept groups' experts only.
    per_group = m.n_routed_experts // m.n_group
    _require(per_group >= 2, "model.n_group", m.n_group,
             f"leaves {per_group} expert(s) per group of model.n_routed_experts="
             f"{m.n_routed_experts}; a group's score sums its 2 best experts, so each group needs >= 2")
    _require(m.num_experts_per_tok <= m.topk_group * per_group, "model.num_experts_per_tok",
             m.num_experts_per_tok,
             f"must be <= model.topk_group * (model.n_routed_experts / model.n_group) = "
             f"{m.topk_group} * {per_group} = {m.topk_group * per_group}, the experts left after "
             "the group mask")
    for name in ("image_token_id", "video_token_id"):
        _require(getattr(m, name) >= 0, f"model.{name}", getattr(m, name), "must be >= 0")
    _require(m.rope_factor >= 1.0, "model.rope_factor", m.rope_factor, "must be >= 1.0")
    _require(m.rms_norm_eps > 0, "model.rms_norm_eps", m.rms_norm_eps, "must be > 0")

    if v.enabled:
        for name in ("patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "in_channels", "pos_emb_height", "pos_emb_width", "pos_emb_time",
                     "merge_size", "frames_per_chunk"):
            _require(getattr(v, name) > 0, f"vision.{name}", getattr(v, name), "must be > 0")
        _require(v.hidden_size % v.num_heads == 0, "vision.num_heads", v.num_heads,
                 f"must divide vision.hidden_size={v.hidden_size}")
        _require((v.hidden_size // v.num_heads) % 4 == 0, "vision.hidden_size", v.hidden_size,
                 "per-head width must be a multiple of 4 (axial 2-D rope pairs)")
        _require(v.frames_per_chunk <= v.pos_emb_time, "vision.frames_per_chunk",
                 v.frames_per_chunk, f"must be <= vision.pos_emb_time={v.pos_emb_time}")
        _require(v.projector_hidden_size >= 0, "vision.projector_hidden_size",
                 v.projector_hidden_size, "must be >= 0")

    _require(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    # max_position_embeddings is the context the rope supports, YaRN extension included (as in
    # HF configs: factor * original length when extended); packed position ids reach seq_len - 1.
    _require(d.seq_len <= m.max_position_embeddings, "data.seq_len", d.seq_len,
             f"must be <= model.max_position_embeddings={m.max_position_embeddings} (the model's "
             "position limit, YaRN included); raise model.max_position_embeddings (with "
             "model.rope_factor for YaRN) or lower data.seq_len")
    _require(0.0 <= d.vision_fraction < 1.0, "data.vision_fraction", d.vision_fraction,
             "must be in [0, 1)")
    _require(d.global_batch_size > 0, "data.global_batch_size", d.global_batch_size, "must be > 0")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _require(d.window_sequences > 0, "data.window_sequences", d.window_sequences, "must be > 0")
    for part in filter(None, (x.strip() for x in d.source_weights.split(","))):
        name, sep, w = part.partition("=")
        try:
            ok = bool(sep and name.strip()) and float(w) > 0
        except ValueError:
            ok = False
        _require(ok, "data.source_weights", d.source_weights,
                 "must look like 'name=weight,...' with positive weights")
    for name in ("image_min_pixels", "image_max_pixels", "video_max_pixels", "video_max_frames"):
        _require(getattr(d, name) > 0, f"data.{name}", getattr(d, name), "must be > 0")
    _require(d.image_min_pixels <= d.image_max_pixels, "data.image_min_pixels", d.image_min_pixels,
             f"must be <= data.image_max_pixels={d.image_max_pixels}")
    _require(d.video_fps > 0, "data.video_fps", d.video_fps, "must be > 0")

    for name in ("pp", "virtual_stages", "dp", "ep", "microbatches"):
        _require(getattr(p, name) > 0, f"parallel.{name}", getattr(p, name), "must be > 0")
    _require(p.dp % p.ep == 0, "parallel.ep", p.ep, f"must divide parallel.dp={p.dp}")
    _require(m.n_routed_experts % p.ep == 0, "parallel.ep", p.ep,
             f"must divide model.n_routed_experts={m.n_routed_experts}")
    _require(m.num_layers >= p.pp * p.virtual_stages, "model.num_layers", m.num_layers,
             f"must be >= parallel.pp * parallel.virtual_stages = {p.pp * p.virtual_stages} "
             "(every pipeline chunk needs a layer)")
    _require(d.global_batch_size % (p.dp * p.microbatches) == 0, "data.global_batch_size",
             d.global_batch_size,
             f"must be divisible by parallel.dp * parallel.microbatches = {p.dp * p.microbatches}")

    _require(o.lr >= 0, "optim.lr", o.lr, "must be >= 0")
    _require(o.adamw_lr >= 0, "optim.adamw_lr", o.adamw_lr, "must be >= 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(o.qk_clip_tau > 0, "optim.qk_clip_tau", o.qk_clip_tau, "must be > 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction,
             "must be in (0, 1]")

    _require(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    _require(t.log_every > 0, "train.log_every", t.log_every, "must be > 0")
    _require(t.max_bad_steps > 0, "train.max_bad_steps", t.max_bad_steps, "must be > 0")
    _require(0.0 <= d.holdout_fraction < 1.0, "data.holdout_fraction", d.holdout_fraction,
             "must be in [0, 1)")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 disables)")
    _require(t.eval_batches > 0, "train.eval_batches", t.eval_batches, "must be > 0")
    _require(t.eval_every == 0 or bool(d.val_manifest) or d.holdout_fraction > 0,
             "train.eval_every", t.eval_every,
             "validation needs data: set data.val_manifest or data.holdout_fraction > 0")
    _require(c.every > 0, "checkpoint.every", c.every, "must be > 0")
    _require(c.keep_last > 0, "checkpoint.keep_last", c.keep_last, "must be > 0")
    _require(c.concurrency >= 1, "checkpoint.concurrency", c.concurrency, "must be >= 1")
    _require(c.part_mib >= 5, "checkpoint.part_mib", c.part_mib,
             "must be >= 5 (S3 refuses smaller multipart parts)")
    _require(c.object_mib >= c.part_mib, "checkpoint.object_mib", c.object_mib,
             f"must be >= checkpoint.part_mib={c.part_mib}")
    s = cfg.store
    for name in ("connect_timeout", "read_timeout", "retry_time", "checkpoint_retry_time"):
        _require(getattr(s, name) > 0, f"store.{name}", getattr(s, name), "must be > 0 seconds")
    _require(s.max_attempts >= 1, "store.max_attempts", s.max_attempts, "must be >= 1")
    _require(s.checkpoint_max_attempts >= 1, "store.checkpoint_max_attempts",
             s.checkpoint_max_attempts, "must be >= 1")
    _validate_activations(cfg)


def _validate_activations(cfg: Config) -> None:
    """Settings that only the config decides; what the torch build and the device support is
    checked where the settings are applied (`train.model.activations.check_support`)."""
    a, m = cfg.activations, cfg.model
    _require(a.loss_chunk_tokens >= 0, "activations.loss_chunk_tokens", a.loss_chunk_tokens,
             "must be >= 0 (0: whole logits)")
    if a.recompute_moe_down:
        _require(a.recompute == "selective", "activations.recompute_moe_down", True,
                 f"needs activations.recompute='selective' (got {a.recompute!r})")
        _require(m.first_k_dense < m.num_layers, "activations.recompute_moe_down", True,
                 f"the model has no MoE layer (model.first_k_dense={m.first_k_dense} = "
                 f"model.num_layers), so no routed-expert down-projection to recompute")
    _require(not (a.fp8_storage and a.recompute == "full"), "activations.fp8_storage", True,
             "has nothing to store with activations.recompute='full' (a layer keeps only its "
             "input); use 'selective' or 'none'")
