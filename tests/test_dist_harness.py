import pytest
import torch
import torch.distributed as dist

from tests.dist import DistributedTestError, run_distributed


def _sum_ranks(rank, world, scale):
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item(), torch.get_num_threads()


def test_all_reduce_on_four_ranks():
    out = run_distributed(_sum_ranks, 4, 2.0)
    assert [v for v, _ in out] == [12.0] * 4
    assert all(threads == 1 for _, threads in out)


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()


def test_failure_reports_the_failing_ranks_traceback():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_fail_on_rank_one, 2, timeout=30)
    assert "rank 1 raised" in str(e.value) and "boom on rank one" in str(e.value)


def _hang(rank, world):
    import time
    time.sleep(60)


def test_timeout_kills_all_ranks():
    with pytest.raises(DistributedTestError, match="gave no result"):
        run_distributed(_hang, 2, timeout=2)
