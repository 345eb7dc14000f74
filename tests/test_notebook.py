"""notebooks/dataset_qa.ipynb: committed clean, runs top to bottom, and its images are the real pixels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from qvl_data.shards import ShardSet
from qvl_data.vision import open_image, preresize_image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dataset_qa.ipynb"
KERNEL = "qvl-test-python"
INLINE = "module://matplotlib_inline.backend_inline"  # figures as outputs, whatever MPLBACKEND says


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.fixture()
def kernel_manager(tmp_path: Path, demo_build: Path):
    """A kernel running *this* interpreter (whatever kernels the machine has registered), with the
    notebook's parameters in its environment."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    images_out = tmp_path / "images"
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qvl test",
        "language": "python",
        "env": {"QVL_SHARDS": str(demo_build), "QVL_QA_OUT": str(images_out), "MPLBACKEND": INLINE},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs), images_out


def test_notebook_runs_and_reconstructs_the_source_image(
    kernel_manager, tmp_path: Path, demo_build: Path
) -> None:
    from nbclient import NotebookClient

    km, images_out = kernel_manager
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "cwd"
    work.mkdir()
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(work)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert f"shard directory: {demo_build.resolve()}" in text
    assert "149759" in text and "190128" in text  # the sources DataFrame
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two matplotlib figures
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "mllm_demo:0" in html and "[image 1 · 12×22 patches · 66 tokens]" in html
    assert "no rejected rows" in text

    # The image the notebook rebuilt from the stored pixels of mllm_demo row 0 is the resized source.
    shards = ShardSet(demo_build)
    row = shards.row(shards.find("mllm_demo", 0))
    options = shards.manifest["options"]
    _, h, w = row["image_grid_thw"][0]
    source = preresize_image(
        open_image(row["images"][0]), options["image_max_pixels"], options["image_min_pixels"]
    )
    expected = np.asarray(source.resize((w * 14, h * 14), Image.BICUBIC), dtype=np.int16)
    rebuilt = np.asarray(Image.open(images_out / "mllm_demo-0-image1.png").convert("RGB"), dtype=np.int16)
    assert rebuilt.shape == expected.shape == (168, 308, 3)
    assert np.abs(rebuilt - expected).max() <= 1
