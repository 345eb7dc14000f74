"""Qwen3-VL (dense and MoE) inference: left-padded batches generate what single rows do (Qwen3-VL's own
rotary positions from the attention mask), and the merged export equals base + adapter (tiny models, CPU,
prompts from real ``qvl-data build --model qwen3-vl`` shards)."""

from __future__ import annotations

import json

import pytest
import torch

from qvl_data.family import model_side, transformers_class
from qvl_data.processor import IM_END_ID, PAD_ID, load_tokenizer
from qvl_data.shards import load_manifest
from qvl_train.__main__ import main
from qvl_train.config import TrainConfig
from qvl_train.infer.generate import Generation, collate_prompts, generate_batch
from qvl_train.infer.prompts import shard_prompts
from qvl_train.model import TINY_MODELS, TINY_QWEN3_VL, TINY_QWEN3_VL_MOE, load_for_inference, load_model
from qvl_train.steps import batch_to_inputs

CPU = torch.device("cpu")
TINIES = [TINY_QWEN3_VL, TINY_QWEN3_VL_MOE]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(qwen3_build) -> list:
    _, rows = shard_prompts(qwen3_build, load_tokenizer("qwen3-vl"), ["mllm_demo", "identity"], 12)
    chosen = list(rows)[4:10]  # image rows and text-only rows of different lengths
    assert any(p.pixels is not None for p in chosen) and any(p.pixels is None for p in chosen)
    assert len({len(p.input_ids) for p in chosen}) > 2
    return chosen


def _scores(model, prompts, summary, attention_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    config = Generation(max_new_tokens=4).generation_config()
    config.output_scores, config.return_dict_in_generate = True, True
    batch = collate_prompts(prompts)
    inputs = batch_to_inputs(batch, CPU, torch.float32, summary)
    if attention_mask:
        inputs["attention_mask"] = batch["attention_mask"]
    else:
        inputs.pop("attention_mask", None)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("name", TINIES)
def test_left_padded_batches_generate_what_single_rows_do(name, qwen3_build, prompts):
    model = load_for_inference(name)
    summary = load_manifest(qwen3_build).processor
    ids, logits = _scores(model, prompts, summary)
    single = [_scores(model, [p], summary) for p in prompts]
    assert torch.equal(ids, torch.cat([s[0] for s in single]))
    single_logits = torch.cat([s[1] for s in single])
    assert (logits - single_logits).abs().max() < 1e-4
    _, unmasked = _scores(model, prompts, summary, attention_mask=False)  # the comparison has teeth
    assert (unmasked[:, 0] - single_logits[:, 0]).abs().max() > 1e-2
    answers = generate_batch(model, prompts, summary, Generation(max_new_tokens=4))
    for answer, row in zip(answers, ids.tolist(), strict=True):
        assert answer == row[: len(answer)] and (len(answer) == 4 or row[len(answer)] in (IM_END_ID, PAD_ID))


@pytest.mark.parametrize("name", TINIES)
def test_merged_export_equals_base_plus_adapter(name, qwen3_build, prompts, tmp_path):
    adapter, out = tmp_path / "adapter", tmp_path / "merged"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = load_model(TrainConfig(model=name, lora_dropout=0.0), CPU, torch.float32)
    generator = torch.Generator().manual_seed(1)
    for key, param in model.named_parameters():
        if "lora_B" in key:
            param.data += torch.randn(param.shape, generator=generator) * 0.5
    model.save_pretrained(adapter, safe_serialization=True)
    main(["export", "--model", name, "--adapter", str(adapter), "--output-dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    side = model_side(TINY_MODELS[name])
    assert config["model_type"] == side.family and config["architectures"] == [side.architecture]
    merged = transformers_class(side, "architecture").from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in key for key, _ in merged.named_parameters())
    reference = load_for_inference(name, str(adapter))
    summary = load_manifest(qwen3_build).processor
    image = next(p for p in prompts if p.pixels is not None)
    inputs = batch_to_inputs(collate_prompts([image]), CPU, torch.float32, summary)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = merged(**inputs).logits
        with reference.disable_adapter():
            base = reference(**inputs).logits
    assert (got - expected).abs().max() < 1e-3
    assert (base - expected).abs().max() > 0.1  # the adapter changes the logits


def test_a_qwen3_vl_base_without_processor_files_exports_qwen3_vls_embedded_processor(tmp_path):
    from qvl_train.infer.export import missing_chat_template, processor_files
    from qvl_train.model import tiny_model_dir

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").symlink_to(tiny_model_dir(TINY_QWEN3_VL) / "config.json")
    origin, files = processor_files(str(base))
    preprocessor = json.loads(files["preprocessor_config.json"].read_text())
    assert origin == "embedded" and preprocessor["patch_size"] == 16
    out = tmp_path / "out"
    out.mkdir()
    for name, path in files.items():
        (out / name).write_bytes(path.read_bytes())
    assert missing_chat_template(out) is None  # not qwen2_vl's jinja with its default system prompt


def test_generation_stops_at_every_familys_stop_tokens():
    from qvl_data.family import FAMILIES
    from qvl_train.infer.generate import EOS_IDS

    assert {f.stop_token_ids for f in FAMILIES.values()} == {EOS_IDS}


def test_prompts_read_from_a_dataset_folder_use_the_processors_family_template():
    from types import SimpleNamespace

    from qvl_train.infer.prompts import encode_options

    cfg = SimpleNamespace(image_max_pixels=262144, image_min_pixels=1024)
    assert encode_options(cfg, "qwen3-vl").template == "qwen3_vl"  # no default system prompt, think blocks
    assert encode_options(cfg, None).template == "qwen2_vl"  # the embedded Qwen2.5-VL processor
