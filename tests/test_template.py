"""qwen2_vl template, masking and truncation: exact ids (docs/semantics.md sections 2 and 4)."""

from __future__ import annotations

import pytest

from qvl_data.template import IGNORE_INDEX as X
from qvl_data.template import assemble, encode_conversation, infer_seqlen

SYSTEM = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]  # default system segment
USER_HI = [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]  # user "hi" + assistant header
ANSWER_HELLO = [9707, 0, 151645, 198]  # "Hello!<|im_end|>\n"
USER_AND_YOU = [151644, 872, 198, 3036, 498, 30, 151645, 198, 151644, 77091, 198]
ANSWER_FINE = [63716, 13, 151645, 198]
TWO_TURNS = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "And you?"},
    {"role": "assistant", "content": "Fine."},
]


def test_single_turn_default_system(tokenizer):
    ids, labels, truncated = encode_conversation(tokenizer, TWO_TURNS[:2], None)
    assert ids == SYSTEM + USER_HI + ANSWER_HELLO
    assert labels == [X] * (len(SYSTEM) + len(USER_HI)) + ANSWER_HELLO  # im_end and \n are trained
    assert not truncated


def test_custom_system_prompt(tokenizer):
    ids, _, _ = encode_conversation(tokenizer, TWO_TURNS[:2], "Be brief.")
    assert ids[:8] == [151644, 8948, 198, 3430, 9814, 13, 151645, 198]


def test_multi_turn_trains_every_answer(tokenizer):
    ids, labels, _ = encode_conversation(tokenizer, TWO_TURNS, None)
    assert ids == SYSTEM + USER_HI + ANSWER_HELLO + USER_AND_YOU + ANSWER_FINE
    masked = [X] * len(SYSTEM + USER_HI) + ANSWER_HELLO + [X] * len(USER_AND_YOU) + ANSWER_FINE
    assert labels == masked


def test_mask_history_trains_last_answer_only(tokenizer):
    ids, labels, _ = encode_conversation(tokenizer, TWO_TURNS, None, mask_history=True)
    assert ids == SYSTEM + USER_HI + ANSWER_HELLO + USER_AND_YOU + ANSWER_FINE
    assert labels == [X] * (len(ids) - len(ANSWER_FINE)) + ANSWER_FINE


def test_segments_are_encoded_separately(tokenizer):
    # "\n" closing the system segment and "<|im_start|>" must not merge with neighbours: encoding the
    # whole prompt as one string would give the same ids here, but the per-segment rule is what the
    # reference does, so check the boundaries explicitly.
    ids, _, _ = encode_conversation(
        tokenizer, [{"role": "user", "content": " "}, {"role": "assistant", "content": "\n"}], None
    )
    expected = (
        SYSTEM
        + tokenizer.encode("<|im_start|>user\n <|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        + tokenizer.encode("\n<|im_end|>\n", add_special_tokens=False)
    )
    assert ids == expected


@pytest.mark.parametrize(
    ("source", "target", "budget", "expected"),
    [
        (100, 10, 50, (40, 10)),  # 2T < budget: keep the whole target, cut the source
        (10, 100, 50, (10, 40)),  # 2S < budget <= 2T: keep the source, cut the target
        (60, 40, 50, (30, 20)),  # both long: split in proportion, int(50 * 40 / 100) = 20 target
        (3, 2, 0, (0, 0)),
        (5, 5, 100, (5, 5)),  # everything fits
    ],
)
def test_infer_seqlen_branches(source, target, budget, expected):
    assert infer_seqlen(source, target, budget) == expected


def _pair(n_source: int, n_target: int, start: int) -> tuple[list[int], list[int]]:
    return list(range(start, start + n_source)), list(range(start + 1000, start + 1000 + n_target))


def test_truncation_cuts_pairs_and_drops_later_turns():
    pairs = [_pair(30, 10, 0), _pair(20, 30, 100), _pair(5, 5, 200)]
    ids, labels, truncated = assemble(pairs, cutoff_len=50)
    # pair 1: budget 50, 2*10 < 50 -> all 30 + 10 kept (total 40); pair 2: budget 10, 2T=60 >= 10,
    # 2S=40 >= 10 -> target int(10*30/50)=6, source 4; pair 3: total 50 >= cutoff -> dropped.
    assert ids == list(range(30)) + list(range(1000, 1010)) + list(range(100, 104)) + list(range(1100, 1106))
    assert labels == [X] * 30 + list(range(1000, 1010)) + [X] * 4 + list(range(1100, 1106))
    assert truncated and len(ids) == 50


def test_truncation_mask_history_keeps_last_turn_first():
    pairs = [_pair(30, 10, 0), _pair(20, 30, 100)]
    ids, labels, truncated = assemble(pairs, cutoff_len=60, mask_history=True)
    # last pair first: budget 60, 2T=60 not < 60, 2S=40 < 60 -> target 40 > 30 so all 30, source 20 (50).
    # first pair: budget 10, 2*10 >= 10, 2*30 >= 10 -> target int(10*10/40)=2, source 8; placed before.
    assert ids == list(range(8)) + [1000, 1001] + list(range(100, 120)) + list(range(1100, 1130))
    assert labels == [X] * 10 + [X] * 20 + list(range(1100, 1130))
    assert truncated


def test_no_truncation_reports_false():
    ids, labels, truncated = assemble([_pair(3, 2, 0)], cutoff_len=5)
    assert len(ids) == 5 and not truncated
