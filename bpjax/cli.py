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
            "failed (a row passes on rtol or on atol; see bpjax.check). "
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
    return parser


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
        "directions v; δ, ∂x: every layer's δ and ∂C/∂x); red: a check failed (rtol f32 1e-5, "
        "f64 1e-10, or atol; fin.diff also allows its own estimated truncation and roundoff). "
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``bpjax`` command line; returns the exit status.

    Args:
      argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
      0 when everything passed, 1 when a check failed, 2 for bad arguments.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argument errors
        return int(exit_.code or 0)
    return args.run(args)
