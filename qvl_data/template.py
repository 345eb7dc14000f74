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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

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


def format_segments(
    messages: Sequence[dict], system: str | None, template: ChatTemplate | str = DEFAULT_TEMPLATE
) -> list[tuple[list[str], str]]:
    """Per turn pair: the source segment strings (system + user for the first pair) and the target string.

    The system prompt is the row's, else the template's default; with neither, no system segment at all
    (LF's ``_encode``: ``if system or tools``)."""
    template = _template(template)
    if len(messages) % 2:
        raise ValueError("messages must be user/assistant pairs")
    system = system or template.default_system
    pairs = []
    for i in range(0, len(messages), 2):
        source = [_fill(template.user_format, messages[i]["content"])]
        if i == 0 and system:
            source.insert(0, _fill(template.system_format, system))
        pairs.append((source, _fill(template.assistant_format, messages[i + 1]["content"])))
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
        for sources, target in format_segments(messages, system, template)
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
) -> tuple[list[int], list[int], bool]:
    """Template, tokenize, mask and truncate one conversation: (input_ids, labels, truncated)."""
    pairs = encode_pairs(
        tokenizer, messages, system, template, enable_thinking, mask_history, preserve_thinking
    )
    return assemble(pairs, cutoff_len, mask_history)


# ------------------------------------------------------------------------------------------ generation


def format_prompt(
    messages: Sequence[dict],
    system: str | None,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
) -> list[str]:
    """The segment strings of a generation prompt: the conversation up to and including the final
    ``<|im_start|>assistant\n``. ``messages`` alternate user/assistant and end with the user turn to answer.

    It is :func:`format_segments` of the conversation with an empty last answer, that answer left out, so a
    prompt is exactly the prefix that training saw before the answer (same segments, same system rule). A
    reasoning template's prompt is LF's ``ReasoningTemplate.encode_oneturn``: history answers lose their
    think blocks (unless ``preserve_thinking``), and without ``enable_thinking`` the prompt ends with the
    empty think.
    """
    template = _template(template)
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if [m["role"] for m in messages] != expected:
        raise ValueError("a prompt's messages alternate user, assistant, ... and end with a user message")
    messages = [dict(m) for m in messages]
    if template.reasoning and not preserve_thinking:
        for i in range(1, len(messages), 2):
            messages[i]["content"] = remove_thought(template, messages[i]["content"])
    pairs = format_segments([*messages, {"role": "assistant", "content": ""}], system, template)
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
) -> list[int]:
    """Token ids of :func:`format_prompt`, each segment encoded on its own (docs/semantics.md section 2):
    what a model generates the answer to the last user message from."""
    segments = format_prompt(messages, system, template, enable_thinking, preserve_thinking)
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
