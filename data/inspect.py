"""`mmpt data inspect`: what the loader makes of a dataset, and one packed sequence as a PNG.

    mmpt data inspect --manifest s3://bucket/ds --tokenizer tok/tokenizer.json [--config C.toml]
        [--seq-len 4096] [--windows 20] [--batches 4] [--sequence G] [--png out.png]
        [--cache-dir DIR] [--data.FIELD=VALUE ...]

Prints the realised mix (token share per source, vision share vs target), the packing efficiency
(non-padding fraction) over the first windows, skipped samples, and the cache stats of reading
the first batches. Renders global sequence G (default: the first one holding media) as a PNG:
tokens flow left to right in rows of cells coloured by document, each document start marked and
labelled; an image or video chunk appears in place as a block of exactly its placeholder tokens
((h/2) x (w/2) cells), showing its pixels (a chunk's first frame) rebuilt from the patches.
S3 credentials and endpoint come from the standard AWS environment (AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

CELL, COLS = 10, 64
PALETTE = [(141, 211, 199), (255, 255, 179), (190, 186, 218), (251, 128, 114), (128, 177, 211),
           (253, 180, 98), (179, 222, 105), (252, 205, 229), (188, 128, 189), (204, 235, 197)]
PAD_COLOR, MEDIA_EDGE = (225, 225, 225), (30, 30, 30)
# Rendering sequence G plans every window before it (metadata only, about 1.5 ms a window on the
# tiny config): past this many windows the answer would take minutes, so it is refused up front.
MAX_PLAN_WINDOWS = 10_000


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmpt data inspect", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--manifest", required=True, help="dataset URL (s3://bucket/prefix or a directory)")
    ap.add_argument("--tokenizer", help="tokenizer file (default: data.tokenizer of the config)")
    ap.add_argument("--config", help="TOML config (default: built-in defaults)")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--window-sequences", type=int)
    ap.add_argument("--windows", type=int, default=20, help="windows to plan for the report")
    ap.add_argument("--batches", type=int, default=4, help="batches to read for the cache stats")
    ap.add_argument("--sequence", type=int, help="global sequence to render (default: first with media)")
    ap.add_argument("--max-windows", type=int, default=MAX_PLAN_WINDOWS,
                    help=f"furthest window --sequence may lie in (default {MAX_PLAN_WINDOWS})")
    ap.add_argument("--png", default="data_inspect.png")
    ap.add_argument("--cache-dir", help="disk tier of the cache (default: memory only)")
    return ap


def image_of_item(patches: np.ndarray, grid, patch: int = 14) -> np.ndarray:
    """uint8 [H, W, 3] of an item's first frame from its patches: the loader's uint8 pixels, or
    normalised float patches (mean = std = 0.5)."""
    t, gh, gw = grid
    x = patches[: gh * gw].reshape(gh, gw, 3, patch, patch).transpose(0, 3, 1, 4, 2)
    x = x.reshape(gh * patch, gw * patch, 3)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    return np.clip((x * 0.5 + 0.5) * 255, 0, 255).astype(np.uint8)


def render_row(batch, row: int, names: list[str], path: str, tokenizer=None) -> None:
    """Draw row `row` of a Batch as described in the module docstring."""
    from PIL import Image, ImageDraw

    ids, docs = batch.input_ids[row].tolist(), batch.doc_ids[row].tolist()
    mask = batch.loss_mask[row].tolist()
    items = [(i, s, n) for i, (r, s, n) in enumerate(batch.vision_spans.tolist()) if r == row]
    starts = np.concatenate([[0], np.cumsum(batch.grid_thw.prod(dim=1).numpy())])
    provenance = [p for p in batch.sample_ids.tolist() if p[0] == row]
    by_start = {s - 1: (i, n) for i, s, n in items}  # media_begin position -> item
    blocks, x, y = [], 0, 0  # flow layout in cell units
    cells = []  # (x, y, colour, token position)
    pos = 0
    while pos < len(ids):
        if pos in by_start:
            i, n = by_start[pos]
            gh, gw = batch.grid_thw[i, 1].item() // 2, batch.grid_thw[i, 2].item() // 2
            cells.append((x, y, PALETTE[docs[pos] % len(PALETTE)], pos))  # media_begin
            y, x = y + 1, 0
            blocks.append((x, y, gw, gh, i))
            y += gh
            pos += 1 + n
            continue
        colour = PAD_COLOR if docs[pos] == docs[-1] and pos >= sum(p[6] - p[5] for p in provenance) \
            else PALETTE[docs[pos] % len(PALETTE)]
        cells.append((x, y, colour, pos))
        x += 1
        if x == COLS:
            x, y = 0, y + 1
        pos += 1
    height = (y + 2) * CELL + 60
    img = Image.new("RGB", (COLS * CELL + 90, height), "white")
    draw = ImageDraw.Draw(img)
    ox, oy = 10, 30
    eff = sum(p[6] - p[5] for p in provenance) / len(ids)
    draw.text((ox, 8), f"sequence {batch.sequence_ids[row].item()}: {len(provenance)} document pieces, "
                       f"{len(items)} media items, {100 * eff:.1f}% non-padding", fill="black")
    doc_start = {p: None for p in range(len(ids)) if p == 0 or docs[p] != docs[p - 1]}
    for cx, cy, colour, p in cells:
        box = [ox + cx * CELL, oy + cy * CELL, ox + (cx + 1) * CELL - 1, oy + (cy + 1) * CELL - 1]
        draw.rectangle(box, fill=colour, outline=None if mask[p] else (150, 150, 150))
        if p in doc_start:
            draw.rectangle([box[0], box[1], box[0] + 1, box[3]], fill="black")
    for bx, by, gw, gh, i in blocks:
        pix = image_of_item(batch.pixel_patches[starts[i]:starts[i + 1]].numpy(),
                            batch.grid_thw[i].tolist())
        tile = Image.fromarray(pix).resize((gw * CELL, gh * CELL))
        img.paste(tile, (ox + bx * CELL, oy + by * CELL))
        draw.rectangle([ox + bx * CELL, oy + by * CELL, ox + (bx + gw) * CELL - 1, oy + (by + gh) * CELL - 1],
                       outline=MEDIA_EDGE)
        draw.text((ox + (bx + gw) * CELL + 4, oy + by * CELL), f"item {i}: grid {batch.grid_thw[i].tolist()}",
                  fill="black")
    at = 0
    for p in provenance:  # label each document piece at its first cell
        cx, cy = next((c[0], c[1]) for c in cells if c[3] >= at)
        draw.text((ox + cx * CELL + 2, oy + cy * CELL - 1), f"{names[p[1]]}", fill=(0, 0, 0))
        at += p[6] - p[5]
    draw.text((ox, height - 22), "one cell per token, colour = document piece, black bar = piece start, "
                                 "grey outline = no loss, grey = padding; media blocks = their placeholders",
              fill=(80, 80, 80))
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "inspect":
        print("usage: mmpt data inspect --manifest URL [options]   (see mmpt data inspect --help)",
              file=sys.stderr)
        return 2
    known, overrides = _parser().parse_known_args(argv[1:])
    from data.loader import DataLoaderWithState, plan_report
    from data.store import redact
    from train.config import load_config

    over = [f"--data.manifest={known.manifest}"] + overrides
    if known.tokenizer:
        over.append(f"--data.tokenizer={known.tokenizer}")
    if known.seq_len:
        over.append(f"--data.seq_len={known.seq_len}")
    if known.window_sequences:
        over.append(f"--data.window_sequences={known.window_sequences}")
    cfg = load_config(known.config, over + ["--data.num_workers=0"])
    check_sequence(known.sequence, known.max_windows, cfg.data.window_sequences)
    cache = {"memory_bytes": 256 << 20}
    if known.cache_dir:
        cache.update(disk_dir=known.cache_dir, disk_bytes=10 << 30)
    loader = DataLoaderWithState(cfg, cache_opts=cache)
    rep = plan_report(loader.stream, known.windows)
    mix = rep["mix"]
    print(f"dataset {redact(known.manifest)}  fingerprint {loader.fingerprint[:16]}")
    print(f"plan: {rep['windows']} windows x {loader.stream.S} sequences x {cfg.data.seq_len} tokens, "
          f"{mix['documents']} units drawn")
    print(f"mix: vision share {100 * mix['vision_share']:.2f}% (target "
          f"{100 * mix['target_vision_share']:.2f}%)")
    for name, s in mix["sources"].items():
        cat = rep["catalog"]["sources"][name]
        print(f"  {name:<14} {cat['kind']:<12} {100 * s['share']:6.2f}% of tokens  "
              f"{s['documents']:>6} units  {s['epochs']:.2f} epochs")
    print(f"packing efficiency: {100 * rep['packing_efficiency']:.2f}% non-padding")
    for reason, n in rep["catalog"]["skipped"].items():
        print(f"skipped {n}: {reason}")
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) >= known.batches:
            break
    for b in batches:
        for s in b.skipped:
            print(f"skipped while reading: {s[0]} shard {s[1]} sample {s[2]}: {s[3]}")
    print(loader.stream.store.format_stats())
    target = known.sequence
    if target is None:
        target = next((int(b.sequence_ids[r]) for b in batches for r in range(b.rows)
                       if (b.vision_spans[:, 0] == r).any()), int(batches[0].sequence_ids[0]))
    batch, row = _find_row(loader, batches, target)
    render_row(batch, row, loader.stream.catalog.names, known.png)
    print(f"wrote {known.png} (sequence {target})")
    return 0


def check_sequence(sequence: int | None, max_windows: int, window_sequences: int) -> None:
    """Refuse, before any planning, a --sequence that would take more than max_windows windows."""
    if sequence is None:
        return
    limit = max_windows * window_sequences
    if sequence < 0:
        raise SystemExit(f"mmpt data inspect: --sequence {sequence} must be >= 0")
    if sequence >= limit:
        raise SystemExit(f"mmpt data inspect: --sequence {sequence} is beyond what inspect plans: "
                         f"sequences 0..{limit - 1} (--max-windows {max_windows} x "
                         f"data.window_sequences {window_sequences}); pick a smaller --sequence or "
                         "raise --max-windows")


def _find_row(loader, batches, sequence: int):
    for b in batches:
        hits = (b.sequence_ids == sequence).nonzero()
        if len(hits):
            return b, int(hits[0])
    stream = loader.stream
    batch = stream.build_batch(stream.new_cursor(), range(sequence, sequence + 1))
    return batch, 0
