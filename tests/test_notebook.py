"""notebooks/dataset_qa.ipynb: committed clean, runs top to bottom, and its images are the real pixels."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qvl_data.cli import main
from qvl_data.shards import ShardSet
from qvl_data.vision import open_image, preresize_image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dataset_qa.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_command_runs_it_on_a_build_and_keeps_the_outputs(
    tmp_path: Path, demo_build: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The documented command (`qvl-data notebook BUILD --out FILE`) runs the committed notebook on a
    build with a kernel of this interpreter, and the written notebook holds every output."""
    images_out = tmp_path / "images"
    monkeypatch.setenv("QVL_QA_OUT", str(images_out))  # the kernel inherits the environment
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "qa" / "dataset_qa.ipynb"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["notebook", str(demo_build), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    # the kernel writes to the real stderr: no transport warning, no "Parent appears to have exited"
    assert "WARNING" not in capfd.readouterr().err
    nb = nbformat.read(out, as_version=4)
    assert nb.cells[0].source == nbformat.read(NOTEBOOK, as_version=4).cells[0].source

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
    options = shards.manifest.options
    _, h, w = row["image_grid_thw"][0]
    source = preresize_image(open_image(row["images"][0]), options.image_max_pixels, options.image_min_pixels)
    expected = np.asarray(source.resize((w * 14, h * 14), Image.BICUBIC), dtype=np.int16)
    rebuilt = np.asarray(Image.open(images_out / "mllm_demo-0-image1.png").convert("RGB"), dtype=np.int16)
    assert rebuilt.shape == expected.shape == (168, 308, 3)
    assert np.abs(rebuilt - expected).max() <= 1


def test_notebook_command_fails_in_one_line_without_a_build(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["notebook", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    assert len(result.output.strip().splitlines()) == 1
