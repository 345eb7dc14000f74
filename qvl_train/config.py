"""The training configuration: one dataclass whose field docstrings are the documentation.

Values come from the dataclass defaults, then a YAML file (``--config``), then ``--key value`` command-line
options generated from the fields by qvl_data/options.py, as qvl-data's are (``--max-steps 20``; the YAML
spelling ``--max_steps 20`` works too; booleans accept ``--dry-run`` alone or ``--dry-run false``). Unknown
keys, mistyped options (with a did-you-mean; no prefix matching) and invalid values are one-line errors.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any

import click

from qvl_data import options
from qvl_data.config import load_config
from qvl_data.errors import QvlError
from qvl_data.options import option

#: The decoder-layer linears of the language model that LoRA may wrap (docs/semantics.md section 7).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """The options of ``qvl-train``, each declared once (qvl_data/options.py): a field is the option
    ``--field-name`` and the YAML key ``field_name``; ``common`` ones lead --help."""

    model: str = option(
        "tiny",
        common=True,
        help="A Qwen-VL checkpoint dir, a hub id, or tiny, tiny-qwen3-vl, tiny-qwen3-vl-moe (random, CPU demos).",
    )
    """Base model: a local Qwen-VL checkpoint dir (the family is its config.json model_type), a hub id, or
    ``tiny`` (a random 39 M-parameter Qwen2.5-VL built and cached locally, for CPU demos and tests),
    ``tiny-qwen3-vl`` / ``tiny-qwen3-vl-moe`` (the same for Qwen3-VL dense / MoE). With --dry-run it may also
    be a config.json."""
    data: str = option("data/qvl-demo", common=True)
    """Shard directory written by ``qvl-data build`` (manifest.json + shards/)."""
    output_dir: str = option("saves/qwen2_5vl-7b/lora/sft", common=True)
    """Where the adapter, checkpoints, plan, log and loss plot go."""
    overwrite_output_dir: bool = option(
        False,
        common=True,
        cli_only="deletes the earlier run's checkpoints",
        help="Start afresh in an output_dir holding a run (deletes its checkpoints); command line only.",
    )
    """Start afresh in an output_dir that already holds a run (its checkpoints, adapter, log and plot are
    deleted). Without it such a directory is an error, unless resuming. Command line only: a config file
    that sets it true is refused, so re-running a recipe never deletes checkpoints by default."""
    resume: str = option(
        "",
        common=True,
        help="auto: continue from the latest checkpoint in output_dir; a path: from that checkpoint.",
    )
    """``auto``: continue from the latest complete checkpoint in output_dir (start afresh if there is none);
    a path: continue from that checkpoint dir; empty: start afresh."""

    lora_rank: int = option(8, common=True)
    """LoRA rank r."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    lora_target: str = option(
        ",".join(LORA_MODULES),
        common=True,
        help="Comma-separated language-model linears to wrap, or all (default: all seven).",
    )
    """Comma-separated decoder-layer linears of the *language model* to wrap (``all`` = all seven). The vision
    tower's MLP has the same names and is never wrapped."""

    per_device_train_batch_size: int = option(1, common=True)
    """Rows per micro-batch on each rank."""
    gradient_accumulation_steps: int = option(8, common=True)
    """Micro-batches per optimizer step on each rank."""
    learning_rate: float = option(1e-4, common=True)
    """Peak learning rate (AdamW)."""
    lr_scheduler_type: str = "cosine"
    """After the warmup: ``cosine`` (to 0), ``linear`` (to 0) or ``constant``."""
    warmup_ratio: float = 0.1
    """Linear warmup over ceil(warmup_ratio * total steps) optimizer steps."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    num_train_epochs: float = option(3.0, common=True, help="Passes over the data (fractions allowed).")
    """Passes over the data (fractions allowed: total steps = ceil(epochs * steps per epoch))."""
    max_steps: int = option(0, common=True)
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
    dataloader_num_workers: int = option(
        0,
        help="Data-loader workers per rank; 0 (the default) loads in the training process, which is the faster path for qvl shards (bench/loader.py).",
    )
    """Data-loader worker processes per rank. 0 (the default) loads in the training process, which is the
    faster path for qvl shards: a row is a few preads (plus the webp decode), while handing each batch from
    a worker to the trainer costs milliseconds of shared-memory and socket traffic; bench/loader.py measured
    uint8 shards at 146 batches/s with 0 workers against 96 with 2 (CPU, to_device included). Workers can
    pay off only for webp shards on a host with idle cores; measure with bench/loader.py."""
    max_rows: int = 0
    """Train on the first N rows of the shards only (0: all); for smoke tests and demos."""
    verify_images: bool = option(False, help="Check each loaded image against its sha256.")
    """Check every image the loader reads against the sha256 its image shard records (a damaged image
    stops the run naming its shard); costs one sha256 of each image's stored bytes per read. For the whole
    build at once, before training: ``qvl-data verify``."""

    val_size: float = option(
        0.0,
        common=True,
        help="Hold out rows of --data for evaluation: a fraction (0 < x < 1) or a row count.",
    )
    """Hold out rows of --data for evaluation: a fraction (0 < x < 1) or a row count (>= 1). The split is by
    row id (a seeded hash of source and index), so it is the same on every rank, world size and resume.
    0: no split."""
    eval_data: str = ""
    """A separate shard directory (another ``qvl-data build``) to evaluate on instead of --val-size."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps and at the end (0: at the end only). Needs --val-size or --eval-data."""
    per_device_eval_batch_size: int = 1
    """Rows per evaluation batch on each rank."""

    packing: bool = option(
        False, common=True, help="Pack several rows into one sequence of up to --packing-len tokens (README)."
    )
    """Pack several rows into one sequence of up to --packing-len tokens (each row keeps its own 3-D
    positions; no token attends across rows; the loss is the same token mean). --per-device-train-batch-size
    and the plan's steps then count packed sequences, so lower --gradient-accumulation-steps to keep the rows
    per optimizer step. Needs --attn-implementation sdpa, eager or flash_attention_2/3 (flash: no mask, the
    varlen kernel). Off by default, as in the reference recipe."""
    packing_len: int = 0
    """Token budget of a packed sequence (0: the build's cutoff_len; no row may be longer)."""

    logging_steps: int = 10
    """Log every N optimizer steps (console + trainer_log.jsonl)."""
    save_steps: int = option(500, common=True)
    """Write checkpoint-N every N optimizer steps (0: only at the end)."""
    save_total_limit: int = 0
    """Keep at most this many checkpoints, deleting the oldest (0: keep all)."""
    plot_loss: bool = True
    """Write training_loss.png at each checkpoint and at the end."""
    stop_at_step: int = option(
        0, help="Stop after this optimizer step with a checkpoint, as if interrupted (0: run to the end)."
    )
    """Stop after this optimizer step, with a checkpoint, as if interrupted (the schedule still spans the
    whole run); continue later with --resume auto. For time-limited jobs and tests. 0: run to the end."""
    log_samples: bool = option(
        False, help="Each rank logs the rows it trains on to output_dir/samples-rank<R>.jsonl."
    )
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
    dry_run: bool = option(
        False,
        common=True,
        help="Print the plan (rows, steps, warmup, trainable parameters) and exit; loads no weights.",
    )
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
        except ValueError:
            converted = None
        if converted is None:
            raise QvlError(f"{f.name}: expected {kind.__name__}, got {value!r}")
        setattr(config, f.name, converted)


# ------------------------------------------------------------------------------------------------ CLI


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Field name -> its docstring (see :func:`qvl_data.options.field_docs`)."""
    return options.field_docs(cls)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


TRAIN_DESCRIPTION = (
    "LoRA fine-tuning of Qwen-VL on qvl shards. Every option can also be set in the YAML --config; the "
    "command line wins. Run under torchrun for several GPUs. Other commands: qvl-train predict | score | "
    "export (each with --help)."
)


def build_command(
    cls: type = TrainConfig, prog: str = "qvl-train", description: str = TRAIN_DESCRIPTION
) -> click.Command:
    """The click command of a config dataclass ``cls``: ``--config FILE.yaml`` plus one option per field
    (qvl_data/options.py generates them from the fields' declarations). Its callback returns the YAML path
    and the options given. Every qvl-train command builds its command line this way."""
    params = [
        options.config_option("YAML file of options (keys: the long options with _ for -)."),
        *options.click_options(cls),
    ]
    return options.OptionsCommand(
        prog,
        params=params,
        callback=lambda config_path, **given: (config_path, given),
        help=description,
        context_settings=options.CONTEXT_SETTINGS,
    )


def help_text(cls: type = TrainConfig, prog: str = "qvl-train", description: str = TRAIN_DESCRIPTION) -> str:
    """What ``--help`` prints (at most 80 columns)."""
    command = build_command(cls, prog, description)
    with click.Context(command, info_name=prog, **options.CONTEXT_SETTINGS) as ctx:
        return command.get_help(ctx)


def parse_tool_config(cls: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """An instance of the config dataclass ``cls`` from ``--config`` YAML plus command-line overrides. A
    usage mistake (an unknown or mistyped option, a bad value) is a one-line QvlError; --help prints the
    help and exits 0."""
    command = build_command(cls, prog, description)
    try:
        parsed = command.main(sys.argv[1:] if argv is None else list(argv), prog, standalone_mode=False)
    except click.UsageError as e:
        raise QvlError(options.usage_error_line(e, prog)) from None
    if not isinstance(parsed, tuple):  # --help: click printed it
        sys.exit(parsed or 0)
    yaml_path, given = parsed
    given = {
        name: (list(value) or None) if isinstance(value, tuple) else value for name, value in given.items()
    }
    return load_config(cls, yaml_path, given)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from ``--config`` YAML plus the command-line overrides; QvlError on any problem."""
    return parse_tool_config(TrainConfig, argv, "qvl-train", TRAIN_DESCRIPTION)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
