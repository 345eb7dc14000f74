"""Where a build's tasks run: this process, a local process pool, or a Ray cluster.

An executor only decides *where* ``fn(*args)`` runs and hands results back as they complete; what a task
writes does not depend on it (see ``qvl_data/task.py``), so every executor gives the same bytes. Ray is the
existing engine for more than one machine; qvl does not schedule anything itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from qvl_data.errors import QvlError

EXECUTORS = ("local", "ray")

Call = tuple[Callable[..., Any], tuple]


def _run(call: Call) -> Any:
    fn, args = call
    return fn(*args)


class InProcess:
    """``--num-proc 1``: tasks run one after the other in this process."""

    workers = 1
    cold_workers = 0  # workers that start without what the driver already loaded (the processor)

    def map_unordered(self, calls: Iterable[Call]) -> Iterator[Any]:
        for call in calls:
            yield _run(call)


def _quiet_worker(parent: int) -> None:
    """A pool worker's start: it leaves Ctrl-C to the driver (which stops the pool and says how to resume)
    and dies with the driver, silently (a ``kill -9``'d driver would otherwise leave each worker printing a
    BrokenPipe traceback when it hands back its result)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the driver died before the line above
        os._exit(1)


class LocalPool:
    """A process pool of ``workers`` processes; each task is one call (``chunksize=1``), taken by whichever
    worker is free, so long and short partitions balance out."""

    def __init__(self, workers: int):
        self.workers = workers
        # fork is cheap and the driver holds nothing large; spawn where fork is unavailable.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.cold_workers = 0 if method == "fork" else workers  # forked workers inherit the driver's
        self._pool = mp.get_context(method).Pool(workers, _quiet_worker, (os.getpid(),))

    def map_unordered(self, calls: Iterable[Call]) -> Iterator[Any]:
        yield from self._pool.imap_unordered(_run, list(calls), chunksize=1)

    def close(self) -> None:
        self._pool.close()
        self._pool.join()

    def terminate(self) -> None:
        self._pool.terminate()
        self._pool.join()


class RayExecutor:
    """Tasks as Ray remote functions (one CPU each) on the cluster at ``address``, or on a Ray started
    here for this build. Every node must see the dataset, the images and the output directory at the
    same paths (a shared filesystem)."""

    def __init__(self, address: str | None, workers: int):
        try:
            import ray
        except ImportError:
            raise QvlError(
                '--executor ray needs Ray: pip install -e ".[ray]" (or pip install "ray>=2.9")'
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning"}
            if address:
                options["address"] = address
                # ray.init retries an address that does not answer for minutes (a stale "current cluster"
                # file of an earlier local Ray is enough): look first, and fail in one line.
                check_ray_address(address)
            else:
                options["num_cpus"] = workers
                # A Ray started here for this build enables token authentication by default and says so
                # on every run; that is the secure setting for a cluster nobody else joins: no notice.
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                    logging.ERROR
                )
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise QvlError(
                    f"cannot start or reach Ray at {address or 'a new local cluster'}: {e}"
                ) from None
        self.workers = int(ray.cluster_resources().get("CPU", workers))
        self.cold_workers = self.workers  # each Ray worker is a fresh process: it imports and loads itself
        self._remote = ray.remote(num_cpus=1)(_run)

    def map_unordered(self, calls: Iterable[Call]) -> Iterator[Any]:
        ray = self._ray
        pending = [self._remote.remote(call) for call in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()

    terminate = close


RAY_START_HINT = "start one with `ray start --head` (or leave out --ray-address to start Ray for this build)"


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """QvlError in about ``timeout`` seconds unless something accepts a connection at the Ray address
    ``address`` (``auto``, ``host:port`` or ``ray://host:port``) as ``ray.init`` would resolve it."""
    target = address.removeprefix("ray://")
    if not address.startswith("ray://"):
        from ray._private.services import get_ray_address_from_environment

        try:  # RAY_ADDRESS wins, then "auto" reads the cluster file of the last `ray start` on this machine
            target = get_ray_address_from_environment(address, None)
        except ConnectionError:
            raise QvlError(
                f"--ray-address {address}: no running Ray cluster found; {RAY_START_HINT}"
            ) from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise QvlError(
            f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT, got {target!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        tried = target if target == address else f"{target} (what {address} resolved to)"
        raise QvlError(
            f"--ray-address {address}: no Ray cluster answers at {tried} ({e.strerror or e}); {RAY_START_HINT}"
        ) from None


@contextmanager
def open_executor(kind: str, workers: int, ray_address: str | None = None) -> Iterator[Any]:
    """The executor for ``--executor kind``; closed (pool joined, Ray shut down if we started it) after."""
    if kind not in EXECUTORS:
        raise QvlError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "ray":
        executor: Any = RayExecutor(ray_address, workers)
    elif workers <= 1:
        yield InProcess()
        return
    else:
        executor = LocalPool(workers)
    try:
        yield executor
    except BaseException:
        executor.terminate()
        raise
    executor.close()
