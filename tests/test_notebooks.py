"""The notebooks run end to end: every cell, the assertions of their last cell, a figure each.

Each notebook is executed top to bottom by ``nbclient`` in a fresh ``python3`` kernel with the Agg
backend; a failing cell (a failed assertion included) fails the test with the cell and its
traceback. After the notebook's own cells, one more cell asserts that it drew a figure.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = (
    "01_delta_recursion.ipynb",
    "02_gradient_checking.ipynb",
    "03_training.ipynb",
    "04_cost_of_backprop.ipynb",
)
DREW_A_FIGURE = (
    "import matplotlib.pyplot as plt\nassert plt.get_fignums(), 'the notebook drew no figure'"
)


def test_every_notebook_is_tested():
    assert tuple(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"
    assert "assert" in code[-1].source, f"{name}: the last cell must assert what it demonstrates"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it: no display needed
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DREW_A_FIGURE))
    client = NotebookClient(
        nb,
        timeout=300,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
