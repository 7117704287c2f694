"""Time the hand-written δ-recursion against JAX autodiff on the MLP, side by side.

For each network ``sizes = (n_0, ..., n_L)`` and batch ``B`` this times three jitted functions on
the same params and data, all in float32:

* ``manual``: ``net.value_and_grad``, the forward pass with its cache and the explicit δ-recursion;
* ``jax.grad``: ``jax.value_and_grad(net.loss)``, reverse-mode autodiff of the plain-JAX loss;
* ``forward``: ``net.loss``, the forward pass and the batch-mean loss, the value both of the others
  also return.

Each is compiled and run once first (``block_until_ready``); then they are called in interleaved
rounds, in a fresh random order each round (:func:`time_interleaved`), so that a slow spell of the
shared machine falls on all three alike and none always follows the same one. A round's calls
are timed one by one with ``time.perf_counter``; the table gives the median and the
interquartile range.

``manual / jax.grad`` is the median over rounds of the paired ratio of the two times in the same
round. ``vag / forward`` is ``median(value_and_grad) / median(forward)``, shown next to its
FLOP-count limit: with the forward's matrix products costing ``F = Σ_l 2 B n_l n_{l-1}`` FLOPs,
the backward needs ``∇W^l`` for every layer (``2 B n_l n_{l-1}`` each) and ``∂C/∂a^{l-1} = δ^l W^l``
for the layers ``l ≥ 2`` (the input gradient is not asked for), so the limit is
``(F + backward) / F``, a bit under 3.

Usage::

    python benchmarks/bench_mlp.py                       # the three default sizes, ~1 minute
    python benchmarks/bench_mlp.py --sizes large --repeats 30 --json out.json
    python benchmarks/bench_mlp.py --sizes 784,512,512,10@256 --activation relu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe, machine_info
from bpjax import ACTIVATIONS, LOSSES, MLP
from bpjax._types import Array, Params
from bpjax.layers import LAYOUT_ENV, weight_grad_layout

DTYPE = jnp.float32


class Case(NamedTuple):
    """One benchmark problem: the layer widths and the batch size."""

    name: str  # "small", "medium", "large" or "custom"
    sizes: tuple[int, ...]  # (n_0, ..., n_L)
    batch: int  # B


CASES: dict[str, Case] = {
    "small": Case("small", (64, 128, 128, 10), 128),
    "medium": Case("medium", (784, 512, 512, 10), 256),
    "large": Case("large", (1024, 2048, 2048, 2048, 10), 512),
}
"""The issue's three sizes, by name."""

OUTPUT_FOR_LOSS = {
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
    "squared_error": "identity",
}
"""The canonical output activation of each loss: the default ``--output``."""

FUNCTIONS = ("manual", "jax.grad", "forward")
CONTROL = "jax.grad A/A"
"""With ``--control``: a second, separately jitted copy of ``jax.grad``'s function (the same
program), timed in the same rounds. Its paired ratio to ``jax.grad`` is the protocol's own noise:
a ``manual / jax.grad`` inside the spread of ``A/A`` around 1 is a tie."""


class Stats(NamedTuple):
    """Summary of one function's timings, in seconds."""

    median: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    min: float
    max: float

    @classmethod
    def of(cls, samples: np.ndarray) -> Stats:
        """The summary of a 1-D array of samples."""
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(samples.min()), float(samples.max()))


class Result(NamedTuple):
    """Everything measured on one :class:`Case`."""

    case: Case
    repeats: int  # number of interleaved rounds timed
    times: dict[str, Stats]  # by function name in FUNCTIONS
    ratio: Stats  # paired manual / jax.grad, per round
    vag_over_forward: dict[str, float]  # median(value_and_grad) / median(forward), by function
    flop_limit: float  # (forward + backward FLOPs) / forward FLOPs
    forward_flops: int
    backward_flops: int
    grad_mismatch: float  # max |manual − jax.grad| over every leaf, relative to max |jax.grad|
    hlo: dict[str, dict[str, float]] | None = None  # hlo_summary by function name, with --hlo
    peak_mib: dict[str, float] | None = None  # compiled_peak_mib of manual and jax.grad
    layouts: tuple[str, ...] = ()  # each Dense layer's ∇W dot layout (weight_grad_layout)
    control: Stats | None = None  # with --control: jax.grad's A/A copy / jax.grad, paired


# -- FLOP counts ---------------------------------------------------------------------------------


def flop_counts(sizes: Sequence[int], batch: int) -> tuple[int, int]:
    """The matrix-product FLOPs of the forward and the backward pass.

    Args:
      sizes: ``(n_0, ..., n_L)``.
      batch: ``B``.

    Returns:
      ``(forward, backward)``: ``forward = Σ_l 2 B n_l n_{l-1}`` for ``z^l = a^{l-1} (W^l)ᵀ``;
      ``backward`` counts ``∇W^l = (δ^l)ᵀ a^{l-1}`` for every layer and ``δ^l W^l`` for ``l ≥ 2``.

    Example:
      >>> flop_counts((3, 4, 2), 5)
      (200, 280)
    """
    per_layer = [2 * batch * n_out * n_in for n_in, n_out in itertools.pairwise(sizes)]
    forward = sum(per_layer)
    return forward, forward + sum(per_layer[1:])


def flop_limit(sizes: Sequence[int], batch: int) -> float:
    """``(forward + backward) / forward``: the value-and-grad / forward ratio FLOPs alone give."""
    forward, backward = flop_counts(sizes, batch)
    return (forward + backward) / forward


# -- problem and timing --------------------------------------------------------------------------


def make_targets(key: jax.Array, loss: str, batch: int, n_out: int) -> Array:
    """Random targets of the form ``loss`` takes.

    Integer labels of shape ``(batch,)`` for cross_entropy, 0/1 floats of shape ``(batch, n_L)``
    for binary_cross_entropy, standard normal ``(batch, n_L)`` for squared_error.
    """
    if loss == "cross_entropy":
        return jax.random.randint(key, (batch,), 0, n_out)
    if loss == "binary_cross_entropy":
        return jax.random.bernoulli(key, 0.5, (batch, n_out)).astype(DTYPE)
    return jax.random.normal(key, (batch, n_out), DTYPE)


def make_problem(net: MLP, batch: int, loss: str, seed: int) -> tuple[Params, Array, Array]:
    """``(params, x, y)`` for ``net``: its own init, standard normal ``x`` of shape ``(B, n_0)``."""
    k_params, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = net.init(k_params, DTYPE)
    x = jax.random.normal(k_x, (batch, net.sizes[0]), DTYPE)
    y = make_targets(k_y, loss, batch, net.sizes[-1])
    return jax.block_until_ready((params, x, y))


def jitted_functions(net: MLP, *, control: bool = False) -> dict[str, Callable[..., Any]]:
    """The three functions timed, jitted, by name (the names of :data:`FUNCTIONS`), and with
    ``control`` the :data:`CONTROL` copy of ``jax.grad``'s."""
    fns = {
        "manual": jax.jit(net.value_and_grad),
        "jax.grad": jax.jit(jax.value_and_grad(net.loss)),
        "forward": jax.jit(net.loss),
    }
    if control:
        # a new function object: jax.jit compiles and caches it apart, the same program
        fns[CONTROL] = jax.jit(jax.value_and_grad(lambda p, x, y: net.loss(p, x, y)))
    return fns


def warm_up(fns: dict[str, Callable[..., Any]], args: tuple[Any, ...]) -> dict[str, float]:
    """Compiles and runs each function twice; returns the second run's time in seconds."""
    seconds = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds[name] = time.perf_counter() - start
    return seconds


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    """The garbage collector collected once, then off until the block ends (timings only)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_interleaved(
    fns: dict[str, Callable[..., Any]], args: tuple[Any, ...], *, repeats: int
) -> dict[str, np.ndarray]:
    """Times ``repeats`` interleaved rounds of every function, in an order that varies by round.

    Two functions alternate (``A B``, ``B A``, ...). Three or more run in a fresh random order
    each round (seeded, so a run is repeatable): a call's time depends on what ran just before
    it (XLA:CPU's and YNNPACK's worker threads still spinning or gone to sleep; a YNNPACK dot
    right after an Eigen dot ran 1.7× slower than after another YNNPACK dot, on a 2-core EPYC),
    and with ``A B C``, ``C B A``, ... ``B`` never follows itself while ``A`` follows ``B`` in
    half its rounds. Shuffled, every function follows every other equally often on average.

    The garbage collector is off while timing. Returns the seconds of each call, by name, in
    round order: ``samples[name][r]`` is round ``r``.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)
    with _gc_off():
        for r in range(repeats):
            if len(names) > 2:
                turn = [names[i] for i in order.permutation(len(names))]
            else:
                turn = names if r % 2 == 0 else names[::-1]
            for name in turn:
                start = time.perf_counter()
                jax.block_until_ready(fns[name](*args))
                samples[name].append(time.perf_counter() - start)
    return {name: np.asarray(s) for name, s in samples.items()}


def time_blocks(
    fns: dict[str, Callable[[], Any]], *, rounds: int, block: int, settle: float
) -> dict[str, np.ndarray]:
    """Times ``rounds`` rounds of every function in blocks: the median of ``block`` calls in a row.

    For timing libraries against each other in one run. Each library's thread pools (XLA's,
    PyTorch's OpenMP, OpenBLAS's) spin for a while after their work and take cores from whoever
    runs next, and sleep when left idle, so a call right after another library's, or after a
    pause, is not what a training loop, which calls one library over and over, sees. Each block
    therefore starts with untimed calls for at least ``settle`` seconds (at least one), then
    times ``block`` calls in a row. The libraries take turns within every round (the order
    reversed each other round), so a slow spell of the machine falls on all of them alike and
    per-round ratios cancel it; timing each library alone, one after the other, let a spell two
    times slower fall on one library only.

    The garbage collector is off while timing. Returns each function's block medians in
    seconds, by name, in round order: ``samples[name][r]`` is round ``r``.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _gc_off():
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                start = time.perf_counter()
                jax.block_until_ready(fns[name]())
                while time.perf_counter() - start < settle:
                    jax.block_until_ready(fns[name]())
                took = []
                for _ in range(block):
                    start = time.perf_counter()
                    jax.block_until_ready(fns[name]())
                    took.append(time.perf_counter() - start)
                samples[name].append(float(np.median(took)))
    return {name: np.asarray(s) for name, s in samples.items()}


def auto_repeats(round_seconds: float, budget: float, *, lo: int = 11, hi: int = 301) -> int:
    """As many rounds as fit in ``budget`` seconds, between ``lo`` and ``hi``, odd."""
    n = int(budget / max(round_seconds, 1e-9))
    return min(max(n, lo), hi) | 1


def grad_mismatch(manual_grads: Params, reference_grads: Params) -> float:
    """``max |manual − reference|`` over all leaves, relative to ``max |reference|``."""
    diffs = jax.tree.map(lambda m, r: jnp.max(jnp.abs(m - r)), manual_grads, reference_grads)
    scales = jax.tree.map(lambda r: jnp.max(jnp.abs(r)), reference_grads)
    diff, scale = float(max(jax.tree.leaves(diffs))), float(max(jax.tree.leaves(scales)))
    return diff / max(scale, float(np.finfo(np.float32).tiny))


def build_net(case: Case, *, activation: str, output: str, loss: str) -> MLP:
    """The MLP of ``case``: ``activation`` on every hidden layer, ``output`` on the last."""
    hidden = (activation,) * (len(case.sizes) - 2)
    return MLP(case.sizes, (*hidden, output), loss)


def bench_case(
    case: Case,
    *,
    activation: str,
    output: str,
    loss: str,
    repeats: int | None,
    budget: float,
    seed: int,
    hlo: bool = False,
    control: bool = False,
) -> Result:
    """Builds, checks and times one case. ``repeats=None`` picks them from ``budget`` seconds.

    With ``hlo`` the result also carries :func:`hlo_summary` of each compiled function; with
    ``control`` the :data:`CONTROL` copy of ``jax.grad`` is timed too, and its paired ratio.
    """
    net = build_net(case, activation=activation, output=output, loss=loss)
    args = make_problem(net, case.batch, loss, seed)
    fns = jitted_functions(net, control=control)
    once = warm_up(fns, args)
    mismatch = grad_mismatch(fns["manual"](*args)[1], fns["jax.grad"](*args)[1])
    if repeats is None:
        repeats = auto_repeats(sum(once.values()), budget)
    samples = time_interleaved(fns, args, repeats=repeats)
    times = {name: Stats.of(samples[name]) for name in FUNCTIONS}
    forward_flops, backward_flops = flop_counts(case.sizes, case.batch)
    return Result(
        case=case,
        repeats=repeats,
        times=times,
        ratio=Stats.of(samples["manual"] / samples["jax.grad"]),
        vag_over_forward={
            name: times[name].median / times["forward"].median for name in ("manual", "jax.grad")
        },
        flop_limit=(forward_flops + backward_flops) / forward_flops,
        forward_flops=forward_flops,
        backward_flops=backward_flops,
        grad_mismatch=mismatch,
        hlo={name: hlo_summary(fns[name], args) for name in FUNCTIONS} if hlo else None,
        peak_mib={name: compiled_peak_mib(fns[name], args) for name in ("manual", "jax.grad")},
        layouts=tuple(
            weight_grad_layout(case.batch, n_out, n_in, DTYPE)
            for n_in, n_out in itertools.pairwise(case.sizes)
        ),
        control=Stats.of(samples[CONTROL] / samples["jax.grad"]) if control else None,
    )


# -- compiled-program summary --------------------------------------------------------------------

_OPCODE = re.compile(r"^\s*(?:ROOT )?%\S+ = .*?\b([a-z][\w-]*)\(", re.MULTILINE)


def _opcodes(hlo_text: str) -> Counter[str]:
    """How often each HLO opcode occurs in ``hlo_text`` (shapes never read as ``word(``)."""
    return Counter(_OPCODE.findall(hlo_text))


def _entry_computation(hlo_text: str) -> str:
    """The text of the ENTRY computation of an HLO module: the ops run one after another."""
    start = hlo_text.index("\nENTRY ")
    end = hlo_text.find("\n}", start)
    return hlo_text[start : end if end >= 0 else None]


def hlo_summary(fn: Any, args: tuple[Any, ...]) -> dict[str, float]:
    """Op counts and XLA's cost estimate of the compiled program of the jitted ``fn``.

    Returns a dict with ``entry ops`` (instructions in the ENTRY computation), ``dots`` (every
    ``dot``, fused or not), ``unfused dots`` (``dot`` in the ENTRY computation: on CPU the ones
    that no library fusion such as YNNPACK's took, left to XLA's own dot emitter), ``fusions``,
    ``transposes`` and ``copies`` (anywhere, fused or not), ``scatter/gather``, and XLA's
    ``GFLOP`` and ``MB accessed``.
    """
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    everywhere, entry = _opcodes(text), _opcodes(_entry_computation(text))
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {
        "entry ops": sum(n for op, n in entry.items() if op not in ("parameter", "constant")),
        "dots": everywhere["dot"],
        "unfused dots": entry["dot"],
        "fusions": entry["fusion"],
        "transposes": everywhere["transpose"],
        "copies": everywhere["copy"],
        "scatter/gather": everywhere["scatter"] + everywhere["gather"],
        "GFLOP": cost.get("flops", math.nan) / 1e9,
        "MB accessed": cost.get("bytes accessed", math.nan) / 1e6,
    }


def compiled_peak_mib(fn: Any, args: tuple[Any, ...]) -> float:
    """The compiled program's peak memory in MiB, from XLA's ``memory_analysis()``.

    ``arguments + outputs + temporaries − aliased`` bytes: what the program holds at once
    (XLA plans the temporaries' buffer reuse, so their total is already the peak). NaN where the
    backend gives no analysis.
    """
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return math.nan
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return total / 2**20


# -- reporting -----------------------------------------------------------------------------------


def _ms(stats: Stats) -> str:
    return f"{stats.median * 1e3:.3g}\n[{stats.q1 * 1e3:.3g}–{stats.q3 * 1e3:.3g}]"


def _ratio_cell(ratio: Stats, target: float) -> str:
    colour = "green" if ratio.q3 <= target else "red" if ratio.q1 > target else "yellow"
    return f"[bold {colour}]{ratio.median:.3f}[/]\n[{ratio.q1:.3f}–{ratio.q3:.3f}]"


def render_table(results: Sequence[Result], *, title: str, target: float) -> Table:
    """A rich table with one row per case."""
    table = Table(title=title, caption=_caption(target), caption_justify="left")
    with_control = any(r.control for r in results)
    for header in ("case", "sizes @ B"):
        table.add_column(header, no_wrap=True)
    for header in (
        "rounds",
        "manual ms\n[IQR]",
        "jax.grad ms\n[IQR]",
        "manual /\njax.grad",
        "forward ms\n[IQR]",
        "manual\n/ fwd",
        "jax.grad\n/ fwd",
        "FLOP\nlimit",
        "peak MiB\nmanual / jax",
        "max|Δ∇|\n/max|∇|",
        *(("A/A\njax.grad",) if with_control else ()),
    ):
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        control = (_stats_cell(r.control),) if with_control else ()
        table.add_row(
            r.case.name,
            f"{','.join(map(str, r.case.sizes))}\n@ {r.case.batch}",
            str(r.repeats),
            _ms(r.times["manual"]),
            _ms(r.times["jax.grad"]),
            _ratio_cell(r.ratio, target),
            _ms(r.times["forward"]),
            f"{r.vag_over_forward['manual']:.2f}",
            f"{r.vag_over_forward['jax.grad']:.2f}",
            f"{r.flop_limit:.2f}",
            _peak_cell(r.peak_mib),
            f"{r.grad_mismatch:.1e}",
            *control,
        )
    return table


def _stats_cell(ratio: Stats | None) -> str:
    return "—" if ratio is None else f"{ratio.median:.3f}\n[{ratio.q1:.3f}–{ratio.q3:.3f}]"


def _peak_cell(peak_mib: dict[str, float] | None) -> str:
    if not peak_mib:
        return "—"
    return f"{peak_mib['manual']:.1f} / {peak_mib['jax.grad']:.1f}"


def render_hlo_table(results: Sequence[Result]) -> Table:
    """A rich table of :func:`hlo_summary`, one row per case and function."""
    table = Table(title="compiled programs (jax.jit(f).lower(...).compile())")
    table.add_column("case", no_wrap=True)
    table.add_column("function", no_wrap=True)
    keys = next(iter(next(r.hlo for r in results if r.hlo).values()))
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for r in results:
        for name, summary in (r.hlo or {}).items():
            table.add_row(r.case.name, name, *(f"{v:.4g}" for v in summary.values()))
    return table


def _caption(target: float) -> str:
    return (
        "manual = jit(net.value_and_grad); jax.grad = jit(jax.value_and_grad(net.loss)); "
        "forward = jit(net.loss).\n"
        f"manual / jax.grad is the per-round paired ratio: green when its 75th percentile ≤ "
        f"{target:.2f}, red when its 25th percentile > {target:.2f}, yellow in between.\n"
        "FLOP limit = (forward + backward matmul FLOPs) / forward FLOPs, backward without ∂C/∂x.\n"
        "A/A jax.grad (--control): a second jitted copy of jax.grad's function over jax.grad, "
        "paired per round: the spread of the protocol itself."
    )


def result_to_json(result: Result) -> dict[str, Any]:
    """A JSON-ready dict of one result; times in seconds."""
    return {
        "case": result.case.name,
        "sizes": list(result.case.sizes),
        "batch": result.case.batch,
        "repeats": result.repeats,
        "times_s": {name: s._asdict() for name, s in result.times.items()},
        "ratio_manual_over_jax": result.ratio._asdict(),
        "ratio_control_over_jax": None if result.control is None else result.control._asdict(),
        "ratio_of_medians": result.times["manual"].median / result.times["jax.grad"].median,
        "vag_over_forward": result.vag_over_forward,
        "flop_limit": result.flop_limit,
        "forward_flops": result.forward_flops,
        "backward_flops": result.backward_flops,
        "grad_mismatch": result.grad_mismatch,
        "peak_mib": result.peak_mib,
        "weight_grad_layouts": list(result.layouts),
        "hlo": result.hlo,
    }


def write_json(path: Path, results: Sequence[Result], settings: dict[str, Any]) -> None:
    """Writes the machine, the settings and every result to ``path``."""
    payload = {
        "machine": machine_info(),
        "settings": settings,
        "results": [result_to_json(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# -- command line --------------------------------------------------------------------------------


def parse_case(spec: str) -> Case:
    """A case by name (``small``, ``medium``, ``large``) or as ``n_0,n_1,...,n_L@B``.

    Raises:
      argparse.ArgumentTypeError: for anything else.

    Example:
      >>> parse_case("784,512,10@256")
      Case(name='custom', sizes=(784, 512, 10), batch=256)
    """
    if spec in CASES:
        return CASES[spec]
    try:
        widths, batch = spec.split("@")
        sizes = tuple(int(w) for w in widths.split(","))
        case = Case("custom", sizes, int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(CASES)} or widths and batch like "
            f"'784,512,512,10@256', got {spec!r}."
        ) from None
    if len(sizes) < 2 or min(*sizes, case.batch) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive widths and a positive batch, got {spec!r}."
        )
    return case


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Time manual backprop (net.value_and_grad) against jax.value_and_grad.",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_case,
        default=list(CASES.values()),
        metavar="CASE",
        help=f"cases to run: {', '.join(CASES)} or 'n0,n1,...,nL@B' (default: all three)",
    )
    parser.add_argument(
        "--activation",
        default="tanh",
        choices=sorted(ACTIVATIONS),
        help="hidden-layer activation (default: tanh)",
    )
    parser.add_argument(
        "--loss", default="cross_entropy", choices=sorted(LOSSES), help="(default: cross_entropy)"
    )
    parser.add_argument(
        "--output",
        choices=sorted(ACTIVATIONS),
        help="output activation (default: the loss's canonical one: softmax for cross_entropy)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="interleaved rounds per case (default: as many as fit in --budget, 11 to 301)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timing per case when --repeats is not given (default: 20)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=1.0,
        help="the manual / jax.grad ratio to beat (default: 1.00)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for params and data")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--hlo",
        action="store_true",
        help="also print op counts and XLA's cost estimate of each compiled program",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help=f"also time an A/A copy of jax.grad ({CONTROL!r}): the protocol's own noise",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected a positive count, got {args.repeats}.")
    args.output = args.output or OUTPUT_FOR_LOSS[args.loss]
    return args


def print_header(console: Console, settings: dict[str, Any]) -> None:
    """Prints what the run is on and with what settings."""
    m = machine_info()
    console.print(
        f"jax {m['jax']} (jaxlib {m['jaxlib']}), python {m['python']}; backend {m['backend']}, "
        f"device {m['device']} ×{m['device_count']}; CPUs {m['cpu_count']} "
        f"({m['cpus_usable']} usable); {m['machine']}; {describe(m)}"
        + (f"; XLA_FLAGS={m['xla_flags']}" if m["xla_flags"] else "")
    )
    console.print(
        f"dtype {settings['dtype']}, hidden {settings['activation']}, output "
        f"{settings['output']}, loss {settings['loss']}; ∇W dot layout "
        f"{os.environ.get(LAYOUT_ENV, 'auto') or 'auto'} ({LAYOUT_ENV})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the table. Returns the process exit status."""
    args = parse_args(argv)
    # piped output gets a width the table fits in, not rich's default 80 columns
    console = Console(width=None if sys.stdout.isatty() else 150)
    settings = {
        "dtype": jnp.dtype(DTYPE).name,
        "activation": args.activation,
        "output": args.output,
        "loss": args.loss,
        "repeats": args.repeats,
        "budget_s": args.budget,
        "seed": args.seed,
        "control": args.control,
    }
    print_header(console, settings)
    results = []
    start = time.perf_counter()
    for case in args.sizes:
        console.log(f"{case.name}: sizes {case.sizes}, batch {case.batch}: compiling and timing")
        results.append(
            bench_case(
                case,
                activation=args.activation,
                output=args.output,
                loss=args.loss,
                repeats=args.repeats,
                budget=args.budget,
                seed=args.seed,
                hlo=args.hlo,
                control=args.control,
            )
        )
    title = (
        f"MLP value_and_grad, {settings['dtype']}, {args.activation} + {args.output} + "
        f"{args.loss} ({time.perf_counter() - start:.0f} s)"
    )
    console.print(render_table(results, title=title, target=args.target))
    if args.hlo:
        console.print(render_hlo_table(results))
    if args.json is not None:
        write_json(args.json, results, settings)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
