"""`mmpt ingest`: local inputs -> webdataset tar shards + per-shard indexes + manifest, in a store.

    mmpt ingest --out s3://bucket/ds --tokenizer tok/tokenizer.json \
        --text text=corpus/text --images images=corpus/images --videos videos=corpus/videos \
        --interleaved docs=corpus/interleaved/docs.jsonl [--shard-size 64MB] [--prune]
        [--store.read_timeout=20 ...]   # S3 waiting and retrying, as the [store] config section
    mmpt ingest --out /data/ds --tokenizer tok/tokenizer.json --corpus corpus   # data.corpus layout
    mmpt ingest --part 3/16 --run-id R ...    # distributed: part 3 of 16 (launch/slurm/ingest.sbatch)
    mmpt ingest merge --out s3://bucket/ds --parts 16 --run-id R [--plan configs/k2.5.toml]

Inputs (each option repeatable, NAME= optional, default name = file/dir stem):
- --text: a JSONL file or a directory of *.jsonl files, one {"text": "..."} per line; Parquet
  files (*.parquet, the FineWeb / HF datasets layout) with a text column (--text-column, default
  "text", read with pyarrow); or an s3:// prefix holding such objects (listed at ingest);
- --webdataset: webdataset tars of image + caption pairs (LAION / DataComp layout: jpg/png/webp
  with txt or json {"caption"|"text"}): a .tar, a directory of *.tar or an s3:// prefix; members
  that escape their directory, links and devices are rejected, a corrupt tar keeps the samples
  before the damage; each is a counted skip;
- --images / --videos: a directory of images (jpg, jpeg, png, webp) or videos (mp4); captions from
  `captions.jsonl` in that directory ({"file": NAME, "caption": ...}) or a sidecar NAME-stem.txt;
- --interleaved: JSONL, one {"segments": [{"text": ...} | {"image": "relative/path.jpg"}, ...]}.
Every input is fully decoded once to validate it and measure it; corrupt or unreadable inputs are
reported (path, reason), skipped, counted in the summary and listed in the manifest. So are lines
that are not UTF-8 (in any JSONL file, captions.jsonl included, named by file and line).

Confinement: the paths on the command line are read as given; everything found below them must
stay inside them. A symlink whose target lies inside the same input directory is followed (as the
file it names); one leading out of it is refused, and so are document images named by an absolute
path or with '..'; each refusal is a counted skip with path and reason.

Tokenizer restart points (data/restarts.py) are recorded for every text segment of more than
2 x --restart-every tokens (default 512; 0: none), each verified at ingest, so the loader can
tokenize a unit of a long document without tokenizing the whole document.

Atomic for readers: shards and indexes go under a fresh generation prefix (gen-NNNNNN/) and the
manifest is switched last; the superseded generation stays for readers that opened it until an
ingest with --prune. Shards, indexes and the fingerprint are byte-identical for the same inputs
and tokenizer (into a fresh prefix, the whole output is). Format: see data/shards.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from data.decode import DEFAULT_MAX_PIXELS
from data.ingest import corpus_sources, ingest, merge, plan_setting
from data.inputs import Source
from data.restarts import RESTART_EVERY
from data.shards import MANIFEST_KEY


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 64MB, 512KB, 1000000)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def summary(manifest: dict, url: str) -> str:
    lines = [f"wrote {url}/{MANIFEST_KEY}  generation {manifest.get('generation', 0)}  "
             f"fingerprint {manifest['fingerprint'][:16]}"]
    for s in manifest["sources"]:
        size = sum(x["size"] for x in manifest["shards"] if x["source"] == s["name"])
        lines.append(f"  {s['name']:<14} {s['kind']:<12} {s['num_samples']:>7} samples "
                     f"{s['num_shards']:>4} shards {size / 1e6:9.2f} MB")
    sk = manifest["skipped"]
    lines.append(f"  skipped {sk['count']} input(s)" + (":" if sk["count"] else ""))
    lines += [f"    {x['path']}: {x['reason']}" for x in sk["inputs"]]
    return "\n".join(lines)


def _source_arg(kind: str, layout: str = ""):
    def parse(s: str) -> Source:
        name, sep, path = s.partition("=")
        if not sep or "://" in name:
            name, path = Path(s.rstrip("/")).stem, s
        if path.startswith("s3://"):
            return Source(name, kind, Path(), url=path, layout=layout)
        return Source(name, kind, Path(path), layout=layout)
    return parse


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps the progress bar intact


def _part_arg(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", s.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"--part {s!r}: expected I/N with 0 <= I < N (e.g. 0/3)")
    return int(m[1]), int(m[2])


def _run_id(value: str | None) -> str:
    run = value or os.environ.get("SLURM_ARRAY_JOB_ID", "")
    if not run:
        raise SystemExit("mmpt ingest: --part/merge need --run-id (or SLURM_ARRAY_JOB_ID): the id "
                         "that every part and the merge of one distributed ingest share")
    return run


def merge_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmpt ingest merge",
                                 description="write the dataset manifest over the parts of a "
                                             "distributed ingest (mmpt ingest --part I/N)")
    ap.add_argument("--out", required=True, help="the dataset URL the parts wrote into")
    ap.add_argument("--parts", type=int, required=True, help="N, the number of parts")
    ap.add_argument("--run-id", help="the parts' --run-id (default: $SLURM_ARRAY_JOB_ID)")
    ap.add_argument("--plan", action="append", default=[], metavar="'CONFIG.toml [--data.x=y ...]'")
    ap.add_argument("--prune", action="store_true")
    args = ap.parse_args(argv)
    from data.store import open_store

    store = open_store(args.out)
    manifest = merge(store, _run_id(args.run_id), args.parts, [plan_setting(p) for p in args.plan],
                     prune_old=args.prune, log=_log)
    print(summary(manifest, store.url))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    ap = argparse.ArgumentParser(prog="mmpt ingest", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="dataset URL: s3://bucket/prefix or a local directory")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a tiktoken rank file")
    for kind, opt in (("text", "--text"), ("image", "--images"), ("video", "--videos"),
                      ("interleaved", "--interleaved")):
        ap.add_argument(opt, action="append", default=[], type=_source_arg(kind), metavar="[NAME=]PATH")
    ap.add_argument("--webdataset", action="append", default=[], type=_source_arg("image", "webdataset"),
                    metavar="[NAME=]PATH|s3://...", help="webdataset tars of image + caption pairs "
                    "(jpg/png/webp with txt or json): a .tar, a directory of them or an S3 prefix")
    ap.add_argument("--text-column", default="text", help="the text column of Parquet inputs")
    ap.add_argument("--corpus", help="a directory in the data.corpus layout (adds its four sources)")
    ap.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="target tar size (default 64MB)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    ap.add_argument("--video-backend", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--timeout", type=float, default=30.0, help="per-video decode timeout, seconds")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--plan", action="append", default=[], metavar="'CONFIG.toml [--data.x=y ...]'",
                    help="also write the plan tables (data/catalog.py) for this training config and "
                         "overrides, so its runs start without a pass over every sample (repeatable)")
    ap.add_argument("--restart-every", type=int, default=RESTART_EVERY, metavar="TOKENS",
                    help="tokens between the tokenizer restart points of long texts, which let the "
                         f"loader tokenize a unit's own text (data/restarts.py; default {RESTART_EVERY}, "
                         "0: none)")
    ap.add_argument("--prune", action="store_true",
                    help="after the switch, delete superseded generations (no reader may still use them)")
    ap.add_argument("--part", type=_part_arg, metavar="I/N",
                    help="distributed ingest: only the I-th of N contiguous ranges of every source's "
                         "inputs, into parts/RUN_ID/; then `mmpt ingest merge` (0 <= I < N)")
    ap.add_argument("--run-id", help="with --part: the id all parts share (default: $SLURM_ARRAY_JOB_ID)")
    args, rest = ap.parse_known_args(argv)
    from train.config import load_config, parse_overrides

    if set(parse_overrides(rest)) - {"store"}:  # junk raises ConfigError naming it
        ap.error(f"unrecognized arguments: {' '.join(rest)} (of the config, only "
                 "--store.FIELD=VALUE applies to ingest)")

    sources = args.text + args.images + args.videos + args.interleaved + args.webdataset
    for src in args.text:
        src.column = args.text_column
    if args.corpus:
        sources += corpus_sources(Path(args.corpus))
    from data.store import open_store
    from data.tokenizer import load_tokenizer

    store = open_store(args.out, **load_config(None, rest).store.store_opts())
    part = {"part": args.part, "run_id": _run_id(args.run_id)} if args.part else {}
    manifest = ingest(sources, store, load_tokenizer(args.tokenizer), args.shard_size, args.max_pixels,
                      args.video_backend, args.timeout, progress=not args.no_progress,
                      log=_log, prune_old=args.prune, plans=[plan_setting(p) for p in args.plan],
                      restart_every=max(args.restart_every, 0), **part)
    if args.part:
        print(f"wrote part {args.part[0]}/{args.part[1]} of run {part['run_id']}: "
              f"{sum(s['num_samples'] for s in manifest['shards'])} samples, "
              f"{len(manifest['skipped'])} skipped; then: mmpt ingest merge --parts {args.part[1]}")
        return 0
    print(summary(manifest, store.url))
    return 0
