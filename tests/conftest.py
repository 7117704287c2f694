"""Shared fixtures: strict dtype promotion everywhere, float64 where a test asks for it."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

# Scripts that tests run in subprocesses (their own devices, float64 for the whole process): pytest
# must not import them, or --doctest-modules would apply their process-wide settings to the suite.
collect_ignore = ["_parallel_worker.py", "_multihost_worker.py"]

# Mixed-dtype arithmetic is an error in the tests: a silent promotion would hide a dtype bug.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Each test process compiles a program once: JAX's persistent compilation cache, in a directory of
# this process's own (so no two processes share a file) that is removed at exit. The tests trace
# the same maths from many Python functions (each test's own loss, each check's own closures), and
# the in-memory jit caches know a program by its function, this cache by the program's text (with
# JAX's version, XLA's flags and the device): an identical program loads instead of compiling,
# about a sixth of the compilations. Tracing is unchanged (the no_retrace contract counts traces),
# and a loaded executable is the one compiling would give. BPJAX_TEST_COMPILATION_CACHE=0 turns
# it off.
if os.environ.get("BPJAX_TEST_COMPILATION_CACHE", "1") != "0":
    _compilation_cache = tempfile.mkdtemp(prefix="bpjax-tests-xla-")
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every program

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


@functools.cache
def _float16_compiles() -> bool:
    """Whether XLA:CPU can convert to and from float16 on this machine.

    Without the F16C instructions (a CPU before Ivy Bridge, or ``XLA_FLAGS=--xla_cpu_max_isa=
    SSE4_2``) XLA:CPU emits calls to ``__truncsfhf2``/``__extendhfsf2``, which its JIT cannot link:
    every float16 computation fails to compile, whatever the code. That is the platform's limit,
    not bpjax's.
    """
    try:
        jax.block_until_ready(
            jax.jit(lambda a: (a.astype(jnp.float16) + 1).astype(a.dtype))(jnp.ones(3))
        )
    except Exception:  # XlaRuntimeError, whose module path differs across jaxlib versions
        return False
    return True


def _is_float16(value: object, *, top: bool = True) -> bool:
    """A test parameter that is float16: the dtype, its name, or a tuple holding the dtype."""
    if isinstance(value, tuple):
        return any(_is_float16(v, top=False) for v in value)
    if isinstance(value, str):  # a name at the top level; a string in a tuple is not a dtype
        return top and value == "float16"
    try:
        return jnp.dtype(value) == jnp.float16
    except (TypeError, ValueError):  # not a dtype
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skips the float16 cases where XLA:CPU cannot compile float16 at all (see above)."""
    float16 = [
        item
        for item in items
        if hasattr(item, "callspec") and any(map(_is_float16, item.callspec.params.values()))
    ]
    if float16 and not _float16_compiles():
        skip = pytest.mark.skip(reason="XLA:CPU cannot compile float16 on this CPU (no F16C)")
        for item in float16:
            item.add_marker(skip)


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
