"""The bpjax pytest plugin: a ``grad_check`` fixture and the ``--bpjax-x64`` option.

Registered through the ``pytest11`` entry point, so it loads in every pytest session where bpjax
is installed; it changes nothing for tests that use neither its fixture nor its marker. Importing
it imports pytest only (and bpjax, its package); the harness loads when the fixture is first used.

- ``grad_check``: a fixture that is :func:`bpjax.testing.assert_backward_matches`
  (``grad_check(forward, backward, *primals, **options)``), returning the
  :class:`~bpjax.testing.BackwardReport`.
- ``@pytest.mark.bpjax_x64``: marks a test to run in float64 when pytest is given
  ``--bpjax-x64``: the test runs inside ``jax.enable_x64(True)`` and ``grad_check`` casts the
  floating primals to float64 (so every check is at float64's tolerances). Without the option the
  marker does nothing.
- In a test that uses ``grad_check`` or the marker, a failing check (a
  :class:`~bpjax.GradientMismatchError`, which :class:`~bpjax.testing.BackwardMismatchError` is) is
  reported as its table and summary, with the test's location, instead of a traceback full of
  arrays. Other tests' reports are left as pytest makes them.

It works with pytest-xdist (``-n 2``): the option reaches every worker, and the failure report is
plain text.

Example:
  In a user's test file (the plugin is already active)::

      @pytest.mark.bpjax_x64
      def test_my_layer(grad_check):
          grad_check(my_fwd, my_bwd, x, w)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

MARKER = "bpjax_x64"
OPTION = "--bpjax-x64"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Adds ``--bpjax-x64``."""
    parser.getgroup("bpjax").addoption(
        OPTION,
        action="store_true",
        default=False,
        help=f"run the tests marked @pytest.mark.{MARKER} in float64 (jax.enable_x64), with "
        "grad_check casting floating primals to float64.",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Registers the marker (the suite may run with ``--strict-markers``)."""
    config.addinivalue_line(
        "markers", f"{MARKER}: run this test in float64 when pytest is given {OPTION}."
    )


def _x64(item: pytest.Item) -> bool:
    return bool(item.config.getoption(OPTION)) and item.get_closest_marker(MARKER) is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Runs a marked test inside ``jax.enable_x64(True)`` under ``--bpjax-x64``."""
    if not _x64(item):
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing check in a test of the plugin's (one that uses ``grad_check`` or the marker) is
    reported as its table, not as a traceback of arrays; other tests' reports are left alone."""
    outcome: Any = yield
    report = outcome.get_result()
    excinfo = call.excinfo
    ours = "grad_check" in getattr(item, "fixturenames", ()) or item.get_closest_marker(MARKER)
    if ours and report.failed and excinfo is not None and _is_mismatch(excinfo.value):
        path, line, _ = item.location
        where = f"{path}:{(line or 0) + 1}: {item.name}"
        report.longrepr = f"{where}\n{excinfo.value}"


def _is_mismatch(error: BaseException) -> bool:
    """Whether ``error`` is a bpjax gradient mismatch (without importing bpjax if it is not)."""
    return any(
        cls.__name__ == "GradientMismatchError" and cls.__module__ == "bpjax.check"
        for cls in type(error).__mro__
    )


@pytest.fixture
def grad_check(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """:func:`bpjax.testing.assert_backward_matches`, in float64 for marked tests under
    ``--bpjax-x64``.

    Call it as ``grad_check(forward, backward, *primals, **options)``; it returns the
    :class:`~bpjax.testing.BackwardReport` and raises
    :class:`~bpjax.testing.BackwardMismatchError` on any failing row.
    """
    from bpjax.testing import assert_backward_matches

    x64 = _x64(request.node)

    def check(forward: Callable[..., Any], backward: Any, *primals: Any, **options: Any) -> Any:
        __tracebackhide__ = True
        if x64:
            primals = _to_float64(primals)
        return assert_backward_matches(forward, backward, *primals, **options)

    return check


def _to_float64(primals: tuple[Any, ...]) -> tuple[Any, ...]:
    import jax
    import jax.numpy as jnp

    def cast(x: Any) -> Any:
        x = jnp.asarray(x)
        return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return tuple(jax.tree.map(cast, primals))
