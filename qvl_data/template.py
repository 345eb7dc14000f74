"""The chat templates (``qwen2_vl``, ``qwen3_vl``, ``qwen3_vl_nothink``), label masking and truncation: the one
implementation (docs/semantics.md sections 2 and 4, and "Model families"). The templates' strings live in
qvl_data/family.py; this module applies them.

A conversation is a list of (source, target) turn pairs. Each segment string is encoded on its own with
``tokenizer.encode(s, add_special_tokens=False)`` and the pieces are concatenated, exactly as
LLaMA-Factory does, so ids match the reference token for token.

A reasoning template (``qwen3_vl``, LF's ``ReasoningTemplate``) also handles think blocks: an answer "has a
think block" unless neither ``<think>`` nor ``</think>`` occurs in it. With ``enable_thinking`` (LF's
default) every answer without one gets the empty think ``<think>\n\n</think>\n\n`` (encoded on its own)
in front of its target ids, trained; without it, every answer's think blocks are removed first and every
source ends with the empty think, not trained. With ``mask_history`` only the last answer keeps its think
block and gets the empty think (LF's ``discarding_history_cot``).

Tool-calling rows (LF's ``qwen`` tool format, the same for every template; docs/semantics.md "Tool-calling
rows"): a pair's source is a user message or an ``observation`` (a tool's result), its target an answer or a
``function_call`` (the calls as JSON, written by :func:`format_function_call`); the row's ``tools`` (a JSON
list of function schemas) are appended to the system prompt by :func:`format_tools`. Think handling looks
at a function call's content as written, before it is formatted, as LF does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

from qvl_data.family import TEMPLATES, ChatTemplate, chat_template

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "qwen2_vl"
# The qwen2_vl template's strings, under their old names (the template itself is TEMPLATES["qwen2_vl"]).
DEFAULT_SYSTEM = TEMPLATES[DEFAULT_TEMPLATE].default_system
SYSTEM_FORMAT = TEMPLATES[DEFAULT_TEMPLATE].system_format
USER_FORMAT = TEMPLATES[DEFAULT_TEMPLATE].user_format
ASSISTANT_FORMAT = TEMPLATES[DEFAULT_TEMPLATE].assistant_format


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: user text may contain braces.
    return fmt.replace("{content}", content)


def _template(template: ChatTemplate | str) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else chat_template(template)


def has_thought(template: ChatTemplate, content: str) -> bool:
    """LF's test for a think block: ``<think>`` or ``</think>`` occurs in the answer."""
    return any(word.strip() in content for word in template.thought_words)


def remove_thought(template: ChatTemplate, content: str) -> str:
    """LF's ``Template.remove_thought``: every ``<think>\n...\n</think>\n\n`` cut out, then leading newlines."""
    start, end = (re.escape(word) for word in template.thought_words)
    return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")


def empty_thought(template: ChatTemplate) -> str:
    return template.thought_words[0] + template.thought_words[1]


# ------------------------------------------------------------------------------------------ tool format

#: The roles of a pair's source (what the model reads) and of its target (what it is trained to write).
SOURCE_ROLES = ("user", "observation")
TARGET_ROLES = ("assistant", "function_call")


class ToolFormatError(ValueError):
    """A row's tools or a function call that the tool format cannot write; the message says what is wrong
    (it follows the field's name: ``field tools {message}``)."""


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolFormatError(f"is not JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise ToolFormatError("is JSON nested too deeply to read") from None


def parse_tools(tools: str) -> list[dict]:
    """A row's ``tools`` text -> its function schemas: a JSON list of objects, each a function (with a
    ``name`` string) or ``{"type": "function", "function": {...}}`` wrapping one (LF's ``json.loads``; LF
    itself crashes on anything else but an object without a name, which it writes into the prompt)."""
    value = _load_json(tools)
    if not isinstance(value, list):
        raise ToolFormatError(f"must be a JSON list of function schemas, got a JSON {_json_kind(value)}")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise ToolFormatError(f"item {i} must be a function schema (an object), got a {_json_kind(tool)}")
        function = tool.get("function") if tool.get("type") == "function" else tool
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise ToolFormatError(
                f'item {i} has no function name (give it a "name" string, or wrap it as '
                '{"type": "function", "function": {"name": ...}})'
            )
    return value


def format_tools(template: ChatTemplate | str, tools: str | None) -> str:
    """The tools block appended to the system prompt (LF's ``ToolFormatter`` with ``QwenToolUtils``): each
    tool as one ``json.dumps`` line, wrapped as ``{"type": "function", "function": tool}`` unless it already
    is; "" for no tools and for an empty list."""
    template = _template(template)
    schemas = parse_tools(tools) if tools else []
    if not schemas:
        return ""
    wrapped = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in schemas]
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in wrapped)
    return template.tools_format.replace("{tools}", lines)


def parse_function_calls(text: str) -> list[tuple[str, dict]]:
    """A function call's JSON -> its calls as (name, arguments): one object or a list of them (parallel
    calls), each with a ``name`` string and an ``arguments`` object (LF's ``_parse_functions``; it also
    takes other arguments values, writing a string as a JSON string, and an empty list as no call)."""
    value = _load_json(text)
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolFormatError("is an empty list: a function_call turn holds at least one call")
    parsed = []
    for i, call in enumerate(calls):
        at = f"call {i} " if isinstance(value, list) else ""
        if not isinstance(call, dict):
            raise ToolFormatError(
                f'{at}must be an object {{"name": ..., "arguments": {{...}}}}, got a {_json_kind(call)}'
            )
        if not (isinstance(call.get("name"), str) and call["name"]):
            raise ToolFormatError(f'{at}has no "name" string')
        if "arguments" not in call:
            raise ToolFormatError(f'{at}has no "arguments" object')
        if not isinstance(call["arguments"], dict):
            got = _json_kind(call["arguments"])
            hint = " (decode it: the tools prompt asks for an object)" if got == "string" else ""
            raise ToolFormatError(f'{at}has "arguments" as a JSON {got}, not an object{hint}')
        parsed.append((call["name"], call["arguments"]))
    return parsed


def format_function_call(template: ChatTemplate | str, content: str) -> str:
    """A ``function_call`` turn's text as the model writes it (LF's ``FunctionFormatter`` with the ``qwen``
    tool format): each call as ``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`` (``json.dumps``,
    non-ASCII kept), joined by ``\n``. When the content holds ``<tool_call>...</tool_call>``, the first such
    block is the JSON and the text outside it goes first; else a think block is cut out, the rest is the
    JSON, and the think block goes first."""
    template = _template(template)
    start, end = template.tool_call_words
    block = re.search(f"{re.escape(start)}(.*?){re.escape(end)}", content, flags=re.DOTALL)
    if block:
        before, calls = content.replace(block.group(0), ""), parse_function_calls(block.group(1))
    else:
        think_start, think_end = (re.escape(word) for word in template.thought_words)
        thought = re.search(f"{think_start}(.*?){think_end}", content, flags=re.DOTALL)
        before = thought.group(0) if thought else ""
        calls = parse_function_calls(content.replace(before, "") if thought else content)
    texts = [
        json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) for name, arguments in calls
    ]
    return before + "\n".join(f"{start}\n{text}\n{end}" for text in texts)


# ------------------------------------------------------------------------------------------ segments


def format_segments(
    messages: Sequence[dict],
    system: str | None,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    tools: str | None = None,
) -> list[tuple[list[str], str]]:
    """Per turn pair: the source segment strings (system + user for the first pair) and the target string.

    The system prompt is the row's, else the template's default, followed by the tools block when the row
    has tools; with no system prompt and no tools, no system segment at all (LF's ``_encode``: ``if system
    or tools``, so a ``tools`` of ``"[]"`` gives a system segment of the system prompt alone). A source is a
    user message or an observation, a target an answer or a function call (module docstring)."""
    template = _template(template)
    if len(messages) % 2:
        raise ValueError("messages must be (source, target) pairs")
    system = system or template.default_system
    pairs = []
    for i in range(0, len(messages), 2):
        source, target = messages[i], messages[i + 1]
        if source["role"] not in SOURCE_ROLES or target["role"] not in TARGET_ROLES:
            raise ValueError(f"turns {i}, {i + 1} are {source['role']}, {target['role']}: not a turn pair")
        user_format = template.observation_format if source["role"] == "observation" else template.user_format
        segments = [_fill(user_format, source["content"])]
        if i == 0 and (system or tools):
            segments.insert(0, _fill(template.system_format, system + format_tools(template, tools)))
        if target["role"] == "function_call":
            answer = _fill(template.function_format, format_function_call(template, target["content"]))
        else:
            answer = _fill(template.assistant_format, target["content"])
        pairs.append((segments, answer))
    return pairs


def _encode_segments(tokenizer: Tokenizer, segments: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for segment in segments:
        ids += tokenizer.encode(segment, add_special_tokens=False)
    return ids


def encode_pairs(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    system: str | None,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    enable_thinking: bool = True,
    mask_history: bool = False,
    preserve_thinking: bool = False,
    tools: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (source, target) pair, every segment encoded separately; a reasoning template's
    think handling as LF 0.9.5's ``ReasoningTemplate.encode_multiturn`` (module docstring). With
    ``mask_history`` and not ``preserve_thinking`` (LF's ``discarding_history_cot``) history answers lose
    their think blocks and only the last pair gets the empty think."""
    template = _template(template)
    messages = [dict(m) for m in messages]
    discarding_history = mask_history and not preserve_thinking
    if template.reasoning:
        for i in range(1, len(messages), 2):
            # enable_thinking false removes every think block; discarding history every one but the last
            if not enable_thinking or (discarding_history and i < len(messages) - 2):
                messages[i]["content"] = remove_thought(template, messages[i]["content"])
    encoded = [
        (_encode_segments(tokenizer, sources), tokenizer.encode(target, add_special_tokens=False))
        for sources, target in format_segments(messages, system, template, tools)
    ]
    if template.reasoning:
        thought = tokenizer.encode(empty_thought(template), add_special_tokens=False)
        turns = [len(encoded) - 1] if discarding_history else range(len(encoded))
        for turn in turns:
            if has_thought(template, messages[2 * turn + 1]["content"]):
                continue
            source, target = encoded[turn]
            encoded[turn] = (source + thought, target) if not enable_thinking else (source, thought + target)
    return encoded


def infer_seqlen(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many source and target tokens of one pair fit in ``budget`` (docs/semantics.md section 4)."""
    if 2 * target_len < budget:
        max_target = budget
    elif 2 * source_len < budget:
        max_target = budget - source_len
    else:
        max_target = int(budget * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    source = min(max(budget - target, 0), source_len)
    return source, target


def assemble(
    pairs: list[tuple[list[int], list[int]]], cutoff_len: int, mask_history: bool = False
) -> tuple[list[int], list[int], bool]:
    """Concatenate pairs into (input_ids, labels, truncated) under ``cutoff_len``.

    Sources are masked with -100; targets keep their ids. With ``mask_history`` only the last answer is
    labelled and pairs are kept last-first, so the latest turn survives truncation.
    """
    order = list(reversed(pairs)) if mask_history else pairs
    input_ids: list[int] = []
    labels: list[int] = []
    total = 0
    truncated = False
    for turn, (source, target) in enumerate(order):
        if total >= cutoff_len:
            truncated = True  # this pair and all later ones are dropped
            break
        s, t = infer_seqlen(len(source), len(target), cutoff_len - total)
        truncated |= s < len(source) or t < len(target)
        source, target = source[:s], target[:t]
        total += s + t
        source_labels = [IGNORE_INDEX] * s
        target_labels = [IGNORE_INDEX] * t if (mask_history and turn != 0) else list(target)
        if mask_history:  # built back to front
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    return input_ids, labels, truncated


def encode_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    system: str | None,
    cutoff_len: int = 2048,
    mask_history: bool = False,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    tools: str | None = None,
) -> tuple[list[int], list[int], bool]:
    """Template, tokenize, mask and truncate one conversation: (input_ids, labels, truncated)."""
    pairs = encode_pairs(
        tokenizer, messages, system, template, enable_thinking, mask_history, preserve_thinking, tools
    )
    return assemble(pairs, cutoff_len, mask_history)


# ------------------------------------------------------------------------------------------ generation


def format_prompt(
    messages: Sequence[dict],
    system: str | None,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    tools: str | None = None,
) -> list[str]:
    """The segment strings of a generation prompt: the conversation up to and including the final
    ``<|im_start|>assistant\n``. ``messages`` are (source, target) pairs (a user message or an observation,
    then an answer or a function call) and end with the source to answer.

    It is :func:`format_segments` of the conversation with an empty last answer, that answer left out, so a
    prompt is exactly the prefix that training saw before the answer (same segments, same system rule). A
    reasoning template's prompt is LF's ``ReasoningTemplate.encode_oneturn``: history answers lose their
    think blocks (unless ``preserve_thinking``), and without ``enable_thinking`` the prompt ends with the
    empty think.
    """
    template = _template(template)
    roles = [m["role"] for m in messages]
    if not (len(roles) % 2 and roles[-1] in SOURCE_ROLES):
        raise ValueError("a prompt's messages are turn pairs and end with a user message (or an observation)")
    messages = [dict(m) for m in messages]
    if template.reasoning and not preserve_thinking:
        for i in range(1, len(messages), 2):
            messages[i]["content"] = remove_thought(template, messages[i]["content"])
    pairs = format_segments([*messages, {"role": "assistant", "content": ""}], system, template, tools)
    segments: list[str] = []
    for sources, target in pairs[:-1]:
        segments += [*sources, target]
    segments += pairs[-1][0]
    if template.reasoning and not enable_thinking:
        segments.append(empty_thought(template))
    return segments


def encode_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    system: str | None,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    tools: str | None = None,
) -> list[int]:
    """Token ids of :func:`format_prompt`, each segment encoded on its own (docs/semantics.md section 2):
    what a model generates the answer to the last user message (or observation) from."""
    segments = format_prompt(messages, system, template, enable_thinking, preserve_thinking, tools)
    return _encode_segments(tokenizer, segments)


def last_answer_start(labels: Sequence[int]) -> int:
    """Position where the last trained answer of an encoded row begins: the start of the last run of labels
    that are not ``IGNORE_INDEX``. Everything before it is the prompt of that answer (every answer's labels
    are its ids, and the user segment between two answers is masked). ValueError when nothing is trained."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        raise ValueError("the row has no trained answer")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start
