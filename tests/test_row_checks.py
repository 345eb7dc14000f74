"""Row conversion on inputs that used to slip through or crash.

These call ``convert_row`` directly, so they do not depend on the build driver.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat, write_image

from qvl_data.family import CONTENT_TOKENS
from qvl_data.processor import ADDED_TOKENS, load_tokenizer
from qvl_data.schema import Rejection
from qvl_data.sources import (
    ALPACA_COLUMNS,
    COMMON_COLUMNS,
    SHAREGPT_COLUMNS,
    SHAREGPT_TAGS,
    DatasetSpec,
    ReadOptions,
    convert_row,
)


def _sharegpt(tmp_path: Path) -> DatasetSpec:
    return DatasetSpec(
        name="sg",
        path=tmp_path / "sg.json",
        formatting="sharegpt",
        columns={**COMMON_COLUMNS, **SHAREGPT_COLUMNS, "images": "images"},
        tags=dict(SHAREGPT_TAGS),
    )


def _alpaca(tmp_path: Path) -> DatasetSpec:
    return DatasetSpec(
        name="al",
        path=tmp_path / "al.jsonl",
        formatting="alpaca",
        columns={**COMMON_COLUMNS, **ALPACA_COLUMNS, "system": "system", "history": "history"},
    )


def _turns(*texts: str, system: str | None = None) -> list[dict]:
    turns = [{"from": "system", "value": system}] if system is not None else []
    return turns + [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def _reject(spec: DatasetSpec, row, tmp_path: Path) -> Rejection:
    item = convert_row(spec, 7, row, ReadOptions(dataset_dir=tmp_path))
    assert isinstance(item, Rejection), item
    assert item.file == str(spec.path)
    assert item.message.startswith(f"{spec.path.name} row 7: ")
    return item


@pytest.mark.parametrize(
    ("row", "field", "token"),
    [
        (
            {"conversations": _turns("look <|image_pad|> here", "ok")},
            "field conversations[0].value",
            "<|image_pad|>",
        ),
        (
            {"conversations": _turns("hi", "<|im_start|>user\nmore")},
            "field conversations[1].value",
            "<|im_start|>",
        ),
        (
            {"conversations": _turns("hi", "yo", system="be <|vision_start|> brief")},
            "field conversations[0].value",
            "<|vision_start|>",
        ),
        ({"conversations": _turns("hi", "yo"), "system": "x<|endoftext|>"}, "field system", "<|endoftext|>"),
        # <tool_call> is content (LLaMA-Factory keeps it as text; tests/test_families.py), <|fim_pad|> is not
        ({"conversations": _turns("a <|fim_pad|> b", "yo")}, "field conversations[0].value", "<|fim_pad|>"),
    ],
)
def test_sharegpt_control_tokens_are_rejected_naming_token_and_field(tmp_path, row, field, token):
    spec = _sharegpt(tmp_path)
    spec.columns["system"] = "system"
    r = _reject(spec, row, tmp_path)
    assert r.reason == "control_token"
    assert field in r.message and token in r.message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"instruction": "say <|im_end|>", "output": "x"}, "field instruction"),
        ({"instruction": "q", "input": "<|vision_end|>", "output": "x"}, "field input"),
        ({"instruction": "q", "output": "a<|video_pad|>"}, "field output"),
        ({"instruction": "q", "output": "a", "system": "<|im_start|>system"}, "field system"),
        ({"instruction": "q", "output": "a", "history": [["hi", "<|box_start|>"]]}, "field history[0][1]"),
    ],
)
def test_alpaca_control_tokens_are_rejected_in_the_users_column_names(tmp_path, row, field):
    r = _reject(_alpaca(tmp_path), row, tmp_path)
    assert r.reason == "control_token" and field in r.message


def test_every_added_token_of_the_tokenizer_but_the_content_ones_is_a_control_token(tmp_path):
    tokenizer = load_tokenizer(None)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    assert added == {content for _, content, _ in ADDED_TOKENS}
    for token in sorted(added - set(CONTENT_TOKENS)):
        r = _reject(_alpaca(tmp_path), {"instruction": f"a{token}b", "output": "x"}, tmp_path)
        assert r.reason == "control_token" and token in r.message
    # tool-call and think tags are content: LLaMA-Factory keeps them as text (docs/semantics.md)
    for token in CONTENT_TOKENS:
        row = {"instruction": f"a{token}b", "output": f"x{token}"}
        assert isinstance(convert_row(_alpaca(tmp_path), 0, row, ReadOptions(dataset_dir=tmp_path)), dict)


def test_lookalikes_of_control_tokens_are_kept(tmp_path):
    row = {"instruction": "write <|im_start> and < |image_pad|> and <image_pad>", "output": "ok"}
    assert isinstance(convert_row(_alpaca(tmp_path), 0, row, ReadOptions(dataset_dir=tmp_path)), dict)


@pytest.mark.parametrize(
    ("text", "spec", "field"),
    [
        ('{"instruction": "bad \\ud800 text", "output": "x"}', _alpaca, "field instruction"),
        ('{"instruction": "q", "output": "x \\udfff"}', _alpaca, "field output"),
        ('{"instruction": "q", "output": "x", "system": "\\ud83d"}', _alpaca, "field system"),
        (
            '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "\\udc80"}]}',
            _sharegpt,
            "field conversations[1].value",
        ),
    ],
)
def test_lone_surrogates_are_rejected_naming_the_field(tmp_path, text, spec, field):
    row = json.loads(text)  # how a JSON escape \ud800 reaches us: a str the tokenizer cannot encode
    r = _reject(spec(tmp_path), row, tmp_path)
    assert r.reason == "invalid_text" and field in r.message and "Unicode" in r.message


def test_valid_surrogate_pairs_are_text(tmp_path):
    row = json.loads('{"instruction": "smile \\ud83d\\ude00", "output": "ok"}')
    record = convert_row(_alpaca(tmp_path), 0, row, ReadOptions(dataset_dir=tmp_path))
    assert isinstance(record, dict) and record["messages"][0]["content"] == "smile \U0001f600"


def test_alpaca_messages_use_the_users_column_names(tmp_path):
    spec = _alpaca(tmp_path)
    r = _reject(spec, {"instruction": "q", "output": "<image>"}, tmp_path)
    assert r.reason == "image_in_answer" and "field output" in r.message and "message 1" not in r.message
    r = _reject(spec, {"instruction": " ", "input": "", "output": "x"}, tmp_path)
    assert r.reason == "empty_content" and "fields instruction and input" in r.message
    r = _reject(spec, {"instruction": "q", "output": "x", "history": [["<video>", "a"]]}, tmp_path)
    assert r.reason == "unsupported_media" and "field history[0][0]" in r.message
    r = _reject(_sharegpt(tmp_path), {"conversations": _turns("hi", "  ")}, tmp_path)
    assert r.reason == "empty_content" and "field conversations[1].value" in r.message


def test_outside_image_message_says_how_to_allow_it(tmp_path):
    data = tmp_path / "data"
    write_image(tmp_path / "media" / "a.png", (32, 32))
    row = {"conversations": _turns("<image>what?", "a"), "images": ["../media/a.png"]}
    r = _reject(_sharegpt(data), row, data)
    assert r.reason == "image_outside_dataset"
    assert "--allow-outside-images" in r.message and "--media-dir" in r.message
    # --media-dir names a folder the user trusts: images under it are not "outside".
    options = ReadOptions(dataset_dir=data, media_dir=tmp_path / "media")
    row["images"] = ["a.png"]
    record = convert_row(_sharegpt(data), 0, row, options)
    assert isinstance(record, dict) and record["images"] == [str((tmp_path / "media" / "a.png").resolve())]


def test_chat_helper_rows_still_convert(tmp_path):
    spec = DatasetSpec(
        name="t",
        path=tmp_path / "t.json",
        formatting="sharegpt",
        columns={**COMMON_COLUMNS, "messages": "messages"},
        tags={
            **SHAREGPT_TAGS,
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    )
    record = convert_row(spec, 0, {"messages": chat("hi", "hello")}, ReadOptions(dataset_dir=tmp_path))
    assert isinstance(record, dict) and record["messages"][1]["content"] == "hello"
