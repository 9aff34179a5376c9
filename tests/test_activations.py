"""Activation-memory settings (train/model/activations.py): recomputation and offload change
only what backward keeps, so losses and every gradient are bit-identical in fp32; FP8 storage
stays within a stated bound of bf16 storage; bad settings fail naming the field."""

import pytest
import torch

from tests.parallel_fixtures import make_batch, tiny_config
from train.config import ActivationConfig, replace
from train.errors import ConfigError
from train.model import build_lm, init_weights
from train.model.activations import (HostStore, apply_activation_memory, check_support,
                                     fp8_dequantize, fp8_quantize)
from train.model.lm import lm_loss_sum
from train.model.moe import moe_layers

SETTINGS = {
    "selective": dict(recompute="selective"),
    "selective+moe_down": dict(recompute="selective", recompute_moe_down=True),
    "full": dict(recompute="full"),
    "offload": dict(offload=True),
    "selective+offload": dict(recompute="selective", offload=True),
    "full+offload": dict(recompute="full", offload=True),
}


def _lm(dtype=torch.float32, grouped=True, record_max_logits=False):
    lm = build_lm(tiny_config().model)
    init_weights(lm, 0)
    lm.to(dtype)
    for m in lm.modules():
        if hasattr(m, "use_grouped_mm"):
            m.use_grouped_mm = grouped
        if hasattr(m, "record_max_logits"):
            m.record_max_logits = record_max_logits
    return lm


def _step(lm, batch):
    """Loss, every gradient, and what forwards record (expert loads, QK-Clip max logits)."""
    logits = lm(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    s, n = lm_loss_sum(logits, batch["labels"], batch["loss_mask"])
    (s / n).backward()
    grads = {k: p.grad.clone() for k, p in lm.named_parameters()}
    records = {k: m.expert_load_total.clone() for k, m in moe_layers(lm).items()}
    records.update({k: m.last_max_logits.clone() for k, m in lm.named_modules()
                    if getattr(m, "last_max_logits", None) is not None})
    return (s / n).detach(), grads, records


def _batch():
    return make_batch(2, 32, seed=3, vision=False)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "expert_loop"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_setting_gives_bit_identical_gradients_fp32(name, grouped):
    """Tiny model: a dense layer and three MoE layers (8 experts, top 2, a shared expert)."""
    batch = _batch()
    ref = _step(_lm(grouped=grouped, record_max_logits=True), batch)
    lm = apply_activation_memory(_lm(grouped=grouped, record_max_logits=True),
                                 ActivationConfig(**SETTINGS[name]))
    got = _step(lm, batch)
    assert torch.equal(got[0], ref[0])
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        assert torch.equal(got[1][k], ref[1][k]), k
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:  # recomputation must not count expert loads twice
        assert torch.equal(got[2][k], ref[2][k]), k


def test_offload_moves_every_saved_activation_to_the_host_store():
    """With offload, the layers' saved tensors are host copies (parameters excepted), and
    backward reads them back from there."""
    packed, unpacked = [], []

    class Spy(HostStore):
        def pack(self, t):
            out = super().pack(t)
            packed.append(out)
            return out

        def unpack(self, p):
            unpacked.append(p)
            return super().unpack(p)

    batch = _batch()
    ref = _step(_lm(), batch)
    lm = apply_activation_memory(_lm(), ActivationConfig(offload=True), store=Spy("cpu"))
    got = _step(lm, batch)
    assert packed and len(unpacked) >= len(packed)
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    assert not any(o.host.untyped_storage().data_ptr() in params for o in packed)
    for k in ref[1]:
        assert torch.equal(got[1][k], ref[1][k]), k


def test_fp8_tiles_round_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g) * torch.logspace(-3, 3, 300)  # tiles of mixed scale
    codes, scale = fp8_quantize(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (5, 384)  # 300 -> 3 tiles
    assert scale.dtype == torch.float32 and scale.shape == (5, 3)
    y = fp8_dequantize(codes, scale, 300, torch.float32)
    tile_scale = scale.repeat_interleave(128, dim=1)[:, :300]
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals (below 2^-6 * scale) 2^-10 * scale.
    assert bool(((y - x).abs() <= x.abs() * 2 ** -4 + tile_scale * 2 ** -10).all())


# Measured on this tiny model (norm-wise relative difference per parameter of the gradients with
# FP8 storage from those with bf16 storage): max 0.034, on the routed experts' gate / up
# weights, whose gradient reads the FP8 copy of the input directly (E4M3 rounds by up to 2^-4);
# median 0.006. For scale, bf16 against fp32 gives about 0.01. The test allows 0.05.
FP8_GRAD_REL_BOUND = 0.05


@pytest.mark.parametrize("settings", [
    dict(), dict(recompute="selective"),
    dict(recompute="selective", recompute_moe_down=True, offload=True)],
    ids=["none", "selective", "selective+moe_down+offload"])
def test_fp8_storage_gradients_within_bound_of_bf16(settings):
    batch = _batch()
    ref = _step(_lm(torch.bfloat16), batch)
    lm = apply_activation_memory(_lm(torch.bfloat16),
                                 ActivationConfig(fp8_storage=True, **settings))
    got = _step(lm, batch)
    assert torch.equal(got[0], ref[0])  # the forward is untouched
    worst = 0.0
    for k, g_ref in ref[1].items():
        denom = g_ref.float().norm()
        if denom > 0:
            worst = max(worst, float((got[1][k].float() - g_ref.float()).norm() / denom))
    print(f"fp8 storage ({settings}): worst relative gradient difference {worst:.4f}")
    assert 0 < worst < FP8_GRAD_REL_BOUND, worst


def test_bad_settings_name_the_field(monkeypatch):
    cfg = tiny_config()
    with pytest.raises(ConfigError,
                       match=r"activations\.recompute_moe_down.*recompute='selective'"):
        replace(cfg, activations=dict(recompute_moe_down=True))
    with pytest.raises(ConfigError, match=r"activations\.recompute_moe_down.*no MoE layer"):
        replace(cfg, model=dict(first_k_dense=4),
                activations=dict(recompute="selective", recompute_moe_down=True))
    with pytest.raises(ConfigError, match=r"activations\.fp8_storage"):
        replace(cfg, activations=dict(recompute="full", fp8_storage=True))
    with pytest.raises(ConfigError, match=r"activations\.recompute"):
        replace(cfg, activations=dict(recompute="attention"))
    with pytest.raises(ConfigError, match=r"activations\.loss_chunk_tokens"):
        replace(cfg, activations=dict(loss_chunk_tokens=-1))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"activations\.offload.*pinned"):
            check_support(ActivationConfig(offload=True), "cuda")
    check_support(ActivationConfig(offload=True), "cpu")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError, match=r"activations\.fp8_storage.*float8"):
        check_support(ActivationConfig(fp8_storage=True), "cpu")


SETTINGS_FOR_FLASH = {"none": ActivationConfig(),
                      "selective": ActivationConfig(recompute="selective")}


def test_measured_saved_bytes_per_setting_small_width():
    """The bench's measurement (bench/activation_memory.py, which runs it at K2.5 width) on a
    narrow MoE layer: each setting keeps less than the one before, offload keeps nothing saved
    on the device, full recomputation keeps only the layer's inputs."""
    from train.model.activation_probe import moe_layer_config, per_token_table
    from train.config import ModelConfig

    m = ModelConfig(hidden_size=256, num_heads=4, q_lora_rank=128, kv_lora_rank=64,
                    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=128)
    t = per_token_table(moe_layer_config(m, 8), [64, 128], torch.bfloat16)
    dev = {k: e["device_bytes_per_token"] for k, e in t.items()}
    assert dev["none"] > dev["selective"] > dev["selective+fp8"] > dev["selective+moe_down+fp8"]
    assert t["none"]["device_bytes_per_token_per_seq"] > 0  # sdpa's saved probabilities
    off = t["selective+fp8+offload"]
    assert off["device_bytes_per_token"] == 0 and off["device_bytes_per_token_per_seq"] == 0
    # The host holds what stays on the device without offload (views copied one by one).
    host = off["host_bytes_per_token"]
    assert dev["selective+fp8"] * 0.9 < host < dev["selective+fp8"] * 1.1
    assert t["full"]["device_bytes_per_token"] <= (m.hidden_size + 2 * m.qk_rope_head_dim) * 2
    assert t["full"]["device_bytes_per_token_per_seq"] == 0
    # With a core that saves q, k, v themselves (flash-style, as on GPUs), selective
    # recomputation also drops those (the MLA up-projections' outputs).
    f = per_token_table(moe_layer_config(m, 8), [64, 128], torch.bfloat16,
                        settings=SETTINGS_FOR_FLASH,
                        attention="flash")
    qkv_bytes = m.num_heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + m.v_head_dim) * 2
    saved_by_selective = (f["none"]["device_bytes_per_token"]
                          - f["selective"]["device_bytes_per_token"])
    assert saved_by_selective > dev["none"] - dev["selective"] + 0.9 * qkv_bytes


@pytest.mark.parametrize("settings,schedule", [
    (dict(recompute="selective", recompute_moe_down=True, offload=True), "interleaved_1f1b"),
    (dict(recompute="full"), "interleaved_1f1b"),
    (dict(recompute="selective", offload=True), "interleaved_zero_bubble")],
    ids=["selective+moe_down+offload", "full", "selective+offload-zero_bubble"])
def test_runtime_with_settings_matches_single_process_pp2_v2_dp2_ep2(settings, schedule):
    """The runtime applies the settings to every pipeline chunk (after the EP split: under
    full recomputation the backward replays the all-to-alls; the zero-bubble schedule splits
    backward into input and weight passes over the same saved tensors); steps against the
    plain single-process reference, as the runtime's own equivalence tests."""
    from tests.test_parallel_runtime import _compare, _steps

    cfg = replace(tiny_config(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4,
                              schedule=schedule), activations=settings)
    _compare(cfg, 4, _steps(2, 4))


def test_training_with_fp8_storage_tracks_bf16_storage_few_steps():
    """The short version of bench/fp8_storage_run.py (200 steps, results in bench/results):
    same first loss (the forward is untouched), then within the band the bench states."""
    from bench.fp8_storage_run import compare

    r = compare(6)
    assert r["first_step_equal"]
    assert r["loss_bf16_storage"][-1] < r["loss_bf16_storage"][0] - 0.1  # it does learn
    assert r["max_abs_step_diff"] < 0.02, r["max_abs_step_diff"]
