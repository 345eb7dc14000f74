"""Tests for qvl_data.processor: the offline Qwen2.5-VL tokenizer/image processor
(docs/semantics.md sections 2, 3, 6)."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl_data import files
from qvl_data import processor as proc

CHECK_SENTENCE = "They're Kane and Gretzka from Bayern Munich."
CHECK_IDS = [6865, 2299, 45556, 323, 87552, 89, 4554, 504, 55591, 46204, 13]
SYSTEM_SEGMENT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """QVL_CACHE pointed at a fresh directory for this module; the embedded processor is built once."""
    cache = tmp_path_factory.mktemp("qvl_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_CACHE", str(cache))
        yield {"cache": cache, "dir": proc.embedded_processor_dir()}


@pytest.fixture(scope="module")
def tokenizer(built):
    return proc.load_tokenizer(None)


@pytest.fixture(scope="module")
def image_processor(built):
    return proc.load_image_processor(None)


# ---------------------------------------------------------------------------------------- cache/dirs


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("QVL_CACHE", str(target))
    assert files.cache_dir() == target
    assert target.is_dir()
    monkeypatch.delenv("QVL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "qvl"
    assert files.cache_dir().is_dir()


def test_embedded_dir_layout(built) -> None:
    out_dir: Path = built["dir"]
    assert out_dir.parent == built["cache"] / "processor"
    assert out_dir.name.startswith("qwen2_5_vl-")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "chat_template.json",
    ):
        assert (out_dir / name).is_file(), name
    # Nothing but the finished directory is left next to it.
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]


def test_second_call_reuses(built) -> None:
    out_dir: Path = built["dir"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert proc.embedded_processor_dir() == out_dir
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes


# ------------------------------------------------------------------------------------------- files


def test_vocab_and_merges_files(built) -> None:
    out_dir: Path = built["dir"]
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == proc.NUM_RANKS == 151643
    assert list(vocab.values()) == list(range(151643))  # rank order
    assert vocab["!"] == 0 and vocab["Ġ"] == 220 and vocab["Ċ"] == 198
    lines = (out_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = lines[1:]
    assert len(merges) == proc.NUM_MERGES == 151387
    assert merges[:3] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    # Every merge joins two lower-ranked tokens into a token, and merges come in rank order.
    previous = -1
    for line in merges[::997]:
        left, right = line.split(" ")
        merged = vocab[left + right]
        assert vocab[left] < merged and vocab[right] < merged and merged > previous
        previous = merged
    tok_json = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok_json["model"]["type"] == "BPE"
    assert tok_json["model"]["merges"] == merges
    assert tok_json["model"]["vocab"] == vocab
    assert tok_json["model"]["byte_fallback"] is False and tok_json["model"]["unk_token"] is None
    assert tok_json["normalizer"]["type"] == "NFC"
    split, byte_level = tok_json["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == proc.PRETOKENIZE_REGEX and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert byte_level["use_regex"] is False
    assert tok_json["decoder"]["type"] == "ByteLevel"
    assert tok_json["post_processor"]["type"] == "ByteLevel"
    assert tok_json["post_processor"]["trim_offsets"] is False


def test_config_files(built) -> None:
    out_dir: Path = built["dir"]
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None and config["model_max_length"] == 131072
    assert config["split_special_tokens"] is False and config["errors"] == "replace"
    assert len(config["added_tokens_decoder"]) == 22
    assert len(config["additional_special_tokens"]) == 13
    template = json.loads((out_dir / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    assert template == config["chat_template"] == proc.CHAT_TEMPLATE
    pre = json.loads((out_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert pre["min_pixels"] == 3136 and pre["max_pixels"] == 12845056
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert pre["processor_class"] == "Qwen2_5_VLProcessor"


def test_derive_merges_toy_ranks() -> None:
    # "abc": BPE below rank 5 merges "ab" (3) before "bc" (4), leaving ("ab", "c").
    tokens = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"bcab"]
    assert proc._derive_merges(tokens) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"bc", b"ab")]
    with pytest.raises(ValueError, match="does not reduce"):
        proc._derive_merges([b"a", b"b", b"c", b"abc"])  # no "ab"/"bc" below it: three parts remain


# -------------------------------------------------------------------------------------------- atomic


def test_build_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "proc"
    # Skip the (correct but slow) merge derivation, then die after vocab.json and merges.txt are written.
    monkeypatch.setattr(proc, "_derive_merges", lambda tokens: [(b"a", b"b")] * proc.NUM_MERGES)

    def killed(*args: object) -> str:
        assert len(list(tmp_path.glob(".proc.tmp-*/merges.txt"))) == 1
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(proc, "_tokenizer_json", killed)
    with pytest.raises(KeyboardInterrupt):
        proc.build_embedded_processor(out_dir)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temporary directory is left


def test_existing_dirs(built, tmp_path: Path) -> None:
    # A complete build of the same source is kept as is (a concurrent build that won the race) ...
    out_dir = tmp_path / "proc"
    shutil.copytree(built["dir"], out_dir)
    marker_mtime = (out_dir / ".qvl-build.json").stat().st_mtime_ns
    loser = _fake_tmp(tmp_path)
    proc._move_into_place(loser, out_dir, proc._source_hash(proc._tiktoken_file()))
    assert (out_dir / ".qvl-build.json").stat().st_mtime_ns == marker_mtime
    assert not (out_dir / "new.txt").exists()
    shutil.rmtree(loser)  # build_embedded_processor's cleanup, done by hand here
    # ... anything else at out_dir is replaced by the new build.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "junk.txt").write_text("x")
    proc._move_into_place(_fake_tmp(tmp_path), stale, "some-other-hash")
    assert sorted(p.name for p in stale.iterdir()) == ["new.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    proc._move_into_place(_fake_tmp(tmp_path), a_file, "some-other-hash")
    assert (a_file / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "proc", "stale"]


def _fake_tmp(root: Path) -> Path:
    tmp = root / f".tmp-{time.perf_counter_ns()}"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    return tmp


# ------------------------------------------------------------------------------------------ tokenizer


def test_check_sentence(tokenizer) -> None:
    assert tokenizer.encode(CHECK_SENTENCE, add_special_tokens=False) == CHECK_IDS
    assert tokenizer.decode(CHECK_IDS) == CHECK_SENTENCE


def test_special_tokens_in_text(tokenizer) -> None:
    assert tokenizer.encode(SYSTEM_SEGMENT, add_special_tokens=False) == SYSTEM_IDS
    ids = tokenizer.encode(
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi", add_special_tokens=False
    )
    assert ids[:4] == [proc.VISION_START_ID, proc.IMAGE_PAD_ID, proc.IMAGE_PAD_ID, proc.VISION_END_ID]
    # Non-special added tokens are still matched as whole tokens.
    assert tokenizer.encode("<tool_call>x</tool_call>", add_special_tokens=False) == [151657, 87, 151658]
    # No BOS and no EOS are added by default.
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


def test_added_tokens_and_special_ids(tokenizer) -> None:
    assert len(tokenizer) == 151665
    assert len(proc.ADDED_TOKENS) == 22
    decoder = tokenizer.added_tokens_decoder
    for token_id, content, special in proc.ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(content) == token_id
        assert str(decoder[token_id]) == content
        assert decoder[token_id].special is special
    assert sum(special for _, _, special in proc.ADDED_TOKENS) == 14
    assert tokenizer.eos_token == proc.EOS_TOKEN and tokenizer.eos_token_id == proc.IM_END_ID == 151645
    assert tokenizer.pad_token == proc.PAD_TOKEN and tokenizer.pad_token_id == proc.PAD_ID == 151643
    assert tokenizer.bos_token is None
    for name in ("IM_START", "IM_END", "PAD", "VISION_START", "VISION_END", "IMAGE_PAD"):
        assert tokenizer.convert_tokens_to_ids(getattr(proc, f"{name}_TOKEN")) == getattr(proc, f"{name}_ID")


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        SYSTEM_SEGMENT
        + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


def _random_strings(count: int, seed: int = 1234) -> list[str]:
    """Varied text: ASCII, contractions, digits, whitespace runs, newlines, accents, CJK, emoji, RTL."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\u00a0\u3000\u2009",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éèêëàâäôöûüçñßÆØÅæøåœŒ",
        "中文测试你好世界大语言模型的训练数据日本語のテキストです한국어텍스트",
        "😀😃🎉👍🏽👨‍👩‍👧‍👦🇩🇪🇺🇸❤️✨🚀",
        "привет мир Ελληνικά עברית العربية हिन्दी ไทย",
        "\u0301\u0308\u200b\u200d\ufeff",
    ]
    words = [
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
        "'S",
        "'LL",
        "    ",
        "\n\n",
        " \n ",
        "1234567",
        "3.14",
    ]
    words += [
        "def f(x):\n    return x",
        "http://example.com/a?b=c",
        "Hello, World!",
        "  leading",
        "trailing  ",
    ]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.25:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def _varied_strings() -> list[str]:
    fixed = [CHECK_SENTENCE, "", " ", "\n", "   \n\n  \t", "a  b   c", "12345678901234567890", "x" * 300]
    # NFC first: the HF pipeline normalizes with NFC, tiktoken does not.
    return [unicodedata.normalize("NFC", s) for s in fixed + _random_strings(3000)]


def test_matches_tiktoken(tokenizer) -> None:
    import tiktoken  # a declared test dependency ([dev]): this test must run, never skip

    ranks = {token: rank for rank, token in enumerate(proc._read_ranks(proc._tiktoken_file()))}
    encoding = tiktoken.Encoding(
        name="qwen2-qvl-test", pat_str=proc.PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={}
    )
    strings = _varied_strings()
    expected = [encoding.encode_ordinary(s) for s in strings]
    actual = tokenizer(strings, add_special_tokens=False)["input_ids"]
    mismatches = [(s, e, a) for s, e, a in zip(strings, expected, actual, strict=True) if e != a]
    assert not mismatches, mismatches[:3]
    assert sum(len(ids) for ids in expected) > 50_000


def test_decode_roundtrip(tokenizer) -> None:
    for text in _varied_strings()[:1500]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_local_dir_loads_like_embedded(built, tokenizer) -> None:
    other = proc.load_tokenizer(str(built["dir"]))
    assert type(other) is type(tokenizer)
    assert other.encode(SYSTEM_SEGMENT + CHECK_SENTENCE) == tokenizer.encode(SYSTEM_SEGMENT + CHECK_SENTENCE)


# ------------------------------------------------------------------------------------ image processor


def test_image_processor(image_processor) -> None:
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert image_processor.size["shortest_edge"] == 3136
    assert image_processor.size["longest_edge"] == 12845056
    assert image_processor.patch_size == 14 and image_processor.merge_size == 2
    assert image_processor.temporal_patch_size == 2
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(168, 300, 3), dtype=np.uint8), mode="RGB")
    out = image_processor(images=[image], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 12, 22]]
    assert out["pixel_values"].shape == (264, 1176)
    assert out["pixel_values"].dtype == np.float32


def test_image_processor_legacy_size_spelling(built, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    local.mkdir()
    config = dict(proc.PREPROCESSOR_CONFIG)
    del config["min_pixels"], config["max_pixels"]
    config["size"] = {"min_pixels": 784, "max_pixels": 1_003_520}
    (local / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")
    image_processor = proc.load_image_processor(str(local))
    assert image_processor.size["shortest_edge"] == 784
    assert image_processor.size["longest_edge"] == 1_003_520


# ------------------------------------------------------------------------------------------- digest


def test_processor_files_digest(built, tmp_path: Path) -> None:
    digest = proc.processor_files_digest(None)
    assert len(digest) == 64 and digest == proc.processor_files_digest(str(built["dir"]))
    copy = tmp_path / "copy"
    shutil.copytree(built["dir"], copy)
    assert proc.processor_files_digest(str(copy)) == digest
    # Files outside the processor set (like the build marker) do not count ...
    (copy / ".qvl-build.json").write_text("{}")
    assert proc.processor_files_digest(str(copy)) == digest
    # ... a changed chat template does, and so does a removed or added file.
    (copy / "chat_template.json").write_text(json.dumps({"chat_template": "x"}))
    changed = proc.processor_files_digest(str(copy))
    assert changed != digest
    os.remove(copy / "chat_template.json")
    removed = proc.processor_files_digest(str(copy))
    assert removed not in (digest, changed)
    (copy / "chat_template.jinja").write_text("x")
    assert proc.processor_files_digest(str(copy)) not in (digest, changed, removed)
