import os

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


def test_timeout_stops_all_ranks_and_shows_where_they_were():
    with pytest.raises(DistributedTestError, match="gave no result") as e:
        run_distributed(_hang, 2, timeout=2)
    for r in (0, 1):
        assert f"--- rank {r} stderr (end) ---" in str(e.value)
    assert "in _hang" in str(e.value)


def _abort_in_native_code(rank, world):
    import sys
    print("about to abort", file=sys.stderr, flush=True)
    os.abort()  # what a C++ std::terminate does


def test_a_crashed_rank_reports_its_stderr_and_every_threads_stack():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_abort_in_native_code, 1, timeout=30)
    message = str(e.value)
    assert "exit codes {0: -6}" in message
    assert "about to abort" in message
    assert "Fatal Python error: Aborted" in message
    assert "in _abort_in_native_code" in message


def _environment(rank, world, name):
    return os.environ.get(name), os.getcwd()


def test_ranks_see_the_callers_current_environment_and_directory(monkeypatch, tmp_path):
    assert run_distributed(_environment, 1, "MMPT_HARNESS_PROBE")[0][0] is None  # server is up
    monkeypatch.setenv("MMPT_HARNESS_PROBE", "set after the ranks' server started")
    monkeypatch.chdir(tmp_path)
    assert run_distributed(_environment, 2, "MMPT_HARNESS_PROBE") == [
        ("set after the ranks' server started", str(tmp_path))] * 2
