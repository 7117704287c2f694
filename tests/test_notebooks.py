"""The notebooks run end to end: every cell, the assertions of their last cell, a figure each.

Each notebook is executed top to bottom by ``nbclient`` in a fresh ``python3`` kernel with the Agg
backend; a failing cell (a failed assertion included) fails the test with the cell and its
traceback. After the notebook's own cells, one more cell asserts that it drew a figure.

The kernels are separate processes that share nothing, so the notebooks the session selected run
concurrently (at most ``KERNELS`` kernels at a time, the longest first) from the first test that
asks; each test waits for its own notebook. Under ``--dist loadfile`` this file's one worker runs
them all, and a core the other workers leave idle is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pathlib
import threading
from collections.abc import Iterator

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
# Longest first (one at a time on 2 cores: 03 ≈ 100 s, 02 ≈ 80 s, 04 ≈ 55 s, 01 ≈ 27 s), so that
# the kernels running side by side finish at about the same time.
LONGEST_FIRST = (
    "03_training.ipynb",
    "02_gradient_checking.ipynb",
    "04_cost_of_backprop.ipynb",
    "01_delta_recursion.ipynb",
)
KERNELS = min(len(EXPECTED), max(2, os.cpu_count() or 1))
DREW_A_FIGURE = (
    "import matplotlib.pyplot as plt\nassert plt.get_fignums(), 'the notebook drew no figure'"
)


def test_every_notebook_is_tested():
    assert tuple(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))) == EXPECTED
    assert sorted(LONGEST_FIRST) == list(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"
    assert "assert" in code[-1].source, f"{name}: the last cell must assert what it demonstrates"


async def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DREW_A_FIGURE))
    client = NotebookClient(
        nb,
        timeout=300,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    # raises CellExecutionError, with the cell and traceback, on any error
    return await client.async_execute()


def _execute_all(names: list[str], done: dict[str, concurrent.futures.Future]) -> None:
    """Runs the notebooks on one event loop, ``KERNELS`` at a time, in the order given."""

    async def one(name: str, slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                done[name].set_result(await _execute(name))
            except Exception as error:  # reported by the notebook's test
                done[name].set_exception(error)

    async def all_of() -> None:
        slots = asyncio.Semaphore(KERNELS)
        await asyncio.gather(*(one(name, slots) for name in names))

    try:
        asyncio.run(all_of())
    finally:  # never leave a test waiting on a notebook that did not run
        for future in done.values():
            if not future.done():
                future.set_exception(RuntimeError("the notebook runner stopped before it"))


@pytest.fixture(scope="module")
def executed(request: pytest.FixtureRequest) -> Iterator[dict[str, concurrent.futures.Future]]:
    """Each selected notebook's executed copy (a future), all started at once in the background."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.path == request.path and getattr(item, "originalname", "") == "test_notebook_runs"
    }
    names = [name for name in LONGEST_FIRST if name in selected]
    done: dict[str, concurrent.futures.Future] = {n: concurrent.futures.Future() for n in names}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernels inherit it: no display needed
        runner = threading.Thread(target=_execute_all, args=(names, done), daemon=True)
        runner.start()
        yield done
        runner.join()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name, executed):
    nb = executed[name].result()  # re-raises the notebook's CellExecutionError
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
