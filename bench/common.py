"""Shared helpers of the benchmarks: machine info, process-tree memory sampling, child runs, tables, JSON.

Every measured configuration runs in a fresh child process so that peaks never mix; the parent samples
the memory of the child's whole process tree from ``/proc`` (no psutil):

* ``rss``: the sum of ``VmRSS`` over the tree (what ``top`` shows; counts pages shared between a parent
  and its forked workers once per process, so it overstates a forking pool);
* ``pss``: the sum of ``Pss`` from ``/proc/<pid>/smaps_rollup`` (shared pages split between their users:
  the tree's real footprint; sampled every 0.5-few seconds, so a lower bound of the peak: see
  ``TreeSampler``);
* ``anon``: the sum of ``RssAnon`` (heap, no file pages). Memory-mapped shards show up in ``rss``/``pss``
  as file pages that the kernel can drop at any time; ``anon`` is what can actually run a machine out of
  memory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
#: Generated data sets and builds (git-ignored, reused between runs: a build whose fingerprint matches is
#: skipped by qvl itself, a synthetic set whose parameters match is not regenerated).
DATA_DIR = REPO / "data" / "bench"

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load, library versions, date: stored with every result."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    packages = ("torch", "transformers", "peft", "datasets", "pyarrow", "polars", "pillow", "numpy")
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": round(_mem_total() / GiB, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": {p: _version(p) for p in packages},
        "git": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return info


def caption(info: dict[str, Any]) -> str:
    v = info["versions"]
    return (
        f"{info['cpu']}, {info['usable_cores']} cores, {info['ram_gib']} GiB; load {info['load_avg_1m']} at start; "
        f"python {info['python']}, torch {v.get('torch')}, transformers {v.get('transformers')}; "
        f"{info['date']}; git {info['git']}"
    )


# ------------------------------------------------------------------------------------ memory of a tree


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/<pid>/task/*/children``)."""
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
            except OSError:
                continue
            stack.extend(int(c) for c in children)
    return pids


def process_memory(pid: int, pss: bool = True) -> dict[str, int]:
    """Bytes of VmRSS, RssAnon, RssFile and (optionally) Pss of one process; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
        if pss:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return {}
    return out


@dataclass
class Peaks:
    rss: int = 0  # peak of the tree's summed VmRSS
    pss: int = 0  # peak of the tree's summed Pss
    anon: int = 0  # peak of the tree's summed RssAnon
    processes: int = 0  # most processes seen at once
    samples: int = 0
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, anon), thinned

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.rss,
            "peak_pss_bytes": self.pss,
            "peak_anon_bytes": self.anon,
            "max_processes": self.processes,
            "samples": self.samples,
        }


class TreeSampler(threading.Thread):
    """Samples the memory of ``pid``'s process tree until stopped, using at most ~2% of one core.

    ``VmRSS``/``RssAnon`` come from ``/proc/<pid>/status`` (about 0.3 ms per process): every ``interval``
    seconds, or less often if a sample costs more than 2% of the interval. ``Pss`` needs
    ``/proc/<pid>/smaps_rollup``, a page-table walk that costs tens of milliseconds for a process with
    large mappings: it is sampled at most every 0.5 s and at a ~3% duty cycle, so its peak is a lower bound
    (short runs may get a single PSS sample). On a 2-core machine an unthrottled sampler (93 ms per sample of
    a 4-process build tree) would steal most of a core from the benchmark it measures.
    """

    def __init__(self, pid: int, interval: float = 0.05, pss: bool = True):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peaks = Peaks()
        self._stop_event = threading.Event()
        self._start = time.perf_counter()
        self._next_pss = 0.0

    def sample(self) -> float:
        """One sample; returns how long it took."""
        started = time.perf_counter()
        with_pss = self.pss and started >= self._next_pss
        totals = {"VmRSS": 0, "RssAnon": 0, "Pss": 0}
        pids = tree_pids(self.pid)
        for p in pids:
            mem = process_memory(p, with_pss)
            for k in totals:
                totals[k] += mem.get(k, 0)
        now = time.perf_counter()
        if with_pss:
            self._next_pss = now + max(0.5, 30 * (now - started))
        pk = self.peaks
        pk.rss = max(pk.rss, totals["VmRSS"])
        pk.anon = max(pk.anon, totals["RssAnon"])
        pk.pss = max(pk.pss, totals["Pss"])
        pk.processes = max(pk.processes, len(pids))
        pk.samples += 1
        if pk.samples % 20 == 1:
            pk.timeline.append((round(now - self._start, 2), totals["VmRSS"], totals["RssAnon"]))
        return 0.0 if with_pss else now - started

    def run(self) -> None:
        while not self._stop_event.is_set():
            cost = self.sample()
            self._stop_event.wait(max(self.interval, 50 * cost))

    def stop(self) -> Peaks:
        self._stop_event.set()
        self.join()
        self.sample()  # a last look (cheap; the tree is usually gone by now)
        return self.peaks


# ------------------------------------------------------------------------------------------ child runs


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None, interval: float = 0.05
) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process, sampling its tree's memory; wall time, exit code, output tails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=out, stderr=err)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.perf_counter() - started
        peaks = sampler.stop()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "cmd": shlex.join(cmd),
        "rc": rc,
        "wall_s": wall,
        **peaks.to_dict(),
        "memory_timeline": peaks.timeline,
        "stdout_tail": stdout[-3000:],
        "stderr_tail": stderr[-3000:],
    }


def run_in_process(fn: Any, config: dict[str, Any]) -> dict[str, Any]:
    """``fn(config)`` in this process, sampling this process's tree: for ``--smoke`` (no interpreter start or
    imports per configuration). Peaks then include whatever this process already held."""
    sampler = TreeSampler(os.getpid())
    started = time.perf_counter()
    sampler.start()
    try:
        result = fn(config)
    finally:
        peaks = sampler.stop()
    process = {"cmd": "in-process", "rc": 0, "wall_s": time.perf_counter() - started, **peaks.to_dict()}
    return {**result, "process": process}


def run_child(
    script: Path, config: dict[str, Any], timeout: float | None = None, in_process: Any = None
) -> dict[str, Any]:
    """``python <script> --child '<config json>'``: the child writes its own measurements to a JSON file,
    the parent adds wall time and the tree's memory peaks. Raises with the child's stderr on failure.
    With ``in_process`` (the child function), run it here instead (smoke mode)."""
    if in_process is not None:
        return run_in_process(in_process, config)
    with tempfile.TemporaryDirectory(prefix="qvl-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--child", json.dumps(config), "--child-result", str(result_path)]
        run = run_measured(cmd, timeout=timeout)
        if run["rc"] != 0 or not result_path.is_file():
            raise RuntimeError(
                f"benchmark child failed (rc {run['rc']}): {run['cmd']}\n{run['stderr_tail']}{run['stdout_tail']}"
            )
        child = json.loads(result_path.read_text())
    return {**child, "process": {k: v for k, v in run.items() if k not in ("stdout_tail", "stderr_tail")}}


def write_child_result(path: str, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------------------------- output helpers


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]], caption_text: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption_text or None, caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    import shutil

    Console(width=max(200, shutil.get_terminal_size().columns)).print(table)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB" if n >= 100 * MiB else f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def bench_parser(
    name: str, doc: str | None, smoke_help: str = "tiny sizes, a few seconds (CI)"
) -> argparse.ArgumentParser:
    """The options every benchmark has (``--smoke``, ``--out``), ready for the script's own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, help=f"results JSON (default bench/results/{name}.json)")
    return parser


def add_child_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs each configuration in a child process over generated data."""
    parser.add_argument("--data-dir", type=Path, help="generated sets and builds (default data/bench)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the configurations in this process (implied by --smoke)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)


def bench_main(
    name: str,
    args: Any,
    run_all: Callable[[Any], Any],
    summarize: Callable[[Any], dict[str, Any]],
    print_tables: Callable[[dict[str, Any]], None],
    child: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The shared ``main`` of every benchmark: a child configuration (``--child``) runs and reports alone;
    otherwise run everything, print the tables and write the JSON."""
    if child is not None and getattr(args, "child", None):
        write_child_result(args.child_result, child(json.loads(args.child)))
        return None
    started = time.perf_counter()
    payload = summarize(run_all(args))
    payload["total_s"] = time.perf_counter() - started
    print_tables(payload)
    out = write_results(args.out or default_out(name + ("-smoke" if args.smoke else "")), payload)
    print(f"results: {out} ({payload['total_s']:.0f} s)")
    return payload


def print_checks(checks: list[dict[str, Any]]) -> None:
    """The targets table every benchmark ends with: goal, measured (a ratio unless it brings its own
    ``display`` text) and met/MISSED; a workload column when the checks name one."""
    with_workload = any("workload" in c for c in checks)
    rows = []
    for c in checks:
        measured = c["measured"]
        ratio_like = measured is None or isinstance(measured, float)
        shown = c.get("display") or (fmt_ratio(measured) if ratio_like else measured)
        verdict = "-" if c["met"] is None else "met" if c["met"] else "MISSED"  # None: informational
        row = [c["target"], c["goal"], shown, verdict]
        rows.append([c.get("workload", ""), *row] if with_workload else row)
    columns = ["target", "goal", "measured", ""]
    print_table("targets", ["workload", *columns] if with_workload else columns, rows)
