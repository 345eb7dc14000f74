"""qvl-train predict: the prompt template, shards vs dataset directory token for token, left-padded batches
equal to one row at a time, the command's JSONL, and the README's Python snippet (tiny model, CPU)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import chat, write_dataset, write_image

from qvl_data.encode import EncodedPrompt, encode_prompt_record
from qvl_data.processor import IM_END_ID, PAD_ID
from qvl_data.schema import Rejection
from qvl_data.template import IGNORE_INDEX, encode_conversation, encode_prompt, last_answer_start
from qvl_train.__main__ import main
from qvl_train.infer.generate import Generation, collate_prompts, generate_batch
from qvl_train.infer.prompts import dataset_records, record_prompts, shard_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]  # default system segment
USER_HI = [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]  # user "hi" + assistant header
ANSWER_HELLO = [9707, 0, 151645, 198]  # "Hello!<|im_end|>\n"
USER_AND_YOU = [151644, 872, 198, 3036, 498, 30, 151645, 198, 151644, 77091, 198]
ROW0_START = [
    151644,
    8948,
    198,
    2610,
    525,
    264,
    10950,
    17847,
    13,
    151645,
    198,
    151644,
    872,
    198,
    151652,
    151655,
]
DEMO_ROWS = 12  # 6 mllm_demo rows (1-2 images each, grids of two sizes) + 6 identity rows (text only)


@pytest.fixture(scope="module")
def tiny():
    from qvl_train.model import load_for_inference

    return load_for_inference("tiny")


@pytest.fixture(scope="module")
def demo_prompts(demo_build, tokenizer) -> list[EncodedPrompt]:
    total, prompts = shard_prompts(demo_build, tokenizer, ["mllm_demo", "identity"], DEMO_ROWS)
    assert total == DEMO_ROWS
    return list(prompts)


# ------------------------------------------------------------------------------------------ the template


def test_prompt_is_the_template_up_to_the_assistant_header(tokenizer):
    turns = chat("hi", "Hello!", "And you?", "Fine.")
    assert encode_prompt(tokenizer, turns[:1], None) == SYSTEM + USER_HI
    assert encode_prompt(tokenizer, turns[:3], None) == SYSTEM + USER_HI + ANSWER_HELLO + USER_AND_YOU
    # exactly the training row's ids before its last answer, and the labels say where that answer starts
    ids, labels, _ = encode_conversation(tokenizer, turns, None)
    start = last_answer_start(labels)
    assert ids[:start] == encode_prompt(tokenizer, turns[:3], None)
    assert ids[start:] == [63716, 13, IM_END_ID, 198]  # "Fine.<|im_end|>\n"
    with pytest.raises(ValueError, match="end with a user message"):
        encode_prompt(tokenizer, turns[:2], None)
    with pytest.raises(ValueError, match="no trained answer"):
        last_answer_start([IGNORE_INDEX] * 4)


def test_a_record_ending_with_a_question_is_all_prompt(tokenizer, image_processor, tmp_path):
    write_image(tmp_path / "img.png", (56, 56))  # -> grid 1x4x4 -> 4 image tokens
    record = {
        "id": "q",
        "source": "mine",
        "index": 0,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "<image>What is it?"}],
        "images": [str(tmp_path / "img.png")],
    }
    prompt = encode_prompt_record(record, tokenizer, image_processor)
    span = [151652, *[151655] * 4, 151653]
    user = [151644, 872, 198, *span, 3838, 374, 432, 30, 151645, 198, 151644, 77091, 198]
    assert prompt.input_ids == [151644, 8948, 198, 3430, 9814, 13, 151645, 198, *user]
    assert prompt.reference is None and prompt.image_grid_thw == [(1, 4, 4)]
    assert prompt.pixels.shape == (16, 588) and prompt.pixels.dtype == np.uint8
    missing = encode_prompt_record(
        dict(record, images=[str(tmp_path / "nope.png")]), tokenizer, image_processor
    )
    assert isinstance(missing, Rejection) and missing.reason == "image_missing"


# ------------------------------------------------------------------------------------------ two inputs, one prompt


def test_dataset_directory_and_shards_give_the_same_prompts(demo_dir, demo_build, tokenizer, image_processor):
    from qvl_data.encode import EncodeOptions

    names = ["mllm_demo", "identity", "alpaca_en_demo"]
    records = dataset_records(demo_dir, names)
    from_dataset = {p.id: p for p in record_prompts(records, tokenizer, image_processor, EncodeOptions())}
    total, prompts = shard_prompts(demo_build, tokenizer)
    assert total == len(from_dataset) == 1096  # every demo row, none rejected
    images = 0
    for shard in prompts:
        mine = from_dataset[shard.id]
        assert mine.input_ids == shard.input_ids, shard.id  # token for token
        assert mine.reference == shard.reference, shard.id
        assert mine.image_grid_thw == shard.image_grid_thw, shard.id
        if shard.pixels is not None:
            assert np.array_equal(mine.pixels, shard.pixels), shard.id  # the same pre-resize and processor
            images += len(shard.image_grid_thw)
    assert images == 8  # every image of mllm_demo (550 image tokens = 6 x 66 + 2 x 77)
    first = from_dataset["mllm_demo:0"]
    assert first.input_ids[:16] == ROW0_START  # docs/semantics.md section 5
    assert first.reference == "They are celebrating on the soccer field."


# ------------------------------------------------------------------------------------------ batched generation


def _scores(model, prompts, summary, attention_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated ids, per-step logits) of one generate() call over ``prompts``."""
    from qvl_train.steps import batch_to_inputs

    config = Generation(max_new_tokens=4).generation_config()
    config.output_scores, config.return_dict_in_generate = True, True
    batch = collate_prompts(prompts)
    inputs = batch_to_inputs(batch, torch.device("cpu"), torch.float32, summary)
    if attention_mask:
        inputs["attention_mask"] = batch["attention_mask"]
    else:
        inputs.pop("attention_mask", None)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


def test_left_padded_batches_generate_what_single_rows_do(tiny, demo_build, demo_prompts):
    from qvl_data.shards import load_manifest

    summary = load_manifest(demo_build).processor
    prompts = demo_prompts[4:10]  # two image rows (grids [1,14,22] and [1,12,22]) and four text-only rows
    lengths = {len(p.input_ids) for p in prompts}
    assert len(lengths) > 2 and any(p.pixels is not None for p in prompts)
    batch = collate_prompts(prompts)
    shortest = min(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    assert batch["input_ids"][shortest, 0] == PAD_ID and batch["attention_mask"][:, -1].all()  # left padding

    ids, logits = _scores(tiny, prompts, summary)
    single = [_scores(tiny, [p], summary) for p in prompts]
    assert torch.equal(ids, torch.cat([s[0] for s in single]))
    single_logits = torch.cat([s[1] for s in single])
    assert (logits - single_logits).abs().max() < 1e-4  # float noise only: masks and 3-D positions agree

    # the comparison has teeth: attending to the padding moves the logits by far more than that
    _, unmasked = _scores(tiny, prompts, summary, attention_mask=False)
    assert (unmasked[:, 0] - single_logits[:, 0]).abs().max() > 1e-2

    # and generate_batch (the command's path) returns the same answers, cut at the end of turn
    answers = generate_batch(tiny, prompts, summary, Generation(max_new_tokens=4))
    for answer, row in zip(answers, ids.tolist(), strict=True):
        assert answer == row[: len(answer)] and (len(answer) == 4 or row[len(answer)] in (IM_END_ID, PAD_ID))


# ------------------------------------------------------------------------------------------ the command


def test_predict_command_on_a_dataset_directory_and_on_shards(demo_build, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    base = ["predict", "--max-new-tokens", "3", "--batch-size", "4", "--quiet", "--output"]
    main([*base, str(out), "--data", str(demo_build), "--dataset", "mllm_demo,identity", "--max-rows", "6"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"mllm_demo:{i}" for i in range(6)]  # input order
    assert set(lines[0]) == {"id", "source", "index", "prompt", "reference", "prediction"}
    assert lines[0]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert lines[0]["prompt"].endswith("What are they doing?<image><|im_end|>\n<|im_start|>assistant\n")
    assert lines[0]["prompt"].count("<image>") == 2 and "<|image_pad|>" not in lines[0]["prompt"]
    assert lines[0]["reference"] == "They are celebrating on the soccer field."
    assert all(isinstance(line["prediction"], str) for line in lines)

    # a dataset directory with a broken row: the row is skipped and said so, the others are answered
    data = tmp_path / "data"
    write_image(data / "a.png", (60, 40))
    rows = [
        {"messages": chat("<image>Colour?", "Red."), "images": ["a.png"]},
        {"messages": chat("<image>Colour?", "Blue."), "images": ["gone.png"]},
        {"messages": chat("Hi", "Hello.")},
    ]
    write_dataset(data, "mine", rows)
    out2 = tmp_path / "pred2.jsonl"
    main([*base[:-1], "--output", str(out2), "--data", str(data), "--dataset", "mine"])
    lines = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [(line["id"], line["reference"]) for line in lines] == [("mine:0", "Red."), ("mine:2", "Hello.")]
    assert "mine.json row 1" in capsys.readouterr().err


def test_predict_failures_are_one_line(tmp_path, capsys):
    for argv, message in (
        (["--data", str(tmp_path)], "neither a shard directory"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    write_dataset(tmp_path / "d", "mine", [{"messages": chat("Hi", "Hello.")}])
    with pytest.raises(SystemExit):
        main(["predict", "--data", str(tmp_path / "d")])
    assert "name the datasets with --dataset (known: mine)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ README snippet


def test_the_readme_snippet_answers_one_question(tmp_path, demo_dir, capsys):
    # an adapter as training writes one (random, non-zero LoRA weights so that it changes the answer)
    from peft import LoraConfig, get_peft_model

    from qvl_train.model import load_for_inference, lora_target_regex

    adapter = tmp_path / "adapter"
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=lora_target_regex(["q_proj", "v_proj"]), init_lora_weights=False
    )
    with warnings.catch_warnings():  # transformers 5 deprecates an alias that peft still calls
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(load_for_inference("tiny"), config).save_pretrained(adapter)
    image = demo_dir / "mllm_demo_data" / "1.jpg"

    # --- the README's snippet without its comments (paths substituted; load_for_inference imported above)
    from qvl_data.encode import encode_prompt_record, processor_summary
    from qvl_data.processor import load_image_processor, load_tokenizer
    from qvl_train.infer.generate import Generation, decode_answer, generate_batch

    tokenizer, image_processor = load_tokenizer(), load_image_processor()
    model = load_for_inference("tiny", adapter=str(adapter))
    record = {"id": "q0", "source": "mine", "index": 0, "system": None, "images": [str(image)],
              "messages": [{"role": "user", "content": "<image>Who are they?"}]}  # fmt: skip
    prompt = encode_prompt_record(record, tokenizer, image_processor)
    ids = generate_batch(model, [prompt], processor_summary(None), Generation(max_new_tokens=16))
    print(decode_answer(tokenizer, ids[0]))
    # ---
    assert capsys.readouterr().out == decode_answer(tokenizer, ids[0]) + "\n"
    assert prompt.input_ids.count(151655) == 66  # the demo image: grid [1, 12, 22]
    base = load_for_inference("tiny")
    assert generate_batch(base, [prompt], processor_summary(None), Generation(max_new_tokens=16)) != ids
