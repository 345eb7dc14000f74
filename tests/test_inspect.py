"""qvl-data inspect: trained vs masked spans, image badges, header numbers, sampling, rejected rows, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import processor_summary
from PIL import Image

from qvl_data.cli import main
from qvl_data.inspect import (
    NEWLINE_MARK,
    TRAINED_CLOSE,
    TRAINED_OPEN,
    break_offsets,
    conversation_runs,
    manifest_tokenizer,
    open_shards,
    row_images,
    runs_to_text,
    unnormalize_patches,
)
from qvl_data.processor import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from qvl_data.template import IGNORE_INDEX
from qvl_data.vision import image_token_count, open_image, pixel_values_from_uint8, preresize_image

TRAINED_SPAN = re.compile(f"{TRAINED_OPEN}(.*?){TRAINED_CLOSE}", re.S)
PANEL_TITLE = re.compile(r"╭─ (\S+:\d+) ─")


def run(*args: str, columns: int = 100):
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(main, [*args], catch_exceptions=False)
    return result


def inspect_ok(*args: str) -> str:
    result = run("inspect", *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def panel_text(output: str) -> str:
    """The panel contents without the box border, lines joined (panels wrap long lines)."""
    lines = []
    for line in output.splitlines():
        if line.startswith("│"):
            lines.append(line[1:].rstrip().removesuffix("│").rstrip()[1:])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- rendering


def test_mllm_demo_row0_trained_spans_badges_and_header(demo_build: Path) -> None:
    out = inspect_ok(str(demo_build), "--index", "mllm_demo:0", "--no-color")
    assert "\x1b[" not in out  # not a TTY: plain text
    assert PANEL_TITLE.findall(out) == ["mllm_demo:0"]
    body = panel_text(out)

    # Header: length, trained tokens, truncation, images; one line per image with grid, tokens, sizes.
    assert "row 0 of 1096 · length 195 · trained 23 (11.8%) · truncated no · images 2" in body
    for k in (1, 2):
        assert re.search(rf"image {k}\s+1×12×22\s+66\s+300×168\s+300×168\s+308×168\s+1\.jpg", body), body

    # Exactly the two answers are trained, each with its <|im_end|> and the trained "\n" shown as ↵.
    assert TRAINED_SPAN.findall(body) == [
        f"They're Kane and Gretzka from Bayern Munich.<|im_end|>{NEWLINE_MARK}",
        f"They are celebrating on the soccer field.<|im_end|>{NEWLINE_MARK}",
    ]
    # Masked text (system, user turns, template) sits outside the markers, special tokens visible.
    masked = TRAINED_SPAN.sub("", body)
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" in masked
    # Each image span collapses to one badge whose count is image_token_count(grid).
    assert "[image 1 · 12×22 patches · 66 tokens]Who are they?<|im_end|>" in masked
    assert "What are they doing?[image 2 · 12×22 patches · 66 tokens]<|im_end|>" in masked
    assert image_token_count([1, 12, 22]) == 66
    assert "<|image_pad|>" not in body and "<|vision_start|>" not in body
    # The legend explains the markers in plain text.
    assert f"{TRAINED_OPEN}trained{TRAINED_CLOSE}" in out and "-100" in out


def test_image_badge_token_count_differs_per_grid(demo_build: Path) -> None:
    body = panel_text(inspect_ok(str(demo_build), "--index", "mllm_demo:1"))
    assert "length 140 · trained 23 (16.4%)" in body
    assert re.search(r"image 1\s+1×14×22\s+77\s+300×199\s+300×199\s+308×196\s+2\.jpg", body)
    assert "[image 1 · 14×22 patches · 77 tokens]Who is he?<|im_end|>" in body


def test_runs_cover_every_token_and_match_the_labels(demo_build: Path) -> None:
    """On every multimodal row and a sample of text rows, the rendered runs are exactly the labels."""
    shards = open_shards(demo_build)
    tok = manifest_tokenizer(shards.manifest)
    rows = list(range(6)) + list(range(6, len(shards), 97))
    for i in rows:
        row = shards.row(i)
        ids, labels = row["input_ids"], row["labels"]
        runs = conversation_runs(
            ids,
            labels,
            lambda t: tok.decode(t, skip_special_tokens=False),
            set(tok.all_special_ids),
            row["image_grid_thw"],
        )
        pieces = [p for r in runs for p in r.pieces]
        assert [p.start for p in pieces] == [0] + [p.end for p in pieces[:-1]]
        assert pieces[-1].end == len(ids)
        trained = [p for r in runs if r.trained for p in r.pieces]
        assert sum(p.end - p.start for p in trained) == row["trained_tokens"]
        for r in runs:
            for p in r.pieces:
                assert all((label != IGNORE_INDEX) == r.trained for label in labels[p.start : p.end])
        images = [p for p in pieces if p.kind == "image"]
        assert [p.tokens for p in images] == [image_token_count(g) for g in row["image_grid_thw"]]
        assert not any(p.mismatch for p in images)
        trained_text = "".join(p.text for p in trained)
        assert trained_text == tok.decode(
            [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        )


def test_conversation_runs_synthetic_badge_and_mismatch() -> None:
    ids = [7, VISION_START_ID, IMAGE_PAD_ID, IMAGE_PAD_ID, IMAGE_PAD_ID, VISION_END_ID, 8, 9, 10]
    labels = [IGNORE_INDEX] * 7 + [9, 10]
    decode = lambda t: "".join({7: "Q", 8: "?", 9: "A", 10: "\n"}[x] for x in t)  # noqa: E731
    runs = conversation_runs(ids, labels, decode, set(), [[1, 2, 6]])
    assert [r.trained for r in runs] == [False, True]
    assert (
        runs_to_text(runs).plain
        == f"Q[image 1 · 2×6 patches · 3 tokens]?{TRAINED_OPEN}A{NEWLINE_MARK}{TRAINED_CLOSE}"
    )
    # A grid that disagrees with the span is flagged, not hidden.
    bad = conversation_runs(ids, labels, decode, set(), [[1, 4, 6]])
    assert bad[0].pieces[1].mismatch
    assert "[image 1 · 4×6 patches · 6 tokens ≠ 3 in the text]" in runs_to_text(bad).plain


def test_tokens_table(demo_build: Path) -> None:
    out = inspect_ok(str(demo_build), "--index", "mllm_demo:0", "--tokens")
    assert "tokens of mllm_demo:0" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["0", "151644", "'<|im_start|>'", "-100"] in lines
    assert ["15-80", "151655", "'<|image_pad|>'", "×66", "-100"] in lines  # one line per image span
    assert ["91", "6865", "'They'", "6865"] in lines  # trained: label = id
    assert ["102", "151645", "'<|im_end|>'", "151645"] in lines
    assert ["103", "198", "'\\n'", "198"] in lines
    assert ["194", "198", "'\\n'", "198"] in lines


def test_color_only_when_asked(demo_build: Path) -> None:
    assert "\x1b[" not in inspect_ok(str(demo_build), "--index", "identity:5")
    colored = inspect_ok(str(demo_build), "--index", "identity:5", "--color")
    assert "\x1b[" in colored and TRAINED_OPEN in colored


# --------------------------------------------------------------------------------------------- selection


def test_sample_is_reproducible_and_filtered(demo_build: Path) -> None:
    first = PANEL_TITLE.findall(inspect_ok(str(demo_build), "--sample", "3", "--seed", "7"))
    assert len(first) == 3
    assert PANEL_TITLE.findall(inspect_ok(str(demo_build), "--sample", "3", "--seed", "7")) == first
    assert PANEL_TITLE.findall(inspect_ok(str(demo_build), "--sample", "3", "--seed", "8")) != first
    only = PANEL_TITLE.findall(inspect_ok(str(demo_build), "--sample", "2", "--source", "mllm_demo"))
    assert len(only) == 2 and all(t.startswith("mllm_demo:") for t in only)
    both = PANEL_TITLE.findall(inspect_ok(str(demo_build), "--index", "mllm_demo:0", "--index", "identity:5"))
    assert both == ["mllm_demo:0", "identity:5"]


@pytest.fixture()
def build_with_rejections(demo_build: Path, tmp_path: Path) -> Path:
    """A copy of the demo build whose rejected.jsonl and manifest list two rejected rows."""
    out = tmp_path / "build"
    shutil.copytree(demo_build, out)
    rejected = [
        {
            "source": "mllm_demo",
            "index": 9,
            "reason": "image_missing",
            "message": "image file not found: 'x.jpg'",
        },
        {"source": "identity", "index": 99, "reason": "role_order", "message": "turns do not alternate"},
    ]
    (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected), encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest["rejected"] = {"total": 2, "by_reason": {"image_missing": 1, "role_order": 1}}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def test_rejected_rows_listed_with_reasons(build_with_rejections: Path) -> None:
    out = inspect_ok(str(build_with_rejections), "--rejected")
    assert "2 rejected row(s)" in out
    assert re.search(r"mllm_demo\s+.\s+9\s+.\s+image_missing\s+.\s+image file not found: 'x.jpg'", out)
    assert re.search(r"identity\s+.\s+99\s+.\s+role_order", out)
    assert "image_missing: 1 · an image file does not exist" in out
    only = inspect_ok(str(build_with_rejections), "--rejected", "--source", "identity")
    assert "1 rejected row(s)" in only and "image_missing" not in only
    # Asking for a rejected row says why it is not there.
    result = run("inspect", str(build_with_rejections), "--index", "mllm_demo:9")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: mllm_demo:9 was rejected (image_missing): image file not found: 'x.jpg'"
    )


def test_no_rejected_rows(demo_build: Path) -> None:
    assert "0 rejected row(s)" in inspect_ok(str(demo_build), "--rejected")


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["inspect", "stats"])
def test_missing_or_incompatible_directory_is_one_line(
    command: str, demo_build: Path, tmp_path: Path
) -> None:
    result = run(command, str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no such shard directory" in result.stderr

    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((demo_build / "manifest.json").read_text(encoding="utf-8"))
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}), encoding="utf-8")
    result = run(command, str(old))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "shard format version 99 but this qvl reads version 3" in result.stderr

    (tmp_path / "empty").mkdir()
    result = run(command, str(tmp_path / "empty"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "missing" in result.stderr

    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    shutil.copy(demo_build / "manifest.json", broken)
    first = manifest["shards"][0]["file"]  # the manifest names each shard file
    shard = (demo_build / first).read_bytes()
    (broken / first).write_bytes(shard[: len(shard) // 2])
    result = run(command, str(broken))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "unreadable shard" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--index", "mllm_demo"], "--index expects SOURCE:INDEX"),
        (["--index", "nope:1"], "unknown source 'nope'; this build has: mllm_demo, identity, alpaca_en_demo"),
        (["--index", "mllm_demo:6"], "mllm_demo:6 is not in"),
        (["--source", "nope"], "unknown source 'nope'"),
    ],
)
def test_bad_selection_is_one_line(demo_build: Path, args: list[str], message: str) -> None:
    result = run("inspect", str(demo_build), *args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


# --------------------------------------------------------------------------------------------- pixels


def test_row_images_match_the_resized_source(demo_build: Path) -> None:
    shards = open_shards(demo_build)
    i = shards.find("mllm_demo", 1)
    (image,) = row_images(shards, i)
    row = shards.row(i)
    _, h, w = row["image_grid_thw"][0]
    options = shards.manifest.options
    source = preresize_image(open_image(row["images"][0]), options.image_max_pixels, options.image_min_pixels)
    expected = np.asarray(source.resize((w * 14, h * 14), Image.BICUBIC))
    assert image.shape == expected.shape == (196, 308, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_unnormalize_inverts_float32_pixels() -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(8, 588), dtype=np.uint8)
    processor = processor_summary()
    f32 = pixel_values_from_uint8(u8, processor.image_mean, processor.image_std, processor.rescale_factor)
    assert f32.shape == (8, 1176)
    np.testing.assert_array_equal(unnormalize_patches(f32, processor), u8)


def _panel_lines(columns: int, demo_build: Path) -> str:
    result = run(
        "inspect", str(demo_build), "--source", "mllm_demo", "--sample", "6", "--no-color", columns=columns
    )
    assert result.exit_code == 0, result.output
    return "\n".join(line.strip("│ ") for line in result.stdout.splitlines())


@pytest.mark.parametrize("columns", [30, 40, 46, 50, 60, 80])
def test_control_tokens_are_never_split_across_lines(demo_build: Path, columns: int) -> None:
    # mllm_demo's answers are runs of Chinese without spaces, which rich folds at any character
    text = _panel_lines(columns, demo_build)
    unwrapped = _panel_lines(400, demo_build)
    for token in ("<|im_start|>", "<|im_end|>"):
        assert text.count(token) == unwrapped.count(token) > 0, token


def test_break_offsets_break_before_an_unbroken_span_not_inside_it() -> None:
    text = "他们在做什么？" + "<|im_end|>"
    # 14 cells of Chinese + a 10-cell token on an 18-cell line: the token moves to the next line whole
    assert break_offsets(text, 18, [(7, 17)]) == [7]
    # a word wider than the line is still folded at characters
    assert break_offsets("abcdefghij", 4, []) == [4, 8]
