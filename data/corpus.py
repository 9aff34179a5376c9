"""Generate the small REAL corpus used by the tests and the quickstart (nothing binary is committed).

    python -m data.corpus OUT_DIR [--corrupt]

Sources, all from what is installed here:
- text: the Python documentation topics (`pydoc_data.topics`) and a fixed list of stdlib modules'
  source files, as JSONL `{"text": ...}`;
- images: photos shipped with scikit-image (`skimage/data`), downscaled and written as JPEG, PNG
  and WebP, captions in `images/captions.jsonl`; one JPEG is stored rotated with an EXIF
  Orientation tag so that readers must apply it;
- videos: H.264 MP4s (PyAV/libx264) panning and zooming over those photos, sidecar `.txt` captions;
- interleaved: documents mixing paragraphs of the documentation with the photos.
With --corrupt it adds deliberately bad inputs: a corrupt JPEG, a truncated MP4, an invalid JSONL
line, a JPEG without a caption. Output is byte-identical for the same code and installed packages.

Layout: text/{topics,code}.jsonl, images/*.{jpg,png,webp} + captions.jsonl,
videos/*.mp4 + *.txt, interleaved/docs.jsonl + interleaved/img/*.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
from PIL import Image

# (skimage file, output name, format, caption). Captions describe the actual photos.
PHOTOS = [
    ("astronaut.png", "astronaut", "jpg", "Portrait of astronaut Eileen Collins in an orange flight suit in front of an American flag."),
    ("coffee.png", "coffee", "jpg", "A cup of coffee with a saucer and a spoon on a wooden table."),
    ("chelsea.png", "chelsea", "png", "Close-up of a ginger tabby cat named Chelsea looking to the side."),
    ("rocket.jpg", "rocket", "jpg", "A rocket on the launch pad before lift-off under a blue sky."),
    ("hubble_deep_field.jpg", "hubble", "jpg", "Hubble deep field: hundreds of distant galaxies on a black background."),
    ("motorcycle_left.png", "motorcycle", "webp", "A red motorcycle parked in a room, seen from the left camera of a stereo pair."),
    ("camera.png", "cameraman", "png", "Black and white photo of a man with a camera on a tripod in a field."),
    ("coins.png", "coins", "png", "Greyscale photo of old coins laid out in rows on a dark background."),
    ("retina.jpg", "retina", "jpg", "A fundus photograph of a human retina with branching blood vessels."),
    ("ihc.png", "ihc", "jpg", "Microscope image of tissue stained with immunohistochemistry, brown and blue."),
    ("brick.png", "brick", "png", "Greyscale texture of a brick wall."),
    ("horse.png", "horse", "png", "Black silhouette of a horse on a white background."),
]
EXIF_PHOTO = "coffee"  # stored rotated 90 degrees with EXIF Orientation=6 (true image upright)
VIDEOS = [("astronaut", "pan", "A slow pan across a portrait of an astronaut."),
          ("chelsea", "zoom", "The camera zooms in on a ginger cat's face."),
          ("rocket", "pan", "A camera pan over a rocket standing on the launch pad.")]
CODE_MODULES = ["bisect.py", "colorsys.py", "heapq.py", "textwrap.py", "fnmatch.py", "shlex.py",
                "string.py", "queue.py", "graphlib.py", "keyword.py", "this.py", "numbers.py"]
MAX_SIDE = 320  # keep the corpus small: a few MB in all
VIDEO_SIZE = (160, 112)  # (width, height) of the MP4 frames
VIDEO_FPS, VIDEO_FRAMES = 12, 30


def _skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _load_photo(name: str) -> Image.Image:
    img = Image.open(_skimage_data_dir() / name)
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return img


def _save_image(img: Image.Image, path: Path, fmt: str, exif_rotate: bool = False) -> None:
    buf = io.BytesIO()
    if fmt == "jpg":
        if exif_rotate:
            # Store the pixels rotated by 90 degrees clockwise... and tag Orientation=6 (rotate 90 CW
            # to display), i.e. the stored raster is the upright image rotated 90 CCW.
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=88, exif=exif.tobytes())
        else:
            img.save(buf, "JPEG", quality=88)
    elif fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=85, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    path.write_bytes(buf.getvalue())


def encode_mp4(frames: list[np.ndarray], path: Path, fps: int = VIDEO_FPS) -> None:
    """Encode RGB uint8 frames [H, W, 3] as H.264 MP4, byte-identical on every run and x86 CPU.

    libx264 runs single-threaded and with its assembly kernels off (`no-asm`): the AVX-512 kernels
    it picks on CPUs that have them read uninitialised memory, so their output changed with the
    heap contents left by earlier work in the process, and the kernel set chosen per CPU gives
    different (valid) bitstreams on different machines. The portable C path costs well under a
    second for these small clips.
    """
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "28", "preset": "veryfast", "threads": "1", "x264-params": "no-asm=1"}
        stream.thread_count = 1
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def camera_path(img: Image.Image, motion: str, n: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """Frames of a virtual camera moving over a photo: a horizontal pan or a centred zoom."""
    W, H = VIDEO_SIZE
    src = np.asarray(img)
    ih, iw = src.shape[:2]
    frames = []
    for i in range(n):
        t = i / max(1, n - 1)
        if motion == "pan":
            ch = min(ih, int(iw * H / W))
            cw = int(ch * W / H)
            x0 = int(round(t * (iw - cw)))
            y0 = (ih - ch) // 2
        else:  # zoom from the full frame to a 50% crop about the centre
            scale = 1.0 - 0.5 * t
            ch = int(min(ih, iw * H / W) * scale)
            cw = int(ch * W / H)
            x0, y0 = (iw - cw) // 2, (ih - ch) // 2
        crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((W, H), Image.Resampling.BILINEAR)
        frames.append(np.asarray(crop))
    return frames


def _text_docs() -> tuple[list[str], list[str]]:
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / m).read_text(encoding="utf-8") for m in CODE_MODULES if (stdlib / m).exists()]
    return topics, code


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def generate(out_dir: str | os.PathLike, corrupt: bool = False) -> Path:
    out = Path(out_dir)
    for sub in ("text", "images", "videos", "interleaved/img"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    topics, code = _text_docs()
    _write_jsonl(out / "text" / "topics.jsonl", [{"text": t} for t in topics])
    _write_jsonl(out / "text" / "code.jsonl", [{"text": t} for t in code])

    photos, captions = {}, []
    for src, name, fmt, caption in PHOTOS:
        img = photos[name] = _load_photo(src)
        _save_image(img, out / "images" / f"{name}.{fmt}", fmt, exif_rotate=(name == EXIF_PHOTO))
        captions.append({"file": f"{name}.{fmt}", "caption": caption})
    # Half the captions as JSONL, the other half as sidecar .txt, so both paths are exercised.
    _write_jsonl(out / "images" / "captions.jsonl", captions[::2])
    for c in captions[1::2]:
        (out / "images" / (Path(c["file"]).stem + ".txt")).write_text(c["caption"] + "\n", encoding="utf-8")

    for name, motion, caption in VIDEOS:
        encode_mp4(camera_path(photos[name], motion), out / "videos" / f"{name}_{motion}.mp4")
        (out / "videos" / f"{name}_{motion}.txt").write_text(caption + "\n", encoding="utf-8")

    docs = []
    names = [p[1] for p in PHOTOS]
    for i in range(8):
        a, b = names[i % len(names)], names[(3 * i + 1) % len(names)]
        for n in (a, b):
            photos[n].save(out / "interleaved" / "img" / f"{n}.jpg", "JPEG", quality=85)
        para = topics[(7 * i) % len(topics)][:600].strip()
        docs.append({"segments": [{"text": para}, {"image": f"img/{a}.jpg"},
                                  {"text": dict((p[1], p[3]) for p in PHOTOS)[a]},
                                  {"image": f"img/{b}.jpg"},
                                  {"text": topics[(7 * i + 3) % len(topics)][:400].strip()}]})
    _write_jsonl(out / "interleaved" / "docs.jsonl", docs)

    if corrupt:
        _write_corrupt(out)
    return out


def _write_corrupt(out: Path) -> None:
    """Deliberately bad inputs: each must be reported and skipped by ingest, never silently dropped."""
    good = (out / "images" / "rocket.jpg").read_bytes()
    bad = bytearray(good[:len(good) // 3])  # a JPEG cut short with garbage in the entropy data
    bad[len(bad) // 2:len(bad) // 2 + 64] = b"\xff\x00" * 32
    (out / "images" / "corrupt.jpg").write_bytes(bytes(bad))
    _write_jsonl_append(out / "images" / "captions.jsonl", {"file": "corrupt.jpg", "caption": "A broken file."})
    _load_photo("moon.png").save(out / "images" / "nocaption.jpg", "JPEG", quality=80)
    mp4 = (out / "videos" / "astronaut_pan.mp4").read_bytes()
    (out / "videos" / "truncated.mp4").write_bytes(mp4[:len(mp4) // 2])
    (out / "videos" / "truncated.txt").write_text("A video cut in half.\n", encoding="utf-8")
    with open(out / "text" / "topics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "an unterminated json line\n')


def _write_jsonl_append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--corrupt", action="store_true", help="also write deliberately corrupt inputs")
    args = ap.parse_args(argv)
    out = generate(args.out_dir, corrupt=args.corrupt)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote corpus to {out} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
