"""Shared fixtures: strict dtype promotion everywhere, float64 where a test asks for it."""

from __future__ import annotations

import jax
import pytest
from hypothesis import HealthCheck, settings

# Scripts that tests run in subprocesses (their own devices, float64 for the whole process): pytest
# must not import them, or --doctest-modules would apply their process-wide settings to the suite.
collect_ignore = ["_parallel_worker.py", "_multihost_worker.py"]

# Mixed-dtype arithmetic is an error in the tests: a silent promotion would hide a dtype bug.
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture
def x64():
    """Enables float64 for the duration of one test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    """A fixed PRNG key."""
    return jax.random.key(0)


@pytest.fixture(params=[True, False], ids=["jit", "nojit"])
def maybe_jit(request):
    """``jax.jit`` or the identity: run a check both jitted and not."""
    return jax.jit if request.param else (lambda f: f)
