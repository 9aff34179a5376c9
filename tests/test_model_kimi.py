"""KimiK25 (decoder + vision tower): build on meta, deterministic init, fusion order, errors,
gradients into the tower. HF parity of the same model is in test_hf_kimi.py."""

import pytest
import torch

from train.config import load_config, replace
from train.model import build_model, init_weights
from train.model.lm import lm_loss_sum
from train.model.vision import num_patches, vision_tokens

CFG = replace(load_config("configs/tiny.toml"),
              model={"num_layers": 2, "vocab_size": 256, "image_token_id": 3, "video_token_id": 4},
              vision={"patch_size": 4, "pos_emb_height": 8, "pos_emb_width": 8})
P = CFG.vision.patch_size


def tiny_model(seed: int = 0):
    model = build_model(CFG)
    init_weights(model, seed)
    return model.eval()


def inputs(grids, seed):
    gen = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grids)
    return torch.randn(num_patches(grid_thw), 3 * P * P, generator=gen), grid_thw


def forward(model, ids, patches=None, grid_thw=None):
    b, s = ids.shape
    return model(ids, position_ids=torch.arange(s).expand(b, s),
                 doc_ids=torch.zeros(b, s, dtype=torch.long), pixel_patches=patches, grid_thw=grid_thw)


def test_meta_build_and_init_are_deterministic():
    with torch.device("meta"):
        meta = build_model(CFG)
    meta.to_empty(device="cpu")
    init_weights(meta, 7)
    plain = build_model(CFG)
    init_weights(plain, 7)
    other = build_model(CFG)
    init_weights(other, 8)
    a, b, c = meta.state_dict(), plain.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("vision.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["vision.pos_grid"], c["vision.pos_grid"])


def test_k25_vision_encoder_size():
    """The published MoonViT-3D is SigLIP-SO400M sized: about 0.4B parameters."""
    with torch.device("meta"):
        model = build_model(load_config("configs/k2.5.toml"))
    encoder = sum(p.numel() for n, p in model.vision.named_parameters() if not n.startswith("projector"))
    assert 0.38e9 < encoder < 0.44e9


def test_items_fill_placeholder_runs_in_row_major_order():
    """A batch of two rows with one image each equals each row run alone with its own image."""
    model = tiny_model()
    grids = [[1, 4, 6], [1, 6, 4]]
    patches, grid_thw = inputs(grids, seed=1)
    ids = torch.randint(5, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    ids[0, 4:10] = CFG.model.image_token_id   # 6 tokens: item 0
    ids[1, 1:7] = CFG.model.video_token_id    # 6 tokens: item 1 (either placeholder id works)
    first = grid_thw[0].prod().item()
    with torch.no_grad():
        both = forward(model, ids, patches, grid_thw)
        row0 = forward(model, ids[:1], patches[:first], grid_thw[:1])
        row1 = forward(model, ids[1:], patches[first:], grid_thw[1:])
        swapped = forward(model, ids, torch.cat([patches[first:], patches[:first]]), grid_thw[[1, 0]])
    torch.testing.assert_close(both, torch.cat([row0, row1]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both, swapped, atol=1e-3)


def test_gradients_reach_the_vision_tower():
    model = tiny_model()
    model.train()
    patches, grid_thw = inputs([[1, 4, 4], [2, 4, 4]], seed=3)
    n = vision_tokens(grid_thw, CFG.vision.merge_size)
    ids = torch.randint(5, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    ids[0, 2:2 + n] = CFG.model.image_token_id
    logits = forward(model, ids, patches, grid_thw)
    loss, count = lm_loss_sum(logits, torch.roll(ids, -1, 1), torch.ones_like(ids, dtype=torch.bool))
    (loss / count).backward()
    for name in ("patch_embed.weight", "pos_grid", "blocks.0.attn.q_proj.weight", "projector.out_proj.weight"):
        grad = model.vision.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_clear_errors():
    model = tiny_model()
    patches, grid_thw = inputs([[1, 4, 4]], seed=5)
    ids = torch.full((1, 8), 7)
    with pytest.raises(ValueError, match="4 vision embeddings"):  # no placeholders in ids
        forward(model, ids, patches, grid_thw)
    with pytest.raises(ValueError, match="together"):
        forward(model, ids, patches, None)
    no_vision = build_model(replace(CFG, vision={"enabled": False}))
    assert no_vision.vision is None
    with pytest.raises(ValueError, match="vision.enabled"):
        forward(no_vision, ids, patches, grid_thw)
