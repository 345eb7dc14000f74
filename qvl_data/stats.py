"""Dataset statistics of a shard directory (``qvl-data stats``), computed without reading pixel data.

Each shard is memory-mapped and only the small columns are selected (``STATS_COLUMNS``); the ``pixels``
column is never converted, copied or touched, so a shard set larger than RAM is fine. Aggregation is
done with polars. :func:`compute_stats` returns plain JSON-able data (what ``--json`` prints);
:func:`render_stats` prints it as rich tables and :func:`stats_frames` gives polars DataFrames.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qvl_data.errors import QvlError
from qvl_data.format import Manifest
from qvl_data.schema import REASONS
from qvl_data.shards import load_manifest, open_checked_shard, shard_schema
from qvl_data.vision import image_token_count

# The only columns stats reads. Never add "pixels" here.
STATS_COLUMNS = ("source", "length", "trained_tokens", "truncated", "images", "image_grid_thw")
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
HISTOGRAM_BINS = 16  # about this many bins, of a round width
BAR_WIDTH = 40


# ---------------------------------------------------------------------------------------------- reading


def read_columns(out_dir: str | Path, manifest: Manifest | None = None) -> pa.Table:
    """``STATS_COLUMNS`` of every shard the manifest lists, memory-mapped (zero copy) and concatenated."""
    out_dir = Path(out_dir)
    manifest = manifest or load_manifest(out_dir)
    tables = []
    for shard in manifest.shards:
        path = out_dir / shard.file
        table = open_checked_shard(path, shard, manifest.pixel_format, manifest.geometry)[0]
        missing = [c for c in STATS_COLUMNS if c not in table.column_names]
        if missing:
            raise QvlError(f"{path}: shard lacks column(s) {', '.join(missing)}")
        tables.append(table.select(list(STATS_COLUMNS)))
    if not tables:
        return (
            shard_schema(manifest.pixel_format, manifest.geometry).empty_table().select(list(STATS_COLUMNS))
        )
    return pa.concat_tables(tables)


def row_frame(table: pa.Table, merge_size: int = 2) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(one line per row, one line per image) as polars frames.

    rows: row, source, length, trained_tokens, truncated, images, image_tokens.
    images: row, source, t, h, w, tokens (``image_token_count`` of the grid).
    """
    n_images = pc.list_value_length(table.column("images")).cast(pa.int32())  # offsets only, no strings
    rows = pl.from_arrow(table.select(["source", "length", "trained_tokens", "truncated"]))
    rows = rows.with_columns(pl.Series("images", n_images.to_numpy(), dtype=pl.Int32)).with_row_index("row")
    grids = pl.from_arrow(pa.table({"grid": table.column("image_grid_thw")})).with_row_index("row")
    images = (
        grids.explode("grid")
        .drop_nulls("grid")
        .select(
            "row",
            pl.col("grid").arr.get(0).alias("t"),
            pl.col("grid").arr.get(1).alias("h"),
            pl.col("grid").arr.get(2).alias("w"),
        )
    )
    # Tokens per image from the one place that arithmetic lives, once per distinct grid.
    distinct = images.select("t", "h", "w").unique()
    tokens = distinct.with_columns(
        pl.Series(
            "tokens",
            [image_token_count(g, merge_size) for g in distinct.iter_rows()],
            dtype=pl.Int64,
        )
    )
    images = images.join(tokens, on=["t", "h", "w"], how="left").sort("row", maintain_order=True)
    images = images.join(rows.select("row", "source"), on="row", how="left")
    per_row = images.group_by("row").agg(pl.col("tokens").sum().alias("image_tokens"))
    rows = (
        rows.join(per_row, on="row", how="left").with_columns(pl.col("image_tokens").fill_null(0)).sort("row")
    )
    return rows, images


# ---------------------------------------------------------------------------------------------- computing


def _round_width(raw: float) -> int:
    """The smallest 1, 2 or 5 × 10^k that is >= raw."""
    if raw <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 5, 10):
        if step * exp >= raw:
            return int(step * exp)
    return int(10 * exp)


def _length_summary(lengths: pl.Series) -> dict:
    if lengths.len() == 0:
        return {"mean": 0.0, **{name: 0 for name, _ in PERCENTILES}, "max": 0}
    out = {"mean": round(float(lengths.mean()), 1)}
    for name, q in PERCENTILES:
        out[name] = int(lengths.quantile(q, "nearest"))
    out["max"] = int(lengths.max())
    return out


def _histogram(lengths: pl.Series) -> dict:
    top = int(lengths.max()) if lengths.len() else 0
    width = _round_width((top + 1) / HISTOGRAM_BINS)
    counts = (lengths // width).value_counts().sort(lengths.name)
    by_bin = dict(counts.iter_rows())
    bins = [
        {"from": b * width, "to": (b + 1) * width, "rows": int(by_bin.get(b, 0))}
        for b in range(top // width + 1 if lengths.len() else 0)
    ]
    return {"bin_width": width, "bins": bins}


def _totals(frame: pl.DataFrame, images: pl.DataFrame) -> dict:
    tokens = int(frame["length"].sum())
    trained = int(frame["trained_tokens"].sum())
    return {
        "rows": frame.height,
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_ratio": round(trained / tokens, 4) if tokens else 0.0,
        "image_tokens": int(frame["image_tokens"].sum()),
        "images": images.height,
        "truncated": int(frame["truncated"].sum()),
        "max_length": int(frame["length"].max() or 0),
        "rows_without_trained_tokens": int((frame["trained_tokens"] == 0).sum()),
    }


def compute_stats(out_dir: str | Path) -> dict:
    """Everything ``qvl-data stats`` shows, as JSON-able data. Reads the manifest and small columns only."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    merge, patch = manifest.geometry.merge_size, manifest.geometry.patch_size
    pixel_format = manifest.pixel_format
    rows, images = row_frame(read_columns(out_dir, manifest), merge)

    source_names = list(manifest.sources)
    source_names += [s for s in rows["source"].unique(maintain_order=True).to_list() if s not in source_names]
    sources = {}
    lengths = {"all": _length_summary(rows["length"])}
    for name in source_names:
        part = rows.filter(pl.col("source") == name)
        sources[name] = {
            **_totals(part, images.filter(pl.col("source") == name)),
            "rejected": manifest.sources[name].rejected if name in manifest.sources else 0,
        }
        lengths[name] = _length_summary(part["length"])
    rejected = manifest.rejected
    totals = {**_totals(rows, images), "rejected": rejected.total}

    per_row = rows.group_by("images").agg(pl.len().alias("rows")).sort("images")
    grids = (
        images.group_by("t", "h", "w", "tokens")
        .agg(pl.len().alias("images"))
        .sort(["images", "t", "h", "w"], descending=[True, False, False, False])
    )
    # as the writer counted them (webp too): the image store's shards hold the pixels, once per image
    store = manifest.image_store
    pixel_bytes = sum(s.pixel_bytes for s in (store.shards if store else manifest.shards))
    distinct = store.images if store else images.height
    files = [out_dir / s.file for s in manifest.shards]
    size = sum(f.stat().st_size for f in files)

    warnings = []
    for key in ("rows", "tokens", "trained_tokens", "image_tokens", "images"):
        if getattr(manifest.totals, key) != totals[key]:
            said = getattr(manifest.totals, key)
            warnings.append(f"{key}: shards hold {totals[key]:,} but the manifest says {said:,}")
    n_grids = int(rows["images"].sum())
    if n_grids != images.height:
        warnings.append(f"{n_grids} image paths but {images.height} image grids stored")
    if totals["rows_without_trained_tokens"]:
        warnings.append(f"{totals['rows_without_trained_tokens']} row(s) have no trained tokens")
    if totals["truncated"]:
        warnings.append(f"{totals['truncated']} row(s) were truncated to cutoff_len")

    return {
        "shards_dir": str(out_dir),
        "pixel_format": pixel_format,
        "cutoff_len": manifest.options.cutoff_len,
        "totals": totals,
        "sources": sources,
        "lengths": lengths,
        "length_histogram": _histogram(rows["length"]),
        "images_per_row": [{"images": int(k), "rows": int(n)} for k, n in per_row.iter_rows()],
        "grids": [
            {
                "grid": [int(t), int(h), int(w)],
                "images": int(n),
                "tokens_per_image": int(tok),
                "processed_size": [int(w) * patch, int(h) * patch],
            }
            for t, h, w, tok, n in grids.iter_rows()
        ],
        "rejected": {"total": rejected.total, "by_reason": dict(rejected.by_reason)},
        "storage": {
            "shards": len(files),
            "bytes": size,
            "bytes_per_row": round(size / rows.height, 1) if rows.height else 0.0,
            "pixel_bytes": pixel_bytes,
            # per distinct image: the store keeps each once, however many rows use it
            "distinct_images": distinct,
            "image_shards": len(store.shards) if store else 0,
            "image_shard_bytes": sum(s.bytes for s in store.shards) if store else 0,
            "pixel_bytes_per_image": round(pixel_bytes / distinct, 1) if distinct else 0.0,
            "pixel_format": pixel_format,
        },
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------- views


def stats_frames(stats: dict) -> dict[str, pl.DataFrame]:
    """The tables of :func:`compute_stats` as polars DataFrames (for notebooks)."""
    sources = pl.DataFrame(
        [{"source": name, **values} for name, values in stats["sources"].items()]
        + [{"source": "total", **stats["totals"]}]
    )
    lengths = pl.DataFrame([{"source": name, **values} for name, values in stats["lengths"].items()])
    grids = pl.DataFrame(
        [
            {
                "grid": "×".join(map(str, g["grid"])),
                "images": g["images"],
                "tokens_per_image": g["tokens_per_image"],
                "processed_size": "×".join(map(str, g["processed_size"])),
            }
            for g in stats["grids"]
        ],
        schema={
            "grid": pl.String,
            "images": pl.Int64,
            "tokens_per_image": pl.Int64,
            "processed_size": pl.String,
        },
    )
    rejected = pl.DataFrame(
        [
            {"reason": r, "rows": n, "meaning": REASONS.get(r, "")}
            for r, n in stats["rejected"]["by_reason"].items()
        ],
        schema={"reason": pl.String, "rows": pl.Int64, "meaning": pl.String},
    )
    return {
        "sources": sources,
        "lengths": lengths,
        "length_histogram": pl.DataFrame(stats["length_histogram"]["bins"]),
        "images_per_row": pl.DataFrame(stats["images_per_row"]),
        "grids": grids,
        "rejected": rejected,
        "storage": pl.DataFrame([stats["storage"]]),
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(title: str, columns: list[str], left: int = 1, wide: bool = True) -> Table:
    table = Table(
        title=Text(title),
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0) if wide else 0,
    )
    for n, name in enumerate(columns):
        table.add_column(name, justify="left" if n < left else "right", no_wrap=True)
    return table


def _emit(console: Console, renderable) -> None:
    if isinstance(renderable, Table):
        _keep_cells_whole(renderable)
    console.print(renderable)
    console.print()


def _keep_cells_whole(table: Table) -> None:
    """On a narrow terminal rich squeezes no-wrap columns down to nothing (a count column vanished at 80
    columns): give every no-wrap column its content's width, so only wrapping columns give way."""
    for column in table.columns:
        if column.no_wrap:
            cells = [column.header, *column.cells]
            column.min_width = max(
                Text.from_markup(c).cell_len if isinstance(c, str) else len(c) for c in cells
            )


def render_stats(stats: dict, console: Console | None = None) -> None:
    """Print the statistics as rich tables."""
    console = console or Console(highlight=False)
    cols = ["source", "rows", "tokens", "trained", "ratio", "image tok", "images", "truncated", "rejected"]
    table = _table(f"qvl-data stats: {stats['shards_dir']}", cols, wide=False)
    table.columns[0].no_wrap = False  # a long source name folds; the counts (rejected last) always show
    table.columns[0].overflow = "fold"
    keys = ("rows", "tokens", "trained_tokens")
    for name, s in [*stats["sources"].items(), ("total", stats["totals"])]:
        cells = [f"{s[k]:,}" for k in keys] + [f"{s['trained_ratio']:.1%}"]
        cells += [f"{s[k]:,}" for k in ("image_tokens", "images", "truncated", "rejected")]
        table.add_row(Text(name), *cells, style="bold" if name == "total" else None)
    _emit(console, table)

    table = _table("length (tokens per row)", ["source", "mean", "p50", "p90", "p99", "max"])
    for name, s in stats["lengths"].items():
        table.add_row(Text(name), f"{s['mean']:,.1f}", *(f"{s[k]:,}" for k in ("p50", "p90", "p99", "max")))
    _emit(console, table)

    hist = stats["length_histogram"]
    table = _table(f"length histogram (bins of {hist['bin_width']} tokens)", ["tokens", "rows", ""])
    table.columns[2].justify = "left"
    peak = max((b["rows"] for b in hist["bins"]), default=0) or 1
    for b in hist["bins"]:
        bar = "█" * round(BAR_WIDTH * b["rows"] / peak) or ("▏" if b["rows"] else "")
        table.add_row(f"{b['from']:,}-{b['to'] - 1:,}", f"{b['rows']:,}", bar)
    _emit(console, table)

    table = _table("images per row", ["images", "rows"], left=0)
    for item in stats["images_per_row"]:
        table.add_row(str(item["images"]), f"{item['rows']:,}")
    _emit(console, table)
    if stats["grids"]:
        table = _table("image grids", ["grid t×h×w", "images", "tokens / image", "processed px"])
        for g in stats["grids"]:
            size = "×".join(map(str, g["processed_size"]))
            table.add_row(
                "×".join(map(str, g["grid"])), f"{g['images']:,}", f"{g['tokens_per_image']:,}", size
            )
        _emit(console, table)

    by_reason = stats["rejected"]["by_reason"]
    if by_reason:
        table = _table(
            f"rejected rows by reason ({stats['rejected']['total']:,})", ["reason", "rows", "meaning"]
        )
        table.columns[2].justify = "left"
        table.columns[2].no_wrap = False  # the explanation wraps; reason and count always show
        for reason, n in by_reason.items():
            table.add_row(reason, f"{n:,}", REASONS.get(reason, ""))
        _emit(console, table)
    else:
        _emit(console, "rejected rows: none")

    s = stats["storage"]
    table = _table(
        "storage", ["shards", "bytes", "bytes / row", "pixel bytes", "pixel bytes / image", "pixels"], 0
    )
    table.add_row(
        f"{s['shards']:,}",
        _bytes(s["bytes"]),
        _bytes(s["bytes_per_row"]),
        _bytes(s["pixel_bytes"]),
        _bytes(s["pixel_bytes_per_image"]),
        s["pixel_format"],
    )
    _emit(console, table)
    for warning in stats["warnings"]:
        console.print(Text.assemble(("warning: ", "bold yellow"), warning))
