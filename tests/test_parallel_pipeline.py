"""Pipeline split + schedules vs the single-process model: loss and every gradient."""

import pytest
import torch

from parallel.batch import split_microbatches
from parallel.mesh import build_mesh
from parallel.pipeline import PipelineRunner, chunk_layer_keys, layer_counts, split_model
from tests.dist import run_distributed
from tests.grad_check import assert_grads_match, merge_ranks, model_grads
from tests.parallel_fixtures import IMAGE, VIDEO, make_batch, tiny_config
from train.model import build_model, init_weights
from train.model.lm import lm_loss_sum


def test_layer_counts_uneven_and_explicit():
    assert layer_counts(4, 4) == [1, 1, 1, 1]
    assert layer_counts(10, 4) == [2, 3, 3, 2]  # extras to the middle chunks first
    assert layer_counts(11, 4) == [3, 3, 3, 2]
    assert layer_counts(5, 2) == [3, 2]
    assert chunk_layer_keys(5, [1, 4]) == [["0"], ["1", "2", "3", "4"]]
    with pytest.raises(ValueError, match="3 layers cannot fill 4"):
        layer_counts(3, 4)
    with pytest.raises(ValueError, match=r"must be >= 1 each and sum to 5"):
        chunk_layer_keys(5, [0, 5])


def test_split_keeps_names_and_pieces():
    cfg = tiny_config()
    model = build_model(cfg)
    names = {n for n, _ in model.named_parameters()}
    got = {}
    for rank in range(2):
        for stage, mod in split_model(model, 2, 2, rank, vision_in_first_stage=True):
            assert (mod.lm.embed is not None) == (stage == 0)
            assert (mod.lm.head is not None) == (stage == 3)
            assert (mod.vision is not None) == (stage == 0)
            assert list(mod.lm.layers.keys()) == [str(stage)]
            for n, p in mod.named_parameters():
                assert n not in got
                got[n] = p
    assert set(got) == names
    assert len(list(model.lm.layers)) == 4  # the input model is untouched


def _reference(cfg, batch):
    model = build_model(cfg)
    init_weights(model, 0)
    logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                   doc_ids=batch["doc_ids"], pixel_patches=batch["pixel_patches"],
                   grid_thw=batch["grid_thw"])
    s, n = lm_loss_sum(logits, batch["labels"], batch["loss_mask"])
    (s / n).backward()
    return (s / n).item(), model_grads(model)


def _pipeline(rank, world, cfg, batch):
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    p = cfg.parallel
    stages = split_model(model, p.pp, p.virtual_stages, mesh.pp_rank, vision_in_first_stage=True)
    runner = PipelineRunner(stages, p.pp * p.virtual_stages, mesh.pp_group, p.microbatches,
                            p.schedule, cfg.model.hidden_size, cfg.model.vocab_size)
    mbs = split_microbatches(batch, p.microbatches, image_token_id=IMAGE, video_token_id=VIDEO,
                             merge_size=cfg.vision.merge_size)
    kwargs = [dict(position_ids=mb.position_ids, doc_ids=mb.doc_ids,
                   pixel_patches=mb.pixel_patches, grid_thw=mb.grid_thw) for mb in mbs]
    losses = runner.run([mb.input_ids for mb in mbs], kwargs, [mb.target for mb in mbs],
                        float(batch["loss_mask"].sum()))
    grads = {n: q.grad for _, m in stages for n, q in m.named_parameters()}
    return sum(x.item() for x in losses), grads


@pytest.mark.parametrize("schedule,v", [("interleaved_1f1b", 2), ("1f1b", 1),
                                        ("interleaved_zero_bubble", 2)])
def test_pipeline_matches_single_process(schedule, v):
    cfg = tiny_config(pp=2, virtual_stages=v, microbatches=4, schedule=schedule)
    batch = make_batch(8, 32, seed=1)
    assert batch["grid_thw"] is not None and (batch["grid_thw"][:, 0] > 1).any()  # video too
    ref_loss, ref_grads = _reference(cfg, batch)
    out = run_distributed(_pipeline, 2, cfg, batch, timeout=120)
    assert out[0][0] == 0.0  # rank 0 holds no last stage
    torch.testing.assert_close(torch.tensor(out[1][0]), torch.tensor(ref_loss), rtol=0, atol=1e-6)
    assert_grads_match(merge_ranks([out[0][1], out[1][1]]), ref_grads, atol=1e-6)
