"""The unified record every source format is converted to, and the reasons a row can be rejected.

The record is defined as JSON Schema in ``schemas/unified_record.schema.json`` (the contract users can
validate against) and as ``UNIFIED_ARROW_SCHEMA`` below (how ``qvl-data convert`` stores it);
``tests/test_schema.py`` checks the two agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import NotRequired, TypedDict

import pyarrow as pa

IMAGE_PLACEHOLDER = "<image>"
# Placeholders of media we do not train on yet: a row using them is rejected rather than trained wrongly.
UNSUPPORTED_PLACEHOLDERS = ("<video>", "<audio>")


#: The roles of a record's messages: a user message or an observation (a tool's result) is read, an
#: answer or a function call (the calls as JSON) is trained (qvl_data/template.py, docs/semantics.md).
ROLES = ("user", "assistant", "function_call", "observation")


class Message(TypedDict):
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class EmbeddedImage:
    """An image whose bytes came inside the dataset row (raw bytes, or the ``bytes`` of a
    ``{"bytes": ..., "path": ...}`` struct, the Hugging Face ``Image`` feature), not from a file."""

    name: str  # how shards, rejections and inspect name it (stable: the same row gives the same name)
    data: bytes


#: An image of a record: a resolved file path, or bytes embedded in the row.
ImageSource = str | EmbeddedImage


class Record(TypedDict):
    id: str
    source: str
    index: int
    system: str | None
    # the row's tools: a JSON list of function schemas, as written in the row; None (or absent, in a record
    # made by hand) for none
    tools: NotRequired[str | None]
    messages: list[Message]
    images: list[ImageSource]


UNIFIED_ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("system", pa.string(), nullable=True),
        pa.field("tools", pa.string(), nullable=True),
        pa.field(
            "messages",
            pa.list_(
                pa.struct(
                    [
                        pa.field("role", pa.string(), nullable=False),
                        pa.field("content", pa.string(), nullable=False),
                    ]
                )
            ),
            nullable=False,
        ),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        # per image: its bytes when they came embedded in the row (then ``images`` holds its name), else null
        pa.field("image_bytes", pa.list_(pa.binary()), nullable=False),
    ]
)

# Every reason a row can be rejected for. The code goes to rejected.jsonl and the manifest counts.
REASONS: dict[str, str] = {
    "invalid_row": "the row is not a JSON object",
    "missing_field": "a required column is absent or null",
    "invalid_type": "a field has the wrong type (e.g. non-string content, images not a list of strings)",
    "empty_content": "a user or assistant message is empty or whitespace only",
    "invalid_text": "a text field is not valid Unicode (e.g. a lone surrogate such as the JSON escape \\ud800)",
    "control_token": "a text field contains one of the model's control tokens (e.g. <|im_start|>, <|image_pad|>)",
    "invalid_role": "a message has a role tag the dataset's tags do not define",
    "role_order": (
        "turns are out of order: a user message or an observation (right after a function call) at even "
        "turns, an answer or a function call at odd turns, ending with an answer or a function call"
    ),
    "invalid_function_call": (
        "a function_call turn is not a JSON object (or list of them) with a name and an arguments object"
    ),
    "invalid_tools": "the tools column is not a JSON string of a list of function schemas",
    "unsupported_media": "the row uses <video>/<audio> placeholders or video/audio columns",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "image_in_answer": "an <image> placeholder sits in an assistant message (images are inputs only)",
    "image_in_system": "an <image> placeholder sits in the system prompt (LLaMA-Factory leaves it as words)",
    "image_outside_dataset": "an image path leaves the dataset directory (use --allow-outside-images)",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image file cannot be decoded",
    "image_too_large": "an image's dimensions exceed the decompression-bomb limit",
    "duplicate_id": "another row already used this id",
    "image_truncated": "cutoff_len would cut through an image span or drop a turn holding an image",
}


@dataclass(frozen=True)
class Rejection:
    """A row that will not be trained on, and why. Nothing is dropped without one of these."""

    source: str
    index: int
    reason: str
    message: str  # starts with row_location(file, index), then the field path in the user's column names
    file: str = ""  # the dataset file the row comes from (never an image: image paths are in the message)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")

    def to_json(self) -> dict:
        return asdict(self)


def rejection_line(rejection: Rejection) -> str:
    """One ``rejected.jsonl`` line: the format every writer of rejected rows uses."""
    return json.dumps(rejection.to_json(), ensure_ascii=False) + "\n"


def row_location(file: str, index: int) -> str:
    """How every message names a row: the data file's name and the row's 0-based index in it.

    The index is the ``index`` column of the shards; in a JSON Lines file it counts rows, not blank lines.
    """
    return f"{PurePath(file).name} row {index}"


def records_to_table(records: list[Record]) -> pa.Table:
    """Unified records -> an Arrow table with ``UNIFIED_ARROW_SCHEMA``."""
    rows = [
        {
            **record,
            "images": [i.name if isinstance(i, EmbeddedImage) else i for i in record["images"]],
            "image_bytes": [i.data if isinstance(i, EmbeddedImage) else None for i in record["images"]],
        }
        for record in records
    ]
    return pa.Table.from_pylist(rows, schema=UNIFIED_ARROW_SCHEMA)
