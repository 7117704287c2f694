"""Running the ``bpjax check`` matrix: checking each case, timing it, and the worker processes.

Speed. The harness runs the MLP rows eagerly (``jit=False``): an eager primitive is compiled once
per shape and dtype and then reused by every later case, where a jitted harness would compile
several programs per case. So every MLP case shares one set of layer widths (each depth is a prefix
of one architecture), and the cases are split over worker processes (``spawn``) by dtype, so that
each dtype's kernels are compiled in one worker only. Those small eager kernels are compiled
with XLA's fast-compile settings, and so are the timed functions of nets small enough that a call
is dispatch-bound (the default matrix: ~0.1 s a function instead of ~0.4 s, for calls ~10% slower
on both sides); larger nets' timed functions get XLA's defaults. The layer rows
(:mod:`bpjax.cli.networks`) run jitted, each network's float32 and float64 rows in one worker,
spread over the workers by their measured cost. The workers time their cases only once every
worker has checked and compiled all of its own, so no timing runs beside a compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import math
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from bpjax.cli.matrix import DTYPES, Case, case_data
from bpjax.cli.networks import LAYER_NETWORKS, LayerCase, layer_case_data

# Compiling is most of the cost of the matrix. The harness's eager kernels are compiled with XLA's
# fast settings: JAX's switch for the cheapest LLVM pipeline, and in worker processes the legacy
# elemental emitters (the flag must be set before JAX starts its backend), together about 2× faster.
_FAST_COMPILE_CONFIG = "jax_disable_most_optimizations"
_FAST_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
_FAST_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
_DEFAULT_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": True}
# A net below this many FLOPs per value_and_grad is dispatch-bound (a call takes ~100 µs, its
# arithmetic about 1), so its timed functions are compiled with the fast settings too: a third of
# the compile time of XLA's defaults (which would add ~30 CPU-seconds to the matrix), for calls
# measured 0-25% (median ~9%) slower, on both sides alike. Larger nets get XLA's defaults.
_FAST_TIMING_FLOPS = 1e6


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """What checking one case gave: the report, the timings, or the error it raised."""

    case: Case | LayerCase
    report: Any = None  # bpjax.GradCheckReport, or None when the case raised
    manual_s: float = math.nan  # median seconds per call of jitted manual value_and_grad
    autodiff_s: float = math.nan  # median seconds per call of jitted jax.value_and_grad
    ratio: float = math.nan  # median over the interleaved blocks of manual / autodiff time
    error: str = ""  # the traceback, when the case raised

    @property
    def passed(self) -> bool:
        """Every check passed."""
        return not self.error and self.report is not None and self.report.ok


def _time_pair(
    manual: Any, autodiff: Any, args: tuple[Any, ...], *, repeats: int, min_block_s: float = 3e-3
) -> tuple[float, float, float]:
    """Times two functions in ``repeats`` interleaved blocks of calls.

    Each function is called once first (warm-up), then a few times to size the blocks: a block
    holds enough calls that the slower function's takes at least ``min_block_s``.

    Returns:
      ``(manual, autodiff, ratio)``: the median seconds per call of each and the median of the
      per-block ratios manual/autodiff (neighbouring blocks see the same machine load).
    """
    import jax

    def block(fn: Any, number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / number

    for fn in (manual, autodiff):
        jax.block_until_ready(fn(*args))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection of the harness's garbage is not the call's cost
    try:
        per_call = max(block(manual, 5), block(autodiff, 5))
        number = max(1, min(10_000, math.ceil(min_block_s / max(per_call, 1e-7))))
        pairs = [(block(manual, number), block(autodiff, number)) for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    return (
        statistics.median(m for m, _ in pairs),
        statistics.median(a for _, a in pairs),
        statistics.median(m / a for m, a in pairs),
    )


def _flops(sizes: Sequence[int], batch: int) -> int:
    """FLOPs of one value_and_grad: the forward, ∇W and δ products, ``6 B Σ_l n_l n_{l-1}``."""
    return 6 * batch * sum(n_in * n_out for n_in, n_out in itertools.pairwise(sizes))


def _compile(fn: Any, *args: Any, fast: bool) -> Any:
    """``jax.jit(fn)`` compiled for ``args``: with XLA's defaults, or its fast-compile settings."""
    import jax

    previous = jax.config.values[_FAST_COMPILE_CONFIG]
    jax.config.update(_FAST_COMPILE_CONFIG, fast)
    try:
        options = _FAST_COMPILER_OPTIONS if fast else _DEFAULT_COMPILER_OPTIONS
        return jax.jit(fn).lower(*args).compile(options)
    finally:
        jax.config.update(_FAST_COMPILE_CONFIG, previous)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A checked case, with its compiled timed functions when it is to be timed."""

    result: CaseResult
    timed: tuple[Any, Any, tuple[Any, ...]] | None = None  # (manual, autodiff, args)


def _check_and_compile(case: Case | LayerCase, *, timing: bool) -> _Checked:
    """Checks one case (an MLP eagerly, a layer row jitted); compiles its timed functions."""
    import jax

    import bpjax as bp

    try:
        manual: Any
        reference: Any
        if isinstance(case, LayerCase):
            net, params, x, y, key = layer_case_data(case)
            report = bp.check_network(net, params, x, y, key=key, jit=True)
            manual = functools.partial(net.value_and_grad, key=key)
            reference = functools.partial(jax.value_and_grad(net.loss), key=key)
            fast = True  # every layer row's network is far below _FAST_TIMING_FLOPS
        else:
            net, params, x, y = case_data(case)
            report = bp.check_mlp(net, params, x, y, jit=False)
            manual, reference = net.value_and_grad, jax.value_and_grad(net.loss)
            fast = _flops(case.sizes, case.batch) < _FAST_TIMING_FLOPS
        if not timing:
            return _Checked(CaseResult(case, report))
        compiled = _compile(manual, params, x, y, fast=fast)
        autodiff = _compile(reference, params, x, y, fast=fast)
        return _Checked(CaseResult(case, report), (compiled, autodiff, (params, x, y)))
    except Exception:  # a crash is a failing case, reported with its traceback
        return _Checked(CaseResult(case, error=traceback.format_exc()))


def _timed(checked: _Checked, *, repeats: int) -> CaseResult:
    """The result with its timings filled in (as it is when there is nothing to time)."""
    if checked.timed is None:
        return checked.result
    manual, autodiff, args = checked.timed
    try:
        manual_s, autodiff_s, ratio = _time_pair(manual, autodiff, args, repeats=repeats)
    except Exception:
        return dataclasses.replace(checked.result, error=traceback.format_exc())
    return dataclasses.replace(
        checked.result, manual_s=manual_s, autodiff_s=autodiff_s, ratio=ratio
    )


def check_case(case: Case | LayerCase, *, timing: bool, repeats: int) -> CaseResult:
    """Checks one case and times it; never raises.

    An MLP case goes through :func:`bpjax.check_mlp` (eagerly), a layer row through
    :func:`bpjax.check_network` (jitted).
    """
    return _timed(_check_and_compile(case, timing=timing), repeats=repeats)


@dataclasses.dataclass(frozen=True)
class _Task:
    cases: tuple[Case | LayerCase, ...]
    timing: bool
    repeats: int


# Set in each worker process: the workers meet here before timing, so that no worker's timing
# runs beside another's compiles.
_TIMING_BARRIER: Any = None
_BARRIER_TIMEOUT_S = 300.0


def _run_task(task: _Task) -> list[CaseResult]:
    """Checks a group of cases under the harness settings (float64 on, fast compiles).

    Every case is checked and its timed functions compiled first; then, once every worker has got
    that far, the cases are timed.
    """
    with _harness_settings():
        checked = [_check_and_compile(case, timing=task.timing) for case in task.cases]
        if task.timing and _TIMING_BARRIER is not None:
            with contextlib.suppress(threading.BrokenBarrierError):  # a worker was lost: go on
                _TIMING_BARRIER.wait(_BARRIER_TIMEOUT_S)
        return [_timed(c, repeats=task.repeats) for c in checked]


@contextlib.contextmanager
def _harness_settings() -> Iterator[None]:
    """float64 enabled and XLA's fast-compile mode for the eager kernels; restored on exit."""
    import jax

    fast = jax.config.values[_FAST_COMPILE_CONFIG]
    jax.config.update(_FAST_COMPILE_CONFIG, True)
    try:
        with jax.enable_x64(True):
            yield
    finally:
        jax.config.update(_FAST_COMPILE_CONFIG, fast)


def _init_worker(barrier: Any) -> None:
    """A fresh worker process: fast-compile XLA flags (set before JAX starts its backend)."""
    global _TIMING_BARRIER
    _TIMING_BARRIER = barrier
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} {_FAST_COMPILE_XLA_FLAGS}".strip()


def _partition(cases: Sequence[Case | LayerCase], parts: int) -> list[tuple[Case | LayerCase, ...]]:
    """The cases in at most ``parts`` chunks of nearly equal cost.

    The MLP cases go in contiguous chunks of nearly equal size, ordered dtype-major: eager kernels
    are compiled per dtype, so chunks that keep to one dtype compile fewer of them between them
    (with two workers, one checks every float32 case and the other every float64 one: about 20%
    fewer kernels than splitting by activation). Each layer row's float32 and float64 cases stay
    together (the float64 one reuses programs the float32 one compiled); the layers go, costliest
    first, to the chunk with the least layer cost so far.
    """
    mlp = [case for case in cases if isinstance(case, Case)]
    ordered = sorted(mlp, key=lambda c: DTYPES.index(c.dtype))  # stable: keeps the matrix order
    size, extra = divmod(len(ordered), parts)
    chunks: list[list[Case | LayerCase]] = []
    start = 0
    for part in range(parts):
        stop = start + size + (part < extra)
        chunks.append(list(ordered[start:stop]))
        start = stop
    groups: dict[str, list[LayerCase]] = {}
    for case in cases:
        if isinstance(case, LayerCase):
            groups.setdefault(case.layer, []).append(case)
    load = [0.0] * parts
    for layer in sorted(groups, key=lambda name: -LAYER_NETWORKS[name].cost):
        part = min(range(parts), key=lambda i: (load[i], len(chunks[i])))
        chunks[part] += groups[layer]
        load[part] += LAYER_NETWORKS[layer].cost * len(groups[layer])
    return [tuple(chunk) for chunk in chunks if chunk]


def workers(cases: Sequence[Case | LayerCase], jobs: int) -> int:
    """How many processes :func:`run_matrix` uses for ``cases`` with ``jobs``; 1: this one."""
    if jobs <= 1 or len(cases) <= 1:
        return 1
    return len(_partition(cases, jobs))


def run_matrix(
    cases: Sequence[Case | LayerCase], *, jobs: int, timing: bool, repeats: int
) -> Iterator[CaseResult]:
    """Checks every case, in ``jobs`` spawned worker processes (in this process for one).

    Yields the results as the workers finish, not in the order of ``cases``.
    """
    if jobs <= 1 or len(cases) <= 1:
        yield from _run_task(_Task(tuple(cases), timing, repeats))
        return
    tasks = [_Task(chunk, timing, repeats) for chunk in _partition(cases, jobs)]
    # spawn, never fork: a forked child of a process that has started JAX can deadlock
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(tasks))
    with ProcessPoolExecutor(
        len(tasks), mp_context=context, initializer=_init_worker, initargs=(barrier,)
    ) as pool:
        for future in as_completed([pool.submit(_run_task, task) for task in tasks]):
            yield from future.result()
