"""Faults around a build: nothing qvl did not write is lost, a damaged output is never taken
for a good one, nothing hangs, and an environment failure is one line naming the path."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset, write_image

from qvl_data import shards, task
from qvl_data.build import build
from qvl_data.cli import main
from qvl_data.config import BuildConfig
from qvl_data.errors import QvlError
from qvl_data.lock import exclusive_lock
from qvl_data.shards import DamagedShard, ShardSet, load_manifest

ROWS = 8
PARTITION_ROWS = 2  # 4 partitions


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A JSON array (staged as JSON Lines in the work dir) of 8 rows, every other one with an image."""
    data = tmp_path / "data"
    rows = []
    for i in range(ROWS):
        if i % 2:
            name = write_image(data / f"img{i}.png", (56 + 8 * i, 40), seed=i)
            rows.append({"messages": chat(f"<image>what is {i}?", f"picture {i}"), "images": [name]})
        else:
            rows.append({"messages": chat(f"say {i}", f"{i} " * (i + 1))})
    return write_dataset(data, "mine", rows)


def _config(dataset: Path, out: Path, **overrides) -> BuildConfig:
    base = dict(
        dataset_dir=str(dataset),
        dataset="mine",
        out=str(out),
        num_proc=1,
        quiet=True,
        partition_rows=PARTITION_ROWS,
    )
    return BuildConfig(**{**base, **overrides})


def _cli_args(dataset: Path, out: Path) -> list[str]:
    args = ["build", "--dataset-dir", str(dataset), "--dataset", "mine", "--out", str(out)]
    return args + ["--num-proc", "1", "--partition-rows", str(PARTITION_ROWS)]


def _cli(dataset: Path, out: Path, *more: str):
    return CliRunner().invoke(main, [*_cli_args(dataset, out), "--quiet", *more])


def _one_line(result, *expected: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _outputs(out: Path) -> dict[str, bytes]:
    """manifest.json, rejected.jsonl and every shard, by name: what must be byte-identical."""
    files = [out / shards.MANIFEST, out / shards.REJECTED, *sorted((out / shards.SHARD_DIR).glob("*.arrow"))]
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in files}


@pytest.fixture()
def clean(dataset: Path, tmp_path: Path) -> dict[str, bytes]:
    """The outputs of a clean build of ``dataset`` (the reference for byte-identity)."""
    build(_config(dataset, tmp_path / "clean"))
    return _outputs(tmp_path / "clean")


def _user_files(folder: Path) -> dict[str, bytes]:
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    files = {
        "manifest.json": b'{"my": "own manifest"}\n',
        "rejected.jsonl": b'{"my": "rejections"}\n',
        "shards/part-00000-000.arrow": b"my own bytes",
        "notes.txt": b"keep me",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


# ---------------------------------------------------------------------------------------- data lost


def test_a_folder_with_a_foreign_manifest_is_refused_and_left_alone(dataset: Path, tmp_path: Path):
    out = tmp_path / "mine"
    files = _user_files(out)
    _one_line(_cli(dataset, out), "manifest.json: not a qvl manifest", "choose another --out")
    _one_line(_cli(dataset, out, "--force"), "not a qvl manifest")
    assert {n: (out / n).read_bytes() for n in files} == files
    assert not (out / ".qvl-build").exists()


def test_a_folder_with_foreign_rejected_rows_or_shards_is_refused(dataset: Path, tmp_path: Path):
    out = tmp_path / "mine"
    files = _user_files(out)
    (out / "manifest.json").unlink()
    del files["manifest.json"]
    _one_line(_cli(dataset, out), "rejected.jsonl and shards/ that no qvl build wrote")
    assert {n: (out / n).read_bytes() for n in files} == files


def test_a_rebuild_removes_only_what_qvl_wrote(dataset: Path, tmp_path: Path):
    out = tmp_path / "o"
    build(_config(dataset, out))
    (out / "notes.txt").write_text("keep me")
    (out / "shards" / "my-table.arrow").write_text("keep me too")
    (out / "shards" / "part-00099-000.arrow").write_text("not listed anywhere")
    result = build(_config(dataset, out, cutoff_len=64))  # another fingerprint: everything is redone
    assert not result.skipped and result.reused == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "shards" / "my-table.arrow").read_text() == "keep me too"
    assert (out / "shards" / "part-00099-000.arrow").read_text() == "not listed anywhere"
    assert load_manifest(out).options.cutoff_len == 64


def test_a_damaged_completion_record_keeps_the_complete_build(dataset: Path, tmp_path: Path, clean):
    out = tmp_path / "o"
    build(_config(dataset, out))
    record = out / ".qvl-build" / "parts" / "00001.json"
    good = record.read_bytes()
    for damage in (b"null", b"", b"{", b'{"fingerprint": 3}', b"[1, 2]"):
        record.write_bytes(damage)
        (out / ".qvl-build" / "build.json").write_bytes(damage)
        result = _cli(dataset, out)
        assert result.exit_code == 0 and "up to date" in result.output, result.output
        assert _outputs(out) == clean
        assert json.loads(record.read_bytes()) == json.loads(good)  # written back from the manifest


def test_a_damaged_record_without_a_manifest_redoes_that_partition(dataset: Path, tmp_path: Path, clean):
    out = tmp_path / "o"
    build(_config(dataset, out))
    (out / "manifest.json").unlink()  # as a killed build leaves it
    (out / ".qvl-build" / "parts" / "00002.json").write_text("null")
    (out / ".qvl-build" / "index" / "mine.json").write_text("null")
    result = build(_config(dataset, out))
    assert result.partitions == 4 and result.reused == 3
    assert _outputs(out) == clean


def _build_outputs(out: Path) -> dict[str, bytes]:
    """manifest.json, rejected.jsonl and the shards the manifest lists: the complete build a reader sees."""
    names = [shards.MANIFEST, shards.REJECTED, *(s.file for s in load_manifest(out).shards)]
    return {name: (out / name).read_bytes() for name in names}


def _fail_in_the_third_partition(monkeypatch) -> None:
    real = task.encode_record

    def failing(item, *args, **kwargs):
        if item["index"] == 2 * PARTITION_ROWS:
            raise RuntimeError("injected failure")
        return real(item, *args, **kwargs)

    monkeypatch.setattr(task, "encode_record", failing)


def test_a_rebuild_that_fails_part_way_keeps_the_previous_build(tmp_path: Path, monkeypatch):
    # rows 1 and 7 rejected (partitions 0 and 3): rejected.jsonl is the partitions' files in order
    rows = [
        {"messages": "x"} if i in (1, 7) else {"messages": chat(f"say {i}", f"{i} " * (i + 1))}
        for i in range(ROWS)
    ]
    dataset = write_dataset(tmp_path / "data", "mine", rows)
    out, clean_a, clean_b = tmp_path / "o", tmp_path / "clean-a", tmp_path / "clean-b"
    assert build(_config(dataset, clean_a)).manifest.rejected.total == 2
    build(_config(dataset, clean_b, cutoff_len=64))
    clean = _outputs(clean_a)
    build(_config(dataset, out))  # build A
    with monkeypatch.context() as patch:
        _fail_in_the_third_partition(patch)
        with pytest.raises(RuntimeError, match="injected"):  # build B: two partitions written, then a failure
            build(_config(dataset, out, cutoff_len=64))
    assert _build_outputs(out) == clean  # A's manifest, rejected rows and shards, as they were
    assert (
        len(ShardSet(out)) == load_manifest(out).totals.rows and load_manifest(out).options.cutoff_len != 64
    )
    result = build(_config(dataset, out, cutoff_len=64))  # the same command resumes B, then replaces A
    assert result.reused == 2
    assert _outputs(out) == _outputs(clean_b)  # byte-identical to a clean B, and no file of A left

    with monkeypatch.context() as patch:  # back to A's options: B's unfinished shards go, not A's
        _fail_in_the_third_partition(patch)
        with pytest.raises(RuntimeError, match="injected"):
            build(_config(dataset, out))
    assert _build_outputs(out) == _outputs(clean_b)
    build(_config(dataset, out, cutoff_len=64, force=True))  # --force of B: B's own names
    assert _outputs(out) == _outputs(clean_b)
    build(_config(dataset, out))
    assert _outputs(out) == clean

    with monkeypatch.context() as patch:  # build B fails again; back to A's options
        _fail_in_the_third_partition(patch)
        with pytest.raises(RuntimeError, match="injected"):
            build(_config(dataset, out, cutoff_len=64))
    assert build(_config(dataset, out)).skipped  # A is up to date: nothing redone, B's shards removed
    # the completion records and rejected rows too (image request files are not restored: a later build
    # that redoes any partition redoes those without one, since its image tasks read every partition's)
    parts = {d: sorted((d / ".qvl-build" / "parts").glob("*.json*")) for d in (out, clean_a)}
    assert [p.read_bytes() for p in parts[out]] == [p.read_bytes() for p in parts[clean_a]]
    assert _outputs(out) == clean and build(_config(dataset, out, cutoff_len=64)).reused == 0


# ---------------------------------------------------------------------------------------- silently wrong


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_shard_header_is_redone_by_the_rerun_and_refused_by_readers(
    dataset: Path, tmp_path: Path, clean
):
    out = tmp_path / "o"
    build(_config(dataset, out))
    shard = out / load_manifest(out).shards[1].file
    _flip(shard, shard.read_bytes().index(b"input_ids"))  # a column's name, in the stream's schema
    with pytest.raises(DamagedShard) as e:
        ShardSet(out)
    assert str(shard) in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)
    result = CliRunner().invoke(main, _cli_args(dataset, out))
    assert result.exit_code == 0, result.output
    assert f"repaired: {shard}: damaged or unreadable shard" in result.output.replace("\n", "")
    assert "reused 3 of 4 partitions" in result.output  # only that partition is redone
    assert _outputs(out) == clean and len(ShardSet(out)) == ROWS


def test_a_shard_of_another_size_is_refused_by_readers(dataset: Path, tmp_path: Path):
    out = tmp_path / "o"
    build(_config(dataset, out))
    shard = out / load_manifest(out).shards[0].file
    with open(shard, "ab") as f:
        f.write(b"\0")
    for read in (lambda: ShardSet(out), lambda: __import__("qvl_data.stats").stats.compute_stats(out)):
        with pytest.raises(DamagedShard, match="the manifest records"):
            read()


def test_verify_finds_a_flipped_byte_and_the_rerun_repairs_it(dataset: Path, tmp_path: Path, clean):
    out = tmp_path / "o"
    build(_config(dataset, out))
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0 and "4 shard(s)" in result.output, result.output
    manifest = load_manifest(out)
    damaged = [out / manifest.shards[k].file for k in (1, 3)]
    for shard in damaged:
        _flip(shard, shard.stat().st_size - 100)  # in the data: only the sha256 can tell
    ShardSet(out)  # the cheap check cannot see it
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [str(d) for d in damaged]
    assert all("sha256" in line for line in lines[:-1]) and "qvl-data build" in lines[-1]
    for shard in damaged:  # the repair the message names
        shard.unlink()
    assert build(_config(dataset, out)).reused == 2
    assert _outputs(out) == clean
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_verify_of_a_folder_that_is_not_a_build_is_one_line(tmp_path: Path):
    _one_line(CliRunner().invoke(main, ["verify", str(tmp_path)]), "manifest.json: missing")


# ---------------------------------------------------------------------------------------- hangs


def _run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``qvl-data ARGS`` in a subprocess, so that a regression that hangs fails the test instead."""
    return subprocess.run(
        [sys.executable, "-m", "qvl_data.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("which", ["data file", "dataset_info.json"])
def test_a_fifo_as_an_input_file_is_refused_not_read(dataset: Path, tmp_path: Path, which: str):
    fifo = dataset / ("mine.json" if which == "data file" else "dataset_info.json")
    fifo.unlink()
    os.mkfifo(fifo)
    args = ["build", "--dataset-dir", str(dataset), "--dataset", "mine", "--out", str(tmp_path / "o")]
    result = _run_cli([*args, "--num-proc", "1", "--quiet"])
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"error: {fifo}: the {'data file' if which == 'data file' else 'dataset description'} is a FIFO, not a regular file; point it at a file"
    )


def test_a_fifo_as_an_image_is_a_rejected_row(dataset: Path, tmp_path: Path):
    (dataset / "img3.png").unlink()
    os.mkfifo(dataset / "img3.png")
    out = tmp_path / "o"
    result = _run_cli(["build", "--dataset-dir", str(dataset), "--dataset", "mine", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejected] == [(3, "image_unreadable")]
    assert "is a FIFO" in rejected[0]["message"]


@pytest.mark.parametrize("command", ["stats", "inspect", "verify"])
def test_reading_commands_refuse_a_fifo_manifest(tmp_path: Path, command: str):
    os.mkfifo(tmp_path / "manifest.json")
    result = _run_cli([command, str(tmp_path)], timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "manifest.json: is a FIFO" in result.stderr


def test_a_second_build_into_the_same_folder_says_who_holds_it(dataset: Path, tmp_path: Path):
    out = tmp_path / "o"
    build(_config(dataset, out))
    with exclusive_lock(out / ".qvl-build" / "lock", out):
        line = _one_line(_cli(dataset, out, "--force"), f"{out}: another qvl-data build is writing here")
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line
    assert _cli(dataset, out).exit_code == 0  # released


def test_the_lock_of_a_killed_build_is_taken_once_its_workers_exit(tmp_path: Path):
    """A ``kill -9``'d driver's pool workers hold its lock for a moment: a re-run started right after
    waits for them instead of refusing."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock = tmp_path / "lock"
    worker = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, sys.argv[2].encode(), 0); print('held', flush=True); "
        "time.sleep(1)"
    )
    holder = f"pid {int(dead.stdout)} on {socket.gethostname()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", worker, str(lock), holder], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    started = time.monotonic()
    with exclusive_lock(lock, tmp_path):
        assert time.monotonic() - started > 0.3  # it waited for the "worker" to exit
    proc.wait()


def test_a_lock_file_removed_by_its_holder_is_never_held_by_two_runs(tmp_path: Path, monkeypatch):
    lock = tmp_path / ".qvl-score.lock"
    with exclusive_lock(lock, tmp_path, remove=True):
        assert lock.is_file()
    assert not lock.exists()  # removed on release

    real_open, opened = os.open, []

    def removed_right_after_opening(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:  # the holder ends (removing the file) between this run's open and its flock
            opened.append(path)
            os.unlink(path)
        return fd

    monkeypatch.setattr(os, "open", removed_right_after_opening)
    with exclusive_lock(lock, tmp_path, "qvl-train score", remove=True):
        assert opened and lock.is_file()
        with pytest.raises(QvlError, match="another qvl-train score is writing here"):  # a third run
            with exclusive_lock(lock, tmp_path, "qvl-train score", remove=True):
                pass


def test_a_row_nested_10000_levels_deep_is_one_rejected_row(tmp_path: Path):
    data = tmp_path / "data"
    write_dataset(data, "deep", [])
    info = json.loads((data / "dataset_info.json").read_text())
    info["deep"]["file_name"] = "deep.jsonl"
    (data / "dataset_info.json").write_text(json.dumps(info))
    good = json.dumps({"messages": chat("hi", "hello")})
    (data / "deep.jsonl").write_text("\n".join([good, "[" * 10_000 + "]" * 10_000, good]) + "\n")
    result = build(BuildConfig(dataset_dir=str(data), dataset="deep", out=str(tmp_path / "o"), num_proc=1))
    assert result.manifest.totals.rows == 2 and result.manifest.rejected.by_reason == {"invalid_row": 1}
    rejected = json.loads((tmp_path / "o" / "rejected.jsonl").read_text())
    assert rejected["index"] == 1 and "deep.jsonl row 1" in rejected["message"]
    assert "nested more than" in rejected["message"]


def test_out_that_is_a_file_is_one_line(dataset: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.write_text("mine")
    _one_line(_cli(dataset, out), f"{out}: --out is a file")
    _one_line(_cli(dataset, out / "sub"), f"{out}", "choose another --out")
    assert out.read_text() == "mine"


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


def _umount(path: Path) -> None:
    """Unmount the test's tmpfs; if something of this process still maps a file there (a ShardSet not yet
    collected), collect it first, and detach lazily at worst: never leave a mount behind."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        gc.collect()
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_out_is_one_line_and_keeps_the_build(dataset: Path, tmp_path: Path):
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "size=16m")
    try:
        out = mount / "o"
        build(_config(dataset, out))
        before = _outputs(out)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        _one_line(_cli(dataset, out, "--force"), str(out), "read-only file system: choose another --out")
        _one_line(_cli(dataset, mount / "new"), str(mount / "new"), "read-only")
        assert _outputs(out) == before
    finally:
        _umount(mount)


def test_a_full_disk_is_one_line_and_the_same_command_then_resumes(dataset: Path, tmp_path: Path, clean):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=48k")  # room for the work dir and a shard or two, not for all of them
    try:
        out = mount / "o"
        _one_line(_cli(dataset, out), str(mount), "No space left on device", "re-run the same command")
        assert not (out / "manifest.json").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)  # space freed
        assert _cli(dataset, out).exit_code == 0
        assert _outputs(out) == clean
    finally:
        _umount(mount)


# ---------------------------------------------------------------------------------------- interrupted


def test_ctrl_c_says_the_same_command_resumes(dataset: Path, tmp_path: Path, clean, monkeypatch):
    out = tmp_path / "o"
    real, done = task.encode_record, []

    def interrupted_in_the_third_partition(item, *args, **kwargs):
        if item["index"] == 2 * PARTITION_ROWS:
            raise KeyboardInterrupt
        done.append(item["index"])
        return real(item, *args, **kwargs)

    monkeypatch.setattr(task, "encode_record", interrupted_in_the_third_partition)
    _one_line(_cli(dataset, out), f"{out}: interrupted; re-run the same command to resume")
    assert done == [0, 1, 2, 3]
    monkeypatch.setattr(task, "encode_record", real)
    result = build(_config(dataset, out))
    assert result.reused == 2 and _outputs(out) == clean


def _start_pool_build(demo_dir: Path, out: Path) -> subprocess.Popen:
    """A 2-worker build of alpaca_en_demo (125 partitions) in its own session, once it has finished at least
    one partition more than before; SIGINT as a terminal would deliver it (not ignored)."""
    args = ["build", "--dataset-dir", str(demo_dir), "--dataset", "alpaca_en_demo", "--out", str(out)]
    args += ["--num-proc", "2", "--partition-rows", "8", "--quiet"]
    parts = out / ".qvl-build" / "parts"
    before = len(list(parts.glob("*.json")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qvl_data.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.json"))) <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.slow
def test_ctrl_c_and_kill_9_of_a_pool_build_are_quiet_and_it_resumes(demo_dir: Path, tmp_path: Path):
    out = tmp_path / "o"
    proc = _start_pool_build(demo_dir, out)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver and every worker
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert (
        stderr
        == f"error: {out}: interrupted; re-run the same command to resume (finished partitions are kept)\n"
    )

    proc = _start_pool_build(demo_dir, out)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only
    _, stderr = proc.communicate(timeout=60)  # EOF once every worker is gone too
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr

    with exclusive_lock(out / ".qvl-build" / "lock", out):  # released by the kernel
        assert list((out / ".qvl-build" / "parts").glob("*.json"))  # finished partitions kept for the re-run


# ---------------------------------------------------------------------------------------- moved


def test_a_moved_build_folder_is_up_to_date_and_resumes(dataset: Path, tmp_path: Path, clean):
    out, moved = tmp_path / "o", tmp_path / "elsewhere" / "o"
    build(_config(dataset, out))
    moved.parent.mkdir()
    out.rename(moved)
    assert build(_config(dataset, moved)).skipped
    (moved / "manifest.json").unlink()
    (moved / ".qvl-build" / "parts" / "00000.json").unlink()
    moved.rename(out)
    result = build(_config(dataset, out))
    assert result.reused == 3 and _outputs(out) == clean


# ---------------------------------------------------------------------------------------- typos


def test_an_unknown_dataset_suggests_the_closest_name_and_counts_the_rest(demo_dir: Path):
    from qvl_data.sources import resolve_datasets

    with pytest.raises(QvlError) as e:
        resolve_datasets(demo_dir, ["alpaca_en_dem"])
    message = str(e.value)
    known = len(json.loads((demo_dir / "dataset_info.json").read_text()))
    assert "unknown dataset 'alpaca_en_dem'; did you mean 'alpaca_en_demo'" in message  # the closest first
    assert message.endswith(f" and {known - 20} more)") and "\n" not in message
    with pytest.raises(QvlError) as e:
        resolve_datasets(demo_dir, ["zzzz_nothing_like_it"])
    assert "did you mean" not in str(e.value)
