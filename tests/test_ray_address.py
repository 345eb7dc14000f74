import socket
import time

import pytest

from qvl_data.errors import QvlError
from qvl_data.executors import check_ray_address, open_executor


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_ray_address_that_does_not_answer_fails_in_one_line_within_seconds(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _closed_port()
    start = time.perf_counter()
    with pytest.raises(
        QvlError,
        match=rf"--ray-address 127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} .*ray start --head",
    ):
        with open_executor("ray", 1, f"127.0.0.1:{port}"):
            pass
    assert time.perf_counter() - start < 10


def test_ray_address_auto_names_what_it_resolved_to(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(
        QvlError,
        match=rf"--ray-address auto: no Ray cluster answers at 127.0.0.1:{port} \(what auto resolved to\)",
    ):
        check_ray_address("auto")
