"""The training configuration: one dataclass whose field docstrings are the documentation.

Values come from the dataclass defaults, then a YAML file (``--config``), then ``--key value`` command-line
arguments generated from the fields (``--max-steps 20`` and ``--max_steps 20`` both work; booleans accept
``--dry-run`` alone or ``--dry-run false``). Unknown keys and invalid values are one-line errors.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from qvl_data.config import load_config
from qvl_data.errors import QvlError

#: The decoder-layer linears of the language model that LoRA may wrap (docs/semantics.md section 7).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    model: str = "tiny"
    """Base model: a local Qwen2.5-VL checkpoint dir, a hub id, or ``tiny`` (a random 39 M-parameter
    Qwen2.5-VL built and cached locally, for CPU demos and tests). With --dry-run it may also be a config.json."""
    data: str = "data/qvl-demo"
    """Shard directory written by ``qvl-data build`` (manifest.json + shards/)."""
    output_dir: str = "saves/qwen2_5vl-7b/lora/sft"
    """Where the adapter, checkpoints, plan, log and loss plot go."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that already holds a run (its checkpoints, adapter, log and plot are
    deleted). Without it such a directory is an error, unless resuming. Command line only: a config file
    that sets it true is refused, so re-running a recipe never deletes checkpoints by default."""
    resume: str = ""
    """``auto``: continue from the latest complete checkpoint in output_dir (start afresh if there is none);
    a path: continue from that checkpoint dir; empty: start afresh."""

    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    lora_target: str = ",".join(LORA_MODULES)
    """Comma-separated decoder-layer linears of the *language model* to wrap (``all`` = all seven). The vision
    tower's MLP has the same names and is never wrapped."""

    per_device_train_batch_size: int = 1
    """Rows per micro-batch on each rank."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step on each rank."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    lr_scheduler_type: str = "cosine"
    """After the warmup: ``cosine`` (to 0), ``linear`` (to 0) or ``constant``."""
    warmup_ratio: float = 0.1
    """Linear warmup over ceil(warmup_ratio * total steps) optimizer steps."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    num_train_epochs: float = 3.0
    """Passes over the data (fractions allowed: total steps = ceil(epochs * steps per epoch))."""
    max_steps: int = 0
    """Total optimizer steps; overrides num_train_epochs when > 0 (the data is cycled as needed)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 42
    """Seed of the LoRA init, dropout and the per-epoch data permutation."""

    bf16: bool = True
    """On CUDA: base weights in bfloat16 and bf16 autocast (LoRA weights stay float32)."""
    cpu_dtype: str = "float32"
    """Base-weight dtype on CPU: float32 (default; faster there) or bfloat16."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cuda`` or ``cpu``."""
    dataloader_num_workers: int = 0
    """Data-loader worker processes per rank. 0 (the default) loads in the training process, which is the
    faster path for qvl shards: a row is a few preads (plus the webp decode), while handing each batch from
    a worker to the trainer costs milliseconds of shared-memory and socket traffic; bench/loader.py measured
    uint8 shards at 146 batches/s with 0 workers against 96 with 2 (CPU, to_device included). Workers can
    pay off only for webp shards on a host with idle cores; measure with bench/loader.py."""
    max_rows: int = 0
    """Train on the first N rows of the shards only (0: all); for smoke tests and demos."""

    val_size: float = 0.0
    """Hold out rows of --data for evaluation: a fraction (0 < x < 1) or a row count (>= 1). The split is by
    row id (a seeded hash of source and index), so it is the same on every rank, world size and resume.
    0: no split."""
    eval_data: str = ""
    """A separate shard directory (another ``qvl-data build``) to evaluate on instead of --val-size."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps and at the end (0: at the end only). Needs --val-size or --eval-data."""
    per_device_eval_batch_size: int = 1
    """Rows per evaluation batch on each rank."""

    packing: bool = False
    """Pack several rows into one sequence of up to --packing-len tokens (each row keeps its own 3-D
    positions; no token attends across rows; the loss is the same token mean). --per-device-train-batch-size
    and the plan's steps then count packed sequences, so lower --gradient-accumulation-steps to keep the rows
    per optimizer step. Needs --attn-implementation sdpa, eager or flash_attention_2/3 (flash: no mask, the
    varlen kernel). Off by default, as in the reference recipe."""
    packing_len: int = 0
    """Token budget of a packed sequence (0: the build's cutoff_len; no row may be longer)."""

    logging_steps: int = 10
    """Log every N optimizer steps (console + trainer_log.jsonl)."""
    save_steps: int = 500
    """Write checkpoint-N every N optimizer steps (0: only at the end)."""
    save_total_limit: int = 0
    """Keep at most this many checkpoints, deleting the oldest (0: keep all)."""
    plot_loss: bool = True
    """Write training_loss.png at each checkpoint and at the end."""
    stop_at_step: int = 0
    """Stop after this optimizer step, with a checkpoint, as if interrupted (the schedule still spans the
    whole run); continue later with --resume auto. For time-limited jobs and tests. 0: run to the end."""
    log_samples: bool = False
    """Each rank appends the (step, epoch, source, index) of every row it trains on to
    samples-rank<R>.jsonl in output_dir (to audit the data split)."""
    report_to: str = "none"
    """Also send the log records (and the plan and config as hyper-parameters) to experiment trackers:
    ``none``, or a comma-separated list of tensorboard, wandb, mlflow, trackio (each an optional extra, e.g.
    ``pip install -e ".[tensorboard]"``); rank 0 only. TensorBoard writes to output_dir/tensorboard; the others
    follow their own settings (WANDB_MODE=offline, MLFLOW_TRACKING_URI, TRACKIO_PROJECT)."""
    ddp_timeout: int = 1800
    """Seconds before a collective operation times out."""
    world_size: int = 0
    """Ranks to plan for with --dry-run (0: torchrun's WORLD_SIZE, else 1). A real run takes torchrun's; if
    set, it must agree."""
    dry_run: bool = False
    """Print the plan (rows, steps, warmup, trainable parameters) and exit; the model is built on the meta
    device from its config alone, no weights are loaded."""

    def __post_init__(self) -> None:
        coerce_types(self)
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "lora_rank",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise QvlError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "max_steps",
            "warmup_steps",
            "save_steps",
            "save_total_limit",
            "stop_at_step",
            "max_rows",
            "world_size",
            "dataloader_num_workers",
            "val_size",
            "eval_steps",
            "packing_len",
            "max_grad_norm",
            "weight_decay",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise QvlError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise QvlError("num_train_epochs must be > 0 (or set max_steps)")
        if not 0 <= self.warmup_ratio <= 1:
            raise QvlError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise QvlError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise QvlError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise QvlError(
                f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise QvlError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.cpu_dtype not in ("float32", "bfloat16"):
            raise QvlError(f"cpu_dtype must be float32 or bfloat16, got {self.cpu_dtype!r}")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise QvlError(f"val_size must be a fraction below 1 or a whole row count, got {self.val_size}")
        if self.val_size and self.eval_data:
            raise QvlError(
                "give either val_size (a split of --data) or eval_data (a separate build), not both"
            )
        from qvl_train.trackers import parse_report_to

        parse_report_to(self.report_to)  # an unknown tracker fails here, dry run included
        unknown = [m for m in self.lora_modules if m not in LORA_MODULES]
        if unknown or not self.lora_modules:
            raise QvlError(
                f"lora_target: unknown module(s) {unknown}; choose from {', '.join(LORA_MODULES)} or all"
            )

    @property
    def lora_modules(self) -> list[str]:
        if self.lora_target.strip() == "all":
            return list(LORA_MODULES)
        return [m.strip() for m in self.lora_target.split(",") if m.strip()]


def coerce_types(config: Any) -> None:
    """YAML gives ``1e-4`` as a string and ``3`` as an int: convert each value to its field's type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, value = hints[f.name], getattr(config, f.name)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            continue
        try:
            if kind is bool:
                converted = parse_bool(value) if isinstance(value, str) else None
            elif kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
                converted = float(value)
            elif kind is int and isinstance(value, str):
                converted = int(value)
            elif kind is int and isinstance(value, float) and value.is_integer():
                converted = int(value)
            elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                converted = str(value)
            else:
                converted = None
        except (ValueError, argparse.ArgumentTypeError):
            converted = None
        if converted is None:
            raise QvlError(f"{f.name}: expected {kind.__name__}, got {value!r}")
        setattr(config, f.name, converted)


# ------------------------------------------------------------------------------------------------ CLI


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Field name -> its docstring (the string literal right after the field in the class body), over the
    dataclass and its dataclass bases (a field a subclass declares again takes the subclass's text)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse's own code too)
        raise QvlError(message)


TRAIN_DESCRIPTION = (
    "LoRA fine-tuning of Qwen2.5-VL on qvl shards. Every option can also be set in the YAML --config; the "
    "command line wins. Run under torchrun for several GPUs. Other commands: qvl-train predict | score | "
    "export (each with --help)."
)


def build_parser(
    cls: type = TrainConfig, prog: str = "qvl-train", description: str = TRAIN_DESCRIPTION
) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per field of the config dataclass ``cls`` (its docstring as
    the help), plus ``--config FILE.yaml``. Every qvl-train command builds its parser this way."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument(
        "--config", help="YAML file of options (keys = the option names below, with underscores)."
    )
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    # the command's own options first, in the order its class declares them, then the ones it inherits
    own = list(cls.__dict__.get("__annotations__", {}))
    for f in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        flags = [f"--{f.name}"]
        if "_" in f.name:
            flags.insert(0, f"--{f.name.replace('_', '-')}")
        kind = hints[f.name]
        help_text = f"{docs.get(f.name, '')} [default: {f.default!r}]".replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                *flags,
                dest=f.name,
                type=parse_bool,
                nargs="?",
                const=True,
                default=None,
                metavar="BOOL",
                help=help_text,
            )
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)
    return parser


def parse_tool_config(cls: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """An instance of the config dataclass ``cls`` from ``--config`` YAML plus command-line overrides."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    return load_config(cls, args.pop("config"), args)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from ``--config`` YAML plus the command-line overrides; QvlError on any problem."""
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config")
    config = load_config(TrainConfig, yaml_path, args)
    if config.overwrite_output_dir and args["overwrite_output_dir"] is None:  # it came from the file
        raise QvlError(
            f"{yaml_path}: overwrite_output_dir deletes the earlier run's checkpoints, so it is a command-line "
            "choice only; remove it from the config file and pass --overwrite-output-dir when you mean it"
        )
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
