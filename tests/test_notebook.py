"""examples/quickstart.ipynb runs top to bottom in a fresh kernel of this interpreter."""

import ast
import json
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL_NAME = "mixco-tf-test"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_is_valid_and_parses():
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    nbformat.validate(notebook)
    for cell in _code_cells(notebook):
        ast.parse(cell.source)


def _register_kernel(jupyter_dir):
    """Writes a kernel spec that starts this interpreter, so the kernel imports this checkout."""
    kernel_dir = jupyter_dir / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mixco_tf tests",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    _register_kernel(tmp_path / "jupyter")
    # Kernel specs in JUPYTER_PATH take precedence over user and system ones.
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=900,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(tmp_path)}},
    )

    client.execute()

    assert (tmp_path / "runs" / "quickstart" / "backbone" / "1" / "saved_model.pb").is_file()
    outputs = [output for cell in _code_cells(notebook) for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    # The preview, the loss curves and the t-SNE.
    assert len(images) == 3
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "Epoch 15/15" in text
    match = re.search(r"Linear probe on frozen features: top-1 ([0-9.]+) on 360 test digits", text)
    assert match, text[-2000:]
    # Chance is 0.1; even random convolutional features exceed 0.5 on digits.
    assert float(match.group(1)) > 0.5
