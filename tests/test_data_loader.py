"""qvl_train.data: the step plan, the rank/epoch split, the shard dataset and the collate."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from qvl_data.errors import QvlError
from qvl_data.shards import ShardSet
from qvl_train.data import (
    RankBatchSampler,
    ShardDataset,
    collate,
    epoch_order,
    rank_rows,
)
from qvl_train.plan import make_plan
from qvl_train.steps import to_device

# ------------------------------------------------------------------------------------------------ plan


def test_plan_of_the_seed_recipe_on_the_demo_set():
    plan = make_plan(1096, world_size=2, batch_size=1, grad_accum=8, num_train_epochs=3.0, warmup_ratio=0.1)
    assert (plan.per_rank_rows, plan.per_rank_batches, plan.steps_per_epoch) == (548, 548, 69)
    assert (plan.total_steps, plan.warmup_steps, plan.effective_batch) == (207, 21, 16)
    # 548 = 68 * 8 + 4: the last step of each epoch has 4 micro-batches
    assert plan.micro_batches(0) == (0, 0, 8)
    assert plan.micro_batches(68) == (0, 544, 4)
    assert plan.micro_batches(69) == (1, 0, 8)
    assert plan.micro_batches(206) == (2, 544, 4)


def test_plan_edge_cases():
    one = make_plan(1096, 1, 1, 8, 3.0, warmup_ratio=0.1)
    assert (one.steps_per_epoch, one.total_steps, one.warmup_steps) == (137, 411, 42)
    odd = make_plan(9, world_size=2, batch_size=2, grad_accum=2, num_train_epochs=1.0)
    assert (odd.per_rank_rows, odd.per_rank_batches, odd.steps_per_epoch, odd.total_steps) == (5, 3, 2, 2)
    assert make_plan(1096, 2, 1, 8, 0.5).total_steps == 35  # ceil(0.5 * 69)
    capped = make_plan(1096, 2, 1, 8, 3.0, max_steps=500, warmup_ratio=0.1, warmup_steps=7)
    assert (capped.total_steps, capped.warmup_steps) == (500, 7)
    assert capped.micro_batches(499)[0] == 7  # max_steps cycles through further epochs
    with pytest.raises(QvlError):
        make_plan(0, 1, 1, 1, 1.0)


# --------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("rows,world", [(10, 2), (9, 2), (7, 3), (3, 4)])
def test_rank_split_is_distributed_sampler(rows, world):
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ours = rank_rows(rows, epoch, seed=42, rank=rank, world_size=world)
            reference = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=42)
            reference.set_epoch(epoch)
            assert ours == list(reference)
            seen += ours
        assert set(seen) == set(range(rows))  # every row, each rank the same count (wrap-around padding)
        assert len(seen) == -(-rows // world) * world
    if rows % world == 0:
        ranks = [set(rank_rows(rows, 0, 42, r, world)) for r in range(world)]
        assert all(not (a & b) for i, a in enumerate(ranks) for b in ranks[i + 1 :])


def test_epochs_are_different_seeded_permutations():
    assert epoch_order(100, 0, 42) == epoch_order(100, 0, 42)
    assert epoch_order(100, 0, 42) != epoch_order(100, 1, 42)
    assert epoch_order(100, 1, 42) == epoch_order(100, 0, 43)  # seed + epoch
    assert sorted(epoch_order(100, 3, 7)) == list(range(100))


def test_sampler_resumes_at_the_next_batch():
    sampler = RankBatchSampler(rows=21, batch_size=2, rank=1, world_size=2, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == 6 and sum(len(b) for b in full) == 11
    sampler.set_epoch(3, start_batch=4)
    assert list(sampler) == full[4:] and len(sampler) == 2


# --------------------------------------------------------------------------------------------- dataset


def test_dataset_rows_pixels_and_collate(demo_build):
    ds = ShardDataset(demo_build)
    shards = ShardSet(demo_build)
    assert len(ds) == 1096 and ds.pixel_format == "uint8"
    assert len(ShardDataset(demo_build, max_rows=8)) == 8

    image_row, text_row = ds[0], ds[10]
    assert image_row["source"] == "mllm_demo" and image_row["index"] == 0
    assert image_row["input_ids"].tolist() == shards.row(0)["input_ids"]
    assert image_row["pixels"].dtype == torch.uint8 and image_row["pixels"].shape == (528, 588)
    assert image_row["image_grid_thw"].tolist() == [[1, 12, 22], [1, 12, 22]]
    assert text_row["pixels"] is None and text_row["image_grid_thw"].shape == (0, 3)

    batch = collate([text_row, image_row, ds[1]])
    n = max(len(r["input_ids"]) for r in (text_row, image_row, ds[1]))
    assert batch["input_ids"].shape == (3, -(-n // 8) * 8) and batch["input_ids"].shape[1] % 8 == 0
    length = len(text_row["input_ids"])
    assert batch["input_ids"][0, length:].eq(151643).all() and batch["labels"][0, length:].eq(-100).all()
    assert batch["attention_mask"][0].sum() == length and batch["attention_mask"][1].sum() == len(
        image_row["input_ids"]
    )
    assert batch["pixels"].shape[0] == 528 + ds[1]["pixels"].shape[0]
    assert (
        batch["image_grid_thw"].tolist()
        == image_row["image_grid_thw"].tolist() + ds[1]["image_grid_thw"].tolist()
    )
    expected_tokens = sum(int((r["labels"][1:] != -100).sum()) for r in (text_row, image_row, ds[1]))
    assert batch["trained_tokens"] == expected_tokens
    assert [r[1:] for r in batch["rows"]] == [("identity", 4), ("mllm_demo", 0), ("mllm_demo", 1)]

    # uint8 patches become the processor's float32 pixel_values on the device, bit for bit
    inputs = to_device(collate([image_row]), torch.device("cpu"), torch.float32, ds.processor)
    assert np.array_equal(inputs["pixel_values"].numpy(), shards.pixel_values(0))
    assert inputs["mm_token_type_ids"].sum() == int((image_row["input_ids"] == 151655).sum()) == 132
    assert "pixel_values" not in to_device(
        collate([text_row]), torch.device("cpu"), torch.float32, ds.processor
    )


def _mapped_rss(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of ``paths`` (from /proc/self/smaps)."""
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = fields[-1] if len(fields) == 6 else None
        elif fields and fields[0] == "Rss:" and current in paths:
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_a_pass_reads_with_pread_and_leaves_the_mapping_cold(demo_build):
    """The dataset copies the token and pixel lists out with pread and releases the few mapped pages
    that locating them touched: after a full pass almost nothing of the mapped shards is resident, so the
    loader's RSS does not grow with the data it reads."""
    ds = ShardDataset(demo_build)
    ds[0]
    paths = {str(p.resolve()) for p in ds.shards().paths}
    before = _mapped_rss(paths)
    read = 0
    for i in range(len(ds)):
        row = ds[i]
        read += row["input_ids"].numel() * 8 + (row["pixels"].numel() if row["pixels"] is not None else 0)
    assert read > 2 << 20
    assert _mapped_rss(paths) - before < 0.02 * read

    mapped = ShardSet(demo_build)  # the values equal those read through the map
    for i in range(0, len(ds), 7):
        row = ds[i]
        assert row["input_ids"].dtype == row["labels"].dtype == torch.long
        assert row["input_ids"].tolist() == mapped.row(i, ("input_ids",))["input_ids"]
        assert row["labels"].tolist() == mapped.row(i, ("labels",))["labels"]
        if row["pixels"] is not None:
            assert np.array_equal(row["pixels"].numpy(), mapped.pixel_patches(i))


def test_webp_shards_deliver_the_uint8_batches(demo_dir, demo_build, tmp_path):
    """A webp build of mllm_demo: smaller pixels, and the loader delivers exactly the uint8 build's patches
    (decoded in the dataset) and, after to_device, the processor's pixel_values."""
    from click.testing import CliRunner

    from qvl_data.cli import main
    from qvl_data.stats import compute_stats

    out = tmp_path / "webp"
    args = ["build", "--dataset-dir", str(demo_dir), "--dataset", "mllm_demo", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--pixel-format", "webp", "--quiet"])
    assert result.exit_code == 0, result.output
    webp, uint8 = ShardDataset(out), ShardDataset(demo_build)
    assert webp.pixel_format == "webp" and len(webp) == 6
    for i in range(len(webp)):
        row, expected = webp[i], uint8[i]  # mllm_demo is first in the demo build, in the same order
        assert (row["source"], row["index"]) == (expected["source"], expected["index"])
        assert row["pixels"].dtype == torch.uint8 and torch.equal(row["pixels"], expected["pixels"])
        inputs = to_device(collate([row]), torch.device("cpu"), torch.float32, webp.processor)
        assert np.array_equal(inputs["pixel_values"].numpy(), ShardSet(demo_build).pixel_values(i))
    stored = compute_stats(out)["storage"]
    raw = compute_stats(demo_build)["storage"]
    assert stored["pixel_format"] == "webp"
    assert stored["pixel_bytes_per_image"] < 0.75 * raw["pixel_bytes_per_image"]


def test_dataset_is_opened_lazily_and_pickles_without_the_mapping(demo_build):
    ds = ShardDataset(demo_build)
    assert ds._shards is None
    ds[3]
    assert ds._shards is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._shards is None and clone[3]["input_ids"].tolist() == ds[3]["input_ids"].tolist()


def test_workers_deliver_the_sampler_order(demo_build):
    ds = ShardDataset(demo_build, max_rows=40)
    batches = []
    for workers in (0, 2):
        sampler = RankBatchSampler(len(ds), batch_size=3, rank=0, world_size=2, seed=1)
        sampler.set_epoch(1, start_batch=2)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        batches.append([[r[0] for r in b["rows"]] for b in loader])
    assert batches[0] == batches[1] == sampler.batches()[2:]


def test_missing_and_foreign_shards_are_one_line_errors(tmp_path):
    with pytest.raises(QvlError, match="no such shard directory"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(QvlError, match="missing"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "qvl-shards", "format_version": 99}')
    with pytest.raises(QvlError, match="version 99"):
        ShardDataset(tmp_path)
