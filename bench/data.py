"""Data pipeline throughput, ours vs a plain webdataset + tokenizers pipeline, on the same shards.

    python bench/data.py [--out bench/results/data.json] [--seconds 8] [--text-copies 12]
    python bench/data.py --only text [--repeats 3]   # the text comparison alone, printed, not saved

Builds (in a temp dir) the real corpus (data/corpus.py) enlarged for benchmarking: the text JSONL
repeated --text-copies times with a distinct header per copy, the photos as ~512x512 JPEGs, and
MP4 pans at 320x240; trains the tokenizer; ingests once to a local directory and once to the
embedded SeaweedFS (same bytes, same fingerprint). Everything runs in this one process, one
thread (figures are per core). Measured:

- text tokens/s: ours = the loader (read + tokenize + mix + plan + pack into [B, 4096] batches,
  text only); plain = webdataset over the same tar shards, decode + tokenize only, with HF
  `tokenizers` and with tiktoken (ours uses the tiktoken backend: same ids, see data/tokenizer.py);
- JPEG images/s (~512x512): ours = ranged read + decode + NaViT resize + patchify; plain =
  webdataset + PIL decode;
- MP4 frames/s: ours = read + decode the sampled frames + resize + patchify; plain = webdataset +
  decord decode of the same frames;
- end to end from SeaweedFS, full mix (10% vision tokens): packed sequences/s and tokens/s with a
  cold and a warm tiered cache (disk tier shared, new memory tier), store requests/s;
- planning alone (mixer + window planner, metadata only): units/s and tokens/s.
Per-core figures are work per CPU second of this process (robust on a shared machine); the
pipelines compared side by side run in alternating slices; wall-clock rates are reported too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
SEQ_LEN, WINDOW, BATCH = 4096, 32, 8


def build_inputs(root: Path, text_copies: int) -> Path:
    from PIL import Image

    from data.corpus import PHOTOS, _load_photo, encode_mp4, generate

    corpus = generate(root / "corpus")
    text = corpus / "text"
    for f in sorted(text.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        with open(f, "w") as out:
            for c in range(text_copies):
                for r in rows:
                    out.write(json.dumps({"text": f"[copy {c}]\n{r['text']}"}) + "\n")
    images = corpus / "images"
    for p in images.iterdir():
        p.unlink()
    caps = []
    for src, name, _, caption in PHOTOS:
        img = _load_photo(src).resize((512, 512), Image.Resampling.BICUBIC)
        for k, op in enumerate([None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM]):
            (img if op is None else img.transpose(op)).save(images / f"{name}{k}.jpg", "JPEG", quality=90)
            caps.append({"file": f"{name}{k}.jpg", "caption": caption})
    (images / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    videos = corpus / "videos"
    for p in videos.iterdir():
        p.unlink()
    for i, (src, name, _, caption) in enumerate(PHOTOS[:6]):
        big = np.asarray(_load_photo(src).resize((512, 512)))
        frames = [big[136:376, x:x + 320] for x in np.linspace(0, 192, 36).astype(int)]
        encode_mp4(frames, videos / f"{name}.mp4", fps=12)
        (videos / f"{name}.txt").write_text(caption + "\n")
    return corpus


def endless(factory, measure):
    """Yield measure(item) for the items of factory(), restarting it whenever it runs out."""
    while True:
        empty = True
        for item in factory():
            empty = False
            yield measure(item)
        if empty:
            raise RuntimeError("pipeline yields nothing")


def compare(pipelines: dict, seconds: float, rounds: int = 4) -> dict:
    """Run the pipelines (name -> endless iterator of work amounts) in alternating slices, so a
    shared machine's load hits them alike. Work per CPU second of this process (= per core; the
    pipelines are single-threaded) and per wall second."""
    for it in pipelines.values():
        next(it)  # warm-up: imports, first window, first shard
    acc = {k: [0.0, 0.0, 0.0] for k in pipelines}
    for _ in range(rounds):
        for name, it in pipelines.items():
            w0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - w0 < seconds / rounds:
                acc[name][0] += next(it)
            acc[name][1] += time.perf_counter() - w0
            acc[name][2] += time.process_time() - c0
    return {k: {"per_cpu_s": w / c, "per_wall_s": w / t, "cpu_fraction": c / t} for k, (w, t, c) in acc.items()}


def cfg_for(url: str, tokenizer: Path, **data):
    from train.config import load_config

    over = {"manifest": url, "tokenizer": str(tokenizer), "seq_len": SEQ_LEN, "window_sequences": WINDOW,
            "global_batch_size": BATCH, "num_workers": 0, **data}
    return load_config(None, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()])


def shard_paths(url: str, source: str) -> list[str]:
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    return [str(Path(url) / s["key"]) for s in manifest["shards"] if s["source"] == source]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data.json"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--text-copies", type=int, default=12)
    ap.add_argument("--only", choices=["text"], help="run only this section; print, do not save")
    ap.add_argument("--repeats", type=int, default=1, help="with --only: repeat the comparison")
    args = ap.parse_args(argv)

    import webdataset as wds
    from PIL import Image

    from data.embedded_s3 import EmbeddedS3
    from data.ingest import corpus_sources, ingest
    from data.loader import DataLoaderWithState, plan_report
    from data.media import MediaRules
    from data.shards import read_member
    from data.store import open_store
    from data.tokenizer import load_tokenizer
    from data.train_tokenizer import corpus_texts, export_tiktoken, train_bpe
    from data.vision import VisionPreprocess, sample_frame_indices

    S = args.seconds
    results: dict = {"seq_len": SEQ_LEN, "window_sequences": WINDOW, "global_batch": BATCH,
                     "seconds_per_measurement": S, "threads": 1, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = build_inputs(root, args.text_copies)
        hf = train_bpe(corpus_texts(corpus), 2048)
        (root / "tok").mkdir()
        hf.save(str(root / "tok" / "tokenizer.json"))
        tik_path = root / "tok" / "tokenizer.tiktoken"
        export_tiktoken(hf, tik_path)
        tok = load_tokenizer(tik_path)
        url = str(root / "ds")
        manifest = ingest(corpus_sources(corpus), open_store(url), tok, progress=False, log=lambda m: None)
        results["dataset"] = {s["name"]: s["num_samples"] for s in manifest["sources"]}
        results["dataset"]["text_tokens"] = None

        import gc

        gc.freeze()  # as a DataLoader worker does (data/loader.py _worker_init): long-lived objects not rescanned
        # -- text: ours (text only) vs plain webdataset + tokenizers / tiktoken
        text_cfg = cfg_for(url, tik_path, vision_fraction=0.0)
        ours = DataLoaderWithState(text_cfg)
        hf_tok = load_tokenizer(root / "tok" / "tokenizer.json")
        text_shards = shard_paths(url, "text")
        results["dataset"]["text_tokens"] = int(ours.stream.catalog.sources[0].tokens.sum())

        def plain_text(t):
            return endless(lambda: wds.WebDataset(text_shards, shardshuffle=False, empty_check=False),
                           lambda s: len(t.encode(s["txt"].decode("utf-8"))))

        t = compare({"ours": endless(lambda: ours, lambda b: b.non_padding_tokens()),
                     "plain_webdataset_tokenizers": plain_text(hf_tok),
                     "plain_webdataset_tiktoken": plain_text(tok)}, S)
        t["ours_vs_plain_tokenizers"] = t["ours"]["per_cpu_s"] / t["plain_webdataset_tokenizers"]["per_cpu_s"]
        t["ours_vs_plain_tiktoken"] = t["ours"]["per_cpu_s"] / t["plain_webdataset_tiktoken"]["per_cpu_s"]
        results["text_tokens_per_s"] = t
        print("text tokens/s", json.dumps(t), flush=True)
        if args.only == "text":
            ratios = [t["ours_vs_plain_tiktoken"]]
            for _ in range(args.repeats - 1):
                r = compare({"ours": endless(lambda: ours, lambda b: b.non_padding_tokens()),
                             "plain_webdataset_tiktoken": plain_text(tok)}, S)
                ratios.append(r["ours"]["per_cpu_s"] / r["plain_webdataset_tiktoken"]["per_cpu_s"])
                print("text tokens/s", json.dumps(r), flush=True)
            print(f"ours / plain tiktoken per CPU second: {[round(x, 3) for x in ratios]}, "
                  f"median {float(np.median(ratios)):.3f}")
            return 0

        # -- planning alone
        stream = ours.stream

        def plan_some():
            cursor = stream.new_cursor(0, stream._fresh_state())
            for k in range(20):
                cursor.get(k)
            return cursor.planner.mixer.state.draws

        plan = compare({"plan": (plan_some() for _ in iter(int, 1))}, S / 2, rounds=1)["plan"]
        results["planning"] = {"units_per_cpu_s": plan["per_cpu_s"],
                               "tokens_per_cpu_s": plan["per_cpu_s"] * float(np.mean(stream.catalog.sources[0].tokens))}

        # -- JPEG images and MP4 frames: ours (read + decode + resize + patchify) vs plain decode
        full_cfg = cfg_for(url, tik_path)
        media = MediaRules(VisionPreprocess.from_config(full_cfg))
        store = open_store(url)
        full = DataLoaderWithState(full_cfg)
        cat = full.stream.catalog
        img_src, vid_src = cat.names.index("images"), cat.names.index("videos")

        def entries(src):
            return [cat.entry(src, i) for i in range(cat.catalogs[src].n)]

        imgs = entries(img_src)
        results["jpeg_size"] = [imgs[0][1]["images"][0]["height"], imgs[0][1]["images"][0]["width"]]

        def ours_image(item):
            key, e = item
            media.load("image", read_member(store, key, e, "jpg"), e["images"][0], "bench", None)
            return 1

        def plain_image(sample):
            return int(Image.open(io.BytesIO(sample["jpg"])).convert("RGB").size[0] > 0)

        r = compare({"ours": endless(lambda: imgs, ours_image),
                     "plain_webdataset_pil_decode": endless(
                         lambda: wds.WebDataset(shard_paths(url, "images"), shardshuffle=False,
                                                empty_check=False), plain_image)}, S)
        results["jpeg_images_per_s"] = r
        print("jpeg images/s", json.dumps(r), flush=True)

        vids = entries(vid_src)
        p = media.pre
        info = vids[0][1]["videos"][0]
        frame_idx = sample_frame_indices(info["frames"], info["fps"], p.sample_fps, p.max_frames)

        def ours_video(item):
            key, e = item
            chunks = media.load("video", read_member(store, key, e, "mp4"), e["videos"][0], "bench", None)
            return sum(g[0] for _, g in chunks)

        from data.decode import decode_video_frames

        r = compare({"ours": endless(lambda: vids, ours_video),
                     "plain_webdataset_decode": endless(
                         lambda: wds.WebDataset(shard_paths(url, "videos"), shardshuffle=False,
                                                empty_check=False),
                         lambda s: len(decode_video_frames(s["mp4"], frame_idx, "v")))}, S)
        r["frame_size"] = [info["height"], info["width"]]
        r["sampled_frames_per_video"] = len(frame_idx)
        results["mp4_frames_per_s"] = r
        print("mp4 frames/s", json.dumps(r), flush=True)

        # -- end to end from SeaweedFS, cold and warm cache
        with EmbeddedS3(root / "s3", bucket="mmpt-bench") as server:
            ingest(corpus_sources(corpus), server.store("ds"), tok, progress=False, log=lambda m: None)
            opts = {"endpoint_url": server.endpoint, "access_key": server.access_key,
                    "secret_key": server.secret_key}
            cache = {"memory_bytes": 512 << 20, "disk_dir": str(root / "cache"), "disk_bytes": 4 << 30}
            e2e = {}
            for phase in ("cold", "warm"):
                loader = DataLoaderWithState(cfg_for("s3://mmpt-bench/ds", tik_path), store_opts=opts,
                                             cache_opts=cache)
                loader.stream.store.reset_stats()
                seqs = toks = 0
                t0, c0 = time.perf_counter(), time.process_time()
                for b in loader:
                    seqs += b.rows
                    toks += b.non_padding_tokens()
                    if time.perf_counter() - t0 > S:
                        break
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                st = loader.stream.store.stats()
                e2e[phase] = {"sequences_per_s": seqs / dt, "tokens_per_s": toks / dt,
                              "sequences_per_cpu_s": seqs / cpu, "tokens_per_cpu_s": toks / cpu,
                              "store_requests": st["store_requests"],
                              "store_requests_per_s": st["store_requests"] / dt,
                              "mem_hit_rate": st["mem_hit_rate"], "disk_hit_rate": st["disk_hit_rate"]}
                print(f"e2e {phase}", json.dumps(e2e[phase]), flush=True)
            results["end_to_end_seaweedfs"] = e2e
            rep = plan_report(loader.stream, 10)
            results["mix"] = {"vision_share": rep["mix"]["vision_share"],
                              "packing_efficiency": rep["packing_efficiency"]}

    t = results["text_tokens_per_s"]
    results["goals"] = {
        "text_tokens_per_cpu_s_ge_0.5M": t["ours"]["per_cpu_s"] >= 5e5,
        "jpeg_images_per_cpu_s_ge_200": results["jpeg_images_per_s"]["ours"]["per_cpu_s"] >= 200,
        "text_ge_0.9x_plain_same_tokenizer_backend": t["ours_vs_plain_tiktoken"] >= 0.9,
        "text_ge_0.9x_plain_hf_tokenizers": t["ours_vs_plain_tokenizers"] >= 0.9,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
