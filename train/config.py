"""Typed run configuration: dataclasses with defaults, loaded from TOML, overridable from the CLI.

A config is nine sections (model, vision, data, parallel, optim, train, checkpoint, store,
activations). Loading goes TOML file -> `--section.field=value` overrides -> validation
(train/config_checks.py). Every error names the field, the bad value and what is allowed;
unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from train.config_checks import validate
from train.errors import ConfigError


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The text model: DeepSeek-V3 / Kimi K2 architecture (names follow the HF config)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    first_k_dense: int = 1  # the first layers use a dense SwiGLU MLP instead of MoE
    intermediate_size: int = 384  # dense MLP width
    num_heads: int = 4
    q_lora_rank: int = 64  # 0 means a full-rank q projection (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # one rope key of this width is shared by all heads
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96
    n_group: int = 1  # group-limited routing (K2 uses one group)
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # Aux-loss-free balancing: bias += rate * sign(mean_load - load), outside autograd.
    bias_update_rate: float = 1e-3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    max_position_embeddings: int = 4096
    # YaRN context extension; factor 1.0 means plain RoPE.
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # Placeholder tokens replaced by projected vision embeddings (one per merged patch). They
    # are never embedded, so they may lie outside the vocabulary (as in Kimi K2.5).
    image_token_id: int = 3
    video_token_id: int = 4
    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"


@dataclass
class VisionConfig:
    """MoonViT-3D encoder and the patch-merger projector to the LM width."""

    enabled: bool = True
    patch_size: int = 14
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    in_channels: int = 3
    pos_emb_height: int = 16  # learned 2-D position grid, interpolated to each image
    pos_emb_width: int = 16
    pos_emb_time: int = 4  # time embedding slots: frames per video chunk
    merge_size: int = 2  # 2x2 spatial patch merge before the projector
    frames_per_chunk: int = 4  # video: frames averaged into one spatio-temporal volume
    projector_hidden_size: int = 0  # 0: same as the merged width
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    projector_ln_eps: float = 1e-5


@dataclass
class DataConfig:
    """Where the data comes from and how it is mixed and packed."""

    manifest: str = ""  # URL of a dataset manifest: s3://bucket/prefix or a local path
    seq_len: int = 256
    vision_fraction: float = 0.1
    seed: int = 0
    global_batch_size: int = 8  # sequences per optimizer step, over all DP replicas
    num_workers: int = 0
    tokenizer: str = ""
    # Vision preprocessing (data/vision.py): pixel budgets per image / video frame, frame sampling.
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 512 * 512
    video_max_pixels: int = 256 * 256
    video_fps: float = 2.0  # frames sampled per second of video
    video_max_frames: int = 64  # per video; spread evenly over longer videos
    # Mixing and packing (data/mix.py, data/pack.py): BFD packs inside windows of this many
    # sequences; weights "name=w,..." split each modality's tokens between its sources
    # (empty: by source size in tokens).
    window_sequences: int = 32
    source_weights: str = ""
    # Image augmentation (data/augment.py): crop/flip/rotation/colour jitter keyed only by
    # (seed, sample id, epoch); the output keeps the image size, so token counts stay exact.
    augment: bool = False
    # Validation data (train.eval_every): a separate ingested dataset, or else the samples a
    # keyed hash of their identity holds out of this dataset (data/catalog.py); a fraction > 0
    # also removes them from training.
    val_manifest: str = ""
    holdout_fraction: float = 0.0


@dataclass
class ParallelConfig:
    pp: int = 1
    virtual_stages: int = 1
    dp: int = 1
    ep: int = 1
    microbatches: int = 1
    schedule: Literal["interleaved_1f1b", "1f1b", "interleaved_zero_bubble"] = "interleaved_1f1b"
    dep: bool = True  # decoupled encoder process for the vision encoder


@dataclass
class OptimConfig:
    lr: float = 2e-3
    adamw_lr: float = 2e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    qk_clip_tau: float = 100.0
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr_ratio


@dataclass
class TrainConfig:
    steps: int = 20
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    log_every: int = 1
    run_dir: str = "runs/default"
    max_bad_steps: int = 3
    # Forward-only validation every eval_every steps (0: never) over eval_batches global batches
    # of the validation stream, always the same ones (data.val_manifest / data.holdout_fraction).
    eval_every: int = 0
    eval_batches: int = 2
    # Weights & Biases: also log every metric to a wandb run (mode "offline" needs no network).
    wandb: bool = False
    wandb_project: str = "mmpt"
    wandb_mode: Literal["online", "offline"] = "online"


@dataclass
class CheckpointConfig:
    dir: str = ""  # local path or s3://bucket/prefix; empty disables checkpointing
    every: int = 10
    keep_last: int = 3
    # Training stalls only to copy this rank's state to host memory; the write runs in a
    # background thread (the next save, and the end of the run, wait for it).
    async_save: bool = True
    concurrency: int = 8  # parts one rank writes (and objects it reads) at once
    part_mib: int = 16  # multipart part size (S3 needs >= 5 MiB except the last part)
    object_mib: int = 512  # a rank's data objects are closed at this size


@dataclass
class StoreConfig:
    """How S3 stores (dataset and checkpoints) wait and retry; local directories ignore it."""

    connect_timeout: float = 3.0  # seconds to open a connection to the endpoint
    read_timeout: float = 20.0  # seconds a reply may stall before the attempt counts as failed
    retry_time: float = 60.0  # seconds one operation keeps retrying transient failures
    max_attempts: int = 8  # attempts per operation, whichever limit comes first
    # Checkpoint writes run in the background and must outlast long throttling (a SlowDown
    # storm while thousands of ranks write): minutes, not seconds.
    checkpoint_retry_time: float = 900.0
    checkpoint_max_attempts: int = 1000

    def store_opts(self) -> dict[str, Any]:
        """Keyword arguments for data.store.open_store / data.s3_store.S3Store."""
        return {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                "retry_time": self.retry_time, "max_attempts": self.max_attempts}

    def checkpoint_store_opts(self, concurrency: int) -> dict[str, Any]:
        """store_opts for the checkpoint store: the checkpoint retry budget, `concurrency`
        requests at once (what one rank's background writer uses)."""
        return {**self.store_opts(), "retry_time": self.checkpoint_retry_time,
                "max_attempts": self.checkpoint_max_attempts, "max_concurrency": concurrency}


@dataclass
class ActivationConfig:
    """What the backward pass keeps, and where (train/model/activations.py applies it)."""

    # "selective": RMSNorm, SwiGLU and the MLA up-projections are recomputed in backward;
    # "full": every decoder layer is recomputed from its input.
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_moe_down: bool = False  # selective: also the routed experts' SwiGLU + down-proj
    # Saved inputs of the routed experts' up-projections and of SwiGLU as FP8-E4M3 (1x128
    # tiles, fp32 scales); the matmuls still run in the working dtype.
    fp8_storage: bool = False
    offload: bool = False  # decoder layers' saved activations go to (pinned) host memory
    # The last stage's loss applies the head this many tokens at a time (never the whole
    # [tokens, vocab] logits); 0 computes whole logits and then the loss.
    loss_chunk_tokens: int = 1024


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Convert a TOML or CLI value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(where, value, args[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r} must be a string")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _section_from_dict(name: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}; known keys of [{name}]: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; sections are: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(Config)
    parts = {}
    for name in SECTIONS:
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] must be a table, got {section!r}")
        parts[name] = _section_from_dict(name, hints[name], section)
    cfg = Config(**parts)
    validate(cfg)
    return cfg


def _parse_cli_value(text: str) -> Any:
    """Parse an override value as a TOML value; a bare word that is not TOML is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ['--model.hidden_size=64', '--data.manifest', 's3://b/m'] into nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r} must look like --section.field=value")
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            i += 1
            text = args[i]
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"override --{key}: unknown section {section!r}; sections are: {', '.join(SECTIONS)}")
        out.setdefault(section, {})[name] = _parse_cli_value(text)
        i += 1
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or the defaults when path is None) and apply CLI overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of cfg with some fields changed, validated: replace(cfg, model={'num_layers': 2})."""
    raw = cfg.to_dict()
    for name, values in sections.items():
        raw[name].update(values)
    return from_dict(raw)
