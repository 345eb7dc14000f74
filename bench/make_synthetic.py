"""A synthetic multimodal SFT set: sharegpt rows with 1-3 JPEG images each, alpaca-length text.

    python bench/make_synthetic.py --rows 2000 --seed 0            # -> data/bench/synthetic-2000-s0

* Text: the instructions and answers of LLaMA-Factory's ``alpaca_en_demo`` (real alpaca lengths), picked at
  random per row; 5% of the rows are multi-turn (2-3 user/assistant pairs).
* Images: 1 (50%), 2 (30%) or 3 (20%) per row, ``<image>`` placed before or after the text of a user turn.
  Each side is log-uniform in ``[--min-side, --max-side]`` (300-2000 px by default), so about a quarter of
  the images are below ``image_max_pixels`` (262144 = 512x512) and the rest are pre-resized down, as real
  photo sets are. Photo-like content (smooth colour fields, shapes, sensor noise), JPEG quality 90.
* The rows draw from a pool of ``--unique-images`` distinct files (512 by default): the cost of decoding
  and processing an image is paid per row either way (neither qvl nor the baseline caches decoded
  images), and the pool keeps the generation time and the disk use of a 20,000-row set reasonable. The pool
  is shared between sets of the same seed and sizes (hard links), and row i depends only on (seed, i), so
  ``--rows 500`` is exactly the first 500 rows of ``--rows 2000``.

A set whose parameters match an existing one is not regenerated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from PIL import Image, ImageDraw

from bench.common import DATA_DIR

DATASET = "synthetic"
_MARKER = ".synthetic.json"
_VERSION = 1


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour regions + a few shapes + fine noise: decodes and compresses like a photo."""
    small = rng.integers(0, 256, (max(2, height // 96), max(2, width // 96), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = (
            x0 + int(rng.integers(20, max(21, width // 3))),
            y0 + int(rng.integers(20, max(21, height // 3))),
        )
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    tile = rng.integers(-10, 11, (128, 128, 3), dtype=np.int16)
    reps = (-(-height // 128), -(-width // 128), 1)
    noise = np.tile(tile, reps)[:height, :width]
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _side(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(float(np.exp(rng.uniform(np.log(lo), np.log(hi))))))


def make_pool(pool_dir: Path, count: int, seed: int, min_side: int, max_side: int) -> list[dict]:
    """``count`` JPEGs ``img-NNNNN.jpg`` in ``pool_dir`` (image j depends only on (seed, j)); their sizes."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    marker = pool_dir / _MARKER
    params = {"version": _VERSION, "count": count, "seed": seed, "min_side": min_side, "max_side": max_side}
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("params") == params:
            return saved["images"]
    images = []
    for j in range(count):
        rng = np.random.default_rng([seed, 1, j])
        width, height = _side(rng, min_side, max_side), _side(rng, min_side, max_side)
        path = pool_dir / f"img-{j:05d}.jpg"
        if not path.is_file():
            tmp = path.with_suffix(".tmp.jpg")
            _photo_like(rng, width, height).save(tmp, quality=90)
            os.replace(tmp, path)
        images.append({"file": path.name, "width": width, "height": height, "bytes": path.stat().st_size})
    marker.write_text(json.dumps({"params": params, "images": images}))
    return images


def _alpaca_pairs() -> list[tuple[str, str]]:
    from qvl_data.demo import fetch_demo_data

    rows = json.loads((fetch_demo_data() / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    pairs = []
    for row in rows:
        user = "\n".join(x for x in (row.get("instruction"), row.get("input")) if x)
        if user and row.get("output"):
            pairs.append((user, row["output"]))
    return pairs


def make_row(i: int, seed: int, pairs: list[tuple[str, str]], short: list[int], pool_size: int) -> dict:
    """Row ``i``: depends only on (seed, i) and the text/image pools."""
    rng = np.random.default_rng([seed, 2, i])
    n_images = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    n_turns = 1 if rng.random() < 0.95 else int(rng.integers(2, 4))
    if n_turns == 1:
        chosen = [int(rng.integers(len(pairs)))]
    else:  # keep multi-turn rows well inside cutoff_len 2048 even with 3 large images
        chosen = [short[int(rng.integers(len(short)))] for _ in range(n_turns)]
    users = [pairs[k][0] for k in chosen]
    turn_of_image = sorted(int(rng.integers(n_turns)) if n_turns > 1 else 0 for _ in range(n_images))
    for turn in range(n_turns):
        k = turn_of_image.count(turn)
        if k:
            users[turn] = (
                "<image>" * k + users[turn] if rng.random() < 0.8 else users[turn] + "\n" + "<image>" * k
            )
    messages = []
    for user, k in zip(users, chosen, strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": pairs[k][1]}]
    images = [f"images/img-{int(rng.integers(pool_size)):05d}.jpg" for _ in range(n_images)]
    return {"messages": messages, "images": images}


def make_synthetic(
    rows: int,
    seed: int = 0,
    out: Path | None = None,
    unique_images: int = 512,
    min_side: int = 300,
    max_side: int = 2000,
    quiet: bool = False,
) -> Path:
    """Write the set (``dataset_info.json``, ``synthetic.json``, ``images/``) and return its directory."""
    out = Path(out) if out else DATA_DIR / f"synthetic-{rows}-s{seed}"
    params = {
        "version": _VERSION,
        "rows": rows,
        "seed": seed,
        "unique_images": unique_images,
        "min_side": min_side,
        "max_side": max_side,
    }
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        return out
    started = time.perf_counter()
    pool_dir = out.parent / f"pool-s{seed}-u{unique_images}-{min_side}-{max_side}"
    pool = make_pool(pool_dir, unique_images, seed, min_side, max_side)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for item in pool:  # hard links: no copy, and the paths stay inside the dataset folder
        src, dst = pool_dir / item["file"], out / "images" / item["file"]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    pairs = _alpaca_pairs()
    short = [k for k, (user, answer) in enumerate(pairs) if len(user) + len(answer) < 800]
    data = [make_row(i, seed, pairs, short, unique_images) for i in range(rows)]
    (out / f"{DATASET}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    info = {
        DATASET: {
            "file_name": f"{DATASET}.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    n_images = sum(len(r["images"]) for r in data)
    sizes = {item["file"]: item for item in pool}
    above = sum(
        sizes[p.split("/")[-1]]["width"] * sizes[p.split("/")[-1]]["height"] > 262144
        for r in data
        for p in r["images"]
    )
    stats = {
        "rows": rows,
        "images": n_images,
        "images_above_262144_px": above,
        "multi_turn_rows": sum(len(r["messages"]) > 2 for r in data),
        "jpeg_bytes": sum(sizes[p.split("/")[-1]]["bytes"] for r in data for p in r["images"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps({"params": params, "stats": stats}))
    if not quiet:
        print(f"{out}: {json.dumps(stats)}")
    return out


def synthetic_stats(path: Path) -> dict:
    return json.loads((Path(path) / _MARKER).read_text())["stats"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: data/bench/synthetic-<rows>-s<seed>")
    parser.add_argument(
        "--unique-images", type=int, default=512, help="distinct image files the rows draw from"
    )
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=2000)
    args = parser.parse_args(argv)
    make_synthetic(args.rows, args.seed, args.out, args.unique_images, args.min_side, args.max_side)


if __name__ == "__main__":
    main()
