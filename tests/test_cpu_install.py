"""The README's CPU install on a machine that is not ours: constraints/cpu.txt plus PyTorch's CPU index
picks the CPU build of torch, which the pin alone would not (on PyPI, Linux's torch is the CUDA build).

pip runs for real, offline, against two local stand-in indexes: "PyPI" holding ``torch-2.13.0`` (and a
newer release) and "the CPU index" holding ``torch-2.13.0+cpu``; nothing is fetched from the network."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints" / "cpu.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _install_command() -> list[str]:
    """The first command of the README's Install section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.+?)\n```", section, re.S)
    assert block, "no install command in the README's Install section"
    return shlex.split(block.group(1).splitlines()[0])


def _pinned_torch() -> str:
    pins = [
        line.strip() for line in CONSTRAINTS.read_text().splitlines() if line.strip().startswith("torch==")
    ]
    assert len(pins) == 1, pins
    return pins[0].removeprefix("torch==")


def _index(root: Path, *versions: str) -> str:
    """A PEP 503 simple index at ``root`` holding metadata-only torch wheels of ``versions``."""
    project = root / "torch"
    project.mkdir(parents=True)
    links = []
    for version in versions:
        name = f"torch-{version}-py3-none-any.whl"
        info = f"torch-{version}.dist-info"
        with zipfile.ZipFile(project / name, "w") as wheel:
            wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
            wheel.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: qvl-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            wheel.writestr(f"{info}/RECORD", "")
        links.append(f'<a href="{name.replace("+", "%2B")}">{name}</a>')
    (project / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
    return root.as_uri()


def _resolve_torch(tmp_path: Path, *index_options: str) -> str:
    out = tmp_path / f"out-{len(index_options)}"
    # --isolated: neither this machine's pip configuration (its local wheel folder) nor its environment.
    command = [sys.executable, "-m", "pip", "--isolated", "download", "torch", "--no-deps", "-d", str(out)]
    child = subprocess.run(
        [*command, "-c", str(CONSTRAINTS), *index_options], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    (wheel,) = out.glob("torch-*.whl")
    return wheel.name.split("-")[1]


def test_the_readme_installs_with_our_constraints_and_the_pytorch_cpu_index():
    command = _install_command()
    assert command[:3] == ["pip", "install", "-e"]
    assert command[command.index("-c") + 1] == "constraints/cpu.txt"
    assert command[command.index("--extra-index-url") + 1] == CPU_INDEX


def test_the_pin_is_the_torch_the_tests_run_on():
    import torch

    assert torch.__version__.split("+")[0] == _pinned_torch()


def test_the_cpu_index_makes_pip_take_the_cpu_build(tmp_path: Path):
    pin = _pinned_torch()
    pypi = _index(tmp_path / "pypi", pin, "99.0.0")
    cpu_index = _index(tmp_path / "cpu", f"{pin}+cpu")
    pytest.importorskip("pip")
    assert _resolve_torch(tmp_path, "--index-url", pypi) == pin  # the pin alone: PyPI's build
    # The README's option, with the stand-in for the CPU index.
    assert _resolve_torch(tmp_path, "--index-url", pypi, "--extra-index-url", cpu_index) == f"{pin}+cpu"
