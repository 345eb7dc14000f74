"""Every template's input_ids, labels and image grids equal LLaMA-Factory 0.9.5's, through the real build.

The committed LF runs (tests/fixtures/lf095/expected, README there) are rebuilt with ``qvl-data build`` of the
fixture datasets, with the run's settings as command-line options: ``--model qwen3-vl`` (the offline
Qwen3-VL processor) for the ``qwen3_vl`` / ``qwen3_vl_nothink`` runs, the default processor for ``qwen2_vl``;
``qwen3_vl`` is the Qwen3-VL family's default template and ``--template`` selects the others. The one row
qvl builds differently follow qvl's own rules: a row whose truncation would cut an image span is rejected
(``image_truncated``) where LF cuts through it, and a literal ``<image>`` in a system prompt, which LF leaves
as words beside no image span, is rejected (``image_in_system``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qvl_data import shards
from qvl_data.cli import main
from qvl_data.shards import ShardSet

FIXTURES = Path(__file__).parent / "fixtures" / "lf095"
DATA = FIXTURES / "data"
IMAGE_PAD_ID = 151655

# the LF runs a build reproduces (the malformed tool rows and the predict runs: tests/test_tool_rows.py)
RUNS = (
    # every file type LF reads, images as paths and embedded (Parquet struct, raw bytes, HF Image)
    "qwen2_vl.formats",
    "qwen3_vl.formats",
    "qwen2_vl.demo",
    "qwen2_vl.cases",
    "qwen2_vl.cases.mask_history",
    "qwen2_vl.cases.cutoff512",
    "qwen3_vl.demo",
    "qwen3_vl.cases",
    "qwen3_vl.cases.mask_history",
    "qwen3_vl.cases.cutoff512",
    "qwen3_vl.cases.enable_thinking_false",
    "qwen3_vl.cases.preserve_thinking",
    "qwen3_vl.cases.mask_history.preserve_thinking",
    "qwen3_vl.cases.image_max_pixels_589824",
    "qwen3_vl_nothink.demo",
    "qwen3_vl_nothink.cases",
    "qwen3_vl_nothink.cases.mask_history",
    "qwen3_vl_nothink.cases.cutoff512",
    "qwen2_vl.tools",
    "qwen3_vl.tools",
    "qwen3_vl.tools.enable_thinking_false",
    "qwen3_vl_nothink.tools",
)


def lf_run(name: str) -> dict:
    return json.load(gzip.open(FIXTURES / "expected" / f"{name}.json.gz"))


def labels_from_spans(input_ids: list[int], spans: list[list[int]]) -> list[int]:
    labels = [-100] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return labels


def build_like(run: dict, out: Path) -> Path:
    """``qvl-data build`` of the run's datasets with its settings, as a user would type it."""
    settings = run["settings"]
    args = ["build", "--dataset-dir", str(DATA), "--dataset", ",".join(run["datasets"])]
    args += ["--out", str(out), "--num-proc", "1", "--quiet"]
    args += [
        "--cutoff-len",
        str(settings["cutoff_len"]),
        "--image-max-pixels",
        str(settings["image_max_pixels"]),
    ]
    args += ["--image-min-pixels", str(settings["image_min_pixels"])]
    if settings["mask_history"]:
        args.append("--mask-history")
    if run["template"] != "qwen2_vl":
        args += ["--model", "qwen3-vl"]
        if run["template"] != "qwen3_vl":  # qwen3_vl is the family's own
            args += ["--template", run["template"]]
    if not settings["enable_thinking"]:
        args += ["--enable-thinking", "false"]
    if settings["preserve_thinking"]:
        args.append("--preserve-thinking")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", RUNS)
def test_build_equals_llamafactory(tmp_path: Path, name: str) -> None:
    run = lf_run(name)
    out = build_like(run, tmp_path / "out")
    manifest = shards.load_manifest(out)
    assert manifest.options.template == run["template"]
    assert manifest.family == ("qwen2_5_vl" if run["template"] == "qwen2_vl" else "qwen3_vl")
    file_of = {}
    info = json.loads((DATA / "dataset_info.json").read_text())
    for dataset in run["datasets"]:
        file_of[dataset] = info[dataset]["file_name"]
    rows = ShardSet(out)
    built = {}
    for i in range(len(rows)):
        row = rows.row(i)
        built[(file_of[row["source"]], row["index"])] = row
    rejected = {
        (file_of[r["source"]], r["index"]): r["reason"]
        for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
    }
    checked = 0
    # a file LF could not load at all (the save_to_disk folder) is one error row; qvl reads it
    # (tests/test_columnar_files.py compares its rows)
    lf_rows = [lf for lf in run["rows"] if lf["dataset"] not in run.get("file_errors", {})]
    assert len(lf_rows) >= len(run["rows"]) - 1
    for lf in lf_rows:
        key = (lf["dataset"], lf["index"])
        if key in rejected:
            # qvl's rules: a cut image span is rejected (LF cut it: fewer pads than its grids give), and so
            # is the word <image> in a system prompt
            expected = "image_in_system" if key in IMAGE_IN_SYSTEM else "image_truncated"
            assert rejected[key] == expected, (key, rejected[key])
            continue
        row = built[key]
        assert row["input_ids"] == lf["input_ids"], key
        assert row["labels"] == labels_from_spans(lf["input_ids"], lf["label_spans"]), key
        assert row["image_grid_thw"] == lf.get("image_grid_thw", []), key
        checked += 1
    # rejected are exactly the rows where LF cut through an image span (long_with_image at cutoff 512, or
    # at 2048 once its image is larger)
    cut = {(lf["dataset"], lf["index"]) for lf in lf_rows if _cuts_an_image(lf)}
    in_system = {(lf["dataset"], lf["index"]) for lf in lf_rows} & IMAGE_IN_SYSTEM
    assert set(rejected) == cut | in_system and checked == len(lf_rows) - len(cut | in_system)
    assert len(cut) == (1 if name.endswith(("cutoff512", "image_max_pixels_589824")) else 0)
    assert len(in_system) == (1 if ".cases" in name else 0)


def _image_in_system() -> set[tuple[str, int]]:
    """The fixture rows whose system prompt holds the word ``<image>`` (qvl rejects them)."""
    rows = json.loads((DATA / "cases.json").read_text(encoding="utf-8"))
    return {
        ("cases.json", i)
        for i, row in enumerate(rows)
        if any(m["role"] == "system" and "<image>" in m["content"] for m in row["messages"])
    }


IMAGE_IN_SYSTEM = _image_in_system()


def _cuts_an_image(lf: dict) -> bool:
    grid_tokens = sum(t * h * w // 4 for t, h, w in lf.get("image_grid_thw", []))
    return lf["input_ids"].count(IMAGE_PAD_ID) < grid_tokens


PREDICT_RUNS = {
    "qwen2_vl.cases.predict": (None, True),
    "qwen3_vl.cases.predict": ("qwen3-vl", True),
    "qwen3_vl.cases.predict.enable_thinking_false": ("qwen3-vl", False),
    "qwen3_vl_nothink.cases.predict": ("qwen3-vl", True),
}


@pytest.mark.parametrize("name", list(PREDICT_RUNS))
def test_generation_prompts_equal_llamafactory(name: str) -> None:
    """LF's predict-path prompts (``encode_oneturn``) vs qvl's ``encode_prompt_record``: history answers
    lose their think blocks, and with enable_thinking false the prompt ends with the empty think. LF
    truncates prompts longer than cutoff_len; qvl never does, so those rows are left out."""
    from qvl_data.encode import EncodeOptions, encode_prompt_record
    from qvl_data.processor import load_image_processor, load_tokenizer
    from qvl_data.schema import Rejection
    from qvl_data.sources import ReadOptions, iter_records, resolve_datasets

    model, enable_thinking = PREDICT_RUNS[name]
    run = lf_run(name)
    tokenizer, image_processor = load_tokenizer(model), load_image_processor(model)
    options = EncodeOptions(
        image_max_pixels=run["settings"]["image_max_pixels"],
        template=run["template"],
        enable_thinking=enable_thinking,
    )
    specs = resolve_datasets(DATA, run["datasets"])
    lf_rows = {(row["dataset"], row["index"]): row for row in run["rows"]}
    file_of = {spec.name: spec.path.name for spec in specs}
    equal = 0
    rejected = 0
    for record in iter_records(specs, ReadOptions(dataset_dir=DATA)):
        if isinstance(record, Rejection):  # the word <image> in a system prompt (qvl rejects the row)
            assert record.reason == "image_in_system" and ("cases.json", record.index) in IMAGE_IN_SYSTEM
            rejected += 1
            continue
        lf = lf_rows[(file_of[record["source"]], record["index"])]
        if len(lf["input_ids"]) + len(lf["response_ids"]) >= run["settings"]["cutoff_len"]:
            continue  # LF truncated this prompt (long_answer, long_multi_turn)
        prompt = encode_prompt_record(record, tokenizer, image_processor, options)
        assert prompt.input_ids == lf["input_ids"], record["id"]
        equal += 1
    assert rejected == 1 and equal == len(run["rows"]) - 2 - rejected
