"""What a run leaves in output_dir and how it picks up again: checkpoints, RNG state, the start decision.

A checkpoint is ``checkpoint-N/`` (adapter, optimizer, scheduler, one RNG file per rank, trainer_state.json
written last), built in ``checkpoint-N.tmp`` and renamed when complete. :func:`prepare_output_dir` decides,
identically on every rank and before anything is written, whether a run starts afresh, resumes, or is refused.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qvl_data.errors import QvlError
from qvl_data.files import write_json_atomic
from qvl_data.lock import exclusive_lock
from qvl_train.config import TrainConfig
from qvl_train.distributed import Dist
from qvl_train.meter import Window
from qvl_train.plan import Plan

LOG_FILE = "trainer_log.jsonl"
PLAN_FILE = "plan.json"
PLOT_FILE = "training_loss.png"
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LOCK_FILE = ".qvl-train.lock"  # one run per output_dir (qvl_data.lock); the file stays
_HELD_LOCKS: list = []  # locks taken without an ExitStack to hold them: kept until the process ends


# ----------------------------------------------------------------------------------------- the state


@dataclass
class TrainState:
    """trainer_state.json: where a run stands at a checkpoint, and what a resume must match.

    On disk the data position is ``"data": {"epoch", "batches_done"}`` and ``plan`` is
    :meth:`Plan.to_dict`; checkpoints from before evaluation (no ``eval_set``) or the later fields read
    with their defaults."""

    step: int  # optimizer steps done
    epoch: int  # the data position of the next step: its epoch ...
    batches_done: int  # ... and the micro-batches of that epoch already trained (per rank)
    world_size: int
    seed: int
    plan: Plan
    elapsed_s: float = 0.0  # wall time of the run up to the checkpoint
    pending: Window = field(default_factory=Window)  # the log window open at the checkpoint
    eval_set: dict[str, Any] = field(default_factory=dict)  # evaluate.eval_set_identity; {}: none
    config: dict[str, Any] = field(default_factory=dict)  # the run's TrainConfig (for the record)
    # the --data build's manifest fingerprint: another build of as many rows (another --cutoff-len) is
    # another run; "" in checkpoints from before it was recorded (then only the counts are compared)
    data_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": {"epoch": self.epoch, "batches_done": self.batches_done},
            "world_size": self.world_size,
            "seed": self.seed,
            "plan": self.plan.to_dict(),
            "elapsed_s": self.elapsed_s,
            "pending": self.pending.to_dict(),
            "eval_set": self.eval_set,
            "config": self.config,
            "data_fingerprint": self.data_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """KeyError (the missing key) or TypeError where ``data`` is not a trainer state."""
        plan = Plan(**{f.name: data["plan"][f.name] for f in fields(Plan) if f.name in data["plan"]})
        return cls(
            step=data["step"],
            epoch=data["data"]["epoch"],
            batches_done=data["data"]["batches_done"],
            world_size=data["world_size"],
            seed=data["seed"],
            plan=plan,
            elapsed_s=data.get("elapsed_s", 0.0),
            pending=Window(**data.get("pending", {})),
            eval_set=data.get("eval_set", {}),
            config=data.get("config", {}),
            data_fingerprint=data.get("data_fingerprint", ""),
        )


# ----------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain lists (loadable with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np.array(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX) :].isdigit():
        return None
    return int(name[len(CHECKPOINT_PREFIX) :])


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete once renamed from its .tmp directory; the state file is written last."""
    return checkpoint_step(path) is not None and (path / STATE_FILE).is_file()


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    dist: Dist,
    save_total_limit: int,
) -> Path:
    """checkpoint-N/: adapter (safetensors), optimizer.pt, scheduler.pt, rng_state_<rank>.pt and
    trainer_state.json (step, data-loader position, pending log sums), written into checkpoint-N.tmp and
    renamed when complete. Everything loads with ``torch.load(weights_only=True)``.

    A failed write (disk full, permissions) removes the .tmp directory and raises QvlError on every rank; the
    checkpoints saved before stay as they were (older ones are pruned only after the rename)."""
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
    error = None
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        error = _write_or_say(tmp, lambda: tmp.mkdir(parents=True))
    _raise_on_every_rank(error, dist)
    # every rank creates it too (a no-op on a shared output_dir): a rank that does not see rank 0's
    # directory writes its RNG state into its own rather than failing with FileNotFoundError
    error = _write_or_say(tmp, lambda: _write_rng_state(tmp, dist.rank))
    if int(dist.sum(1.0 if error else 0.0).item()):  # on every rank: the ones that wrote do not wait
        raise QvlError(error or f"{tmp}: another rank could not write its RNG state there (see its error)")
    if dist.main:
        error = _write_or_say(tmp, lambda: _write_checkpoint(tmp, final, model, optimizer, scheduler, state))
        if error is None and save_total_limit > 0:
            for old in checkpoints(out_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _raise_on_every_rank(error, dist)
    return final


def _write_rng_state(tmp: Path, rank: int) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")


def _write_checkpoint(
    tmp: Path, final: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState
) -> None:
    """Rank 0's part of :func:`save_checkpoint`: the files, fsynced, then the rename."""
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    write_json(tmp / STATE_FILE, state.to_dict())  # last: marks the content complete
    for path in tmp.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_or_say(tmp: Path, write: Any) -> str | None:
    """Run ``write``; on a failed write remove ``tmp`` and return the one-line error, else None. torch.save
    and safetensors report a full disk as RuntimeError / SafetensorError, not OSError."""
    from safetensors import SafetensorError

    try:
        write()
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(e, "filename", None) or tmp
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        return (
            f"{where}: cannot write the checkpoint ({reason}); the checkpoints saved before are intact: free "
            "space (or fix the permissions) and run the same command with --resume auto"
        )
    return None


def _raise_on_every_rank(error: str | None, dist: Dist) -> None:
    """Rank 0's error (or None) raised on every rank, so no rank waits at a barrier for a rank that failed."""
    error = dist.broadcast_object(error)
    if error:
        raise QvlError(error)


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist
) -> TrainState:
    """Restore adapter, optimizer, scheduler and this rank's RNG; return the trainer state (which
    :func:`check_resume` has already found to belong to this run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_state(path)
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(dist.device))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise QvlError(f"{path}: adapter does not fit this model (unexpected keys such as {unexpected[0]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dist.device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{dist.rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ----------------------------------------------------------------------------------------- output dir

_ARTEFACTS = (LOG_FILE, PLAN_FILE, PLOT_FILE, *ADAPTER_FILES)


def read_state(checkpoint: Path) -> TrainState:
    path = checkpoint / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QvlError(f"{path}: cannot read the trainer state ({e})") from None
    try:
        return TrainState.from_dict(data)
    except KeyError as e:
        raise QvlError(f"{path}: no {e} (not a qvl-train checkpoint)") from None
    except (TypeError, AttributeError) as e:
        raise QvlError(f"{path}: not a qvl-train trainer state ({e})") from None


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def check_resume(
    checkpoint: Path,
    plan: Plan,
    cfg: TrainConfig,
    world_size: int,
    eval_set: dict[str, Any] | None = None,
    fingerprint: str = "",
) -> None:
    """QvlError unless ``checkpoint`` belongs to this run (same ranks, plan, seed, evaluation set, data
    build and data position). ``eval_set`` is :func:`qvl_train.evaluate.eval_set_identity` of this run (None
    or ``{}``: no evaluation); ``fingerprint`` the --data build's manifest fingerprint ("": not compared, nor
    where the checkpoint predates it). Called before anything is written, so a refused resume leaves the
    output directory as it was."""
    state = read_state(checkpoint)
    if fingerprint and state.data_fingerprint and state.data_fingerprint != fingerprint:
        raise QvlError(
            f"{checkpoint}: trained on the build with fingerprint {state.data_fingerprint[:12]}, but --data "
            f"{cfg.data} has fingerprint {fingerprint[:12]} (another build, e.g. another --cutoff-len); "
            "not the same run: resume with the same --data, or train into another --output-dir"
        )
    if state.world_size != world_size:
        raise QvlError(
            f"{checkpoint}: saved by {_ranks(state.world_size)}, resumed with {world_size}; the data "
            "split would differ (resume with the same number of processes)"
        )
    # val_size decides which rows train, and an eval curve whose rows change midway compares nothing;
    # checked before the plan, whose row count a new val_size changes too, so the message says why
    if _eval_key(state.eval_set) != _eval_key(eval_set or {}):
        raise QvlError(
            f"{checkpoint}: evaluation set was {_describe_eval(state.eval_set)}, now "
            f"{_describe_eval(eval_set or {})}; not the same run"
        )
    # packing_len / packed_rows: a packed run resumed unpacked (or with another budget) trains other
    # sequences even where the counts happen to agree; checkpoints from before packing have neither (0)
    for key in (
        "rows",
        "total_steps",
        "steps_per_epoch",
        "grad_accum",
        "batch_size",
        "packing_len",
        "packed_rows",
    ):
        if getattr(state.plan, key) != getattr(plan, key):
            raise QvlError(
                f"{checkpoint}: {key} was {getattr(state.plan, key)}, now {getattr(plan, key)}; not the same run"
            )
    if state.seed != cfg.seed:
        raise QvlError(f"{checkpoint}: seed was {state.seed}, now {cfg.seed}; not the same run")
    epoch, first, _ = plan.micro_batches(state.step)
    if (state.epoch, state.batches_done) != (epoch, first):
        raise QvlError(
            f"{checkpoint}: data-loader state {{'epoch': {state.epoch}, 'batches_done': {state.batches_done}}} "
            f"does not match step {state.step}"
        )


def _eval_key(identity: dict[str, Any]) -> tuple:
    """What makes two evaluation sets the same: the digest covers the build's fingerprint and the rows, so
    an --eval-data build reached by another path (moved, a symlink, relative to another directory) is too."""
    return (identity.get("val_size"), identity.get("rows"), identity.get("digest"))


def _describe_eval(identity: dict[str, Any]) -> str:
    if not identity:
        return "none"
    what = (
        f"val_size {identity['val_size']:g}" if identity["val_size"] else f"eval_data {identity['eval_data']}"
    )
    return f"{what} ({identity['rows']} rows, digest {identity['digest'][:12]})"


def find_start(
    cfg: TrainConfig,
    plan: Plan,
    world_size: int,
    eval_set: dict[str, Any] | None = None,
    fingerprint: str = "",
    notes: list[str] | None = None,
) -> tuple[Path | None, bool]:
    """This process's view of where to start: ``(checkpoint to resume or None, clear the old run)``.
    Refuses to mix with an old run unless overwrite_output_dir, which deletes that run's files. With
    ``--resume auto`` a damaged latest checkpoint (:func:`checkpoint_damage`) is passed over for the newest
    one that loads; ``notes`` gets one line for each checkpoint passed over."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise QvlError(
            f"{out}: --output-dir is a file, not a directory; pass a directory (created if missing)"
        )
    resume: Path | None = None
    if cfg.resume == "auto":
        resume = newest_loadable(checkpoints(out), world_size, notes if notes is not None else [])
    elif cfg.resume:
        resume = Path(cfg.resume)
        if not is_complete_checkpoint(resume):
            raise QvlError(f"{resume}: not a complete checkpoint (expected checkpoint-N/ with {STATE_FILE})")
    if resume is not None:
        check_resume(resume, plan, cfg, world_size, eval_set, fingerprint)
        return resume, False
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        if not cfg.overwrite_output_dir:
            if cfg.resume == "auto":
                problem, hint = "is not empty and holds no complete checkpoint", ""
            else:
                problem, hint = "is not empty", " or --resume auto to continue from its last checkpoint"
            raise QvlError(
                f"{out}: output directory {problem}; pass --overwrite-output-dir true to start afresh{hint}"
            )
        return None, True
    return None, False


def checkpoint_damage(checkpoint: Path, world_size: int) -> str | None:
    """Why ``checkpoint`` would not load (a missing or truncated file: its trainer state, adapter, optimizer,
    scheduler or a rank's RNG state), or None. Each file is read in full, on the CPU."""
    from safetensors.torch import load_file

    files = [STATE_FILE, ADAPTER_FILES[0], "optimizer.pt", "scheduler.pt"]
    files += [f"rng_state_{rank}.pt" for rank in range(world_size)]
    for name in files:
        path = checkpoint / name
        try:
            if name == STATE_FILE:
                read_state(checkpoint)
            elif name.endswith(".safetensors"):
                load_file(str(path), device="cpu")
            else:
                torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return f"no {name}"
        except Exception as e:  # noqa: BLE001 - whatever the reader says, the file does not load
            return f"{name} does not load: {(str(e).splitlines() or [type(e).__name__])[0][:160]}"
    return None


def newest_loadable(found: list[Path], world_size: int, notes: list[str]) -> Path | None:
    """The newest of ``found`` (oldest first) that loads; a line in ``notes`` for each one passed over.
    QvlError when there are checkpoints and none loads."""
    for checkpoint in reversed(found):
        damage = checkpoint_damage(checkpoint, world_size)
        if damage is None:
            if notes:
                notes.append(f"resuming from {checkpoint.name}, the newest checkpoint that loads")
            return checkpoint
        notes.append(f"{checkpoint}: damaged ({damage}); passed over")
    if found:
        raise QvlError(
            f"{found[-1].parent}: no checkpoint loads ({'; '.join(notes)}); pass --overwrite-output-dir true "
            "to start afresh"
        )
    return None


def decide_start(
    cfg: TrainConfig,
    plan: Plan,
    dist: Dist,
    eval_set: dict[str, Any] | None = None,
    fingerprint: str = "",
) -> tuple[Path | None, bool]:
    """Rank 0 decides (:func:`find_start`) and every rank follows: ranks that each picked "the latest
    checkpoint" from their own view of the directory could resume at different steps and hang. A refusal
    is raised on every rank, with rank 0's message; rank 0 prints why it passed over a damaged checkpoint."""
    decision: dict[str, Any] = {"resume": None, "clear": False, "error": None}
    if dist.main:
        notes: list[str] = []
        try:
            resume, clear = find_start(cfg, plan, dist.world_size, eval_set, fingerprint, notes)
            decision = {"resume": None if resume is None else str(resume), "clear": clear, "error": None}
            if notes:
                print(f"warning: {' '.join(notes)}", file=sys.stderr)
        except QvlError as e:
            decision["error"] = str(e)
    decision = dist.broadcast_object(decision)
    if decision["error"]:
        raise QvlError(decision["error"])
    return (Path(decision["resume"]) if decision["resume"] else None), decision["clear"]


def check_shared_output_dir(out: Path, dist: Dist) -> None:
    """Every rank must see what rank 0 writes in output_dir (checkpoints hold every rank's RNG state and
    are read back by every rank on resume): rank 0 writes a file with a random token, each rank looks for
    it, and all ranks fail with one line if any does not see it."""
    if dist.world_size == 1:
        return
    token = dist.broadcast_object(secrets.token_hex(8) if dist.main else None)
    marker = out / f".qvl-shared-check-{token}"
    if dist.main:
        marker.write_text(token, encoding="utf-8")
    dist.barrier()
    try:
        seen = marker.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = int(dist.sum(0.0 if seen else 1.0).item())
    dist.barrier()  # everyone has looked before the file goes
    if dist.main:
        marker.unlink(missing_ok=True)
    if blind:
        raise QvlError(
            f"{out}: output_dir must be a directory that every rank sees (on multi-node runs a filesystem "
            f"shared by all nodes); {_ranks(blind)} of {dist.world_size} do not see the file rank 0 wrote there"
        )


def prepare_output_dir(
    cfg: TrainConfig,
    plan: Plan,
    dist: Dist,
    eval_set: dict[str, Any] | None = None,
    fingerprint: str = "",
    hold: ExitStack | None = None,
) -> Path | None:
    """Decide where to start (:func:`decide_start`), take the output directory's lock (rank 0; held until
    ``hold`` closes), clear an old run if asked, create output_dir and check that every rank sees it.
    Returns the checkpoint to resume from, or None. Nothing is written before the decision, so a refused
    start leaves the directory as it was; a second run into the same directory stops at the lock."""
    out = Path(cfg.output_dir)
    resume, clear = decide_start(cfg, plan, dist, eval_set, fingerprint)
    dist.barrier()  # every rank has decided before anything is deleted
    error = None
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = exclusive_lock(
                out / LOCK_FILE, out, "qvl-train run", "wait for it to end, or pass another --output-dir"
            )
            if hold is not None:
                hold.enter_context(lock)
            else:  # held until this process ends
                _HELD_LOCKS.append(lock)
                lock.__enter__()
            if clear:
                _clear_run(out)
        except QvlError as e:
            error = str(e)
        except OSError as e:
            error = f"{e.filename or out}: cannot prepare the output directory ({e.strerror or e})"
    error = dist.broadcast_object(error)
    if error:
        raise QvlError(error)
    check_shared_output_dir(out, dist)
    return resume


def _clear_run(out: Path) -> None:
    """--overwrite-output-dir: delete what an earlier run wrote in ``out`` (and nothing else)."""
    for path in out.iterdir():
        if path.name in _ARTEFACTS or path.name.startswith((CHECKPOINT_PREFIX, "samples-rank")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (by a run that went past its last checkpoint)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["step"] <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented ASCII JSON, written atomically (:func:`qvl_data.files.write_json_atomic`)."""
    write_json_atomic(path, obj, ensure_ascii=True)
