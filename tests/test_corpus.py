"""The generated corpus is byte-identical across processes, whatever the process did before."""

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _generate(out: Path, malloc_perturb: int) -> dict[str, str]:
    """Run `python -m data.corpus` in a fresh process; sha256 of every file it wrote, by path."""
    # glibc fills memory returned by malloc with ~byte and freed memory with byte: an encoder that
    # reads memory it never wrote then gives different output in the two processes.
    env = dict(os.environ, MALLOC_PERTURB_=str(malloc_perturb), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    subprocess.run([sys.executable, "-m", "data.corpus", str(out)], env=env, check=True,
                   capture_output=True, timeout=120)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="MALLOC_PERTURB_ is a glibc feature")
def test_corpus_is_byte_identical_in_two_fresh_processes(tmp_path):
    a = _generate(tmp_path / "a", malloc_perturb=85)
    b = _generate(tmp_path / "b", malloc_perturb=255)
    assert sum(name.endswith(".mp4") for name in a) == 3
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
