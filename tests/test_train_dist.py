"""qvl_train.loop across two ranks (gloo on CPU, torch.multiprocessing): rank 0 decides where to start and
every rank follows; output_dir must be seen by every rank; a checkpoint's temporary directory exists on every
rank even when output_dir is not shared."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qvl_data.errors import QvlError
from qvl_train.checkpoint import TrainState, check_shared_output_dir, decide_start, save_checkpoint
from qvl_train.config import TrainConfig
from qvl_train.distributed import Dist
from qvl_train.plan import make_plan

PLAN = make_plan(8, 2, 1, 1, 2.0)  # 4 batches per rank and epoch -> 4 steps per epoch, 8 in all


def _checkpoint(out: Path, step: int) -> None:
    """A complete checkpoint-<step> of PLAN: the trainer state, and small files in place of the adapter,
    optimizer, scheduler and RNG states (the start decision checks that they load)."""
    epoch, first, _ = PLAN.micro_batches(step)
    state = {
        "step": step,
        "world_size": 2,
        "seed": 42,
        "plan": PLAN.to_dict(),
        "data": {"epoch": epoch, "batches_done": first},
    }
    checkpoint = out / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    save_file({"w": torch.zeros(1)}, checkpoint / "adapter_model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt"):
        torch.save({}, checkpoint / name)


class _Adapter:
    """Stands in for the PEFT model in save_checkpoint: it writes one file."""

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        (Path(path) / "adapter_model.safetensors").write_bytes(b"adapter")


def _error(fn) -> str | None:
    try:
        fn()
    except QvlError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    root = Path(tmp)
    torch_dist.init_process_group("gloo", init_method=f"file://{root / 'init'}", rank=rank, world_size=world)
    dist = Dist(rank=rank, world_size=world)
    result: dict = {}
    try:
        # 1. a shared output_dir passes the check and keeps no trace of it
        shared = root / "shared"
        if rank == 0:
            shared.mkdir()
        dist.barrier()
        result["shared"] = _error(lambda: check_shared_output_dir(shared, dist))
        dist.barrier()
        result["shared_left"] = sorted(p.name for p in shared.iterdir())

        # 2. one output_dir path that is a different directory on each rank (as on nodes without a shared
        #    filesystem): every rank fails with the same one line
        private = root / f"private-{rank}"
        private.mkdir()
        result["private"] = _error(lambda: check_shared_output_dir(private, dist))

        # 3. each rank's view of the run differs (rank 1 also sees checkpoint-4): rank 0's choice wins
        view = root / f"view-{rank}"
        _checkpoint(view, 2)
        if rank == 1:
            _checkpoint(view, 4)
        resume, clear = decide_start(TrainConfig(output_dir=str(view), resume="auto"), PLAN, dist)
        result["resume"], result["clear"] = str(resume), clear

        # 4. a refusal on rank 0 (a different plan) is raised on every rank, not a hang
        other = make_plan(8, 2, 1, 1, 3.0)
        result["refused"] = _error(
            lambda: decide_start(TrainConfig(output_dir=str(view), resume="auto"), other, dist)
        )

        # 5. a checkpoint into an output_dir rank 1 does not share: rank 1 no longer fails writing its RNG
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        state = TrainState(step=3, epoch=0, batches_done=3, world_size=2, seed=42, plan=PLAN)
        final = save_checkpoint(private, 3, _Adapter(), optimizer, scheduler, state, dist, 0)
        result["saved"] = sorted(str(p.relative_to(private)) for p in private.rglob("*.pt"))
        result["final"] = str(final)
    finally:
        torch_dist.destroy_process_group()
    (root / f"result-{rank}.json").write_text(json.dumps(result))


def test_two_ranks_start_from_rank_0s_decision_and_need_a_shared_output_dir(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1))

    assert r0["shared"] is None and r1["shared"] is None and r0["shared_left"] == []

    assert r0["private"].split(": ", 1)[1] == r1["private"].split(": ", 1)[1]  # the path is each rank's own
    assert r0["private"].endswith(
        "output_dir must be a directory that every rank sees (on multi-node runs a filesystem shared by all "
        "nodes); 1 rank of 2 do not see the file rank 0 wrote there"
    )
    assert "\n" not in r0["private"]

    assert r0["resume"] == r1["resume"] == str(tmp_path / "view-0" / "checkpoint-2")
    assert r0["clear"] is r1["clear"] is False

    assert r0["refused"] == r1["refused"] and "total_steps was 8, now 12; not the same run" in r0["refused"]

    assert r0["saved"] == [
        "checkpoint-3/optimizer.pt",
        "checkpoint-3/rng_state_0.pt",
        "checkpoint-3/scheduler.pt",
    ]
    assert r1["saved"] == ["checkpoint-3.tmp/rng_state_1.pt"]  # on its own (unshared) directory
