"""Start-up, resident memory and planning CPU of the data plane against the number of samples.

    python bench/data_scale.py [--sizes 1e6,1e7,1e8] [--out bench/results/data_scale.json]
                               [--dir /path/with/space] [--keep] [--profile]

--profile prints the cProfile table of one global batch's planning (the first size, no
hold-out) instead of measuring.

Writes synthetic datasets (no tar bytes: planning never reads them) in the layout mmpt ingest
writes: a manifest with one shard entry per 10,000 samples, and per source the sample catalog
and the plan table for the K2.5 packing (seq_len 4096, window_sequences 32, global batch 4096
sequences: units of up to a window, data/catalog.py's UNIT_RULE) as column files
(data/columnar.py), the plan table with its hold-out columns (every sample's identity hashed as
ingest does, units sorted by score). Sources: "text" (90% of the samples, log-normal lengths
around 1,000 tokens) and "images" (10%, one image of one of eight sizes plus a caption), mixed at
10% vision tokens. Columns are filled in chunks through np.memmap; the hold-out sort holds the
scores and their order in memory (about 2 GB at 10^8 samples).

Per size, in a fresh process: start-up = opening the dataset as a DP rank does (manifest read and
fingerprint check, catalog and plan mapped, mixer and planner built), wall and CPU seconds;
resident memory after it (VmRSS), also net of the process after its imports; planning CPU per
K2.5-size global batch (16,384 sequences of 4096 tokens = 512 windows), i.e. what every rank
spends per step, as a fraction of one core at a 10 s step. Goals: start-up < 2 s and < 200 MB
at every size, planning < 5% of a core. Each size is measured without hold-out and with
data.holdout_fraction = HOLDOUT (the training split of the same dataset): one run to warm the
page cache, then REPEATS runs, each in a fresh process; the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ_LEN, WINDOW, GLOBAL_BATCH = 4096, 32, 16384
PLAN_GLOBAL_BATCH = 4096  # configs/k2.5.toml's data.global_batch_size: the plan table's units
SAMPLES_PER_SHARD = 10_000
IMAGE_SHARE = 0.1
IMAGE_SIZES = [(512, 384), (384, 512), (640, 480), (256, 256), (1024, 768), (300, 200), (800, 800),
               (224, 320)]
CHUNK = 5_000_000
HOLDOUT = 0.01
REPEATS = 3


def _media():
    from data.media import MediaRules
    from data.vision import VisionPreprocess

    return MediaRules(VisionPreprocess())


def _fill(path: Path, specs: dict, meta: dict, fill) -> int:
    """Write a column file whose columns `fill(name, lo, hi)` produces chunk by chunk."""
    import numpy as np

    from data.columnar import column_layout

    head, offsets = column_layout(specs, meta)
    end = max(offsets[n] + int(np.prod(s)) * np.dtype(d).itemsize for n, (d, s) in specs.items())
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(end + (-end % 64))
    for name, (dtype, shape) in specs.items():
        n = shape[0]
        if n == 0:
            continue
        mm = np.memmap(path, dtype=dtype, mode="r+", offset=offsets[name], shape=shape)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            mm[lo:hi] = fill(name, lo, hi)
        mm.flush()
        del mm
    return path.stat().st_size


def write_dataset(root: Path, n: int, global_batch: int = PLAN_GLOBAL_BATCH) -> dict:
    """A synthetic dataset of n samples under root, its plan tables for `global_batch`; returns
    what was written."""
    import numpy as np

    from data.catalog import CATALOG_FORMAT, SEGMENT_DTYPE
    from data.plan_table import (PLAN_FORMAT, SEG_IMAGE, Layout, holdout_columns, holdout_scores,
                                 plan_key, unit_dtype)
    from data.shards import build_manifest, canonical_json, generation_prefix

    media = _media()
    key = plan_key(media, SEQ_LEN, WINDOW, global_batch)
    layout = Layout(media, SEQ_LEN, WINDOW, global_batch)
    per_unit = SEQ_LEN * layout.unit_pieces  # text has no atoms: its pieces are seq_len tokens
    img_tokens = np.array([layout.segments("image", {"text_tokens": 0, "images": [
        {"member": "jpg", "height": h, "width": w}]})[0].tokens for h, w in IMAGE_SIZES], np.int64)
    img_vision = img_tokens - 2
    gen = generation_prefix(1)
    counts = {"text": n - int(n * IMAGE_SHARE), "images": int(n * IMAGE_SHARE)}
    shards, catalogs, written = [], [], {}

    def text_tokens(source, lo, hi):
        rng = np.random.default_rng([n, 1 if source == "text" else 2, lo])
        if source == "text":
            return np.clip(rng.lognormal(6.5, 1.0, hi - lo), 16, 100_000).astype(np.int32)
        return rng.integers(8, 60, hi - lo).astype(np.int32)

    def image_size(lo, hi):
        return np.random.default_rng([n, 7, lo]).integers(0, len(IMAGE_SIZES), hi - lo)

    def segments(lo, hi):  # one image per sample: its kind and size
        rows = np.zeros(hi - lo, SEGMENT_DTYPE)
        size = np.array(IMAGE_SIZES)[image_size(lo, hi)]
        rows["kind"], rows["height"], rows["width"] = SEG_IMAGE, size[:, 0], size[:, 1]
        return rows

    for source, count in counts.items():
        (root / gen / source).mkdir(parents=True, exist_ok=True)
        num_shards = -(-count // SAMPLES_PER_SHARD)
        first = np.arange(num_shards, dtype=np.int64) * SAMPLES_PER_SHARD
        mine = [{"source": source, "key": f"{gen}{source}/shard-{k:06d}.tar",
                 "index": f"{gen}{source}/shard-{k:06d}.idx.json",
                 "num_samples": int(min(SAMPLES_PER_SHARD, count - first[k])), "size": 64 << 20,
                 "index_sha256": f"{k:064x}"} for k in range(num_shards)]
        shards += mine
        members = 1 if source == "text" else 2  # txt, or jpg + txt
        within = lambda lo, hi: np.arange(lo, hi) % (SAMPLES_PER_SHARD * members)  # noqa: E731
        fills = {
            "h_key": lambda lo, hi: np.array([s["key"].encode() for s in mine[lo:hi]]),
            "h_size": lambda lo, hi: np.full(hi - lo, 64 << 20, np.int64),
            "h_first": lambda lo, hi: first[lo:hi],
            "s_text_tokens": lambda lo, hi: text_tokens(source, lo, hi),
            "s_text_bytes": lambda lo, hi: text_tokens(source, lo, hi).astype(np.uint32) * 4,
            "s_mem_start": lambda lo, hi: np.arange(lo, hi, dtype=np.int64) * members,
            "s_mem_count": lambda lo, hi: np.full(hi - lo, members, np.uint8),
            "m_ext": lambda lo, hi: np.arange(lo, hi) % members,
            "m_offset": lambda lo, hi: (within(lo, hi) // members * 8192 + 512
                                        + np.arange(lo, hi) % members * 4096).astype(np.uint32),
            "m_size": lambda lo, hi: np.full(hi - lo, 4096, np.uint32),
            "s_seg_start": lambda lo, hi: np.arange(lo, hi, dtype=np.int64),
            "s_seg_count": lambda lo, hi: np.ones(hi - lo, np.int32),
            "segments": lambda lo, hi: segments(lo, hi),
        }
        idx = np.int32 if count * members < 2**31 else np.int64
        specs = {"h_key": ("S40", (num_shards,)), "h_size": (np.int64, (num_shards,)),
                 "h_first": (np.int64, (num_shards,)), "s_text_tokens": (np.int32, (count,)),
                 "s_text_bytes": (np.uint32, (count,)), "s_mem_start": (idx, (count,)),
                 "s_mem_count": (np.uint8, (count,)), "m_ext": (np.uint8, (count * members,)),
                 "m_offset": (np.uint32, (count * members,)), "m_size": (np.uint32, (count * members,))}
        if source == "images":
            specs.update({"s_seg_start": (idx, (count,)), "s_seg_count": (np.int32, (count,)),
                          "segments": (SEGMENT_DTYPE, (count,))})
        kind = "text" if source == "text" else "image"
        meta = {"format": CATALOG_FORMAT, "source": source, "kind": kind, "num_samples": count,
                "num_shards": num_shards, "exts": ["txt"] if source == "text" else ["jpg", "txt"],
                "sequential_keys": True}
        cat_key = f"{gen}{source}/catalog.cols"
        size = _fill(root / cat_key, specs, meta, lambda name, lo, hi: fills[name](lo, hi))

        # plan table: a unit per U pieces of seq_len tokens (data/catalog.py's UNIT_RULE): a text
        # sample longer than U * seq_len is several units; an image sample fits one sequence
        def sample_units(lo, hi):
            t = text_tokens(source, lo, hi).astype(np.int64) + 1
            v = np.zeros(hi - lo, np.int64)
            if source == "images":
                s = image_size(lo, hi)
                t, v = t + img_tokens[s], img_vision[s]
                assert t.max() <= SEQ_LEN, "an image sample longer than seq_len: cut at its atoms"
            per = -(-t // per_unit)
            sample = np.repeat(np.arange(lo, hi, dtype=np.int64), per)
            first = np.repeat(np.cumsum(per) - per, per)
            offset = (np.arange(len(sample), dtype=np.int64) - first) * per_unit
            rows = np.zeros(len(sample), unit_dtype(count))
            rows["tokens"] = np.minimum(per_unit, t[sample - lo] - offset)
            rows["vision"], rows["sample"], rows["offset"] = v[sample - lo], sample, offset
            return rows

        sample_chunks = [(lo, min(count, lo + CHUNK)) for lo in range(0, count, CHUNK)]
        chunk_units, totals = [], [0, 0]
        for lo, hi in sample_chunks:
            rows = sample_units(lo, hi)
            chunk_units.append(len(rows))
            totals[0] += int(rows["tokens"].sum())
            totals[1] += int(rows["vision"].sum())
        chunk_first = np.cumsum([0] + chunk_units)
        num_units = int(chunk_first[-1])

        def units(ulo, uhi):  # unit rows [ulo, uhi), from the sample chunks that hold them
            parts = [sample_units(*sample_chunks[c])[max(ulo - a, 0):uhi - a]
                     for c, (a, b) in enumerate(zip(chunk_first[:-1], chunk_first[1:]))
                     if a < uhi and ulo < b]
            return np.concatenate(parts)

        # hold-out columns: mmpt ingest's sequential keys, SAMPLES_PER_SHARD to a shard
        scores = np.concatenate([holdout_scores(source, ((i // SAMPLES_PER_SHARD, f"{i:012d}")
                                                         for i in range(lo, hi)))
                                 for lo, hi in sample_chunks])
        unit_rows = [sample_units(lo, hi)[["sample", "tokens"]] for lo, hi in sample_chunks]
        hcols, hmeta = holdout_columns(scores, np.concatenate([r["sample"] for r in unit_rows]),
                                       np.concatenate([r["tokens"] for r in unit_rows]))
        del scores, unit_rows
        pmeta = {"format": PLAN_FORMAT, "source": source, "plan_key": key, "units": num_units,
                 "tokens": totals[0], "vision_tokens": totals[1], "seq_len": SEQ_LEN,
                 "window_sequences": WINDOW, "unit_pieces": layout.unit_pieces, "skipped": {},
                 **hmeta}
        plan_key_path = f"{gen}{source}/plan-{key}.cols"
        pspecs = {"units": (unit_dtype(count), (num_units,)),
                  **{name: (col.dtype, col.shape) for name, col in hcols.items()}}
        psize = _fill(root / plan_key_path, pspecs, pmeta,
                      lambda name, lo, hi: units(lo, hi) if name == "units" else hcols[name][lo:hi])
        del hcols
        catalogs.append({"source": source, "key": cat_key, "size": size, "sha256": None,
                         "plans": {key: {"key": plan_key_path, "size": psize, "sha256": None,
                                         "seq_len": SEQ_LEN, "window_sequences": WINDOW}}})
        written[source] = {"samples": count, "units": num_units, "catalog_bytes": size,
                           "plan_bytes": psize}
    tokenizer = {"fingerprint": "synthetic", "vocab_size": 163840, "special_tokens": {}}
    manifest = build_manifest([{"name": "text", "kind": "text"}, {"name": "images", "kind": "image"}],
                              shards, tokenizer, [], 1, catalogs)
    raw = canonical_json(manifest)
    (root / "manifest.json").write_bytes(raw)
    written["manifest_bytes"] = len(raw)
    return written


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident MB of this process (VmRSS), or of one part: RssAnon (private memory), RssFile
    (mapped file pages: shared with every process of the host mapping the same file, and
    reclaimable; the kernel maps up to 16 cached neighbours of a faulting page)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(url: str, holdout: float = 0.0, profile: bool = False) -> dict:
    """One rank's start-up and planning (runs in a fresh process)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    from data.stream import PackedStream

    imports = {"wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
               "rss_mb": _rss_mb(), "rss_anon_mb": _rss_mb("RssAnon")}
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    # GLOBAL_BATCH and PLAN_GLOBAL_BATCH both hold a window at least: the same units, the same key
    stream = PackedStream(url, seq_len=SEQ_LEN, window_sequences=WINDOW, global_batch=GLOBAL_BATCH,
                          dp_rank=0, dp_size=1, seed=0, vision_fraction=0.1, weights={},
                          tokenizer="", media=_media(), holdout_fraction=holdout)
    cursor = stream.new_cursor()
    startup = {"wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
               "rss_mb": _rss_mb(), "rss_anon_mb": _rss_mb("RssAnon"), "rss_file_mb": _rss_mb("RssFile")}
    startup["rss_over_imports_mb"] = startup["rss_mb"] - imports["rss_mb"]
    windows = GLOBAL_BATCH // WINDOW
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: [cursor.get(k) for k in range(windows)])
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
        cursor = stream.new_cursor()
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    tokens = sum(cursor.get(k).tokens() for k in range(windows))
    cpu = time.process_time() - t_cpu
    mix = cursor.planner.mixer.report()
    return {"imports": imports, "startup": startup,
            "planning": {"windows": windows, "sequences": GLOBAL_BATCH, "cpu_s_per_global_batch": cpu,
                         "wall_s": time.perf_counter() - t_wall, "core_fraction_at_10s_step": cpu / 10,
                         "documents": mix["documents"], "packing_efficiency":
                             tokens / (GLOBAL_BATCH * SEQ_LEN), "vision_share": mix["vision_share"],
                         "rss_mb_after": _rss_mb(), "rss_anon_mb_after": _rss_mb("RssAnon"),
                         "rss_file_mb_after": _rss_mb("RssFile")},
            "holdout_fraction": holdout, "units": sum(s.size for s in stream.catalog.sources),
            "derived_plans": stream.catalog.derived_plans,
            "derived_holdout": stream.catalog.derived_holdout}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7,1e8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_scale.json"))
    ap.add_argument("--dir", default=None, help="where to write the synthetic datasets")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--holdout", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="profile the planning, do not measure")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.holdout, args.profile)))
        return 0
    results = {"seq_len": SEQ_LEN, "window_sequences": WINDOW, "global_batch": GLOBAL_BATCH,
               "samples_per_shard": SAMPLES_PER_SHARD, "cpu_count": os.cpu_count(),
               "holdout_fraction": HOLDOUT, "repeats": REPEATS, "sizes": {}}
    base = Path(tempfile.mkdtemp(prefix="mmpt-scale-", dir=args.dir))
    try:
        for size in [int(float(s)) for s in args.sizes.split(",")]:
            root = base / f"n{size}"
            t = time.perf_counter()
            written = write_dataset(root, size)
            wrote_s = time.perf_counter() - t
            if args.profile:
                subprocess.run([sys.executable, __file__, "--measure", str(root), "--profile"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
                return 0
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            entry = results["sizes"][str(size)] = {"written": written, "write_s": wrote_s}
            on_disk = sum(w["catalog_bytes"] + w["plan_bytes"] for w in written.values()
                          if isinstance(w, dict))
            for holdout in (0.0, HOLDOUT):
                runs = []
                # the first run warms the page cache (a host whose first rank fetched the files)
                for _ in range(1 + REPEATS):
                    out = subprocess.run([sys.executable, __file__, "--measure", str(root),
                                          "--holdout", str(holdout)], env=env, check=True,
                                         capture_output=True, text=True).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                entry["runs" if holdout == 0 else "runs_holdout"] = runs
                cpu = sorted(r["planning"]["cpu_s_per_global_batch"] for r in runs[1:])
                up = sorted(r["startup"]["wall_s"] for r in runs[1:])
                r = runs[-1]
                print(f"{size:>11,} samples, holdout {holdout}: start-up {up[0]:.3f}-{up[-1]:.3f} s "
                      f"({r['startup']['rss_anon_mb']:.0f} MB private, "
                      f"{r['startup']['rss_over_imports_mb']:.1f} MB over imports); planning "
                      f"{cpu[0]:.3f}/{cpu[len(cpu) // 2]:.3f}/{cpu[-1]:.3f} CPU s (min/median/max) per "
                      f"global batch = {10 * cpu[len(cpu) // 2]:.1f}% of a core at a 10 s step; "
                      f"catalog+plan {on_disk / 1e9:.2f} GB", flush=True)
            if not args.keep:
                shutil.rmtree(root)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
