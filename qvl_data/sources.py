"""Read datasets described by a LLaMA-Factory ``dataset_info.json`` and convert rows to unified records.

Supported: local JSON (a list of objects) or JSONL files in ``alpaca`` or ``sharegpt`` formatting, with
the ``columns`` and ``tags`` overrides LLaMA-Factory understands. Every row comes out either as a
``Record`` or as a ``Rejection`` naming the file, row, field and reason; whole-file problems raise
``QvlError``.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qvl_data.errors import QvlError
from qvl_data.files import file_kind, regular_file
from qvl_data.partition import (
    DatasetIndex,
    Partition,
    data_files,
    index_dataset,
    make_plan,
    partition_rows,
    record_id,
)
from qvl_data.processor import CONTROL_TOKENS
from qvl_data.schema import (
    IMAGE_PLACEHOLDER,
    UNSUPPORTED_PLACEHOLDERS,
    EmbeddedImage,
    ImageSource,
    Message,
    Record,
    Rejection,
    row_location,
)
from qvl_data.template import (
    DEFAULT_TEMPLATE,
    SOURCE_ROLES,
    TARGET_ROLES,
    ToolFormatError,
    format_function_call,
    parse_tools,
)

# LLaMA-Factory's defaults for columns and sharegpt tags (DatasetAttr in its data/parser.py).
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None}
SHAREGPT_COLUMNS = {"messages": "conversations"}
COMMON_COLUMNS = {"system": None, "tools": None, "images": None, "videos": None, "audios": None}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of dataset_info.json, with LLaMA-Factory's defaults filled in."""

    name: str
    path: Path
    formatting: str
    columns: dict[str, str | None]
    tags: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadOptions:
    """What row conversion needs beyond the row itself: a task's view of BuildConfig's read options
    (qvl_data/config.py declares them; qvl_data/build.py: read_options maps them)."""

    dataset_dir: Path
    media_dir: Path | None = None  # image paths are relative to this; default: dataset_dir
    allow_outside_images: bool = False
    set_vars: tuple[tuple[str, str], ...] = ()  # ("name", "qvl") substitutes {{name}}; off by default


def load_dataset_info(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not os.path.lexists(info_path):
        raise QvlError(f"{info_path}: no dataset_info.json in the dataset directory")
    regular_file(info_path, "dataset description")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QvlError(f"{info_path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise QvlError(f"{info_path}: not readable as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise QvlError(f"{info_path}: expected an object mapping dataset names to descriptions")
    return info


def resolve_datasets(dataset_dir: Path, names: list[str]) -> list[DatasetSpec]:
    """Look up each requested dataset in dataset_info.json; fail fast on anything we cannot read."""
    info = load_dataset_info(dataset_dir)
    info_path = Path(dataset_dir) / "dataset_info.json"
    seen: set[str] = set()
    specs = []
    for name in names:
        if name in seen:
            raise QvlError(f"dataset {name!r} is listed twice")
        seen.add(name)
        if name not in info:
            raise QvlError(f"{info_path}: {unknown_dataset(name, list(info))}")
        entry = info[name]
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise QvlError(
                f"{info_path}: dataset {name!r} has no local file_name (hub datasets are not supported)"
            )
        if entry.get("ranking"):
            raise QvlError(f"{info_path}: dataset {name!r} is a preference (ranking) dataset, not SFT")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise QvlError(
                f"{info_path}: dataset {name!r} has formatting {formatting!r} (alpaca or sharegpt)"
            )
        columns: dict[str, str | None] = {**COMMON_COLUMNS}
        columns.update(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS)
        columns.update(entry.get("columns") or {})
        tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})} if formatting == "sharegpt" else {}
        path = Path(dataset_dir) / entry["file_name"]
        if not path.exists():
            raise QvlError(f"{path}: data file of dataset {name!r} does not exist")
        data_files(path)  # a folder must hold data files
        specs.append(DatasetSpec(name=name, path=path, formatting=formatting, columns=columns, tags=tags))
    return specs


def unknown_dataset(name: str, known: list[str], shown: int = 20) -> str:
    """``unknown dataset 'x'``, the closest names (difflib) as a did-you-mean, then the first ``shown``
    known names and how many more there are."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    names = sorted(known)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"unknown dataset {name!r}{hint} (known: {', '.join(names[:shown])}{more})"


def check_dataset_shape(spec: DatasetSpec, index: DatasetIndex) -> None:
    """Fail the run when no row has the column the declared formatting reads (e.g. an alpaca file declared
    sharegpt): every row would be rejected the same way. Names the formatting the file's columns fit."""
    if not index.rows or not index.columns:
        return
    present = set(index.columns)
    needed = spec.columns["messages"] if spec.formatting == "sharegpt" else spec.columns["response"]
    if needed in present:
        return
    fits = ""
    if {ALPACA_COLUMNS["prompt"], ALPACA_COLUMNS["response"]} <= present:
        fits = '; its columns fit "formatting": "alpaca"'
    elif present & {SHAREGPT_COLUMNS["messages"], "messages"}:
        column = sorted(present & {SHAREGPT_COLUMNS["messages"], "messages"})[0]
        fits = f'; its columns fit "formatting": "sharegpt" with "columns": {{"messages": "{column}"}}'
    shown = ", ".join(sorted(present)[:12])
    raise QvlError(
        f"{spec.path}: dataset {spec.name!r} is declared {spec.formatting} but no row has the column "
        f"{needed!r} (its columns: {shown}){fits}; fix its entry in dataset_info.json"
    )


class _Reject(Exception):
    """Raised inside row conversion; carries the reason code and the field it concerns."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Every added token of the Qwen-VL tokenizers but the content ones (think and tool tags, which LLaMA-Factory
# keeps as text; qvl_data/family.py CONTENT_TOKENS). The tokenizer turns their text into the token itself,
# so a row quoting one would carry a stray <|im_start|> or <|image_pad|> that breaks the template or the
# image-feature alignment in training; such rows are rejected instead (docs/semantics.md section 1).


def _check_text(text: str, where: str, role: str) -> None:
    """Reject text the encoder would mis-read; ``where`` is the field path in the user's column names."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone surrogate (JSON "\ud800") decodes from JSON but is not text: the tokenizer would crash.
        raise _Reject(
            "invalid_text", f"{where} is not valid Unicode ({text[e.start]!r} at character {e.start})"
        ) from None
    token = CONTROL_TOKENS.search(text)
    if token:
        raise _Reject(
            "control_token", f"{where} contains the model's control token {token.group()} (remove it)"
        )
    if role == "system":
        if IMAGE_PLACEHOLDER in text:  # LLaMA-Factory would keep it as words next to no image span
            raise _Reject(
                "image_in_system",
                f"{where} (the system prompt) contains {IMAGE_PLACEHOLDER}; images belong in user turns",
            )
        return
    if role == "assistant" and IMAGE_PLACEHOLDER in text:
        raise _Reject("image_in_answer", f"{where} (an answer) contains {IMAGE_PLACEHOLDER}")
    for placeholder in UNSUPPORTED_PLACEHOLDERS:
        if placeholder in text:
            raise _Reject("unsupported_media", f"{where} contains {placeholder}")


def _string_or_none(row: dict, column: str | None, what: str, role: str) -> str | None:
    if not column or row.get(column) is None:
        return None
    value = row[column]
    if not isinstance(value, str):
        raise _Reject("invalid_type", f"field {column} ({what}) must be a string, got {type(value).__name__}")
    _check_text(value, f"field {column}", role)
    return value


def _alpaca_messages(row: dict, cols: dict[str, str | None]) -> tuple[list[Message], list[str]]:
    """The messages and, for each, the field it came from (for messages in the user's column names)."""
    messages: list[Message] = []
    fields: list[str] = []
    history_col = cols.get("history")
    history = row.get(history_col) if history_col else None
    if history is not None:
        if not isinstance(history, list):
            raise _Reject("invalid_type", f"field {history_col} must be a list of [user, assistant] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise _Reject(
                    "invalid_type", f"field {history_col}[{i}] must be a [user, assistant] string pair"
                )
            _check_text(pair[0], f"field {history_col}[{i}][0]", "user")
            _check_text(pair[1], f"field {history_col}[{i}][1]", "assistant")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            fields += [f"field {history_col}[{i}][0]", f"field {history_col}[{i}][1]"]
    prompt_col, query_col = cols.get("prompt"), cols.get("query")
    parts = [
        _string_or_none(row, prompt_col, "instruction", "user"),
        _string_or_none(row, query_col, "input", "user"),
    ]
    # LLaMA-Factory joins the non-empty values of instruction and input with a newline.
    user = "\n".join(p for p in parts if p)
    response_col = cols.get("response")
    answer = _string_or_none(row, response_col, "answer", "assistant")
    if answer is None:
        raise _Reject("missing_field", f"field {response_col} (the answer) is missing")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    user_fields = " and ".join(c for c in (prompt_col, query_col) if c)
    fields += [f"fields {user_fields}" if " and " in user_fields else f"field {user_fields}"]
    fields += [f"field {response_col}"]
    return messages, fields


def _check_order(role: str, i: int, before: list[Message], where: str, tag: str) -> None:
    """LF's sharegpt order (a user message or an observation at even turns, an answer or a function call
    at odd ones), and qvl's: an observation answers the function call right before it."""
    if i % 2 == 0 and role not in SOURCE_ROLES:
        raise _Reject("role_order", f"{where} is {tag!r} but turn {i} must be the user (or an observation)")
    if i % 2 == 1 and role not in TARGET_ROLES:
        raise _Reject(
            "role_order",
            f"{where} is {tag!r} but turn {i} must be the assistant (an answer or a function call)",
        )
    if role == "observation" and (not before or before[-1]["role"] != "function_call"):
        raise _Reject(
            "role_order", f"{where} is {tag!r} (a tool's result) but does not follow a function call"
        )


def _check_function_call(content: str, where: str) -> None:
    """The calls must be what the tool format writes; every template shares its tool-call and think words
    (qvl_data/family.py), so the default template's reading is every template's."""
    try:
        format_function_call(DEFAULT_TEMPLATE, content)
    except ToolFormatError as e:
        raise _Reject("invalid_function_call", f"{where} (a function call) {e}") from None


def _tools(row: dict, column: str | None) -> str | None:
    """The row's tools: a JSON string of a list of function schemas, as LF reads it; absent, null or ""
    mean none."""
    if not column or row.get(column) is None or row[column] == "":
        return None
    value = row[column]
    if not isinstance(value, str):
        raise _Reject(
            "invalid_tools",
            f"field {column} must be a JSON string of a list of function schemas, got a "
            f"{type(value).__name__} (write it as a string, e.g. with json.dumps)",
        )
    _check_text(value, f"field {column}", "system")  # the tools are written into the system prompt
    try:
        parse_tools(value)
    except ToolFormatError as e:
        raise _Reject("invalid_tools", f"field {column} {e}") from None
    return value


def _sharegpt_messages(row: dict, cols: dict[str, str | None], tags: dict[str, str | None]) -> tuple:
    """(system, messages, the field path of each message)."""
    col = cols["messages"]
    raw = row.get(col)
    if raw is None:
        raise _Reject("missing_field", f"field {col} (the messages) is missing")
    if not isinstance(raw, list):
        raise _Reject("invalid_type", f"field {col} must be a list of messages, got {type(raw).__name__}")
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    system = None
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_tag not in m or content_tag not in m:
            raise _Reject(
                "invalid_type", f"field {col}[{i}] must be an object with {role_tag!r} and {content_tag!r}"
            )
        if not isinstance(m[content_tag], str):
            got = type(m[content_tag]).__name__
            raise _Reject("invalid_type", f"field {col}[{i}].{content_tag} must be a string, got {got}")
    if raw and tags.get("system_tag") and raw[0][role_tag] == tags["system_tag"]:
        system, raw, offset = raw[0][content_tag], raw[1:], 1
        _check_text(system, f"field {col}[0].{content_tag}", "system")
    else:
        system, offset = _string_or_none(row, cols.get("system"), "system prompt", "system"), 0
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags.get("function_tag"): "function_call",
        tags.get("observation_tag"): "observation",
    }
    roles.pop(None, None)
    messages: list[Message] = []
    fields: list[str] = []
    for i, m in enumerate(raw):
        tag = m[role_tag]
        where = f"field {col}[{i + offset}].{role_tag}"
        if tag not in roles:
            known = ", ".join(repr(t) for t in roles)
            raise _Reject("invalid_role", f"{where} is {tag!r}, expected one of {known}")
        role = roles[tag]
        _check_order(role, i, messages, where, tag)
        fields.append(f"field {col}[{i + offset}].{content_tag}")
        _check_text(m[content_tag], fields[-1], "assistant" if role in TARGET_ROLES else "user")
        messages.append({"role": role, "content": m[content_tag]})
    if len(messages) < 2 or len(messages) % 2:
        raise _Reject(
            "role_order", f"field {col} must end with an answer or a function call ({len(messages)} turns)"
        )
    return system, messages, fields


def _image_list(row: dict, column: str | None) -> list:
    """The row's images as given: each a path, raw bytes, or a ``{"bytes", "path"}`` struct (the Hugging
    Face ``Image`` feature; bytes win over the path, as in LLaMA-Factory)."""
    if not column or row.get(column) is None:
        return []
    value = row[column]
    if isinstance(value, (str, bytes, dict)):  # LLaMA-Factory accepts a single image too
        value = [value]
    if not isinstance(value, list) or not all(_image_value(v) for v in value):
        raise _Reject(
            "invalid_type",
            f"field {column} must be a list of images: paths, bytes, or {{bytes, path}} structs",
        )
    return value


def _image_value(value: Any) -> bool:
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (isinstance(data, bytes) and bool(data)) or (
            data is None and isinstance(path, str) and bool(path)
        )
    return isinstance(value, (str, bytes)) and bool(value)


def _image_source(
    value: str | bytes | dict, column: str, i: int, options: ReadOptions, file: str, index: int
) -> ImageSource:
    """A row's image as a record holds it: a resolved file path, or its embedded bytes under a stable name
    (the struct's path as written, else ``<file name>#<row>/<column>[<i>]``)."""
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if data is None:
        return _resolve_image(value["path"] if isinstance(value, dict) else value, column, i, options)
    path = value.get("path") if isinstance(value, dict) else None
    return EmbeddedImage(
        path if isinstance(path, str) and path else f"{Path(file).name}#{index}/{column}[{i}]", data
    )


def _resolve_image(path: str, column: str, i: int, options: ReadOptions) -> str:
    media_dir = Path(options.media_dir or options.dataset_dir)
    resolved = Path(os.path.realpath(media_dir / path))
    where = f"field {column}[{i}] {path!r}"
    if not options.allow_outside_images:
        # The folders the user named: the dataset directory and, if given, --media-dir.
        roots = {Path(os.path.realpath(d)) for d in (options.dataset_dir, options.media_dir) if d}
        if not any(resolved.is_relative_to(root) for root in roots):
            allowed = " or ".join(sorted(map(str, roots)))
            raise _Reject(
                "image_outside_dataset",
                f"{where} resolves to {resolved}, outside {allowed}; to use it pass --allow-outside-images, "
                "or --media-dir with the folder that holds the images",
            )
    try:
        mode = os.stat(resolved).st_mode
    except OSError:
        raise _Reject("image_missing", f"{where}: file {resolved} does not exist") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the image decoder forever
        raise _Reject("image_unreadable", f"{where}: {resolved} is {file_kind(mode)}, not an image file")
    return str(resolved)


def _check_contents(messages: list[Message], fields: list[str]) -> None:
    """Checks on whole messages (the per-field text checks ran while reading them)."""
    for m, where in zip(messages, fields, strict=True):
        if not m["content"].strip():
            raise _Reject("empty_content", f"{where} ({m['role']} message) is empty")


def _substitute(text: str | None, set_vars: tuple[tuple[str, str], ...]) -> str | None:
    if text is None:
        return None
    for key, value in set_vars:
        text = text.replace("{{" + key + "}}", value)
    return text


def convert_row(spec: DatasetSpec, index: int, row: Any, options: ReadOptions) -> Record | Rejection:
    """One raw row -> a validated unified record, or the reason it cannot be one."""
    file = str(spec.path)
    where = row_location(file, index)
    try:
        if isinstance(row, json.JSONDecodeError):
            raise _Reject("invalid_row", f"line is not valid JSON: {row.msg}")
        if not isinstance(row, dict):
            raise _Reject("invalid_row", f"expected an object, got {type(row).__name__}")
        cols = spec.columns
        for media in ("videos", "audios"):
            if cols.get(media) and row.get(cols[media]):
                raise _Reject("unsupported_media", f"field {cols[media]}: {media} are not supported yet")
        if spec.formatting == "alpaca":
            messages, fields = _alpaca_messages(row, cols)
            system = _string_or_none(row, cols.get("system"), "system prompt", "system")
        else:
            system, messages, fields = _sharegpt_messages(row, cols, spec.tags)
        _check_contents(messages, fields)
        tools = _tools(row, cols.get("tools"))
        if options.set_vars:
            system = _substitute(system, options.set_vars)
            messages = [
                {"role": m["role"], "content": _substitute(m["content"], options.set_vars)} for m in messages
            ]
        for m, at in zip(messages, fields, strict=True):  # after --set-var: the calls as they will be written
            if m["role"] == "function_call":
                _check_function_call(m["content"], at)
        image_col = cols.get("images") or "images"
        paths = _image_list(row, cols.get("images"))
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(paths):
            raise _Reject(
                "image_count_mismatch",
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(paths)} image(s)",
            )
        images = [_image_source(p, image_col, i, options, file, index) for i, p in enumerate(paths)]
    except _Reject as r:
        return Rejection(source=spec.name, index=index, reason=r.reason, message=f"{where}: {r}", file=file)
    row_id = record_id(spec.name, index, row)
    return Record(
        id=row_id, source=spec.name, index=index, system=system, tools=tools, messages=messages, images=images
    )


def convert_partition(
    spec: DatasetSpec, partition: Partition, options: ReadOptions
) -> Iterator[Record | Rejection]:
    """The rows of one partition as records or rejections, ids settled by the dataset's index."""
    spec = replace(spec, path=Path(partition.file))  # messages name the data file the row is in
    duplicates = dict(partition.duplicates)
    for index, row in partition_rows(partition):
        item = convert_row(spec, index, row, options)
        if isinstance(item, dict) and index in duplicates:
            first = duplicates[index]
            msg = f"{spec.path.name} row {index}: id {item['id']!r} already used by row {first}"
            item = Rejection(spec.name, index, "duplicate_id", msg, str(spec.path))
        yield item


def iter_records(specs: list[DatasetSpec], options: ReadOptions) -> Iterator[Record | Rejection]:
    """All rows of all datasets, in the order given then file order, as records or rejections: the
    build's reading and validation, in one process (for ``qvl-data convert``)."""
    with tempfile.TemporaryDirectory(prefix="qvl-stage-") as stage_dir:
        for spec in specs:
            index = index_dataset(spec.name, str(spec.path), 0, stage_dir)
            check_dataset_shape(spec, index)
            for partition in make_plan([index]):
                yield from convert_partition(spec, partition, options)
