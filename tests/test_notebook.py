"""docs/quickstart.ipynb, run top to bottom on a real Jupyter kernel, as a reader would."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOK = os.path.join(REPO, "docs", "quickstart.ipynb")


def test_the_notebook_is_kept_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # In a folder of its own, so that its runs/ stays out of the checkout. The timeout only
    # guards against a hang; nothing is triggered by it.
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # run.plot()
    with open(tmp_path / "runs" / "quickstart" / "metrics.json") as handle:
        metrics = json.load(handle)
    assert metrics["status"] == "complete" and metrics["val_accuracy"] >= 0.8
    streams = "".join(output.get("text", "") for output in outputs)
    assert "already complete" in streams  # the second fit
    assert "oneDNN" not in streams and "absl::InitializeLog" not in streams
