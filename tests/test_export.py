"""qvl-train export: the merged tiny Qwen2.5-VL gives base + adapter's logits and greedy tokens, and its
directory is a complete Hugging Face model (weights, configs, tokenizer, image processor, chat template)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from one_line_error import fails_in_one_line
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from qvl_data.errors import QvlError
from qvl_data.processor import CHAT_TEMPLATE, IMAGE_PAD_ID, IMAGE_PAD_TOKEN
from qvl_train.__main__ import main
from qvl_train.config import TrainConfig
from qvl_train.infer.export import check_base, export_dtype, missing_chat_template, processor_files
from qvl_train.model import ARCHITECTURE, load_for_inference, load_model, tiny_model_dir

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # load_for_inference's PeftModel calls an alias transformers 5 deprecates (not ours to fix)
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

#: What float32 rounding may change between x (W + s B A)^T and x W^T + s (x A^T) B^T on the tiny model.
#: Measured (torch 2.13 CPU): max |diff| 3.6e-6 (text prompt) and 3.7e-6 (image prompt) on logits of
#: magnitude up to 1.16, which the adapter moves by up to 1.93.
LOGIT_ATOL = 5e-5


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    """LoRA B starts at zero (a no-op adapter): give it, and any modules_to_save copy, seeded values."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name or ".modules_to_save." in name:
            param.data += torch.randn(param.shape, generator=g) * (std if "lora_B" in name else 0.02)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's adapter (LoRA r 8 on the seven language-model linears) with non-zero B, saved as
    qvl-train saves it."""
    out = tmp_path_factory.mktemp("adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = load_model(TrainConfig(model="tiny", lora_dropout=0.0), torch.device("cpu"), torch.float32)
    _randomize(model, seed=1)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def exported(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"  # main() returns on success, errors exit 2
    main(["export", "--adapter", str(adapter), "--output-dir", str(out)])
    return out


def _load_merged_as(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def _prompts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A text-only and an image prompt, built the way a server does from the exported directory alone: its
    tokenizer's chat template, its image processor, one <|image_pad|> per merged 2x2 patch group."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    text_chat = [{"role": "user", "content": "Describe a red square in one sentence."}]
    image_chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
    ]
    pixels = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    vision = image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    tokens = int(vision["image_grid_thw"].prod()) // 4
    text = tokenizer.apply_chat_template(text_chat, tokenize=False, add_generation_prompt=True)
    image_text = tokenizer.apply_chat_template(image_chat, tokenize=False, add_generation_prompt=True)
    image_text = image_text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * tokens)
    image_inputs = dict(tokenizer(image_text, return_tensors="pt"))
    assert int((image_inputs["input_ids"] == IMAGE_PAD_ID).sum()) == tokens == 12
    image_inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
    return {"text": dict(tokenizer(text, return_tensors="pt")), "image": image_inputs}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_merged_model_matches_base_plus_adapter(adapter: Path, exported: Path):
    reference = load_for_inference("tiny", str(adapter))  # base + adapter, unmerged (PeftModel)
    merged = _load_merged_as(exported)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for kind, inputs in _prompts(exported).items():
        expected = _logits(reference, inputs)
        with reference.disable_adapter():
            base_logits = _logits(reference, inputs)
            base_tokens = _greedy(reference, inputs)
        got = _logits(merged, inputs)
        diff = _max_diff(got, expected)
        assert diff < LOGIT_ATOL, f"{kind}: merged vs base + adapter max |diff| {diff:.3g}"
        assert _max_diff(base_logits, expected) > 0.1, f"{kind}: the adapter should change the logits"
        tokens = _greedy(merged, inputs)
        assert tokens == _greedy(reference, inputs), kind
        assert len(tokens) == 8 and tokens != base_tokens, f"{kind}: the adapter should change the answer"


def test_export_directory_is_a_complete_checkpoint(adapter: Path, exported: Path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    names = {p.name for p in exported.iterdir()}
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "chat_template.json",
        "qvl_export.json",
    ):
        assert name in names, name
    assert not [n for n in os.listdir(exported.parent) if ".tmp-" in n or ".old-" in n]
    for path in exported.iterdir():  # readable by a server running as another user (safetensors: 0600)
        assert path.stat().st_mode & 0o044 == 0o044, path.name
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert (exported / name).read_bytes() == (tiny_model_dir() / name).read_bytes(), name  # verbatim

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "qwen2_5_vl"
    assert config["dtype"] == "float32"  # --dtype auto: the tiny base checkpoint is float32
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151645 and generation["pad_token_id"] == 151643
    preprocessor = json.loads((exported / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "Qwen2VLImageProcessor"

    # the released checkpoint's key layout (model.layers.*, visual.*), nothing of peft's
    base_file = tiny_model_dir() / "model.safetensors"
    with safe_open(base_file, "pt") as base, safe_open(exported / "model.safetensors", "pt") as merged:
        assert set(merged.keys()) == set(base.keys())
        name = "model.layers.1.self_attn.q_proj.weight"
        w0, w1 = base.get_tensor(name), merged.get_tensor(name)
        unchanged = "visual.blocks.0.mlp.up_proj.weight"  # same names as a target, but the vision tower's
        assert torch.equal(base.get_tensor(unchanged), merged.get_tensor(unchanged))
        assert torch.equal(base.get_tensor("lm_head.weight"), merged.get_tensor("lm_head.weight"))
    # the merge is W + (alpha / r) B A, computed here from the adapter file alone
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.language_model.layers.1.self_attn.q_proj"
    delta = (16 / 8) * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    assert float(delta.abs().max()) > 0.1
    assert _max_diff(w1, w0 + delta) < 1e-5

    # tokenizer and chat template load offline from the directory alone
    fast = Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert fast.encode("<|im_start|>user\nhi<|im_end|>").ids[:1] == [151644]
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert (
        tokenizer.chat_template
        == CHAT_TEMPLATE
        == json.loads((exported / "chat_template.json").read_text())["chat_template"]
    )
    assert tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN) == IMAGE_PAD_ID

    record = json.loads((exported / "qvl_export.json").read_text())
    assert record["adapter"] == str(adapter.resolve())
    assert record["base_model_path"] == str(tiny_model_dir().resolve())
    assert (
        record["adapter_config_sha256"]
        == hashlib.sha256((adapter / "adapter_config.json").read_bytes()).hexdigest()
    )
    assert record["merged_lora_layers"] == 14 and record["merged_modules_to_save"] == 0
    assert record["dtype"] == "float32" and record["processor_files"] == "base" and record["lora"]["r"] == 8


def test_bfloat16_sharded_export_is_the_float32_merge_cast_once(
    adapter: Path,
    exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    out = tmp_path / "bf16"
    argv = ["export", "--adapter", str(adapter), "--output-dir", str(out)]
    main([*argv, "--dtype", "bfloat16", "--max-shard-size", "30MB"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    reloaded = _load_merged_as(out, torch.bfloat16)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}

    name = "model.layers.0.mlp.down_proj.weight"
    merged16 = reloaded.state_dict()["model.language_model.layers.0.mlp.down_proj.weight"]
    with safe_open(exported / "model.safetensors", "pt") as f32:
        merged32 = f32.get_tensor(name)
    assert torch.equal(merged16, merged32.to(torch.bfloat16))
    # what a merge in bf16 (peft adds delta.to(weight dtype)) would have written instead: differs
    with safe_open(tiny_model_dir() / "model.safetensors", "pt") as base:
        w = base.get_tensor(name).to(torch.bfloat16)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.language_model.layers.0.mlp.down_proj"
    delta = 2.0 * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    assert not torch.equal(w + delta.to(torch.bfloat16), merged16)

    # a failing overwrite leaves the previous export as it was, and no staging directory
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def broken(_out: Path) -> str | None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("qvl_train.infer.export.missing_chat_template", broken)
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--overwrite"])
    assert exit_info.value.code == 2  # one line: the export failed, the previous one is unchanged
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bf16"]
    # a successful one replaces the whole directory (no stale shards), and leaves nothing beside it
    main([*argv, "--overwrite"])
    assert not list(out.glob("model-*")) and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["bf16"]


def test_modules_to_save_and_other_targets_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An adapter qvl-train would not write: LoRA on q/v of the language model *and* the vision tower's
    qkv, r 4, plus a trained copy of lm_head (modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"], modules_to_save=["lm_head"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        peft_model = get_peft_model(base, config)
    _randomize(peft_model, seed=3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    # ... and trained elsewhere, against a base of another name: merged only on request
    config_path = adapter / "adapter_config.json"
    recorded = {**json.loads(config_path.read_text()), "base_model_name_or_path": "acme/tiny-vl"}
    config_path.write_text(json.dumps(recorded))
    out = tmp_path / "merged"
    main(
        [
            "export",
            "--model",
            "tiny",
            "--adapter",
            str(adapter),
            "--output-dir",
            str(out),
            "--allow-base-mismatch",
        ]
    )
    assert "warning: the adapter was trained on acme/tiny-vl; merging it into tiny" in capsys.readouterr().out
    record = json.loads((out / "qvl_export.json").read_text())
    assert record["merged_lora_layers"] == 2 * 2 + 2 and record["merged_modules_to_save"] == 1
    assert record["adapter_base_model"] == "acme/tiny-vl" and record["base_model"] == "tiny"

    reference = load_for_inference("tiny", str(adapter))
    merged = _load_merged_as(out)
    inputs = _prompts(out)["image"]
    diff = _max_diff(_logits(merged, inputs), _logits(reference, inputs))
    assert diff < LOGIT_ATOL, f"max |diff| {diff:.3g}"
    with reference.disable_adapter():
        assert _max_diff(_logits(reference, inputs), _logits(merged, inputs)) > 0.1
    trained_head = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    assert torch.equal(merged.lm_head.weight, trained_head)


def test_cli_errors_are_one_line(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert "no such directory" in fails_in_one_line(
        capsys, ["export", "--adapter", str(tmp_path / "nope"), "--output-dir", str(out)]
    )
    assert "--output-dir is required" in fails_in_one_line(capsys, ["export", "--adapter", str(adapter)])
    assert "not a LoRA adapter" in fails_in_one_line(
        capsys, ["export", "--adapter", str(tmp_path), "--output-dir", str(out)]
    )
    err = fails_in_one_line(
        capsys, ["export", "--adapter", str(adapter), "--output-dir", str(adapter), "--overwrite"]
    )
    assert "which the export reads" in err
    assert "dtype must be" in fails_in_one_line(
        capsys, ["export", "--adapter", str(adapter), "--output-dir", str(out), "--dtype", "fp8"]
    )

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in ([], ["--overwrite"]):  # a directory qvl did not write is never replaced
        err = fails_in_one_line(
            capsys, ["export", "--adapter", str(adapter), "--output-dir", str(out), *overwrite]
        )
        assert "not empty and not a qvl export" in err
        assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # an adapter recorded against another base
    other = tmp_path / "other-adapter"
    other.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "acme/other-vl"})
    )
    (other / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    err = fails_in_one_line(
        capsys, ["export", "--model", "tiny", "--adapter", str(other), "--output-dir", str(tmp_path / "o2")]
    )
    assert "trained on acme/other-vl, not tiny" in err and "--allow-base-mismatch" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-adapter", "out"]  # nothing written


def test_export_dtype_follows_the_base_checkpoint(tmp_path: Path):
    config = json.loads((tiny_model_dir() / "config.json").read_text())
    for key, value, expected in (
        ("torch_dtype", "bfloat16", torch.bfloat16),  # transformers 4 spelling (the released 7B)
        ("dtype", "float16", torch.float16),
        ("dtype", None, torch.float32),
    ):
        path = tmp_path / f"{key}-{value}"
        path.mkdir()
        data = {k: v for k, v in config.items() if k != "dtype"}
        (path / "config.json").write_text(json.dumps({**data, key: value}))
        assert export_dtype("auto", str(path)) == expected
        assert export_dtype("float32", str(path)) == torch.float32


def test_processor_files_fall_back_to_the_embedded_processor(tmp_path: Path):
    base = tmp_path / "weights-only"
    base.mkdir()
    (base / "config.json").symlink_to(tiny_model_dir() / "config.json")
    (base / "tokenizer.json").symlink_to(tiny_model_dir() / "tokenizer.json")  # incomplete: not used alone
    origin, files = processor_files(str(base))
    assert origin == "embedded"
    assert {p.parent for p in files.values()} == {files["tokenizer.json"].parent} != {base}
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
    } <= set(files)


def test_chat_template_written_only_where_missing(tmp_path: Path):
    tokenizer_config = json.loads((tiny_model_dir() / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert missing_chat_template(tmp_path) == CHAT_TEMPLATE  # the tokenizer has one, the processor not
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ custom }}"}))
    assert missing_chat_template(tmp_path) is None  # both have one: files stay as the base had them
    del tokenizer_config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert missing_chat_template(tmp_path) == "{{ custom }}"  # the processor's, for the tokenizer too
    (tmp_path / "chat_template.json").unlink()
    assert missing_chat_template(tmp_path) == CHAT_TEMPLATE  # none at all: the template qvl trains with
    (tmp_path / "chat_template.jinja").write_text("{{ jinja }}")
    assert missing_chat_template(tmp_path) is None


def test_base_names_match_across_spellings(tmp_path: Path):
    local = tmp_path / "models" / "Qwen2.5-VL-7B-Instruct"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "snapshots" / "abc123"
    for path in (local, snapshot):
        path.mkdir(parents=True)
    for recorded, model in (
        ("Qwen/Qwen2.5-VL-7B-Instruct", str(local)),  # a local download of the hub id
        ("Qwen/Qwen2.5-VL-7B-Instruct", str(snapshot)),  # the Hugging Face cache's own copy
        (str(local) + "/", str(local)),
        (str(tiny_model_dir()), "tiny"),  # what qvl-train records for --model tiny
        (None, "tiny"),  # nothing recorded: nothing to compare
    ):
        check_base(recorded, model, allow_mismatch=False)
    for recorded, model in (
        ("Qwen/Qwen2.5-VL-3B-Instruct", str(local)),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "tiny"),
        (str(snapshot), "Qwen/Qwen2.5-VL-72B-Instruct"),
    ):
        with pytest.raises(QvlError, match="--allow-base-mismatch"):
            check_base(recorded, model, allow_mismatch=False)
