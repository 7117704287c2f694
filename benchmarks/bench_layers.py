"""Time hand-written backward passes of CNNs and RNNs against JAX autodiff, side by side.

Each case is a :func:`bpjax.serial` network in float32; three jitted functions run on the same
params and data:

* ``manual``: ``net.value_and_grad``, the forward with its caches and the layers' hand-written
  backward passes chained by the δ-recursion (for the RNNs: backpropagation through time, one
  reversed ``lax.scan``);
* ``jax.grad``: ``jax.value_and_grad(net.loss)``, reverse-mode autodiff of the same forward;
* ``forward``: ``net.loss`` alone.

They are timed in interleaved rounds, in an order varied by round, exactly as
``benchmarks/bench_mlp.py`` does (its timing helpers are reused); ``manual / jax.grad`` is the
median of the per-round paired ratios, with its interquartile range.

Cases:

* ``cnn-digits``: Conv(8, 3×3, relu) → MaxPool 2 → Conv(16, 3×3, relu) → MaxPool 2 → Flatten →
  Dense(10, softmax) on 8×8×1 images (the digits network of the tests), batch 256;
* ``cnn-28``: the same shape of network with 32 and 64 channels on 28×28×1 images, batch 128;
* ``cnn-32x3``: the same with 32×32×3 images, batch 128: ``bench_extend.py``'s CNN, whose
  forward time is the floor under every per-example quantity of it;
* ``elman-100``: Elman(128, tanh) over T = 100 steps of 32 features, the last step to
  Dense(10, softmax), batch 64;
* ``lstm-100``: the same with an LSTM(128).

Usage::

    python benchmarks/bench_layers.py                      # every case, ~2 minutes on 2 cores
    python benchmarks/bench_layers.py --cases lstm-100 --repeats 21 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpjax as bp
from benchmarks.bench_mlp import (
    Stats,
    auto_repeats,
    grad_mismatch,
    time_interleaved,
    warm_up,
)
from benchmarks.machine import describe, machine_info
from bpjax.layers import Conv2D, Dense, Flatten, MaxPool2D
from bpjax.rnn import LSTM, Elman, LastStep

DTYPE = jnp.float32
FUNCTIONS = ("manual", "jax.grad", "forward")


class Case(NamedTuple):
    """One benchmark problem."""

    name: str
    build: Callable[[], Any]  # () -> the serial network
    input_shape: tuple[int, ...]  # one example's shape
    batch: int
    description: str


def _cnn(channels: tuple[int, int], size: int, in_channels: int = 1) -> Any:
    c1, c2 = channels
    return bp.serial(
        Conv2D(c1, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Conv2D(c2, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Flatten(),
        Dense(10, "softmax"),
        loss="cross_entropy",
        input_shape=(size, size, in_channels),
    )


def _rnn(cell: Any, steps: int, features: int) -> Any:
    return bp.serial(
        cell, LastStep(), Dense(10, "softmax"), loss="cross_entropy", input_shape=(steps, features)
    )


CASES: dict[str, Case] = {
    "cnn-digits": Case(
        "cnn-digits", lambda: _cnn((8, 16), 8), (8, 8, 1), 256, "Conv8-Pool-Conv16-Pool-Dense, 8×8"
    ),
    "cnn-28": Case(
        "cnn-28",
        lambda: _cnn((32, 64), 28),
        (28, 28, 1),
        128,
        "Conv32-Pool-Conv64-Pool-Dense, 28×28",
    ),
    "cnn-32x3": Case(  # bench_extend's CNN: its per-example quantities' floor is this forward
        "cnn-32x3",
        lambda: _cnn((32, 64), 32, 3),
        (32, 32, 3),
        128,
        "Conv32-Pool-Conv64-Pool-Dense, 32×32×3",
    ),
    "elman-100": Case(
        "elman-100", lambda: _rnn(Elman(128), 100, 32), (100, 32), 64, "Elman(128), T=100"
    ),
    "lstm-100": Case(
        "lstm-100", lambda: _rnn(LSTM(128), 100, 32), (100, 32), 64, "LSTM(128), T=100"
    ),
}
"""The cases, by name."""


class Result(NamedTuple):
    """Everything measured on one :class:`Case`."""

    case: Case
    repeats: int
    times: dict[str, Stats]  # by function name in FUNCTIONS
    ratio: Stats  # paired manual / jax.grad, per round
    grad_mismatch: float  # max |manual − jax.grad| over every leaf, relative to max |jax.grad|


def make_problem(case: Case, seed: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """``(net, params, x, y)``: the network's own init, standard normal inputs, random labels."""
    net = case.build()
    k_params, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = net.init(k_params, DTYPE)
    x = jax.random.normal(k_x, (case.batch, *case.input_shape), DTYPE)
    y = jax.random.randint(k_y, (case.batch,), 0, 10)
    return net, *jax.block_until_ready((params, x, y))


def bench_case(case: Case, *, repeats: int | None, budget: float, seed: int) -> Result:
    """Times the three functions of ``case`` in interleaved rounds."""
    net, params, x, y = make_problem(case, seed)
    fns = {
        "manual": jax.jit(net.value_and_grad),
        "jax.grad": jax.jit(jax.value_and_grad(net.loss)),
        "forward": jax.jit(net.loss),
    }
    args = (params, x, y)
    first = warm_up(fns, args)
    _, manual_grads = fns["manual"](*args)
    _, reference_grads = fns["jax.grad"](*args)
    mismatch = grad_mismatch(manual_grads, reference_grads)
    if repeats is None:
        repeats = auto_repeats(sum(first.values()), budget)
    samples = time_interleaved(fns, args, repeats=repeats)
    times = {name: Stats.of(s) for name, s in samples.items()}
    ratio = Stats.of(samples["manual"] / samples["jax.grad"])
    return Result(case, repeats, times, ratio, mismatch)


def _ms(stats: Stats) -> str:
    return f"{stats.median * 1e3:.2f} ({stats.q1 * 1e3:.2f}–{stats.q3 * 1e3:.2f})"


def render_table(results: Sequence[Result]) -> Table:
    """The results as a rich table: median (IQR) ms per function and the paired ratio."""
    table = Table(title="manual backward vs jax.grad: CNN and RNN (float32, jitted)")
    for column in ("case", "network", "batch", "manual ms", "jax.grad ms", "forward ms"):
        table.add_column(column, justify="left" if column in ("case", "network") else "right")
    table.add_column("manual / jax.grad", justify="right")
    table.add_column("max rel diff", justify="right")
    for r in results:
        table.add_row(
            r.case.name,
            r.case.description,
            str(r.case.batch),
            *(_ms(r.times[name]) for name in FUNCTIONS),
            f"{r.ratio.median:.2f} ({r.ratio.q1:.2f}–{r.ratio.q3:.2f})",
            f"{r.grad_mismatch:.1e}",
        )
    return table


def result_to_json(result: Result) -> dict[str, Any]:
    """A JSON-ready dict of one result; times in seconds."""
    return {
        "case": result.case.name,
        "network": result.case.description,
        "input_shape": list(result.case.input_shape),
        "batch": result.case.batch,
        "repeats": result.repeats,
        "times_s": {name: s._asdict() for name, s in result.times.items()},
        "ratio_manual_over_jax": result.ratio._asdict(),
        "grad_mismatch": result.grad_mismatch,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Time manual backward passes of CNNs and RNNs against jax.value_and_grad."
    )
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), metavar="CASE",
        help=f"cases to run, from {', '.join(CASES)} (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, help="interleaved rounds per case (default: fit in --budget)"
    )
    parser.add_argument(
        "--budget", type=float, default=15.0, help="seconds of timing per case (default: 15)"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for params and data")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints the table, optionally writes JSON."""
    args = parse_args(argv)
    console = Console(width=max(Console().width, 140))
    results = []
    for name in args.cases:
        with console.status(f"timing {name} …"):
            results.append(
                bench_case(CASES[name], repeats=args.repeats, budget=args.budget, seed=args.seed)
            )
    console.print(render_table(results))
    info = machine_info()
    console.print(f"{describe(info)}, jax {info['jax']}")
    if args.json is not None:
        payload = {
            "machine": info,
            "settings": {"seed": args.seed, "dtype": "float32"},
            "results": [result_to_json(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    worst = max(r.grad_mismatch for r in results)
    return 0 if np.isfinite(worst) and worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
