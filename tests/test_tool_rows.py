"""Tool-calling rows (sharegpt ``function_call`` / ``observation`` turns and a ``tools`` column): LLaMA-Factory
0.9.5's outputs where its rows are well formed, a rejection with a reason where they are not, and the same
prompts and references for generation.

The well-formed fixture rows (``tools.json``) are checked token for token by tests/test_templates_lf095.py
(runs ``<template>.tools``); here: the malformed rows, the predict path, convert, inspect and the row checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write_dataset
from test_templates_lf095 import DATA, build_like, labels_from_spans, lf_run

from qvl_data.cli import main as data_main
from qvl_data.encode import EncodeOptions, encode_prompt_record
from qvl_data.family import TEMPLATES
from qvl_data.processor import load_image_processor, load_tokenizer
from qvl_data.schema import Rejection
from qvl_data.shards import ShardSet
from qvl_data.sources import (
    COMMON_COLUMNS,
    SHAREGPT_COLUMNS,
    SHAREGPT_TAGS,
    DatasetSpec,
    ReadOptions,
    convert_row,
    iter_records,
    resolve_datasets,
)
from qvl_data.template import empty_thought, format_function_call

TOOLS = json.loads(json.loads((DATA / "tools.json").read_text())[0]["tools"])
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL_TEXT = f"<tool_call>\n{WEATHER}\n</tool_call>"

# what qvl does with each malformed row of tools_malformed/ (LF: tests/fixtures/lf095/README.md); None: encoded
MALFORMED = {
    "function_call_not_json": "invalid_function_call",  # LF: RuntimeError, the run stops
    "function_call_json_without_name": "invalid_function_call",  # LF: KeyError
    "tools_not_json": "invalid_tools",  # LF: RuntimeError
    "tools_json_object_not_list": "invalid_tools",  # LF: AttributeError
    "tools_list_of_strings": "invalid_tools",  # LF: AttributeError
    "tools_as_json_list": "invalid_tools",  # LF: TypeError
    "observation_after_human": "role_order",  # LF: dropped with a warning
    "function_call_first": "role_order",  # LF: dropped
    "two_human_turns": "role_order",  # LF: dropped
    "ends_with_observation": "role_order",  # LF: dropped
    "function_call_arguments_as_string": "invalid_function_call",  # LF: trains the string as a JSON string
    "tools_empty_list": None,  # LF: encoded (an empty system segment for qwen3_vl); so is qvl
}


@pytest.mark.parametrize("name", ["qwen2_vl.tools_malformed", "qwen3_vl.tools_malformed"])
def test_malformed_tool_rows_are_rejected_with_their_reason(tmp_path: Path, name: str) -> None:
    run = lf_run(name)
    out = build_like(run, tmp_path / "out")
    rejected = {r["source"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    rows = ShardSet(out)
    built = {rows.row(i)["source"]: rows.row(i) for i in range(len(rows))}
    by_id = {}
    for dataset, lf in zip(run["datasets"], run["rows"], strict=True):
        expected = MALFORMED[lf["id"]]
        if expected is None:
            assert lf["input_ids"] == built[dataset]["input_ids"], lf["id"]
            assert built[dataset]["labels"] == labels_from_spans(lf["input_ids"], lf["label_spans"])
        else:
            assert "input_ids" not in lf or lf["id"] == "function_call_arguments_as_string"
            by_id[lf["id"]] = rejected[dataset]
            assert rejected[dataset]["reason"] == expected, (lf["id"], rejected[dataset])
    assert len(built) == 1 and len(rejected) == len(MALFORMED) - 1
    # the messages say which field and what to do
    assert "field tools must be a JSON string" in by_id["tools_as_json_list"]["message"]
    assert (
        "field conversations[1].value (a function call) is not JSON"
        in (by_id["function_call_not_json"]["message"])
    )
    assert (
        'has "arguments" as a JSON string, not an object'
        in (by_id["function_call_arguments_as_string"]["message"])
    )
    assert "conversations[1].from is 'observation'" in by_id["observation_after_human"]["message"]


PREDICT_RUNS = {"qwen2_vl.tools.predict": None, "qwen3_vl.tools.predict": "qwen3-vl"}


@pytest.mark.parametrize("name", list(PREDICT_RUNS))
def test_tool_prompts_and_references_equal_llamafactory(name: str) -> None:
    """LF's predict encoding of the 8 tool rows: the prompt before the last answer or call; the reference is
    that call as the template writes it (its ids, closed by ``<|im_end|>\\n``, are LF's response ids)."""
    run = lf_run(name)
    tokenizer, image_processor = load_tokenizer(PREDICT_RUNS[name]), load_image_processor(PREDICT_RUNS[name])
    template = TEMPLATES[run["template"]]
    options = EncodeOptions(image_max_pixels=run["settings"]["image_max_pixels"], template=template.name)
    lf_rows = {row["index"]: row for row in run["rows"]}
    calls = 0
    for record in iter_records(resolve_datasets(DATA, ["tools"]), ReadOptions(dataset_dir=DATA)):
        lf = lf_rows[record["index"]]
        prompt = encode_prompt_record(record, tokenizer, image_processor, options)
        assert prompt.input_ids == lf["input_ids"], record["id"]
        response = tokenizer.encode(prompt.reference + "<|im_end|>\n", add_special_tokens=False)
        if template.reasoning and "<think>" not in record["messages"][-1]["content"]:
            response = tokenizer.encode(empty_thought(template), add_special_tokens=False) + response
        assert response == lf["response_ids"], record["id"]
        calls += record["messages"][-1]["role"] == "function_call"
    assert calls == 2  # single_call and call_in_tool_call_tags end with a call
    assert lf_rows[0]["response_ids"][-2:] == [151645, 198]


@pytest.fixture(scope="module")
def tools_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "out"
    result = CliRunner().invoke(
        data_main,
        [
            "build",
            "--dataset-dir",
            str(DATA),
            "--dataset",
            "tools",
            "--out",
            str(out),
            "--num-proc",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_predict_command_gives_llamafactorys_prompts_and_keeps_the_tool_call(
    tools_build: Path, tmp_path: Path, tokenizer
) -> None:
    """``qvl-train predict`` on the dataset folder and on its build: LF's prompts (as text), the call as
    the reference, and an answer that is a tool call decodes with its ``<tool_call>`` text."""
    from qvl_train.__main__ import main as train_main
    from qvl_train.infer.generate import decode_answer
    from qvl_train.infer.predictions import prompt_text

    lf = {row["index"]: row for row in lf_run("qwen2_vl.tools.predict")["rows"]}
    base = ["predict", "--max-new-tokens", "2", "--batch-size", "4", "--quiet", "--dataset", "tools"]
    for data, out in ((DATA, tmp_path / "a.jsonl"), (tools_build, tmp_path / "b.jsonl")):
        train_main([*base, "--data", str(data), "--output", str(out)])
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["index"] for line in lines] == list(range(8))
        for line in lines:
            assert line["prompt"] == prompt_text(tokenizer, lf[line["index"]]["input_ids"]), (
                data,
                line["id"],
            )
        assert lines[0]["reference"] == CALL_TEXT
        assert lines[7]["reference"] == "Let me check." + CALL_TEXT
        assert lines[1]["reference"] == "It is 18 °C and clear in Paris."
    answer = tokenizer.encode(CALL_TEXT + "<|im_end|>", add_special_tokens=False)
    assert decode_answer(tokenizer, answer) == CALL_TEXT


def test_inspect_shows_calls_trained_and_tool_responses_masked(tools_build: Path) -> None:
    from test_inspect import TRAINED_SPAN, inspect_ok, panel_text

    body = panel_text(inspect_ok(str(tools_build), "--index", "tools:1", "--no-color"))
    trained = TRAINED_SPAN.findall(body)
    assert trained == [f"{CALL_TEXT}<|im_end|>↵", "It is 18 °C and clear in Paris.<|im_end|>↵"]
    masked = TRAINED_SPAN.sub("", body)
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp_c": 18, "sky": "clear"}\n</tool_response><|im_end|>'
        in masked
    )
    assert "# Tools" in masked and '"name": "get_time"' in masked


def test_convert_keeps_the_tools_and_the_tool_roles(tmp_path: Path) -> None:
    import jsonschema
    import polars as pl

    out = tmp_path / "unified.parquet"
    args = ["convert", "--dataset-dir", str(DATA), "--dataset", "tools", "--out", str(out)]
    result = CliRunner().invoke(data_main, args)
    assert result.exit_code == 0, result.output
    rows = pl.read_parquet(out).to_dicts()
    schema = json.loads((Path(__file__).parents[1] / "schemas" / "unified_record.schema.json").read_text())
    for row in rows:
        jsonschema.Draft202012Validator(schema).validate(row)
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "function_call", "observation", "assistant"]
    assert rows[1]["messages"][1]["content"] == WEATHER  # as written; the template formats it
    assert json.loads(rows[1]["tools"]) == TOOLS
    assert rows[5]["id"] == "tools:no_tools_plain_chat" and rows[5]["tools"] is None  # "" is no tools
    assert rows[3]["system"] == "You are a travel agent."


# ------------------------------------------------------------------------------------------ row checks


def _spec(tmp_path: Path, formatting: str = "sharegpt") -> DatasetSpec:
    columns = {**COMMON_COLUMNS, "tools": "tools"}
    if formatting == "sharegpt":
        return DatasetSpec(
            "t", tmp_path / "t.json", formatting, {**columns, **SHAREGPT_COLUMNS}, dict(SHAREGPT_TAGS)
        )
    return DatasetSpec(
        "t", tmp_path / "t.json", formatting, {**columns, "prompt": "instruction", "response": "output"}
    )


def _row(*turns: tuple[str, str], tools: object = json.dumps(TOOLS)) -> dict:
    return {"tools": tools, "conversations": [{"from": f, "value": v} for f, v in turns]}


CALL = ("function_call", WEATHER)
ANSWER = ("gpt", "Sunny.")
RESULT = ("observation", '{"temp_c": 18}')


@pytest.mark.parametrize(
    ("row", "reason", "says"),
    [
        # qvl's order rule: an observation answers the call right before it (LF takes it after any answer)
        (_row(("human", "Hi"), ANSWER, RESULT, ANSWER), "role_order", "does not follow a function call"),
        (_row(("human", "Hi"), ("observation", "{}")), "role_order", "turn 1 must be the assistant"),
        (_row(("human", "Hi"), ("function_call", "[]")), "invalid_function_call", "an empty list"),
        (
            _row(("human", "Hi"), ("function_call", '["f"]')),
            "invalid_function_call",
            "call 0 must be an object",
        ),
        (
            _row(("human", "Hi"), ("function_call", '{"name": "f"}')),
            "invalid_function_call",
            'no "arguments"',
        ),
        (
            _row(("human", "Hi"), ("function_call", '{"name": "f", "arguments": [1]}')),
            "invalid_function_call",
            "a JSON list, not an object",
        ),
        (
            _row(("human", "Hi"), ("function_call", "<image>")),
            "image_in_answer",
            "field conversations[1].value",
        ),
        (_row(("human", "Hi"), ("function_call", "  ")), "empty_content", "is empty"),
        (
            _row(("human", "Hi"), CALL, tools='[{"description": "x"}]'),
            "invalid_tools",
            "item 0 has no function name",
        ),
        (
            _row(("human", "Hi"), CALL, tools='[{"type": "function"}]'),
            "invalid_tools",
            "has no function name",
        ),
        (_row(("human", "Hi"), CALL, tools='[{"name": "<|im_end|>"}]'), "control_token", "field tools"),
        (_row(("human", "Hi"), CALL, tools="[1"), "invalid_tools", "field tools is not JSON"),
        (_row(("human", "Hi"), ("robot", "x")), "invalid_role", "'function_call', 'observation'"),
    ],
)
def test_malformed_tool_turns_are_rejected(tmp_path: Path, row: dict, reason: str, says: str) -> None:
    item = convert_row(_spec(tmp_path), 0, row, ReadOptions(dataset_dir=tmp_path))
    assert isinstance(item, Rejection), item
    assert item.reason == reason and says in item.message, item.message


def test_tool_rows_llamafactory_accepts_are_records(tmp_path: Path) -> None:
    options = ReadOptions(dataset_dir=tmp_path)
    wrapped = json.dumps([{"type": "function", "function": TOOLS[0]}])
    # a call followed by a user message (no observation) and a call without a tools column: LF's rules
    row = _row(("human", "Hi"), CALL, ("human", "Never mind."), ANSWER, tools=wrapped)
    record = convert_row(_spec(tmp_path), 0, row, options)
    assert [m["role"] for m in record["messages"]] == ["user", "function_call", "user", "assistant"]
    assert record["tools"] == wrapped
    assert convert_row(_spec(tmp_path), 0, _row(("human", "Hi"), CALL, tools=None), options)["tools"] is None
    # alpaca rows take the tools column too (LF's alpaca converter does)
    alpaca = {"instruction": "Hi", "output": "Hello.", "tools": wrapped}
    assert convert_row(_spec(tmp_path, "alpaca"), 0, alpaca, options)["tools"] == wrapped


def test_function_call_text_is_lfs_qwen_tool_format() -> None:
    template = TEMPLATES["qwen2_vl"]
    two = f'[{WEATHER}, {{"name": "get_time", "arguments": {{"city": "東京"}}}}]'
    assert format_function_call(template, two) == (
        f'{CALL_TEXT}\n<tool_call>\n{{"name": "get_time", "arguments": {{"city": "東京"}}}}\n</tool_call>'
    )
    # the first <tool_call> block is the JSON; the text around it goes first
    assert format_function_call(template, f"A <tool_call>{WEATHER}</tool_call> B") == "A  B" + CALL_TEXT
    # without the tags, a think block is cut out and put back in front
    thought = "<think>\nhm\n</think>\n\n"
    assert format_function_call(template, f"{WEATHER}{thought}") == thought + CALL_TEXT
    # the row checks read calls with the default template's words: every template shares them
    assert len({(t.tool_call_words, t.thought_words, t.tools_format) for t in TEMPLATES.values()}) == 1


def test_empty_tools_list_gives_a_system_segment_as_in_llamafactory(tmp_path: Path, tokenizer) -> None:
    from qvl_data.template import encode_conversation

    columns = {"messages": "conversations", "tools": "tools"}
    write_dataset(tmp_path, "t", [_row(("human", "Hi"), ANSWER, tools="[]")], columns=columns, tags={})
    (record,) = iter_records(resolve_datasets(tmp_path, ["t"]), ReadOptions(dataset_dir=tmp_path))
    assert record["tools"] == "[]"
    ids, _, _ = encode_conversation(
        tokenizer, record["messages"], None, template="qwen3_vl_nothink", tools=record["tools"]
    )
    assert tokenizer.decode(ids).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi")


def test_the_readme_tool_row_is_a_record(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"### Tool-calling rows.*?```json\n(.*?)```", readme, flags=re.DOTALL).group(1)
    record = convert_row(_spec(tmp_path), 0, json.loads(example), ReadOptions(dataset_dir=tmp_path))
    assert [m["role"] for m in record["messages"]] == ["user", "function_call", "observation", "assistant"]
    assert json.loads(record["tools"])[0]["name"] == "get_weather"


def test_function_calls_are_checked_after_set_var(tmp_path: Path) -> None:
    """``--set-var`` runs before the call is read: a value that breaks the JSON rejects the row instead of
    failing the build's encoder."""
    row = _row(("human", "Hi"), ("function_call", '{"name": "f", "arguments": {"city": "{{city}}"}}'))
    fine = convert_row(
        _spec(tmp_path), 0, row, ReadOptions(dataset_dir=tmp_path, set_vars=(("city", "Oslo"),))
    )
    assert fine["messages"][1]["content"] == '{"name": "f", "arguments": {"city": "Oslo"}}'
    quoted = ReadOptions(dataset_dir=tmp_path, set_vars=(("city", 'the "big" one'),))
    item = convert_row(_spec(tmp_path), 0, row, quoted)
    assert isinstance(item, Rejection) and item.reason == "invalid_function_call", item
