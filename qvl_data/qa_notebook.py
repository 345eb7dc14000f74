"""Run ``notebooks/dataset_qa.ipynb`` on a build and keep its outputs (``qvl-data notebook``).

Needs only what the ``[dev]`` extra installs (``nbclient``, ``ipykernel``), not Jupyter itself. The kernel
is *this* interpreter, whatever kernels the machine has registered, so the notebook imports the same qvl.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from qvl_data.errors import QvlError
from qvl_data.files import environment_error, refuse_foreign, write_atomic

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dataset_qa.ipynb"
_KERNEL = "qvl-python"
MARK = "dataset_qa"  # metadata.qvl.notebook of every notebook this command writes
# Figures as notebook outputs, whatever MPLBACKEND the user's shell sets.
_INLINE = "module://matplotlib_inline.backend_inline"


def default_output(shards_dir: Path) -> Path:
    """``./dataset_qa-<build folder name>.ipynb``: beside the user, never inside the build directory."""
    return Path(f"dataset_qa-{shards_dir.resolve().name}.ipynb")


def run_notebook(
    shards_dir: str | Path, out: str | Path | None = None, notebook: Path = NOTEBOOK, timeout: int = 600
) -> Path:
    """Execute ``notebook`` top to bottom on ``shards_dir``; write it, outputs included, to ``out``."""
    try:
        import nbformat
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as e:
        raise QvlError(
            f"running the notebook needs nbclient and ipykernel: pip install -e '.[dev]' ({e})"
        ) from None
    shards_dir = Path(shards_dir)
    if not (shards_dir / "manifest.json").is_file():
        raise QvlError(f"{shards_dir}: no manifest.json (not a qvl-data build; run qvl-data build first)")
    if not notebook.is_file():
        raise QvlError(f"{notebook}: notebook not found (it ships in the source checkout's notebooks/)")
    out = Path(out) if out else default_output(shards_dir)
    refuse_foreign(out, is_qa_notebook, "QA notebook", "--out")
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["qvl"] = {"notebook": MARK}  # what makes a later run's --out replace it
    with tempfile.TemporaryDirectory(prefix="qvl-kernel-") as kernels:
        spec_dir = Path(kernels) / _KERNEL
        spec_dir.mkdir()
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "qvl",
            "language": "python",
            "env": {"QVL_SHARDS": str(shards_dir.resolve()), "MPLBACKEND": _INLINE},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        specs = KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)
        # IPC sockets in the private temp dir instead of TCP on localhost: nothing on the network, and no
        # "running over TCP without encryption" warning from the kernel
        km = KernelManager(
            kernel_name=_KERNEL, kernel_spec_manager=specs, transport="ipc", ip=str(Path(kernels) / "ipc")
        )
        client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": os.getcwd()}})
        try:
            client.execute()
        except CellExecutionError as e:
            _write(nb, out)  # keep what ran, so the failing cell can be read
            last = [line for line in str(e).splitlines() if line.strip()][-1:]
            raise QvlError(f"the notebook failed (outputs so far in {out}): {' '.join(last)}") from None
        finally:
            # nbclient leaves a kernel it was handed running; stopped here it does not outlive us and
            # print "Parent appears to have exited"
            if km.has_kernel:
                km.shutdown_kernel(now=False)
    _write(nb, out)
    return out


def is_qa_notebook(path: Path, notebook: Path = NOTEBOOK) -> bool:
    """Whether ``path`` is a notebook this command wrote: its metadata says so, or (written before qvl
    marked them) its cells are those of ``notebook``. Only such a file is replaced by a later run."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
        metadata = nb.get("metadata") or {}
        if (metadata.get("qvl") or {}).get("notebook") == MARK:
            return True
        template = json.loads(notebook.read_text(encoding="utf-8"))
        return [c["source"] for c in nb["cells"]] == [c["source"] for c in template["cells"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write(nb, out: Path) -> None:
    import nbformat

    try:
        text = nbformat.writes(nb)  # as nbformat.write writes it: ending in a newline
        write_atomic(out, lambda f: f.write((text if text.endswith("\n") else text + "\n").encode("utf-8")))
    except OSError as e:
        raise environment_error(e, out, resumable=False) from None
