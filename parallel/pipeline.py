"""Pipeline parallelism with virtual stages on `torch.distributed.pipelining`.

Splitting (torchtitan style): the decoder is cut into pp * v chunks; pipeline rank r holds the
chunks (virtual stages) r, r + pp, r + 2 pp, ... Each chunk is a new decoder shell that holds
only the pieces it owns, the same module objects as the model's, never copies (layer keys stay
"0".."L-1", so parameter names equal the whole model's: `lm.layers.7.attn...`). Chunk 0 keeps
the embedding (and, without DEP, the vision tower), the last chunk the final norm and head. A rank
splits a model built on the meta device and materialises only its chunks afterwards
(parallel/pieces.py; `init_weights` is keyed by name, so the values equal the whole model's).

Running: `ScheduleInterleaved1F1B` (default), `Schedule1F1B` or `ScheduleInterleavedZeroBubble`.
Micro-batches are built by the caller (parallel/batch.py) and handed to the schedule already split,
because their vision tensors differ in size from one micro-batch to the next (the schedule's own
`step()` can only `tensor_split` equal pieces). Packed-sequence metadata (position ids, doc ids)
travels as keyword arguments to every stage; labels + loss mask are the loss target. The loss of
a micro-batch is its summed token loss divided by the loss-token count of the whole global batch,
with gradient scaling off, so the summed gradients equal the single-process ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.pipelining import (Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)

from parallel.main_grad import MainGradStage
from train.model.lm import lm_head_loss_sum, lm_loss_sum


def layer_counts(num_layers: int, num_chunks: int) -> list[int]:
    """Layers per chunk: as even as possible; extra layers go to the middle chunks first, since
    the first chunk also embeds (and may encode images) and the last one runs the head."""
    if num_layers < num_chunks:
        raise ValueError(f"{num_layers} layers cannot fill {num_chunks} pipeline chunks")
    base, extra = divmod(num_layers, num_chunks)
    counts = [base] * num_chunks
    order = list(range(1, num_chunks - 1)) + [0, num_chunks - 1] if num_chunks > 2 else \
        list(range(num_chunks))
    for c in order[:extra]:
        counts[c] += 1
    return counts


def chunk_layer_keys(num_layers: int, counts: Sequence[int]) -> list[list[str]]:
    if sum(counts) != num_layers or any(c < 1 for c in counts):
        raise ValueError(f"layer counts {list(counts)} must be >= 1 each and sum to {num_layers}")
    keys, start = [], 0
    for c in counts:
        keys.append([str(i) for i in range(start, start + c)])
        start += c
    return keys


class StageModule(nn.Module):
    """One pipeline chunk: a pruned decoder, plus the vision tower on chunk 0 without DEP.

    forward(x, position_ids=, doc_ids=, vision_embeds=None, pixel_patches=None, grid_thw=None):
    x is input_ids on chunk 0, hidden states elsewhere. Vision arguments reach every local chunk
    (the schedule hands the same keyword arguments to all of a rank's stages); only chunk 0
    uses them.
    """

    def __init__(self, lm: nn.Module, vision: nn.Module | None, is_first: bool):
        super().__init__()
        self.lm = lm
        self.vision = vision
        self.is_first = is_first

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                vision_embeds: torch.Tensor | None = None, pixel_patches: torch.Tensor | None = None,
                grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_first:
            vision_embeds = None
        elif pixel_patches is not None:
            if self.vision is None:
                raise ValueError("pixel patches reached pipeline chunk 0, which has no vision "
                                 "tower (with DEP on, pass vision_embeds instead)")
            vision_embeds = self.vision(pixel_patches, grid_thw)
        return self.lm(x, position_ids=position_ids, doc_ids=doc_ids, vision_embeds=vision_embeds)


def _shell(module: nn.Module) -> nn.Module:
    """A shallow copy of module with registries of its own: its children and parameters can be
    replaced without touching the original, and nothing below it is copied."""
    shell = copy.copy(module)
    shell.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set)) else v
                      for k, v in module.__dict__.items()}
    return shell


def split_model(model: nn.Module, pp: int, virtual_stages: int, pp_rank: int, *,
                vision_in_first_stage: bool, counts: Sequence[int] | None = None
                ) -> list[tuple[int, StageModule]]:
    """(stage index, StageModule) for the chunks pipeline rank pp_rank holds.

    model is a KimiK25 (attributes `lm`, `vision`) or a bare DecoderLM. It is not modified, but
    the chunks share its modules (nothing is copied): a rank builds its own model to split.
    """
    lm = getattr(model, "lm", model)
    vision = getattr(model, "vision", None)
    num_layers = len(lm.layers)
    n_chunks = pp * virtual_stages
    keys = chunk_layer_keys(num_layers, counts or layer_counts(num_layers, n_chunks))
    out = []
    for stage in range(pp_rank, n_chunks, pp):
        chunk = _shell(lm)
        chunk.layers = nn.ModuleDict({k: lm.layers[k] for k in keys[stage]})
        if stage != 0:
            chunk.embed = None
        if stage != n_chunks - 1:
            chunk.norm = None
            chunk.head = None
        tower = vision if (stage == 0 and vision_in_first_stage) else None
        out.append((stage, StageModule(chunk, tower, is_first=stage == 0)))
    return out


class PipelineRunner:
    """Builds the stages and schedule for one micro-batch shape and runs steps on it."""

    SCHEDULES = {"interleaved_1f1b": ScheduleInterleaved1F1B, "1f1b": Schedule1F1B,
                 "interleaved_zero_bubble": ScheduleInterleavedZeroBubble}

    def __init__(self, stage_modules: list[tuple[int, StageModule]], num_stages: int,
                 pp_group, microbatches: int, schedule: str, hidden_size: int, vocab_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 loss_chunk_tokens: int = 0):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule {schedule!r}; choose one of {sorted(self.SCHEDULES)}")
        self.stage_modules = stage_modules
        self.num_stages = num_stages
        self.pp_group = pp_group
        self.microbatches = microbatches
        self.schedule_name = schedule
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.dtype, self.device = dtype, torch.device(device)
        self._built_for: tuple[int, int] | None = None
        self.schedule = None
        self._n_tokens = 1.0  # loss-token count of the global batch, set per step
        # loss_chunk_tokens > 0: the last stage outputs normed hidden states and the loss
        # applies the head chunk by chunk (lm_head_loss_sum), never whole logits.
        self.loss_chunk_tokens = loss_chunk_tokens
        self._head: nn.Linear | None = None
        for idx, module in stage_modules:
            if idx == num_stages - 1 and loss_chunk_tokens > 0:
                module.lm.head_in_loss = True
                self._head = module.lm.head

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target [B, S, 2] = (labels, loss mask): summed loss over the global token count.
        (The count is an attribute, not a loss kwarg: torch < 2.13 schedules take none.)"""
        if self._head is not None:  # `logits` are the normed hidden states
            return lm_head_loss_sum(logits, self._head.weight, target[..., 0], target[..., 1],
                                    self.loss_chunk_tokens)[0] / self._n_tokens
        return lm_loss_sum(logits, target[..., 0], target[..., 1])[0] / self._n_tokens

    def modules(self) -> list[StageModule]:
        return [m for _, m in self.stage_modules]

    def _build(self, mb_rows: int, seq_len: int) -> None:
        """Stages with static shapes: no metadata-inference forward (it would run MoE
        all-to-alls on meta tensors). The example tensors must carry requires_grad for the
        activations: static mode takes it from them, and without it no gradient crosses a stage
        boundary (the failure shows as "grad can be implicitly created only for scalar outputs")."""
        def meta(*shape, dtype):
            t = torch.empty(shape, dtype=dtype, device="meta")
            return t.requires_grad_(True) if dtype.is_floating_point else t
        hidden = meta(mb_rows, seq_len, self.hidden_size, dtype=self.dtype)
        stages = []
        for idx, module in self.stage_modules:
            inp = meta(mb_rows, seq_len, dtype=torch.long) if idx == 0 else hidden
            out = (meta(mb_rows, seq_len, self.vocab_size, dtype=self.dtype)
                   if idx == self.num_stages - 1 and self._head is None else hidden)
            stages.append(MainGradStage(module, idx, self.num_stages, self.device,
                                        input_args=(inp,), output_args=(out,), group=self.pp_group))
        cls = self.SCHEDULES[self.schedule_name]
        arg = stages[0] if cls is Schedule1F1B else stages
        self.schedule = cls(arg, self.microbatches, loss_fn=self._loss, scale_grads=False)
        self._built_for = (mb_rows, seq_len)

    def run(self, inputs: list[torch.Tensor], kwargs: list[dict], targets: list[torch.Tensor],
            n_loss_tokens: float) -> list[torch.Tensor]:
        """One forward+backward over all micro-batches; returns the last stage's per-micro-batch
        losses (empty on other ranks). Gradients accumulate in fp32 over the micro-batches: in
        `.grad` of fp32 params, in `main_grad` of low-precision ones (parallel/main_grad.py)."""
        shape = tuple(inputs[0].shape)
        if self._built_for != shape:
            self._build(*shape)
        sched = self.schedule
        # What `schedule.step()` does before running pre-split micro-batches.
        stages = sched._stages if hasattr(sched, "_stages") else [sched._stage]
        for st in stages:
            st.has_backward = sched._has_backward
            st.clear_runtime_states()
        losses: list[torch.Tensor] = []
        self._n_tokens = float(n_loss_tokens)
        sched._step_microbatches([(x,) for x in inputs], kwargs, targets, losses,
                                 return_outputs=False)
        return losses
