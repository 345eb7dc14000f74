"""The model families (qvl_data/family.py): how a build picks one, Qwen3-VL's offline processor, and its
pixels: bit-identical to transformers' image processor with the Qwen3-VL constants in every pixel format,
and to LLaMA-Factory 0.9.5's recorded checksums (tests/fixtures/lf095/expected/index.json)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset
from PIL import Image

from qvl_data import shards
from qvl_data.cli import main
from qvl_data.errors import QvlError
from qvl_data.family import FAMILIES, family_for_model_type
from qvl_data.processor import (
    embedded_processor_dir,
    load_image_processor,
    load_tokenizer,
    model_family,
    preprocessor_config,
)
from qvl_data.shards import ShardSet
from qvl_data.vision import open_image, preresize_image

FIXTURES = Path(__file__).parent / "fixtures" / "lf095"
PIXELS = json.loads((FIXTURES / "expected" / "index.json").read_text())["pixels"]
IMAGES = ["images/grad_300x168.png", "images/grad_1000x700.png", "mllm_demo_data/1.jpg"]


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------------------- choosing a family


def test_each_family_has_its_geometry_template_and_tokens():
    widths = {
        n: (f.geometry.values_per_patch("uint8"), f.geometry.values_per_patch("float32"))
        for n, f in FAMILIES.items()
    }
    assert widths == {
        "qwen2_vl": (588, 1176),
        "qwen2_5_vl": (588, 1176),
        "qwen3_vl": (768, 1536),
        "qwen3_vl_moe": (768, 1536),
    }
    assert [f.template for f in FAMILIES.values()] == ["qwen2_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl"]
    assert [f.factor for f in FAMILIES.values()] == [28, 28, 32, 32]
    assert len(FAMILIES["qwen3_vl"].added_tokens) == 26 and len(FAMILIES["qwen2_5_vl"].added_tokens) == 22
    for family in FAMILIES.values():
        assert "<think>" not in family.control_tokens and "<tool_call>" not in family.control_tokens
        assert "<|im_start|>" in family.control_tokens and "<|image_pad|>" in family.control_tokens


def test_an_unsupported_model_type_stops_with_one_line_naming_it_and_the_supported_ones(tmp_path: Path):
    with pytest.raises(QvlError, match="'llava'.*qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        family_for_model_type("llava")
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(embedded_processor_dir(), checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llava"}))
    data = write_dataset(tmp_path / "data", "d", [{"messages": chat("hi", "hello")}])
    args = ["build", "--dataset-dir", str(data), "--dataset", "d", "--model", str(checkpoint)]
    line = one_line_error([*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert (
        "model_type 'llava' is not a supported" in line and "qwen3_vl_moe" in line and str(checkpoint) in line
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_checkpoint_whose_config_and_processor_disagree_stops_with_one_line(tmp_path: Path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(embedded_processor_dir(), checkpoint)  # 14-px Qwen2.5-VL files...
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))  # ...called Qwen3-VL
    data = write_dataset(tmp_path / "data", "d", [{"messages": chat("hi", "hello")}])
    args = [
        "build",
        "--dataset-dir",
        str(data),
        "--dataset",
        "d",
        "--model",
        str(checkpoint),
        "--num-proc",
        "1",
    ]
    line = one_line_error([*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert "patch_size 14" in line and "model family has 16" in line


def test_the_family_comes_from_config_json_then_processor_class(tmp_path: Path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(embedded_processor_dir("qwen3_vl"), checkpoint)
    assert model_family(str(checkpoint)).name == "qwen3_vl"  # no config.json: Qwen3VLProcessor
    for model_type in ("qwen3_vl_moe", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert model_family(str(checkpoint)).name == model_type
    assert model_family(None).name == "qwen2_5_vl"
    assert [model_family(n).name for n in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")] == list(
        FAMILIES
    )


def test_an_unknown_template_stops_with_one_line(tmp_path: Path):
    data = write_dataset(tmp_path / "data", "d", [{"messages": chat("hi", "hello")}])
    line = one_line_error(["build", "--dataset-dir", str(data), "--dataset", "d", "--template", "qwen3"])
    assert "qwen3" in line and "qwen3_vl_nothink" in line


# --------------------------------------------------------------------------------- the offline processor


def test_qwen3_vl_offline_tokenizer_has_its_added_tokens_at_their_ids():
    tokenizer = load_tokenizer("qwen3-vl")
    assert len(tokenizer) == 151669
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    assert {i: added[i] for i in range(151665, 151669)} == {
        151665: "<tool_response>",
        151666: "</tool_response>",
        151667: "<think>",
        151668: "</think>",
    }
    assert tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False) == [151667, 271, 151668, 271]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    # the same byte-level BPE ranks as Qwen2.5-VL's
    text = "Hello, wörld! 1234 <|im_start|>user\n  spaces\tand tabs"
    assert tokenizer.encode(text) == load_tokenizer(None).encode(text)
    processor = load_image_processor("qwen3-vl")
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (16, 2, 2)
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (65536, 16777216)


def test_the_default_processor_is_still_qwen2_5_vl_and_named_the_same():
    assert embedded_processor_dir("qwen2_5_vl") == embedded_processor_dir()
    assert embedded_processor_dir().name.startswith("qwen2_5_vl-")
    config = json.loads((embedded_processor_dir() / "preprocessor_config.json").read_text())
    assert config == preprocessor_config("qwen2_5_vl") and config["min_pixels"] == 3136


# ----------------------------------------------------------------------------------------------- pixels


def _reference_pixel_values(path: Path) -> tuple[np.ndarray, list[int]]:
    """transformers' own PIL image processor, built with the Qwen3-VL constants, on the pre-resized image."""
    from transformers import Qwen2VLImageProcessorPil

    config = preprocessor_config("qwen3_vl")
    for key in ("image_processor_type", "processor_class"):
        config.pop(key)
    processor = Qwen2VLImageProcessorPil(**config)
    image = preresize_image(open_image(path).convert("RGB"), image_max_pixels=262144, image_min_pixels=1024)
    out = processor(images=[image], return_tensors="np")
    return np.asarray(out["pixel_values"], dtype=np.float32), out["image_grid_thw"][0].tolist()


@pytest.fixture(scope="module")
def qwen3_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One qvl-data build --model qwen3-vl per pixel format: one row per image of IMAGES."""
    root = tmp_path_factory.mktemp("qwen3-pixels")
    data = root / "data"
    for image in IMAGES:
        (data / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "data" / image, data / image)
    rows = [{"messages": chat("<image>What is it?", "A picture."), "images": [image]} for image in IMAGES]
    write_dataset(data, "pix", rows)
    builds = {}
    for pixel_format in ("uint8", "webp", "float32"):
        out = root / pixel_format
        args = ["build", "--dataset-dir", str(data), "--dataset", "pix", "--model", "qwen3-vl"]
        args += ["--pixel-format", pixel_format, "--out", str(out), "--num-proc", "1", "--quiet"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        builds[pixel_format] = out
    return builds


@pytest.mark.parametrize("pixel_format", ["uint8", "webp", "float32"])
def test_qwen3_vl_pixels_equal_transformers_and_llamafactory(
    qwen3_builds: dict[str, Path], pixel_format: str
):
    rows = ShardSet(qwen3_builds[pixel_format])
    manifest = shards.load_manifest(qwen3_builds[pixel_format])
    assert (manifest.family, manifest.template, manifest.geometry.patch_size) == ("qwen3_vl", "qwen3_vl", 16)
    width = {"uint8": 768, "webp": 768, "float32": 1536}[pixel_format]
    for i, image in enumerate(IMAGES):
        row = rows.row(i)
        reference, grid = _reference_pixel_values(FIXTURES / "data" / image)
        assert row["image_grid_thw"] == [grid] == PIXELS[f"qwen3_vl:{image}"]["image_grid_thw"]
        t, h, w = grid
        assert row["input_ids"].count(151655) == t * h * w // 4  # image tokens per image
        assert rows.pixel_patches(i).shape == (t * h * w, width)
        values = rows.pixel_values(i)
        assert values.shape == (t * h * w, 1536) and values.dtype == np.float32
        assert np.array_equal(values, reference)  # bit for bit (NaN-free)
        digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
        assert digest == PIXELS[f"qwen3_vl:{image}"]["pixel_values_float32_sha256"]


def test_qwen3_vl_small_images_are_upscaled_to_its_min_pixels(tmp_path: Path):
    """min_pixels 65536 raises a 64x40 image to 352x224: grid [1, 14, 22], 77 tokens (Qwen2.5-VL: 6)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 40), (10, 200, 30)).save(data / "small.png")
    write_dataset(data, "s", [{"messages": chat("<image>?", "green"), "images": ["small.png"]}])
    grids = {}
    for model in ("qwen3-vl", "qwen2.5-vl"):
        out = tmp_path / model
        args = ["build", "--dataset-dir", str(data), "--dataset", "s", "--model", model]
        result = CliRunner().invoke(main, [*args, "--out", str(out), "--num-proc", "1", "--quiet"])
        assert result.exit_code == 0, result.output
        row = ShardSet(out).row(0)
        grids[model] = (row["image_grid_thw"], row["input_ids"].count(151655))
    assert grids == {"qwen3-vl": ([[1, 14, 22]], 77), "qwen2.5-vl": ([[1, 4, 6]], 6)}


def test_stats_and_inspect_read_the_qwen3_vl_geometry(qwen3_builds: dict[str, Path]):
    """16-px patches: 1000x700 pre-resized to 611x428 is processed at 608x416 (grid 26x38), 247 tokens."""
    from qvl_data.inspect import row_images
    from qvl_data.stats import compute_stats

    for pixel_format, out in qwen3_builds.items():
        grids = {tuple(g["grid"]): g for g in compute_stats(out)["grids"]}
        assert grids[(1, 26, 38)]["tokens_per_image"] == 247
        assert grids[(1, 26, 38)]["processed_size"] == [608, 416]
        assert grids[(1, 12, 22)]["processed_size"] == [352, 192]
        images = row_images(ShardSet(out), 1)
        assert [image.shape for image in images] == [(416, 608, 3)], pixel_format


def test_a_qwen3_vl_checkpoint_directory_builds_the_same_shards_as_the_offline_name(tmp_path: Path):
    checkpoint = tmp_path / "Qwen3-VL-8B-Instruct"
    shutil.copytree(embedded_processor_dir("qwen3_vl"), checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    data = write_dataset(
        tmp_path / "data",
        "d",
        [{"messages": chat("<think>hm</think> hi", "<think>\nx\n</think>\n\nhello", "more?", "no")}],
    )
    digests = {}
    for model in ("qwen3-vl", str(checkpoint)):
        out = tmp_path / ("named" if model == "qwen3-vl" else "dir")
        args = ["build", "--dataset-dir", str(data), "--dataset", "d", "--model", model]
        result = CliRunner().invoke(main, [*args, "--out", str(out), "--num-proc", "1", "--quiet"])
        assert result.exit_code == 0, result.output
        manifest = shards.load_manifest(out)
        assert (manifest.family, manifest.template) == ("qwen3_vl", "qwen3_vl")
        digests[model] = [s.sha256 for s in manifest.shards]
        row = ShardSet(out).row(0)
    assert digests["qwen3-vl"] == digests[str(checkpoint)]
    # <think> in a question is content (token 151667); the second answer got the empty think, trained
    assert 151667 in row["input_ids"][: row["labels"].index(151667)]
    assert row["labels"].count(151667) == 2
