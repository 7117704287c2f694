"""The ``bpjax`` command line.

``bpjax check`` runs the verification matrix: every activation × every loss, in float32 and
float64, on random networks of several depths. Each case is checked by :func:`bpjax.check_mlp`
(``jax.grad``, ``jax.vjp``, ``jvp``, finite differences, the Taylor order and every layer's δ) and
its jitted manual ``value_and_grad`` is timed against jitted ``jax.value_and_grad(net.loss)``. One
table shows the worst error against each reference; the exit status is 1 when any check fails.

Speed. The harness runs eagerly (``jit=False``): an eager primitive is compiled once per shape and
dtype and then reused by every later case, where a jitted harness would compile several programs
per case. So every case shares one set of layer widths (each depth is a prefix of one
architecture), and the cases are split over worker processes (``spawn``) by dtype, so that each
dtype's kernels are compiled in one worker only. Those small eager kernels are compiled
with XLA's fast-compile settings, and so are the timed functions of nets small enough that a call
is dispatch-bound (the default matrix: ~0.1 s a function instead of ~0.4 s, for calls ~10% slower
on both sides); larger nets' timed functions get XLA's defaults. The workers time their cases only
once every worker has checked and compiled all of its own, so no timing runs beside a compile.

``bpjax train`` trains an MLP with :func:`bpjax.train.fit` on a built-in data set or a ``.npz``
file (:mod:`bpjax.datasets`), on the manual or the autodiff gradients, with a rich progress bar
on a terminal (plain lines, about ten, anywhere else), and writes the params, the history and a
loss-curve PNG with ``--out DIR``. A bad option or data file is a one-line error and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

__all__ = ["main"]

_DTYPES = ("float32", "float64")
# the output activation each loss is checked with; None: the activation under test itself
_OUTPUT_FOR_LOSS = {
    "squared_error": None,
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
}
_DEPTHS = (1, 2, 3, 4)
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


# -- the matrix ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One network to check: an activation under test, a loss, a dtype and an architecture."""

    activation: str  # the activation under test (hidden layers, and the output for squared_error)
    loss: str
    dtype: str  # "float32" or "float64"
    sizes: tuple[int, ...]  # (n_0, ..., n_L)
    batch: int
    targets: str  # "labels", "probabilities" or "reals"
    seed: int  # seeds the params, inputs and targets; float32 and float64 share it

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation of each layer."""
        output = _OUTPUT_FOR_LOSS[self.loss] or self.activation
        return (self.activation,) * (len(self.sizes) - 2) + (output,)


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """What checking one :class:`Case` gave: the report, the timings, or the error it raised."""

    case: Case
    report: Any = None  # bpjax.GradCheckReport, or None when the case raised
    manual_s: float = math.nan  # median seconds per call of jitted manual value_and_grad
    autodiff_s: float = math.nan  # median seconds per call of jitted jax.value_and_grad
    ratio: float = math.nan  # median over the interleaved blocks of manual / autodiff time
    error: str = ""  # the traceback, when the case raised

    @property
    def passed(self) -> bool:
        """Every check passed."""
        return not self.error and self.report is not None and self.report.ok


def _random_widths(seed: int) -> tuple[int, int, int]:
    """``(n_0, hidden, n_L)``: seeded random widths shared by every case of the matrix."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_in, hidden, n_out = (int(v) for v in rng.integers((3, 5, 2), (9, 13, 6)))
    return n_in, hidden, n_out


def build_matrix(
    *,
    activations: Sequence[str],
    losses: Sequence[str],
    dtypes: Sequence[str],
    sizes: tuple[int, ...] | None,
    batch: int,
    seed: int,
) -> tuple[list[Case], list[str]]:
    """Every activation × loss × dtype, with its architecture and targets.

    The activation × loss pairs are numbered ``i`` in registry order (so a restricted matrix
    reproduces the full one's rows). Without ``sizes``, pair ``i`` has depth ``1 + i mod 4`` on
    seeded random widths ``(n_0, h, …, h, n_L)``, at least two layers where the loss fixes the
    output activation, so that the activation under test is in the network. With ``sizes`` every
    case uses it; pairs whose only layer would be the loss's fixed output are skipped.
    cross_entropy takes integer labels for even-numbered activations and probabilities for odd.

    Returns:
      ``(cases, skipped)``: the cases and a line per skipped activation × loss pair.
    """
    import bpjax as bp

    n_in, hidden, n_out = _random_widths(seed)
    cases, skipped = [], []
    for activation in activations:
        i_act = list(bp.ACTIVATIONS).index(activation)
        for loss in losses:
            i = i_act * len(_OUTPUT_FOR_LOSS) + list(_OUTPUT_FOR_LOSS).index(loss)
            output = _OUTPUT_FOR_LOSS[loss]
            uses_activation = output is None or output == activation
            if sizes is None:
                depth = _DEPTHS[i % len(_DEPTHS)]
                if depth == 1 and not uses_activation:
                    depth = 2
                case_sizes = (n_in, *([hidden] * (depth - 1)), n_out)
            elif len(sizes) == 2 and not uses_activation:
                skipped.append(f"{activation} × {loss}: its one layer would be the {output} output")
                continue
            else:
                case_sizes = sizes
            if loss == "cross_entropy":
                targets = "labels" if i_act % 2 == 0 else "probabilities"
            elif loss == "binary_cross_entropy":
                targets = "probabilities"
            else:
                targets = "reals"
            case_seed = (seed * 100 + i) % 2**31
            cases += [
                Case(activation, loss, dtype, case_sizes, batch, targets, case_seed)
                for dtype in dtypes
            ]
    return cases, skipped


# -- checking one case -----------------------------------------------------------------------


def _case_data(case: Case) -> tuple[Any, Any, Any, Any]:
    """``(net, params, x, y)`` for a case; float32 and float64 cases get the same numbers.

    The weights are ``net.init``'s in float32, cast to the case's dtype; the biases, inputs and
    targets are drawn with numpy (no random kernels to compile per shape and dtype). The biases
    are standard normal, not init's zeros: with zero biases, an example whose previous layer is all
    dead ReLUs has ``z = b = 0`` exactly, on the next ReLU's kink, where the loss is not
    differentiable and finite differences disagree with any gradient.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bpjax as bp

    net = bp.MLP(case.sizes, case.activations, case.loss)
    dtype = jnp.dtype(case.dtype)
    rng = np.random.default_rng(case.seed)
    params = [
        {
            "W": layer["W"].astype(dtype),
            "b": jnp.asarray(rng.standard_normal(layer["b"].shape, np.float32), dtype),
        }
        for layer in net.init(jax.random.key(case.seed), jnp.float32)
    ]
    n_in, n_out, batch = case.sizes[0], case.sizes[-1], case.batch
    x = jnp.asarray(rng.standard_normal((batch, n_in), np.float32), dtype)
    if case.targets == "labels":
        y = jnp.asarray(rng.integers(0, n_out, batch), jnp.int32)
    elif case.targets == "probabilities" and case.loss == "cross_entropy":
        logits = rng.standard_normal((batch, n_out), np.float32)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        y = jnp.asarray(p / p.sum(axis=-1, keepdims=True), dtype)  # rows on the simplex
    elif case.targets == "probabilities":
        y = jnp.asarray(rng.random((batch, n_out), np.float32), dtype)  # soft binary targets
    else:
        y = jnp.asarray(rng.standard_normal((batch, n_out), np.float32), dtype)
    return net, params, x, y


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


def _check_and_compile(case: Case, *, timing: bool) -> _Checked:
    """Checks one case with :func:`bpjax.check_mlp` (eagerly); compiles its timed functions."""
    import jax

    import bpjax as bp

    try:
        net, params, x, y = _case_data(case)
        report = bp.check_mlp(net, params, x, y, jit=False)
        if not timing:
            return _Checked(CaseResult(case, report))
        fast = _flops(case.sizes, case.batch) < _FAST_TIMING_FLOPS
        manual = _compile(net.value_and_grad, params, x, y, fast=fast)
        autodiff = _compile(jax.value_and_grad(net.loss), params, x, y, fast=fast)
        return _Checked(CaseResult(case, report), (manual, autodiff, (params, x, y)))
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


def check_case(case: Case, *, timing: bool, repeats: int) -> CaseResult:
    """Checks one case with :func:`bpjax.check_mlp` (eagerly) and times it; never raises."""
    return _timed(_check_and_compile(case, timing=timing), repeats=repeats)


@dataclasses.dataclass(frozen=True)
class _Task:
    cases: tuple[Case, ...]
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


def _partition(cases: Sequence[Case], parts: int) -> list[tuple[Case, ...]]:
    """The cases in ``parts`` contiguous chunks of nearly equal size, ordered dtype-major.

    Eager kernels are compiled per dtype, so chunks that keep to one dtype compile fewer of them
    between them (with two workers, one checks every float32 case and the other every float64
    one: about 20% fewer kernels than splitting by activation).
    """
    ordered = sorted(cases, key=lambda c: _DTYPES.index(c.dtype))  # stable: keeps the matrix order
    size, extra = divmod(len(ordered), parts)
    chunks, start = [], 0
    for part in range(parts):
        stop = start + size + (part < extra)
        chunks.append(tuple(ordered[start:stop]))
        start = stop
    return [chunk for chunk in chunks if chunk]


def run_matrix(
    cases: Sequence[Case], *, jobs: int, timing: bool, repeats: int
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


# -- the table -------------------------------------------------------------------------------

_TARGETS_SHORT = {"labels": "labels", "probabilities": "probs", "reals": "reals"}
_DTYPES_SHORT = {"float32": "f32", "float64": "f64"}
# the error columns: header and which report rows each one takes its worst error from
_ERROR_COLUMNS = (
    ("value", lambda row: row.path == "value"),
    ("jax.grad", lambda row: row.reference == "jax.grad"),
    ("jax.vjp", lambda row: row.reference == "jax.vjp"),
    ("jvp", lambda row: row.reference == "jvp"),
    ("fin.diff", lambda row: row.reference == "finite_diff"),
    ("δ, ∂x", lambda row: row.path.startswith("δ") or row.path == "input_grad"),
)


def _red(text: str) -> str:
    return f"[bold red]{text}[/bold red]"


def _status(result: CaseResult) -> str:
    return "[green]ok[/green]" if result.passed else _red("FAIL")


def _error_cell(report: Any, select: Any) -> str:
    """The worst norm-relative error of the selected rows; red when one of them failed."""
    rows = [row for row in report.rows if select(row)]
    if not rows:
        return "–"
    errors = [row.rel_err for row in rows]
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    text = "nan" if math.isnan(worst) else "0" if worst == 0 else f"{worst:.1e}"
    return text if all(row.passed for row in rows) else _red(text)


def _taylor_cell(result: CaseResult) -> str:
    """The smallest observed Taylor order over the leaves; red when one failed."""
    rows = [row for row in result.report.rows if row.reference == "taylor"]
    if not rows:
        return "–"
    orders = [row.order for row in rows if row.order is not None]
    text = f"{min(orders):.2f}" if orders else "flat"
    return text if all(row.passed for row in rows) else _red(text)


def _microseconds(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1e6:.0f}"


def _row(result: CaseResult, *, timing: bool) -> list[str]:
    case = result.case
    cells = [
        case.activation,
        case.loss,
        _TARGETS_SHORT[case.targets],
        _DTYPES_SHORT[case.dtype],
        "·".join(str(n) for n in case.sizes),
    ]
    if result.report is None:
        blank = len(_ERROR_COLUMNS) + (3 if timing else 0)
        return [*cells, _red("raised"), *[""] * blank, _red("FAIL")]
    cells += [_error_cell(result.report, select) for _, select in _ERROR_COLUMNS]
    cells.append(_taylor_cell(result))
    if timing:
        cells += [
            _microseconds(result.manual_s),
            _microseconds(result.autodiff_s),
            "–" if math.isnan(result.ratio) else f"{result.ratio:.2f}",
        ]
    cells.append(_status(result))
    return cells


def _table(results: Sequence[CaseResult], *, title: str, caption: str, timing: bool) -> Any:
    """One row per case, a section per activation."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
    )
    for name in ("activation", "loss", "y", "dtype", "sizes"):
        table.add_column(name, no_wrap=True)
    for name, _ in _ERROR_COLUMNS:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("taylor", justify="right", no_wrap=True)
    for name in ("manual µs", "jax µs", "ratio") if timing else ():
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for i, result in enumerate(results):
        next_activation = results[i + 1].case.activation if i + 1 < len(results) else None
        table.add_row(
            *_row(result, timing=timing),
            end_section=next_activation != result.case.activation,
        )
    return table


# -- argument parsing ------------------------------------------------------------------------


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 8,16,16,4, got {text!r}"
        ) from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive widths (n_0,...,n_L) like 8,16,16,4, got {text!r}"
        )
    return sizes


def _names(registry: dict[str, Any], kind: str) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in registry]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"expected comma-separated names from: {', '.join(registry)}"
            )
        return names

    return parse


def _integer(text: str, *, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, least=1, what="a positive integer")


def _non_negative(text: str) -> int:
    return _integer(text, least=0, what="a non-negative integer")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive hidden-layer widths like 64,32, got {text!r}"
        )
    return widths


def _one_of(names: Sequence[str], kind: str) -> Any:
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {text!r}; expected one of: {', '.join(names)}"
            )
        return text

    return parse


def _parser() -> argparse.ArgumentParser:
    import bpjax as bp

    parser = argparse.ArgumentParser(
        prog="bpjax",
        description="bpjax: backpropagation written out by hand in JAX, proven against autodiff.",
    )
    parser.add_argument("--version", action="version", version=f"bpjax {bp.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="verify every activation × loss against JAX autodiff and time it",
        description=(
            "Run the verification matrix: every activation × every loss, in float32 and float64, "
            "on random networks of depths 1 to 4. Each case compares the hand-written gradients "
            "with jax.grad, jax.vjp, forward-mode jvp, float64 finite differences and the Taylor "
            "remainder order, and every layer's δ and ∂C/∂x with autodiff of the network above "
            "it (bpjax.check_mlp); then times jitted manual value_and_grad against jitted "
            "jax.value_and_grad(net.loss) (median of interleaved runs). The output activation "
            "follows the loss: softmax for cross_entropy (with integer labels for half of the "
            "activations, probability targets for the other half), sigmoid for "
            "binary_cross_entropy, and the activation under test for squared_error. Prints one "
            "table; exits 1 if any check fails, after printing the failing reports in full."
        ),
        epilog=(
            "The table shows, per case, the worst norm-relative error ‖g − g_ref‖/‖g_ref‖ over "
            "the leaves for each reference (directional ones relative to ‖∇f‖), the smallest "
            "observed Taylor order (2 is right, 1 is a wrong gradient), and red where a check "
            "failed (each leaf within its own allowance, derived from the roundoff autodiff "
            "shows in that dtype against float64; see bpjax.check.tolerance). "
            "Example: bpjax check --sizes 8,16,16,4 --dtype float64 --activations tanh,relu"
        ),
    )
    check.set_defaults(run=_check)
    check.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=None,
        metavar="N0,...,NL",
        help="fix one architecture for every case (default: seeded random widths, depths 1-4)",
    )
    check.add_argument(
        "--batch", type=_positive, default=12, help="examples per batch (default: %(default)s)"
    )
    check.add_argument(
        "--seed",
        type=_non_negative,
        default=0,
        help="seeds the widths, params and data (default: %(default)s)",
    )
    check.add_argument(
        "--dtype",
        choices=(*_DTYPES, "both"),
        default="both",
        help="the params' dtype; both: each case in float32 and float64 (default: %(default)s)",
    )
    check.add_argument(
        "--activations",
        type=_names(bp.ACTIVATIONS, "activation"),
        default=tuple(bp.ACTIVATIONS),
        metavar="NAMES",
        help="comma-separated activations to check (default: all)",
    )
    check.add_argument(
        "--losses",
        type=_names(bp.LOSSES, "loss"),
        default=tuple(bp.LOSSES),
        metavar="NAMES",
        help="comma-separated losses to check (default: all)",
    )
    check.add_argument(
        "--jobs",
        type=_positive,
        default=min(os.cpu_count() or 1, 4),
        help="worker processes; 1 runs in this process (default: the CPU count, at most 4)",
    )
    check.add_argument(
        "--repeats",
        type=_positive,
        default=7,
        help="interleaved timing runs per function (default: %(default)s)",
    )
    check.add_argument("--no-timing", action="store_true", help="skip the timing columns")
    _add_train_parser(commands)
    return parser


@dataclasses.dataclass(frozen=True)
class _TrainDefaults:
    """The options `bpjax train` uses on a data set unless told otherwise."""

    hidden: tuple[int, ...]  # hidden-layer widths: sizes = (n_0, *hidden, n_L)
    activation: str  # of every hidden layer
    epochs: int
    batch_size: int
    lr: float


# Each reaches its data set's goal in seconds on 2 cores: digits ≥ 95% held-out accuracy (96.9-98.1%
# over seeds 0-5), xor and spirals ≈ 100%. "npz" is for a user's file.
_TRAIN_DEFAULTS = {
    "xor": _TrainDefaults(hidden=(8,), activation="tanh", epochs=50, batch_size=32, lr=0.01),
    "spirals": _TrainDefaults(
        hidden=(64, 64), activation="relu", epochs=200, batch_size=32, lr=0.01
    ),
    "digits": _TrainDefaults(hidden=(256,), activation="relu", epochs=30, batch_size=64, lr=1e-3),
    "npz": _TrainDefaults(hidden=(128,), activation="relu", epochs=30, batch_size=64, lr=1e-3),
}
# the output activation that goes with each loss when --activations names only hidden layers
_OUTPUT_ACTIVATION = {
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
    "squared_error": "identity",
}


def _add_train_parser(commands: Any) -> None:
    import bpjax as bp
    from bpjax.train import GRADIENTS, OPTIMIZERS

    defaults = "; ".join(
        f"{name}: --hidden {','.join(map(str, d.hidden))} --activations {d.activation} "
        f"--epochs {d.epochs} --batch-size {d.batch_size} --lr {d.lr:g}"
        for name, d in _TRAIN_DEFAULTS.items()
    )
    train = commands.add_parser(
        "train",
        help="train an MLP on a built-in data set or a .npz file, with a progress bar",
        description=(
            "Train an MLP with an optax optimiser on the hand-written gradients (the "
            "δ-recursion) or on jax.grad's, on a built-in data set (xor, spirals, digits: "
            "scikit-learn's bundled 8×8 digits) or on a .npz file with arrays x (n, n_0) and y: "
            "integer class labels (n,), one-hot rows (n, K), or float regression targets "
            "(n, n_L). Inputs are standardised with the training split's per-feature mean and "
            "standard deviation. A held-out split is evaluated after every epoch; the progress "
            "bar shows the loss, the accuracy and the steps per second. Exits 2 on a bad option "
            "or file, 1 if the loss stops being finite."
        ),
        epilog=(
            f"Defaults by data set ({defaults}). The output activation follows the loss: "
            "softmax for cross_entropy, sigmoid for binary_cross_entropy, identity for "
            "squared_error; class labels go to losses other than cross_entropy as one-hot rows. "
            "--out DIR writes params.npz (W0, b0, W1, b1, …: params[l]['W'] and ['b']; x_mean, "
            "x_scale: the input standardisation x̂ = (x − x_mean)/x_scale), history.json (the "
            "options, every step's minibatch loss and every evaluation) and loss.png. "
            "Example: bpjax train --data digits --grad autodiff --out run/"
        ),
    )
    train.set_defaults(run=_train, parser=train)
    train.add_argument(
        "--data",
        default="digits",
        metavar="NAME|PATH",
        help="xor, spirals, digits, or a .npz file with arrays x and y (default: %(default)s)",
    )
    shape = train.add_mutually_exclusive_group()
    shape.add_argument(
        "--hidden",
        type=_widths,
        default=None,
        metavar="W1,...",
        help="hidden-layer widths; n_0 and n_L come from the data (default: by data set)",
    )
    shape.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=None,
        metavar="N0,...,NL",
        help="every layer's width, checked against the data's features and classes",
    )
    train.add_argument(
        "--activations",
        type=_names(bp.ACTIVATIONS, "activation"),
        default=None,
        metavar="NAMES",
        help=(
            "one name for every hidden layer, or one per hidden layer, or one per layer with "
            "the output's last (default: by data set; the output's follows the loss)"
        ),
    )
    train.add_argument(
        "--loss",
        type=_one_of(tuple(bp.LOSSES), "loss"),
        default=None,
        help="cross_entropy, binary_cross_entropy or squared_error (default: cross_entropy for "
        "class labels, squared_error for regression targets)",
    )
    train.add_argument(
        "--optimizer",
        type=_one_of(tuple(OPTIMIZERS), "optimizer"),
        default="adam",
        help=f"an optax optimiser: {', '.join(OPTIMIZERS)} (default: %(default)s)",
    )
    train.add_argument(
        "--lr", type=_positive_float, default=None, help="learning rate (default: by data set)"
    )
    train.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="examples per step (default: by data set)",
    )
    train.add_argument(
        "--epochs", type=_positive, default=None, help="passes over the data (default: by data set)"
    )
    train.add_argument(
        "--seed",
        type=_non_negative,
        default=0,
        help="seeds the held-out split, the params and the batch order (default: %(default)s)",
    )
    train.add_argument(
        "--grad",
        type=_one_of(GRADIENTS, "gradient"),
        default="manual",
        help="manual: the δ-recursion; autodiff: jax.value_and_grad (default: %(default)s)",
    )
    train.add_argument(
        "--devices",
        type=_positive,
        default=None,
        metavar="N",
        help=(
            "data parallel over N devices: the batch is split over them and the gradients "
            "all-reduced (bpjax.parallel); on a CPU host, N CPU devices are made for it"
        ),
    )
    train.add_argument(
        "--target-loss",
        type=_positive_float,
        default=None,
        metavar="LOSS",
        help="stop once the training split's loss is at most LOSS",
    )
    train.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="share of the examples held out for evaluation, 0 for none (default: %(default)s)",
    )
    train.add_argument(
        "--eval-every",
        type=_positive,
        default=1,
        metavar="EPOCHS",
        help="evaluate after every this many epochs (default: %(default)s)",
    )
    train.add_argument(
        "--no-normalize",
        action="store_true",
        help="feed the inputs as they are, without standardising them",
    )
    train.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write params.npz, history.json and loss.png here (created if missing)",
    )


# -- the commands ----------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    # a terminal's own width; piped output (a log, CI) is not squeezed into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    dtypes = _DTYPES if args.dtype == "both" else (args.dtype,)
    cases, skipped = build_matrix(
        activations=args.activations,
        losses=args.losses,
        dtypes=dtypes,
        sizes=args.sizes,
        batch=args.batch,
        seed=args.seed,
    )
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    if not cases:
        console.print("[red]nothing to check[/red]")
        return 2
    jobs = min(args.jobs, len(cases))
    start = time.perf_counter()
    order = {case: i for i, case in enumerate(cases)}
    # a spinner on a terminal's stderr (gone when done); nothing in a log
    status = Console(stderr=True).status(
        f"checking {len(cases)} cases in {jobs} process{'es' if jobs > 1 else ''}…"
    )
    with status if sys.stderr.isatty() else contextlib.nullcontext():
        results = sorted(
            run_matrix(cases, jobs=jobs, timing=not args.no_timing, repeats=args.repeats),
            key=lambda r: order[r.case],
        )
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.passed]
    if failed:
        verdict = _red(f"{len(failed)} of {len(results)} cases FAILED")
    else:
        verdict = f"[bold green]all {len(results)} cases passed[/bold green]"
    caption = (
        f"batch {args.batch}, seed {args.seed}. Errors: the worst norm-relative error "
        "‖g − g_ref‖/‖g_ref‖ over the leaves (jvp, fin.diff: |⟨g − ∇f, v⟩|/‖∇f‖ over unit "
        "directions v; δ, ∂x: every layer's δ and ∂C/∂x); red: a check failed (each leaf "
        "against float64 within its own roundoff measured in that dtype; fin.diff also allows "
        "its own estimated truncation and roundoff). "
        "taylor: the smallest observed order of the Taylor remainder (2: right, 1: wrong; "
        "≥ 1.5 passes)."
    )
    if not args.no_timing:
        caption += (
            " Times: median µs per call of the jitted manual value_and_grad and "
            "jax.value_and_grad(net.loss), and the median ratio manual/jax; nets under 1 MFLOP "
            "are dispatch-bound, and both sides are compiled with XLA's fast-compile settings "
            "(calls ~10% slower than with its defaults)."
        )
    caption += f" {elapsed:.1f} s on {jobs} process{'es' if jobs > 1 else ''}."
    table = _table(
        results,
        title=f"bpjax check: {verdict}",
        caption=caption,
        timing=not args.no_timing,
    )
    # never squeeze the numbers: a terminal narrower than the table wraps its lines instead
    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if width > console.width:
        console = Console(width=width, highlight=False)
    console.print(table)
    for result in failed:
        case = result.case
        console.rule(
            f"[red]FAILED[/red] {case.activation} × {case.loss}, {case.dtype}, "
            f"sizes {case.sizes}, activations {case.activations}, y {case.targets}"
        )
        text = result.error if result.error else str(result.report)
        console.print(text, markup=False, soft_wrap=True)
    return 1 if failed else 0


class _TrainSetupError(Exception):
    """A bad option or data file found after parsing: a one-line message, exit status 2."""


@dataclasses.dataclass(frozen=True)
class _TrainSetup:
    """Everything `bpjax train` settles before the first step."""

    net: Any  # bpjax.MLP
    train: Any  # bpjax.datasets.Dataset, standardised
    test: Any  # bpjax.datasets.Dataset, standardised with the training split's statistics
    normalizer: Any  # bpjax.datasets.Normalizer
    optimizer: Any  # optax.GradientTransformation
    epochs: int
    batch_size: int
    lr: float
    out: Any  # pathlib.Path | None


def _train_setup(args: argparse.Namespace) -> _TrainSetup:
    """Loads and splits the data, builds the net and the optimiser; raises _TrainSetupError."""
    import pathlib

    import bpjax as bp
    from bpjax import datasets, train

    try:
        data = datasets.load_dataset(args.data)
    except ValueError as error:
        raise _TrainSetupError(f"argument --data: {error}") from None
    defaults = _TRAIN_DEFAULTS[args.data if args.data in _TRAIN_DEFAULTS else "npz"]
    try:
        training, test = datasets.split_dataset(data, args.test_fraction, seed=args.seed)
    except ValueError as error:
        message = str(error).removeprefix("test_fraction: ")
        raise _TrainSetupError(f"argument --test-fraction: {message}") from None
    normalizer = (
        datasets.Normalizer.identity(data.num_features)
        if args.no_normalize
        else datasets.fit_normalizer(training.x)
    )
    training = dataclasses.replace(training, x=normalizer(training.x))
    test = dataclasses.replace(test, x=normalizer(test.x))

    n_in, n_out = data.num_features, data.num_outputs
    what = f"{data.num_classes} classes" if data.num_classes is not None else f"{n_out} targets"
    if args.sizes is not None:
        sizes = args.sizes
        if sizes[0] != n_in or sizes[-1] != n_out:
            raise _TrainSetupError(
                f"argument --sizes: {args.data} has {n_in} features and {what}, so the sizes "
                f"must run {n_in},…,{n_out}; got {','.join(map(str, sizes))}"
            )
    else:
        sizes = (n_in, *(args.hidden or defaults.hidden), n_out)
    loss = args.loss or ("cross_entropy" if data.num_classes is not None else "squared_error")
    if loss == "cross_entropy" and data.num_classes is None and n_out < 2:
        raise _TrainSetupError(
            f"argument --loss: cross_entropy needs class labels or probability rows, but "
            f"{args.data} has one regression target per example; use squared_error"
        )
    hidden = len(sizes) - 2
    names = args.activations or (defaults.activation,)
    if len(names) == 1:
        activations = (names[0],) * hidden + (_OUTPUT_ACTIVATION[loss],)
    elif len(names) == hidden:
        activations = (*names, _OUTPUT_ACTIVATION[loss])
    elif len(names) == hidden + 1:
        activations = names
    else:
        raise _TrainSetupError(
            f"argument --activations: expected 1 name, {hidden} (one per hidden layer) or "
            f"{hidden + 1} (one per layer) for sizes {','.join(map(str, sizes))}, got "
            f"{len(names)}: {','.join(names)}"
        )
    try:
        net = bp.MLP(sizes, activations, loss)
    except (ValueError, TypeError) as error:
        raise _TrainSetupError(f"argument --activations/--loss: {error}") from None

    out = None if args.out is None else pathlib.Path(args.out)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _TrainSetupError(f"argument --out: cannot create {str(out)!r}: {error}") from None
    lr = args.lr or defaults.lr
    return _TrainSetup(
        net=net,
        train=training,
        test=test,
        normalizer=normalizer,
        optimizer=train.get_optimizer(args.optimizer, lr),
        epochs=args.epochs or defaults.epochs,
        batch_size=args.batch_size or defaults.batch_size,
        lr=lr,
        out=out,
    )


def _describe(net: Any) -> str:
    """``64-256-10 relu→softmax, cross_entropy``: a short name for a net."""
    names = [a.name for a in net.activations]
    hidden = sorted(set(names[:-1]))
    acts = "→".join([*hidden, names[-1]]) if len(hidden) == 1 else "→".join(names)
    return f"{'-'.join(map(str, net.sizes))} {acts}, {net.objective.name}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _metrics(loss: float, accuracy: float | None) -> str:
    """``loss 0.1234 accuracy 97.5%``; no accuracy for regression targets."""
    return f"loss {loss:.4g}" + ("" if accuracy is None else f" accuracy {_percent(accuracy)}")


def _steps_per_second(previous: Any, record: Any) -> float | None:
    """Steps per second between two evaluations (from the start when ``previous`` is None)."""
    steps = record.step - (0 if previous is None else previous.step)
    seconds = record.seconds - (0.0 if previous is None else previous.seconds)
    return steps / seconds if seconds > 0 and steps > 0 else None


def _rate(previous: Any, record: Any) -> str:
    """``", N steps/s"`` between two evaluations, or nothing."""
    rate = _steps_per_second(previous, record)
    return "" if rate is None else f", {rate:,.0f} steps/s"


def _eval_line(previous: Any, record: Any, *, epochs: int) -> str:
    """One line of metrics at an evaluation, with the steps/s since the ``previous`` line."""
    line = f"epoch {record.epoch}/{epochs}  step {record.step}  " + _metrics(
        record.train_loss, record.train_accuracy
    )
    if record.test_loss is not None:
        line += "  held-out " + _metrics(record.test_loss, record.test_accuracy)
    # the first line's time is mostly compiling: no rate there
    return line + ("" if previous is None else _rate(previous, record))


@contextlib.contextmanager
def _progress(total: int, *, epochs: int) -> Iterator[tuple[Any, Any]]:
    """``(on_step, on_eval)`` callbacks for :func:`bpjax.train.fit`.

    On a terminal: a rich progress bar with the loss, the accuracy and steps/s, gone when done.
    Elsewhere (a pipe, a log, a test): at most about ten plain lines, one per tenth of the run.
    """
    if not sys.stdout.isatty():
        every = max(1, math.ceil(epochs / 10))
        logged: list[Any] = [None]

        def log(record: Any) -> None:
            if record.epoch % every == 0 or record.epoch == epochs:
                print(_eval_line(logged[-1], record, epochs=epochs), flush=True)
                logged.append(record)

        yield (lambda step: None), log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # fits 80 columns; the header line above names the run, the summary below gives the time
    progress = Progress(
        BarColumn(bar_width=15),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("acc {task.fields[accuracy]}"),
        TextColumn("held-out {task.fields[held_out]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        transient=True,
    )
    task = progress.add_task("train", total=total, loss="–", accuracy="–", held_out="–", rate="–")
    evaluated: list[Any] = [None]

    def on_step(step: int) -> None:
        progress.update(task, completed=step)

    def on_eval(record: Any) -> None:
        progress.update(
            task,
            loss=f"{record.train_loss:.3g}",
            accuracy=_percent(record.train_accuracy),
            held_out=_percent(record.test_accuracy),
        )
        # between evaluations, and not the first (compiling): the steps and their waits alike
        rate = None if evaluated[-1] is None else _steps_per_second(evaluated[-1], record)
        if rate is not None:
            progress.update(task, rate=f"{rate:,.0f}")
        evaluated.append(record)

    with progress:
        yield on_step, on_eval


def _plot_history(history: Any, path: Any, *, title: str) -> None:
    """The loss curve (every step's minibatch loss, and each evaluation) and the accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classify = any(r.train_accuracy is not None for r in history.evals)
    figure = Figure(figsize=(10, 4) if classify else (6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, *acc_ax = figure.subplots(1, 2 if classify else 1, squeeze=False)[0]
    steps = [record.step for record in history.evals]
    loss_ax.plot(
        range(1, len(history.step_loss) + 1),
        history.step_loss,
        color="0.7",
        linewidth=0.8,
        label="minibatch",
    )
    loss_ax.plot(steps, [r.train_loss for r in history.evals], "o-", markersize=3, label="train")
    if any(r.test_loss is not None for r in history.evals):
        loss_ax.plot(
            steps, [r.test_loss for r in history.evals], "s-", markersize=3, label="held-out"
        )
    finite = [v for v in history.step_loss if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    for ax in acc_ax:  # none for regression targets
        ax.plot(steps, [r.train_accuracy for r in history.evals], "o-", label="train")
        if any(r.test_accuracy is not None for r in history.evals):
            ax.plot(steps, [r.test_accuracy for r in history.evals], "s-", label="held-out")
        ax.set(xlabel="step", ylabel="accuracy", title="accuracy")
        ax.legend()
    figure.suptitle(title, fontsize="medium")
    figure.savefig(path, dpi=100)


def _write_outputs(setup: _TrainSetup, args: argparse.Namespace, result: Any) -> list[str]:
    """params.npz, history.json and loss.png under ``setup.out``; returns the paths."""
    import json

    import numpy as np

    out = setup.out
    arrays: dict[str, Any] = {}
    for l, layer in enumerate(result.params):
        arrays[f"W{l}"] = np.asarray(layer["W"])
        arrays[f"b{l}"] = np.asarray(layer["b"])
    arrays["x_mean"], arrays["x_scale"] = setup.normalizer
    np.savez(out / "params.npz", **arrays)
    options = {
        key: value for key, value in vars(args).items() if key not in ("run", "parser", "command")
    }
    record = {
        "command": "bpjax train",
        "options": options,
        "net": {
            "sizes": list(setup.net.sizes),
            "activations": [a.name for a in setup.net.activations],
            "loss": setup.net.objective.name,
        },
        "optimizer": {"name": args.optimizer, "learning_rate": setup.lr},
        "epochs": setup.epochs,
        "batch_size": setup.batch_size,
        "data": {
            "source": args.data,
            "train_examples": len(setup.train),
            "test_examples": len(setup.test),
            "features": setup.train.num_features,
            "classes": setup.train.num_classes,
        },
        **result.history.to_dict(),
    }
    with open(out / "history.json", "w", encoding="utf-8") as file:
        json.dump(record, file)
    _plot_history(
        result.history,
        out / "loss.png",
        title=f"{args.data}: {_describe(setup.net)}, {args.optimizer} lr {setup.lr:g}, "
        f"{args.grad} gradients",
    )
    return [str(out / name) for name in ("params.npz", "history.json", "loss.png")]


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    """argparse's error format: the usage, then ``prog: error: message`` on one line; status 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _device_mesh(devices: int | None) -> Any:
    """A 1-D ``"data"`` mesh over ``devices`` devices, or ``None`` for one device.

    On a CPU host JAX makes one CPU device unless told otherwise before its backend starts, so
    ask for ``devices`` of them first; once the backend is up (a second run in one process) the
    count is what it is, and :func:`bpjax.parallel.device_mesh` says so if it is too small.
    """
    if devices is None:
        return None
    import jax

    from bpjax import parallel

    # Once the backend has started the device count can no longer change (RuntimeError).
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", devices)
    return parallel.device_mesh(devices)


def _train(args: argparse.Namespace) -> int:
    import jax

    from bpjax import train

    try:
        setup = _train_setup(args)
    except _TrainSetupError as error:
        return _fail(args.parser, str(error))
    try:
        mesh = _device_mesh(args.devices)
    except ValueError as error:
        return _fail(args.parser, f"argument --devices: {error}")
    net, training, test = setup.net, setup.train, setup.test
    batch = min(setup.batch_size, len(training))
    total = setup.epochs * (len(training) // batch)
    print(
        f"bpjax train: {args.data} ({len(training)} train, {len(test)} held out), "
        f"MLP {_describe(net)}, "
        f"{args.optimizer} lr {setup.lr:g}, batch {batch}, {setup.epochs} epochs, "
        f"{args.grad} gradients"
        + ("" if mesh is None else f", data parallel over {args.devices} devices"),
        flush=True,
    )
    start = time.perf_counter()
    with _progress(total, epochs=setup.epochs) as (on_step, on_eval):
        result = train.fit(
            net,
            net.init(jax.random.key(args.seed)),
            training,
            optimizer=setup.optimizer,
            epochs=setup.epochs,
            batch_size=batch,
            seed=args.seed,
            grad=args.grad,
            grad_fn=None if mesh is None else train.gradient_fn(net, args.grad, mesh=mesh),
            test=test,
            eval_every=args.eval_every,
            target_loss=args.target_loss,
            on_step=on_step,
            on_eval=on_eval,
        )
    elapsed = time.perf_counter() - start
    history = result.history
    final = history.evals[-1]
    if history.stopped == "target_loss":
        reason = f"reached the target loss {args.target_loss:g}"
    elif history.stopped == "nonfinite":
        reason = "STOPPED: the loss is no longer finite (try a lower --lr)"
    else:
        reason = "done"
    print(
        f"{reason} after {final.epoch} epochs ({final.step} steps) in {elapsed:.1f} s, "
        "compiling included"
        + ("" if len(history.evals) < 2 else _rate(history.evals[0], final) + " once compiled")
    )
    line = "train " + _metrics(final.train_loss, final.train_accuracy)
    if final.test_loss is not None:
        line += "; held-out " + _metrics(final.test_loss, final.test_accuracy)
    print(line)
    if setup.out is not None:
        print("wrote " + ", ".join(_write_outputs(setup, args, result)))
    return 1 if history.stopped == "nonfinite" else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``bpjax`` command line; returns the exit status.

    Args:
      argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
      0 when everything passed, 1 when a check failed (``check``) or the loss stopped being
      finite (``train``), 2 for bad arguments or a bad data file.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argument errors
        return int(exit_.code or 0)
    return args.run(args)
