"""Whole-model parity with transformers' Kimi_K25ForConditionalGeneration: config mapping both
ways, logits on (a) text, (b) text + two images of different sizes, (c) text + an 8-frame video,
then our weights converted back and through save_pretrained / from_pretrained unchanged."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from train.config import Config, ModelConfig, VisionConfig  # noqa: E402
from train.model import build_model  # noqa: E402
from train.model.hf_kimi import (config_from_hf, config_to_hf, state_dict_from_hf,  # noqa: E402
                                 state_dict_to_hf)
from train.model.vision import num_patches, vision_tokens  # noqa: E402

IMAGE, VIDEO = 126, 127  # placeholder ids (inside the vocabulary here; they need not be)
CFG = Config(
    model=ModelConfig(vocab_size=128, hidden_size=48, num_layers=2, first_k_dense=1,
                      intermediate_size=96, num_heads=2, q_lora_rank=32, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                      moe_intermediate_size=32, max_position_embeddings=256,
                      image_token_id=IMAGE, video_token_id=VIDEO),
    vision=VisionConfig(patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4,
                        merge_size=2, frames_per_chunk=4),
)


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def models():
    """A random float32 HF Kimi-K2.5 (every tensor perturbed) and ours loaded from it."""
    torch.manual_seed(0)
    hf_config = config_to_hf(CFG)
    hf = transformers.Kimi_K25ForConditionalGeneration._from_config(
        hf_config, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if not t.is_floating_point() or name.endswith(("inv_freq", "time_position_embeddings")):
                continue  # derived buffers, not weights
            if "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
            elif "position_embeddings" in name:
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
    cfg = config_from_hf(hf.config)  # build ours from the HF config, not from CFG
    ours = build_model(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    return hf, ours, cfg


def text_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, IMAGE, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_ours(ours, ids, patches=None, grid_thw=None):
    batch, seq = ids.shape
    with torch.no_grad():
        return ours(ids, position_ids=torch.arange(seq).expand(batch, seq),
                    doc_ids=torch.zeros(batch, seq, dtype=torch.long),
                    pixel_patches=patches, grid_thw=grid_thw)


def random_patches(grids, seed):
    grid_thw = torch.tensor(grids)
    patches = torch.randn(num_patches(grid_thw), 3 * CFG.vision.patch_size**2,
                          generator=torch.Generator().manual_seed(seed))
    return patches, grid_thw


def test_config_round_trip():
    back = config_from_hf(config_to_hf(CFG))
    assert back.model == CFG.model
    assert back.vision == CFG.vision


def test_a_text_only(models):
    hf, ours, _ = models
    ids = text_ids(2, 40, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert max_rel_diff(run_ours(ours, ids), ref) < 1e-4


def test_b_two_images_of_different_sizes(models):
    """Image 1 (6x10 patches -> 15 tokens) in row 0, image 2 (12x8 -> 24 tokens) in row 1."""
    hf, ours, _ = models
    grids = [[1, 6, 10], [1, 12, 8]]
    patches, grid_thw = random_patches(grids, seed=2)
    ids = text_ids(2, 48, seed=3)
    ids[0, 5:5 + 15] = IMAGE
    ids[1, 10:10 + 24] = IMAGE
    p = CFG.vision.patch_size
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=patches.view(-1, 3, p, p), image_grid_thw=grid_thw).logits
    assert max_rel_diff(run_ours(ours, ids, patches, grid_thw), ref) < 1e-4


def hf_video_embeddings(hf, patches, grid_thw):
    """The video tokens as HF computes them: vision_tower + mm_projector called directly.

    transformers 5.23's Kimi_K25Model.get_image_features (also used for videos) splits the
    projected tokens by t*h*w/4 per chunk, while a chunk yields only h*w/4 tokens (its frames
    are averaged), so `pixel_values_videos=` raises for t > 1. We therefore run HF's own tower
    and projector and hand the result over as `mm_encoder_outputs`, which the HF model then
    scatters into the video placeholders exactly as it would have.
    """
    p = CFG.vision.patch_size
    pooled = hf.model.vision_tower(patches.view(-1, 3, p, p), grid_thw=grid_thw).pooler_output
    return hf.model.mm_projector(pooled).squeeze(1)


def test_c_video_of_8_frames(models):
    """8 frames of 6x4 patches as two 4-frame chunks -> 2 x 6 video tokens, in one row."""
    hf, ours, _ = models
    grids = [[4, 6, 4], [4, 6, 4]]
    patches, grid_thw = random_patches(grids, seed=4)
    n = vision_tokens(grid_thw, CFG.vision.merge_size)
    assert n == 12
    ids = text_ids(1, 40, seed=5)
    ids[0, 7:7 + n] = VIDEO
    with torch.no_grad():
        video = hf_video_embeddings(hf, patches, grid_thw)
        ref = hf(input_ids=ids,
                 mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(video,))}).logits
    assert max_rel_diff(run_ours(ours, ids, patches, grid_thw), ref) < 1e-4


def test_images_and_video_in_one_batch(models):
    """Items ordered as their placeholder runs appear, row-major: image, video chunks, image."""
    hf, ours, _ = models
    grids = [[1, 4, 6], [4, 6, 4], [4, 6, 4], [1, 8, 8]]
    patches, grid_thw = random_patches(grids, seed=6)
    ids = text_ids(2, 40, seed=7)
    ids[0, 2:2 + 6] = IMAGE
    ids[0, 20:20 + 12] = VIDEO
    ids[1, 3:3 + 16] = IMAGE
    p = CFG.vision.patch_size
    sizes = grid_thw.prod(-1).tolist()
    image_rows = torch.cat([patches[:sizes[0]], patches[-sizes[3]:]])
    with torch.no_grad():
        video = hf_video_embeddings(hf, patches[sizes[0]:sizes[0] + sizes[1] + sizes[2]], grid_thw[1:3])
        image = hf.model.get_image_features(image_rows.view(-1, 3, p, p), grid_thw[[0, 3]])
        ref = hf(input_ids=ids, mm_encoder_outputs={
            "image": image, "video": BaseModelOutputWithPooling(pooler_output=(video,))}).logits
    assert max_rel_diff(run_ours(ours, ids, patches, grid_thw), ref) < 1e-4


def test_convert_back_and_save_pretrained_round_trip(models, tmp_path):
    hf, ours, cfg = models
    state = state_dict_to_hf(ours.state_dict(), cfg)
    reference = hf.state_dict()
    assert state.keys() == reference.keys()
    for k in reference:
        assert torch.equal(state[k], reference[k]), k

    fresh = transformers.Kimi_K25ForConditionalGeneration(config_to_hf(cfg)).float()
    fresh.load_state_dict(state, strict=True)
    fresh.save_pretrained(tmp_path)
    reloaded = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32).state_dict()
    assert reloaded.keys() == reference.keys()
    for k in reference:
        assert torch.equal(reloaded[k], reference[k]), k
