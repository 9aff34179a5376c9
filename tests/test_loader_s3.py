"""The loader against the embedded SeaweedFS S3 server: same batches as from a local directory,
through the tiered cache (warm pass: no store requests) and through a fault-injecting proxy
(503 SlowDown, connection resets, truncated bodies, delays): nothing lost, duplicated or changed."""

import json
from pathlib import Path

import pytest

from data.embedded_s3 import EmbeddedS3
from data.ingest import corpus_sources, ingest
from data.loader import DataLoaderWithState
from data.tokenizer import load_tokenizer
from tests.corpus_fixtures import make_dataset
from tests.fault_proxy import FaultProxy
from train.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
BUCKET, PREFIX, BATCHES, FAULT_BATCHES = "mmpt-loader", "ds", 10, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    local = make_dataset(tmp_path_factory.mktemp("local"))
    with EmbeddedS3(tmp_path_factory.mktemp("s3"), bucket=BUCKET) as server:
        manifest = ingest(corpus_sources(local.corpus), server.store(PREFIX), load_tokenizer(local.tokenizer),
                          shard_size=200 * 1024, progress=False, log=lambda m: None)
        yield local, server, manifest


def _cfg(local, url, **data):
    over = {"manifest": url, "tokenizer": str(local.tokenizer), "seq_len": 256, "window_sequences": 8,
            "global_batch_size": 4, **data}
    return load_config(TINY, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()])


def _s3_opts(server, endpoint=None):
    return {"endpoint_url": endpoint or server.endpoint, "access_key": server.access_key,
            "secret_key": server.secret_key, "backoff_base": 0.005, "backoff_cap": 0.05, "seed": 0}


def _take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def _digests(batches):
    return [b.digest() for b in batches]


def test_s3_through_the_cache_gives_the_local_batches_and_a_warm_pass_asks_the_store_nothing(setup, tmp_path):
    local, server, manifest = setup
    expected = _digests(_take(DataLoaderWithState(_cfg(local, local.url)), BATCHES))
    url = f"s3://{BUCKET}/{PREFIX}"
    cache = {"memory_bytes": 32 << 20, "disk_dir": str(tmp_path / "cache"), "disk_bytes": 256 << 20}
    cold = DataLoaderWithState(_cfg(local, url), store_opts=_s3_opts(server), cache_opts=cache)
    assert cold.fingerprint == manifest["fingerprint"]
    assert _digests(_take(cold, BATCHES)) == expected
    cold_stats = cold.stream.store.stats()
    assert cold_stats["store_gets"] > 0
    # A new loader (new process memory tier) sharing the disk tier: every read is a disk hit.
    warm = DataLoaderWithState(_cfg(local, url), store_opts=_s3_opts(server), cache_opts=cache)
    assert _digests(_take(warm, BATCHES)) == expected
    warm_stats = warm.stream.store.stats()
    assert warm_stats["store_gets"] == 0 and warm_stats["disk_hits"] > 0, warm_stats
    # With DataLoader workers reading S3 directly (no cache), still the same batches.
    workers = DataLoaderWithState(_cfg(local, url, num_workers=2), store_opts=_s3_opts(server))
    assert _digests(_take(workers, BATCHES)) == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_faults_lose_or_duplicate_nothing_and_change_no_batch(setup, num_workers):
    local, server, _ = setup
    expected = _take(DataLoaderWithState(_cfg(local, local.url)), FAULT_BATCHES)
    # 20% of ~130 requests (the column catalogs are one object per source): every fault kind is
    # drawn whatever the exact set of requests, not only for one stream order
    with FaultProxy(server.endpoint, fraction=0.2, seed=3, delay_s=0.05) as proxy:
        loader = DataLoaderWithState(_cfg(local, f"s3://{BUCKET}/{PREFIX}", num_workers=num_workers),
                                     store_opts=_s3_opts(server, proxy.endpoint))
        got = _take(loader, FAULT_BATCHES)
        counts = dict(proxy.counts)
    assert _digests(got) == _digests(expected)
    assert not any(b.skipped for b in got)
    assert [b.sample_ids.tolist() for b in got] == [b.sample_ids.tolist() for b in expected]
    # Every fault kind happened (each piece of media or text is one ranged GET).
    assert all(counts.get(k, 0) > 0 for k in ("slowdown", "reset", "truncate", "delay")), counts
