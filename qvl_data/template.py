"""The ``qwen2_vl`` chat template, label masking and truncation: the one implementation
(docs/semantics.md sections 2 and 4).

A conversation is a list of (source, target) turn pairs. Each segment string is encoded on its own with
``tokenizer.encode(s, add_special_tokens=False)`` and the pieces are concatenated, exactly as
LLaMA-Factory does, so ids match the reference token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
SYSTEM_FORMAT = "<|im_start|>system\n{content}<|im_end|>\n"
USER_FORMAT = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT_FORMAT = "{content}<|im_end|>\n"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: user text may contain braces.
    return fmt.replace("{content}", content)


def format_segments(messages: Sequence[dict], system: str | None) -> list[tuple[list[str], str]]:
    """Per turn pair: the source segment strings (system + user for the first pair) and the target string."""
    if len(messages) % 2:
        raise ValueError("messages must be user/assistant pairs")
    pairs = []
    for i in range(0, len(messages), 2):
        source = [_fill(USER_FORMAT, messages[i]["content"])]
        if i == 0:
            source.insert(0, _fill(SYSTEM_FORMAT, system or DEFAULT_SYSTEM))
        pairs.append((source, _fill(ASSISTANT_FORMAT, messages[i + 1]["content"])))
    return pairs


def encode_pairs(
    tokenizer: Tokenizer, messages: Sequence[dict], system: str | None
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (source, target) pair, every segment encoded separately."""
    encoded = []
    for sources, target in format_segments(messages, system):
        source_ids: list[int] = []
        for segment in sources:
            source_ids += tokenizer.encode(segment, add_special_tokens=False)
        encoded.append((source_ids, tokenizer.encode(target, add_special_tokens=False)))
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
) -> tuple[list[int], list[int], bool]:
    """Template, tokenize, mask and truncate one conversation: (input_ids, labels, truncated)."""
    return assemble(encode_pairs(tokenizer, messages, system), cutoff_len, mask_history)


# ------------------------------------------------------------------------------------------ generation


def format_prompt(messages: Sequence[dict], system: str | None) -> list[str]:
    """The segment strings of a generation prompt: the conversation up to and including the final
    ``<|im_start|>assistant\\n``. ``messages`` alternate user/assistant and end with the user turn to answer.

    It is :func:`format_segments` of the conversation with an empty last answer, that answer left out, so a
    prompt is exactly the prefix that training saw before the answer (same segments, same system rule).
    """
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if [m["role"] for m in messages] != expected:
        raise ValueError("a prompt's messages alternate user, assistant, ... and end with a user message")
    pairs = format_segments([*messages, {"role": "assistant", "content": ""}], system)
    segments: list[str] = []
    for sources, target in pairs[:-1]:
        segments += [*sources, target]
    return segments + pairs[-1][0]


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[dict], system: str | None) -> list[int]:
    """Token ids of :func:`format_prompt`, each segment encoded on its own (docs/semantics.md section 2):
    what a model generates the answer to the last user message from."""
    ids: list[int] = []
    for segment in format_prompt(messages, system):
        ids += tokenizer.encode(segment, add_special_tokens=False)
    return ids


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
