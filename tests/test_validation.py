"""Every bad-input class: the right reason code, and nothing else lost
(docs/semantics.md section 1, issue part 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import chat, png_header_only, write_dataset, write_image

from qvl_data import shards
from qvl_data.build import build
from qvl_data.cli import main
from qvl_data.config import BuildConfig
from qvl_data.schema import REASONS
from qvl_data.shards import ShardSet

LONG_ANSWER = " ".join(["word"] * 320)

# (row, expected reason or None when the row must be written)
SHAREGPT_CASES = [
    ({"messages": chat("hi", "hello")}, None),
    ("just a string", "invalid_row"),
    ({"images": []}, "missing_field"),
    ({"messages": "hello"}, "invalid_type"),
    ({"messages": [{"role": "user", "content": 123}, {"role": "assistant", "content": "x"}]}, "invalid_type"),
    ({"messages": chat("hi", "   ")}, "empty_content"),
    (
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "invalid_role",
    ),
    (  # a tool's result with no call before it
        {"messages": [{"role": "observation", "content": "{}"}, {"role": "assistant", "content": "x"}]},
        "role_order",
    ),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]}, "role_order"),
    ({"messages": chat("hi", "hello", "and?")}, "role_order"),
    ({"messages": chat("<video>what happens?", "a goal")}, "unsupported_media"),
    ({"messages": chat("<image><image>two?", "one"), "images": ["small.png"]}, "image_count_mismatch"),
    (
        {"messages": chat("<image>see", "<image>back"), "images": ["small.png", "small.png"]},
        "image_in_answer",
    ),
    ({"messages": chat("<image>where?", "outside"), "images": ["../outside.png"]}, "image_outside_dataset"),
    ({"messages": chat("<image>where?", "nowhere"), "images": ["nope.png"]}, "image_missing"),
    ({"messages": chat("<image>what?", "noise"), "images": ["garbage.jpg"]}, "image_unreadable"),
    ({"messages": chat("<image>big?", "bomb"), "images": ["bomb.png"]}, "image_too_large"),
    ({"messages": chat("<image>ok?", "fine"), "images": ["small.png"]}, None),
    ({"id": "a", "messages": chat("first", "one")}, None),
    ({"id": "a", "messages": chat("second", "two")}, "duplicate_id"),
    ({"messages": chat("<image>huge", "cut"), "images": ["large.png"]}, "image_truncated"),
    (
        {"messages": chat("long", LONG_ANSWER, "<image>and this?", "dropped"), "images": ["small.png"]},
        "image_truncated",
    ),
    ({"messages": [{"role": "system", "content": "Be brief."}, *chat("hi", "hey")]}, None),
    ({"messages": chat("see <|image_pad|> here", "ok")}, "control_token"),
    ({"messages": chat("lone \ud800 surrogate", "ok")}, "invalid_text"),
    ({"messages": [{"role": "system", "content": "See <image>."}, *chat("hi", "hey")]}, "image_in_system"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "function_call", "content": "f(x)"}]},
        "invalid_function_call",
    ),
    ({"messages": chat("hi", "hello"), "tools": '{"name": "f"}'}, "invalid_tools"),
]

ALPACA_CASES = [
    ({"instruction": "Add", "input": "1 and 2", "output": "3"}, None),
    ({"instruction": "Add", "input": "1 and 2"}, "missing_field"),
    ({"instruction": ["Add"], "output": "3"}, "invalid_type"),
    ({"instruction": "Add", "output": "3", "history": [["only one"]]}, "invalid_type"),
    ({"instruction": "", "input": "", "output": "3"}, "empty_content"),
    ({"instruction": "Again", "output": "yes", "history": [["hi", "hello"]]}, None),
]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    data = root / "data"
    write_image(data / "small.png", (56, 56))
    write_image(data / "large.png", (600, 600))  # pre-resized to 512x512 -> 324 image tokens > cutoff 300
    write_image(root / "outside.png", (56, 56))
    (data / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    (data / "bomb.png").write_bytes(
        png_header_only(12000, 12000)
    )  # under PIL's own hard limit: ours must catch it
    columns = {"messages": "messages", "images": "images", "tools": "tools"}
    write_dataset(data, "bad_sharegpt", [row for row, _ in SHAREGPT_CASES], columns=columns)
    write_dataset(
        data,
        "bad_alpaca",
        [row for row, _ in ALPACA_CASES],
        formatting="alpaca",
        columns={"history": "history"},
    )
    jsonl = '{"instruction": "a", "output": "b"}\n{not json}\n\n{"instruction": "c", "output": "d"}\n'
    (data / "lines.jsonl").write_text(jsonl)
    info = json.loads((data / "dataset_info.json").read_text())
    info["lines"] = {"file_name": "lines.jsonl"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


@pytest.fixture(scope="module")
def bad_build(bad_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad-out")
    config = BuildConfig(
        dataset_dir=str(bad_dataset),
        dataset="bad_sharegpt,bad_alpaca,lines",
        out=str(out),
        cutoff_len=300,
        num_proc=2,
    )
    config.quiet = True
    build(config)
    return out


def _expected(source: str, cases: list) -> dict[int, str | None]:
    return {i: reason for i, (_, reason) in enumerate(cases)}


def test_every_row_is_written_or_rejected_with_its_reason(bad_build: Path):
    rejected = [json.loads(line) for line in (bad_build / "rejected.jsonl").read_text().splitlines()]
    got = {(r["source"], r["index"]): r["reason"] for r in rejected}
    expected = {("bad_sharegpt", i): r for i, r in _expected("bad_sharegpt", SHAREGPT_CASES).items()}
    expected |= {("bad_alpaca", i): r for i, r in _expected("bad_alpaca", ALPACA_CASES).items()}
    expected |= {("lines", 0): None, ("lines", 1): "invalid_row", ("lines", 2): None}
    assert got == {k: v for k, v in expected.items() if v is not None}

    rows = ShardSet(bad_build)
    written = {(rows.row(i)["source"], rows.row(i)["index"]) for i in range(len(rows))}
    assert written == {k for k, v in expected.items() if v is None}
    manifest = shards.load_manifest(bad_build)
    assert manifest.input_rows == len(expected) == len(written) + len(rejected)
    by_reason: dict[str, int] = {}
    for reason in got.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert manifest.rejected.by_reason == dict(sorted(by_reason.items()))
    # every reason class of the schema is exercised here
    assert set(got.values()) == set(REASONS)


def test_rejection_messages_name_file_row_and_field(bad_build: Path):
    rejected = {
        (r["source"], r["index"]): r
        for r in map(json.loads, (bad_build / "rejected.jsonl").read_text().splitlines())
    }
    r = rejected[("bad_sharegpt", 4)]
    assert r["file"].endswith("bad_sharegpt.json")
    assert r["message"].startswith("bad_sharegpt.json row 4:") and "messages[0].content" in r["message"]
    assert "must be a string, got int" in r["message"]
    r = rejected[("bad_sharegpt", 14)]
    assert "images[0] 'nope.png'" in r["message"] and "does not exist" in r["message"]
    r = rejected[("bad_sharegpt", 16)]
    assert "bomb.png" in r["message"] and "12000x12000" in r["message"]
    r = rejected[("bad_alpaca", 1)]
    assert "field output (the answer) is missing" in r["message"]
    r = rejected[("bad_alpaca", 4)]
    assert "fields instruction and input" in r["message"] and "message 0" not in r["message"]
    r = rejected[("bad_sharegpt", 12)]
    assert "field messages[1].content (an answer) contains <image>" in r["message"]
    r = rejected[("bad_sharegpt", 13)]
    assert "--allow-outside-images" in r["message"] and "--media-dir" in r["message"]
    r = rejected[("bad_sharegpt", 23)]
    assert "field messages[0].content" in r["message"] and "<|image_pad|>" in r["message"]
    r = rejected[("bad_sharegpt", 24)]
    assert "field messages[0].content is not valid Unicode" in r["message"]
    r = rejected[("lines", 1)]
    assert "not valid JSON" in r["message"]
    assert r["message"].startswith("lines.jsonl row 1:")
    for r in rejected.values():  # one convention: the data file's name and the 0-based row
        assert " object at 0x" not in r["message"] and "<_io." not in r["message"]
        assert r["file"].endswith(f"{r['source']}.json" if r["source"] != "lines" else "lines.jsonl")
        assert r["message"].startswith(f"{Path(r['file']).name} row {r['index']}: ")


def test_image_rows_that_fit_are_written_with_their_spans(bad_build: Path):
    rows = ShardSet(bad_build)
    row = rows.row(rows.find("bad_sharegpt", 17))
    assert row["image_grid_thw"] == [[1, 4, 4]] and row["input_ids"].count(151655) == 4
    assert rows.row(rows.find("bad_sharegpt", 22))["input_ids"][:8] == [
        151644,
        8948,
        198,
        3430,
        9814,
        13,
        151645,
        198,
    ]


def test_outside_images_allowed_on_request(bad_dataset: Path, tmp_path: Path):
    config = BuildConfig(
        dataset_dir=str(bad_dataset), dataset="bad_sharegpt", out=str(tmp_path), cutoff_len=300
    )
    config.allow_outside_images, config.quiet, config.num_proc = True, True, 1
    manifest = build(config).manifest
    assert "image_outside_dataset" not in manifest.rejected.by_reason
    assert manifest.sources["bad_sharegpt"].rows == 1 + sum(r is None for _, r in SHAREGPT_CASES)


def test_validate_command_reports_without_writing(bad_dataset: Path, tmp_path: Path):
    report = tmp_path / "report.jsonl"
    args = [
        "validate",
        "--dataset-dir",
        str(bad_dataset),
        "--dataset",
        "bad_alpaca",
        "--quiet",
        "--num-proc",
        "1",
    ]
    result = CliRunner().invoke(main, args + ["--report", str(report)])
    assert result.exit_code == 1, result.output
    assert "missing_field" in result.output and "bad_alpaca.json row 1" in result.output
    assert [json.loads(line)["index"] for line in report.read_text().splitlines()] == [1, 2, 3, 4]
    assert not (bad_dataset / "manifest.json").exists()


@pytest.mark.parametrize(
    ("setup", "dataset", "message"),
    [
        ("missing_file", "ghost", "data file of dataset 'ghost' does not exist"),
        ("invalid_json", "broken", "broken.json:1:3: invalid JSON"),
        (None, "no_such_dataset", "unknown dataset 'no_such_dataset'"),
        ("not_a_list", "obj", "expected a JSON list of rows"),
    ],
)
def test_whole_file_problems_fail_fast_with_one_line(tmp_path: Path, setup, dataset, message):
    write_dataset(tmp_path, "ok", [{"messages": chat("a", "b")}])
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    if setup == "missing_file":
        info["ghost"] = {"file_name": "ghost.json"}
    elif setup == "invalid_json":
        info["broken"] = {"file_name": "broken.json"}
        (tmp_path / "broken.json").write_text("[{oops")
    elif setup == "not_a_list":
        info["obj"] = {"file_name": "obj.json"}
        (tmp_path / "obj.json").write_text('{"a": 1}')
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    args = [
        "build",
        "--dataset-dir",
        str(tmp_path),
        "--dataset",
        f"ok,{dataset}",
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(main, args + ["--quiet"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_set_var_substitutes_placeholders(demo_dir: Path, tmp_path: Path, tokenizer):
    base = BuildConfig(
        dataset_dir=str(demo_dir), dataset="identity", out=str(tmp_path / "a"), num_proc=1, quiet=True
    )
    literal = ShardSet(build(base).out_dir).row(0)
    subst = BuildConfig(
        **{**base.__dict__, "out": str(tmp_path / "b"), "set_vars": ["name=Qwen", "author=Alibaba"]}
    )
    replaced = ShardSet(build(subst).out_dir).row(0)
    assert "{{name}}" in tokenizer.decode(literal["input_ids"])
    text = tokenizer.decode(replaced["input_ids"])
    assert "I am Qwen, an AI assistant developed by Alibaba" in text and "{{" not in text
