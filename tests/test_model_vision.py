"""MoonViT-3D vision tower: parity with transformers' Kimi_K25VisionModel + projector, layout, errors."""

import pytest
import torch

from train.config import VisionConfig
from train.model.hf_kimi import vision_config_to_hf, vision_state_from_hf, vision_state_to_hf
from train.model.vision import VisionTower, num_patches, vision_tokens

transformers = pytest.importorskip("transformers")
from transformers.models.kimi_k25 import modeling_kimi_k25 as hf_kimi  # noqa: E402

LM_HIDDEN = 24
# Tiny but complete: 2 heads of width 16 (axial rope needs head_dim % 4 == 0), an 8x8 learned
# position grid (images below are smaller, equal and larger -> down-, no- and up-sampling).
CFG = VisionConfig(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                   pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, merge_size=2, frames_per_chunk=4)


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (the tolerance measure used by all parity tests)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_hf_pair(seed: int = 0):
    """A random HF vision tower + projector (float32, eager attention) and ours with its weights."""
    torch.manual_seed(seed)
    hf_fields = vision_config_to_hf(CFG)
    config = transformers.Kimi_K25Config(
        vision_config=hf_fields["vision_config"],
        text_config={"model_type": "deepseek_v3", "hidden_size": LM_HIDDEN},
        projection_hidden_size=hf_fields["projection_hidden_size"],
        projection_layer_norm_eps=hf_fields["projection_layer_norm_eps"],
    )
    config.vision_config._attn_implementation = "eager"
    tower = hf_kimi.Kimi_K25VisionModel(config.vision_config).eval()
    projector = hf_kimi.Kimi_K25MultimodalProjection(config).eval()
    # Every tensor random (biases and norm scales too) so a swapped or dropped weight shows.
    with torch.no_grad():
        for name, p in [*tower.named_parameters(), *projector.named_parameters()]:
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "position_embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    hf_state = {"model.vision_tower." + k: v for k, v in tower.state_dict().items()}
    hf_state.update({"model.mm_projector." + k: v for k, v in projector.state_dict().items()})

    ours = VisionTower(CFG, LM_HIDDEN).eval()
    ours.load_state_dict(vision_state_from_hf(hf_state, CFG.num_layers), strict=True)
    return tower, projector, hf_state, ours


def hf_reference(tower, projector, patches: torch.Tensor, grid_thw: torch.Tensor):
    """HF encoder features and projected tokens. HF's temporal merge index cannot mix items of
    different frame counts in one call (transformers 5.23 stacks [tokens, t, 4] rows), so items
    are run in runs of equal t; attention is per item anyway, so this changes no number."""
    p = CFG.patch_size
    hidden, tokens = [], []
    sizes = grid_thw.prod(-1).tolist()
    start = 0
    while start < len(sizes):
        end = start + 1
        while end < len(sizes) and grid_thw[end, 0] == grid_thw[start, 0]:
            end += 1
        first, last = sum(sizes[:start]), sum(sizes[:end])
        out = tower(patches[first:last].view(-1, 3, p, p), grid_thw=grid_thw[start:end])
        hidden.append(out.last_hidden_state)
        tokens.append(projector(out.pooler_output).squeeze(1))
        start = end
    return torch.cat(hidden), torch.cat(tokens)


def random_inputs(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grids, dtype=torch.long)
    patches = torch.randn(num_patches(grid_thw), 3 * CFG.patch_size**2, generator=g)
    return patches, grid_thw


# Two images of different sizes (6x10 and 12x8 patches, one smaller, one larger than the 8x8
# grid), then an 8-frame video as two chunks of 4 frames (6x4 patches each).
IMAGES = [[1, 6, 10], [1, 12, 8]]
VIDEO = [[4, 6, 4], [4, 6, 4]]


@pytest.mark.parametrize("grids", [IMAGES, VIDEO, IMAGES + VIDEO, [[1, 8, 8], [3, 4, 6]]],
                         ids=["two_images", "video_8_frames", "images_and_video", "same_grid_and_3_frames"])
def test_parity_with_hf(grids):
    tower, projector, _, ours = build_hf_pair()
    patches, grid_thw = random_inputs(grids)
    with torch.no_grad():
        ref_hidden, ref_out = hf_reference(tower, projector, patches, grid_thw)
        hidden = ours.encode(patches, grid_thw)
        out = ours(patches, grid_thw)
    assert out.shape == (vision_tokens(grid_thw), LM_HIDDEN) == ref_out.shape
    assert out.shape[0] == sum((h // 2) * (w // 2) for _, h, w in grids)
    assert max_rel_diff(hidden, ref_hidden) < 1e-4
    assert max_rel_diff(out, ref_out) < 1e-4


def test_images_and_video_share_weights_and_items_are_independent():
    """Encoding items together equals encoding each alone: attention never crosses items."""
    _, _, _, ours = build_hf_pair()
    patches, grid_thw = random_inputs(IMAGES + VIDEO)
    with torch.no_grad():
        together = ours(patches, grid_thw)
        alone = [ours(p, grid_thw[i:i + 1])
                 for i, p in enumerate(patches.split(grid_thw.prod(-1).tolist()))]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_video_frames_are_averaged_and_time_embedded():
    """A 4-frame chunk of identical frames differs from the single image (time embedding), and
    permuting frames changes the output (time embedding is per frame)."""
    _, _, _, ours = build_hf_pair()
    frame, _ = random_inputs([[1, 4, 4]])
    same = frame.repeat(4, 1)
    with torch.no_grad():
        image = ours(frame, torch.tensor([[1, 4, 4]]))
        video = ours(same, torch.tensor([[4, 4, 4]]))
    assert image.shape == video.shape == (4, LM_HIDDEN)
    assert not torch.allclose(image, video, atol=1e-4)


def test_weight_conversion_round_trip():
    _, _, hf_state, ours = build_hf_pair()
    back = vision_state_to_hf(ours.state_dict(), CFG.num_layers, CFG.patch_size)
    assert back.keys() == hf_state.keys()
    for k in hf_state:
        assert torch.equal(back[k], hf_state[k]), k


def test_meta_build_and_deterministic_init():
    """The tower builds on the meta device and the shared init_weights fills it reproducibly."""
    from train.model import init_weights

    with torch.device("meta"):
        tower = VisionTower(CFG, LM_HIDDEN)
    tower.to_empty(device="cpu")
    init_weights(tower, seed=3)
    again = VisionTower(CFG, LM_HIDDEN)
    init_weights(again, seed=3)
    for (name, a), (_, b) in zip(tower.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    patches, grid_thw = random_inputs(IMAGES)
    assert torch.isfinite(tower(patches, grid_thw)).all()


@pytest.mark.parametrize("grid, message", [
    ([[5, 4, 4]], "frames_per_chunk"),
    ([[1, 5, 4]], "merge_size"),
    ([[1, 4, 4], [1, 2, 2]], "pixel_patches has shape"),
])
def test_bad_grids_are_clear_errors(grid, message):
    _, _, _, ours = build_hf_pair()
    patches, _ = random_inputs([[1, 4, 4]])
    with pytest.raises(ValueError, match=message):
        ours(patches if message == "pixel_patches has shape" else torch.zeros(num_patches(grid), 48),
             torch.tensor(grid))
