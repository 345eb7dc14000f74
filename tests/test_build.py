"""The demo build end to end: the docs/semantics.md section 5 figures,
determinism across workers, no-op rebuilds, shard files split at --shard-size-mb."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from qvl_data import shards
from qvl_data.build import build
from qvl_data.config import BuildConfig
from qvl_data.shards import ShardSet

SPEC_TOTALS = {  # docs/semantics.md section 5
    "mllm_demo": {"rows": 6, "tokens": 1025, "trained_tokens": 245, "max_length": 195, "image_tokens": 550},
    "identity": {"rows": 91, "tokens": 4895, "trained_tokens": 2684, "max_length": 96, "image_tokens": 0},
    "alpaca_en_demo": {
        "rows": 999,
        "tokens": 184208,
        "trained_tokens": 146830,
        "max_length": 672,
        "image_tokens": 0,
    },
}


def test_demo_build_matches_reference_figures(demo_build: Path):
    manifest = shards.load_manifest(demo_build)
    for source, expected in SPEC_TOTALS.items():
        got = manifest.sources[source]
        assert {k: getattr(got, k) for k in expected} == expected, source
        assert got.rejected == 0 and got.truncated == 0
    totals = manifest.totals
    assert (totals.rows, totals.tokens, totals.trained_tokens, totals.image_tokens) == (
        1096,
        190128,
        149759,
        550,
    )
    assert manifest.input_rows == 1096 and (manifest.rejected.total, manifest.rejected.by_reason) == (0, {})
    assert (demo_build / "rejected.jsonl").read_text() == ""
    assert sum(s.rows for s in manifest.shards) == 1096
    assert sum(s.tokens for s in manifest.shards) == 190128


def test_demo_row0_matches_reference(demo_build: Path):
    rows = ShardSet(demo_build)
    row = rows.row(0)
    assert (row["source"], row["index"]) == ("mllm_demo", 0)
    assert row["input_ids"][:16] == [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
    ] + [
        872,
        198,
        151652,
        151655,
    ]
    assert row["length"] == len(row["input_ids"]) == 195
    assert row["trained_tokens"] == sum(label != -100 for label in row["labels"]) == 23
    assert row["image_grid_thw"] == [[1, 12, 22], [1, 12, 22]]
    assert row["input_ids"].count(151655) == 2 * 66
    assert rows.pixel_patches(0).shape == (2 * 264, 588)
    # 2.jpg (300x199) -> grid [1,14,22] -> 77 tokens
    row1 = rows.row(1)
    assert row1["image_grid_thw"] == [[1, 14, 22]] and row1["input_ids"].count(151655) == 77
    # rows are in input order: sources in the order given, rows in file order
    order = [(rows.row(i)["source"], rows.row(i)["index"]) for i in (0, 5, 6, 96, 97, 1095)]
    assert order == [
        ("mllm_demo", 0),
        ("mllm_demo", 5),
        ("identity", 0),
        ("identity", 90),
        ("alpaca_en_demo", 0),
        ("alpaca_en_demo", 998),
    ]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.arrow"))}


def test_num_proc_1_and_2_are_byte_identical(tmp_path: Path, demo_dir: Path):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        build(
            BuildConfig(
                dataset_dir=str(demo_dir), dataset="mllm_demo,identity", out=str(out), num_proc=n, quiet=True
            )
        )
        outs.append(out)
    assert _shard_bytes(outs[0]) == _shard_bytes(outs[1])
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()


def test_second_build_is_a_noop_and_force_rebuilds(tmp_path: Path, demo_dir: Path):
    config = BuildConfig(
        dataset_dir=str(demo_dir), dataset="mllm_demo", out=str(tmp_path / "o"), num_proc=1, quiet=True
    )
    first = build(config)
    assert not first.skipped
    shard = tmp_path / "o" / first.manifest.shards[0].file
    mtime = shard.stat().st_mtime_ns
    second = build(config)
    assert second.skipped and shard.stat().st_mtime_ns == mtime
    # a changed option changes the fingerprint
    third = build(BuildConfig(**{**config.__dict__, "cutoff_len": 100}))
    assert not third.skipped and third.manifest.fingerprint != first.manifest.fingerprint
    config.force = True
    assert not build(config).skipped


def test_second_build_via_cli_says_so(tmp_path: Path, demo_dir: Path):
    from click.testing import CliRunner

    from qvl_data.cli import main

    args = [
        "build",
        "--dataset-dir",
        str(demo_dir),
        "--dataset",
        "mllm_demo",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert CliRunner().invoke(main, args + ["--num-proc", "1"]).exit_code == 0
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "up to date" in result.output and "nothing to do" in result.output


def test_small_shard_size_splits_a_partition_into_several_files_with_the_same_rows(
    tmp_path: Path, demo_dir: Path
):
    # (a build killed half way is in tests/test_scale_out.py: nothing readable, then resumed)
    def build_with(shard_size_mb: int, out: Path):
        config = BuildConfig(
            dataset_dir=str(demo_dir),
            dataset="alpaca_en_demo",
            out=str(out),
            partition_rows=1000,  # one partition of 1,000 text rows (~1.5 MiB), in batches of 64
            shard_size_mb=shard_size_mb,
            quiet=True,
        )
        return build(config), ShardSet(out)

    (whole, whole_set), (split, split_set) = (
        build_with(512, tmp_path / "whole"),
        build_with(1, tmp_path / "split"),
    )
    assert [p.index for p in split.manifest.partitions] == [0]
    fp8 = split.manifest.fingerprint[:8]  # the build's own names (a rebuild's never collide with them)
    assert [s.file for s in whole.manifest.shards] == [
        f"shards/part-{whole.manifest.fingerprint[:8]}-00000-000.arrow"
    ]
    names = [s.file for s in split.manifest.shards]
    assert len(names) == 2 and names == [f"shards/part-{fp8}-00000-{k:03d}.arrow" for k in range(len(names))]
    assert split.manifest.shards[0].bytes >= 1 << 20  # a shard closes at the first batch past the size
    assert not list((tmp_path / "split").rglob("*.tmp"))
    table = pa.concat_tables(split_set.tables).combine_chunks()
    assert table.equals(pa.concat_tables(whole_set.tables).combine_chunks())  # the same rows, in order


def test_a_resumed_build_says_so_before_it_works(tmp_path: Path, demo_dir: Path):
    from click.testing import CliRunner

    from qvl_data.cli import main
    from qvl_data.task import PARTS_DIR

    args = ["build", "--dataset-dir", str(demo_dir), "--dataset", "identity", "--out", str(tmp_path)]
    args += ["--partition-rows", "32", "--num-proc", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    # as after a kill: no manifest, and one partition's completion record missing
    (tmp_path / shards.MANIFEST).unlink()
    (tmp_path / ".qvl-build" / PARTS_DIR / "00001.json").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("resuming: 2 of 3 partitions were finished by an earlier run")
    assert "resumed: reused 2 of 3 partitions already built" in result.output
