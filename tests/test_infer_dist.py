"""``predict`` and ``score`` across two ranks (gloo on CPU, as torchrun starts them): the rows split over
the ranks, one file in input order equal byte for byte to a one-process run, scores.json written once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from qvl_train.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_FORKED: dict = {}  # the ranks' command lines, inherited by the forked ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int) -> None:
    # torchrun's environment: qvl_train.distributed.setup_distributed reads it
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from qvl_train.infer import predictions

    generate = predictions.generate_batch

    def recorded(model, prompts, *args):  # which rows this rank generates
        with open(f"{_FORKED['log']}.{rank}", "a") as log:
            log.writelines(f"{p.id}\n" for p in prompts)
        return generate(model, prompts, *args)

    predictions.generate_batch = recorded
    main(_FORKED["argv"])


def _two_ranks(argv: list[str], log: Path) -> list[list[str]]:
    """Run ``argv`` on two ranks; the ids of the rows each rank generated."""
    # forked, not spawned: the ranks start with the imports (seconds each on a busy machine)
    _FORKED.update(argv=argv, log=str(log))
    try:
        torch.multiprocessing.start_processes(
            _rank_worker, args=(2, _free_port()), nprocs=2, start_method="fork"
        )
    finally:
        _FORKED.clear()
    return [Path(f"{log}.{rank}").read_text().split() for rank in (0, 1)]


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


GENERATE = ["--max-rows", "5", "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu", "--quiet"]


def test_predict_on_two_ranks_writes_the_file_of_one(demo_build, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    main(["predict", "--data", str(demo_build), "--output", str(one), *GENERATE])
    shares = _two_ranks(
        ["predict", "--data", str(demo_build), "--output", str(two), *GENERATE], tmp_path / "log"
    )
    ids = _ids(one)
    assert len(ids) == 5 and [sorted(s) for s in shares] == [
        ids[0::2],
        ids[1::2],
    ]  # each row generated once, by one rank
    assert two.read_bytes() == one.read_bytes()  # merged in input order
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_score_on_two_ranks_gives_the_scores_of_one(demo_build, tmp_path):
    argv = ["score", "--task", "instruct", "--data", str(demo_build), *GENERATE]
    main([*argv, "--output-dir", str(tmp_path / "one")])
    shares = _two_ranks([*argv, "--output-dir", str(tmp_path / "two")], tmp_path / "log")
    ids = _ids(tmp_path / "one" / "predictions-base.jsonl")
    assert [sorted(s) for s in shares] == [ids[0::2], ids[1::2]]
    one, two = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    for report in (one, two):
        report.pop("seconds")
        for entry in report["models"]:
            entry.pop("predictions")
    assert two == one and one["rows"] == 5 and one["models"][0]["rows"] == 5
    assert (tmp_path / "two" / "predictions-base.jsonl").read_bytes() == (
        tmp_path / "one" / "predictions-base.jsonl"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["predictions-base.jsonl", "scores.json"]
