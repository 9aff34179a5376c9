import pytest
import torch
import torch.distributed as dist

from parallel.mesh import build_mesh, check_parallel_config
from tests.dist import run_distributed
from train.config import Config, replace
from train.errors import ConfigError


def _cfg(**parallel):
    base = dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4)
    base.update(parallel)
    return replace(Config(), parallel=base, data={"global_batch_size": 16})


def test_valid_layout_passes():
    check_parallel_config(_cfg(), 4)


def _raw(**parallel):
    """A config with fields set directly, bypassing config validation (as a hand-edited run)."""
    cfg = Config()
    cfg.data.global_batch_size = 16
    for k, v in {**dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4), **parallel}.items():
        setattr(cfg.parallel, k, v)
    return cfg


@pytest.mark.parametrize("parallel,world,needle", [
    (dict(), 8, "parallel.pp * parallel.dp = 2 * 2 = 4 does not match the world size 8"),
    (dict(dp=4, ep=3), 8, "parallel.ep=3 must divide parallel.dp=4"),
    (dict(dp=6, ep=3), 12, "model.n_routed_experts=8 is not divisible by parallel.ep=3"),
    (dict(virtual_stages=4), 4, "model.num_layers=4 cannot be split over parallel.pp * "
                                "parallel.virtual_stages = 2 * 4 = 8"),
    (dict(schedule="1f1b"), 4, "parallel.virtual_stages=2"),
    (dict(schedule="1f1b", virtual_stages=1, microbatches=1), 4,
     "parallel.microbatches=1 must be >= parallel.pp=2"),
    (dict(pp=4, dp=1, ep=1, virtual_stages=1, microbatches=9), 4,
     "parallel.microbatches=9 must be a multiple of the number of rounds max(1, microbatches // pp) = 2"),
    (dict(microbatches=3), 4, "data.global_batch_size=16 is not divisible by parallel.dp * "
                              "parallel.microbatches = 2 * 3 = 6"),
])
def test_bad_layouts_fail_naming_the_numbers(parallel, world, needle):
    with pytest.raises(ConfigError) as e:
        check_parallel_config(_raw(**parallel), world)
    assert needle in str(e.value)


def _groups(rank, world):
    cfg = _cfg(pp=2, dp=4, ep=2, virtual_stages=1, microbatches=2)
    m = build_mesh(cfg)

    def members(group):
        t = torch.tensor([rank])
        out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return [int(x) for x in out]

    return dict(pp=members(m.pp_group), dp=members(m.dp_group), ep=members(m.ep_group),
                edp=members(m.edp_group), coords=(m.pp_rank, m.dp_rank, m.edp_rank, m.ep_rank),
                rank=m.rank)


def test_mesh_groups_on_eight_ranks():
    out = run_distributed(_groups, 8)
    for r, o in enumerate(out):
        pp_rank, dp_rank = divmod(r, 4)
        assert o["rank"] == r
        assert o["coords"] == (pp_rank, dp_rank, dp_rank // 2, dp_rank % 2)
        assert o["pp"] == [dp_rank, 4 + dp_rank]
        assert o["dp"] == [4 * pp_rank + i for i in range(4)]
        assert o["ep"] == [r - r % 2, r - r % 2 + 1]
        assert o["edp"] == [4 * pp_rank + (dp_rank % 2), 4 * pp_rank + (dp_rank % 2) + 2]
