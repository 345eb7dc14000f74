"""encode_record: placeholder expansion and the image-span guard, with exact ids."""

from __future__ import annotations

import pytest
from helpers import chat, write_image

from qvl_data.encode import EncodeOptions, encode_record, expand_image_placeholders
from qvl_data.schema import Rejection

SYSTEM = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
# "<|im_start|>user\n" + vision span of 4 pads + "What is it?<|im_end|>\n<|im_start|>assistant\n"
USER_WITH_IMAGE = [
    151644,
    872,
    198,
    151652,
    *[151655] * 4,
    151653,
    3838,
    374,
    432,
    30,
    151645,
    198,
    151644,
    77091,
    198,
]
ANSWER = [61819, 13, 151645, 198]  # "Noise.<|im_end|>\n"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "img.png"
    write_image(path, (56, 56))  # smart_resize -> 56x56 -> grid 1x4x4 -> 4 tokens
    messages = chat("<image>What is it?", "Noise.")
    return {
        "id": "t:0",
        "source": "t",
        "index": 0,
        "system": None,
        "messages": messages,
        "images": [str(path)],
    }


def test_image_row_exact_ids(record, tokenizer, image_processor):
    row = encode_record(record, tokenizer, image_processor, EncodeOptions())
    assert row.input_ids == SYSTEM + USER_WITH_IMAGE + ANSWER
    assert row.labels == [-100] * (len(SYSTEM) + len(USER_WITH_IMAGE)) + ANSWER
    assert row.image_grid_thw == [(1, 4, 4)] and row.pixels.shape == (16, 588)
    assert row.image_sizes == [(56, 56, 56, 56)] and not row.truncated


def test_image_span_guard_at_the_boundary(record, tokenizer, image_processor):
    # The span ends at position len(SYSTEM) + 9: a cutoff that keeps it whole is accepted (the answer is cut),
    # one token less would cut <|vision_end|> off and is rejected.
    span_end = len(SYSTEM) + 9
    # budget rule: 2T = 8 < cutoff -> whole target kept, the source is cut to cutoff - 4
    kept = encode_record(record, tokenizer, image_processor, EncodeOptions(cutoff_len=span_end + len(ANSWER)))
    assert kept.input_ids == SYSTEM + USER_WITH_IMAGE[:9] + ANSWER and kept.truncated
    cut = encode_record(
        record, tokenizer, image_processor, EncodeOptions(cutoff_len=span_end + len(ANSWER) - 1)
    )
    assert isinstance(cut, Rejection) and cut.reason == "image_truncated"
    assert "cutoff_len 23" in cut.message and "4 image tokens" in cut.message


def test_image_in_a_dropped_turn_is_rejected(record, tokenizer, image_processor):
    two_turns = dict(record, messages=chat("Hi", "Hello " * 40, "<image>What is it?", "Noise."))
    result = encode_record(two_turns, tokenizer, image_processor, EncodeOptions(cutoff_len=60))
    assert isinstance(result, Rejection) and result.reason == "image_truncated"


def test_placeholders_expand_in_order_across_messages():
    messages = chat("<image>a<image>", "x", "b<image>", "y")
    out = expand_image_placeholders(messages, [1, 2, 3])
    span = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # noqa: E731
    assert [m["content"] for m in out] == [span(1) + "a" + span(2), "x", "b" + span(3), "y"]


def test_image_rejections_name_the_dataset_file_and_no_object_reprs(
    record, tokenizer, image_processor, tmp_path
):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image" * 10)
    bad = dict(record, index=3, images=[str(garbage)])
    result = encode_record(bad, tokenizer, image_processor, EncodeOptions(), file="/data/mine.jsonl")
    assert isinstance(result, Rejection) and result.reason == "image_unreadable"
    # `file` means the dataset file for every reason; the image is named in the message.
    assert result.file == "/data/mine.jsonl"
    assert result.message.startswith("mine.jsonl row 3: field images[0] ")
    assert result.message.count("garbage.jpg") == 1  # named once, not again in Pillow's words
    assert "<_io." not in result.message and " object at 0x" not in result.message
