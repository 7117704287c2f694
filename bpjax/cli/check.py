"""``bpjax check``: the verification matrix, one table, exit status 1 when any check fails.

The matrix has two parts. The MLP rows (:mod:`bpjax.cli.matrix`): every activation × every loss,
in float32 and float64, on random networks of several depths, each case checked by
:func:`bpjax.check_mlp` (``jax.grad``, ``jax.vjp``, ``jvp``, finite differences, the Taylor order
and every layer's δ). The layer rows (:mod:`bpjax.cli.networks`): a small serial network around
each of Conv2D, MaxPool2D, AvgPool2D, LayerNorm, Residual, Embedding, Dropout, Elman and LSTM, in
float32 and float64, checked by :func:`bpjax.check_network`. Each case's jitted manual
``value_and_grad`` is timed against jitted ``jax.value_and_grad(net.loss)``
(:mod:`bpjax.cli.runner`). One table shows the worst error against each reference
(:mod:`bpjax.cli.table`); the exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

from bpjax.cli.matrix import DTYPES, Case, build_matrix
from bpjax.cli.networks import LAYER_NETWORKS, LayerCase, build_layer_matrix, layer_names
from bpjax.cli.options import name_list, non_negative, parse_sizes, positive
from bpjax.cli.runner import run_matrix, workers
from bpjax.cli.table import failure_title, red, table


def _layer_rows_help() -> str:
    """``conv2d (Conv2D → Flatten → Dense), …``: each layer row's name and its network."""
    return ", ".join(
        f"{name} ({' → '.join(layer_names(LayerCase(name, 'float32', 1, 0)))})"
        for name in LAYER_NETWORKS
    )


def add_check_parser(commands: Any) -> None:
    """Adds ``bpjax check`` to the ``commands`` subparsers."""
    import bpjax as bp

    check = commands.add_parser(
        "check",
        help="verify every activation × loss and every layer against JAX autodiff and time it",
        description=(
            "Run the verification matrix: every activation × every loss, in float32 and float64, "
            "on random networks of depths 1 to 4. Each case compares the hand-written gradients "
            "with jax.grad, jax.vjp, forward-mode jvp, float64 finite differences and the Taylor "
            "remainder order, and every layer's δ and ∂C/∂x with autodiff of the network above "
            "it (bpjax.check_mlp); then times jitted manual value_and_grad against jitted "
            "jax.value_and_grad(net.loss) (median of interleaved runs). The output activation "
            "follows the loss: softmax for cross_entropy (with integer labels for half of the "
            "activations, probability targets for the other half), sigmoid for "
            "binary_cross_entropy, and the activation under test for squared_error. Then the "
            "layer rows: a small seeded network around each layer, in float32 and float64, "
            "checked the same way by bpjax.check_network (Dropout in training mode, with a PRNG "
            "key) and timed the same way. Prints one table; exits 1 if any check fails, after "
            "printing the failing reports in full."
        ),
        epilog=(
            "The table shows, per case, the worst norm-relative error ‖g − g_ref‖/‖g_ref‖ over "
            "the leaves for each reference (directional ones relative to ‖∇f‖), the smallest "
            "observed Taylor order (2 is right, 1 is a wrong gradient), and red where a check "
            "failed (each leaf within its own allowance, derived from the roundoff autodiff "
            "shows in that dtype against float64; see bpjax.check.tolerance). "
            f"The layer rows, named in the activation column by their layer: {_layer_rows_help()}; "
            "their sizes column is one example's shape in → out. Elman's and LSTM's δ is their "
            "per-step BPTT error δ_t, against jax.vjp of their forward_shifted. "
            "--sizes, --activations and --losses choose the MLP rows, --layers the layer rows; "
            "--batch, --seed and --dtype apply to both. "
            "Example: bpjax check --sizes 8,16,16,4 --dtype float64 --activations tanh,relu "
            "--layers conv2d,lstm"
        ),
    )
    check.set_defaults(run=run_check)
    check.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="N0,...,NL",
        help="fix one architecture for every case (default: seeded random widths, depths 1-4)",
    )
    check.add_argument(
        "--batch", type=positive, default=12, help="examples per batch (default: %(default)s)"
    )
    check.add_argument(
        "--seed",
        type=non_negative,
        default=0,
        help="seeds the widths, params and data (default: %(default)s)",
    )
    check.add_argument(
        "--dtype",
        choices=(*DTYPES, "both"),
        default="both",
        help="the params' dtype; both: each case in float32 and float64 (default: %(default)s)",
    )
    check.add_argument(
        "--activations",
        type=name_list(bp.ACTIVATIONS, "activation"),
        default=tuple(bp.ACTIVATIONS),
        metavar="NAMES",
        help="comma-separated activations to check (default: all)",
    )
    check.add_argument(
        "--losses",
        type=name_list(bp.LOSSES, "loss"),
        default=tuple(bp.LOSSES),
        metavar="NAMES",
        help="comma-separated losses to check (default: all)",
    )
    check.add_argument("--no-mlp", action="store_true", help="skip the activation × loss rows")
    layers = check.add_mutually_exclusive_group()
    layers.add_argument(
        "--layers",
        type=name_list(LAYER_NETWORKS, "layer"),
        default=tuple(LAYER_NETWORKS),
        metavar="NAMES",
        help=f"comma-separated layer rows to check, from: {', '.join(LAYER_NETWORKS)} "
        "(default: all)",
    )
    layers.add_argument("--no-layers", action="store_true", help="skip the layer rows")
    check.add_argument(
        "--jobs",
        type=positive,
        default=min(os.cpu_count() or 1, 4),
        help="worker processes; 1 runs in this process (default: the CPU count, at most 4)",
    )
    check.add_argument(
        "--repeats",
        type=positive,
        default=7,
        help="interleaved timing runs per function (default: %(default)s)",
    )
    check.add_argument("--no-timing", action="store_true", help="skip the timing columns")


def run_check(args: argparse.Namespace) -> int:
    """Runs ``bpjax check`` with parsed arguments; returns the exit status."""
    from rich.console import Console
    from rich.measure import Measurement

    # a terminal's own width; piped output (a log, CI) is not squeezed into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    dtypes = DTYPES if args.dtype == "both" else (args.dtype,)
    cases, skipped = (
        ([], [])
        if args.no_mlp
        else build_matrix(
            activations=args.activations,
            losses=args.losses,
            dtypes=dtypes,
            sizes=args.sizes,
            batch=args.batch,
            seed=args.seed,
        )
    )
    layer_cases = (
        []
        if args.no_layers
        else build_layer_matrix(args.layers, dtypes=dtypes, batch=args.batch, seed=args.seed)
    )
    for line in skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    everything: list[Case | LayerCase] = [*cases, *layer_cases]
    if not everything:
        console.print("[red]nothing to check[/red]")
        return 2
    jobs = workers(everything, args.jobs)
    start = time.perf_counter()
    order = {case: i for i, case in enumerate(everything)}
    # a spinner on a terminal's stderr (gone when done); nothing in a log
    status = Console(stderr=True).status(
        f"checking {len(everything)} cases in {jobs} process{'es' if jobs > 1 else ''}…"
    )
    with status if sys.stderr.isatty() else contextlib.nullcontext():
        results = sorted(
            run_matrix(everything, jobs=jobs, timing=not args.no_timing, repeats=args.repeats),
            key=lambda r: order[r.case],
        )
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.passed]
    if failed:
        verdict = red(f"{len(failed)} of {len(results)} cases FAILED")
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
    if layer_cases:
        caption += (
            " Rows named by a layer: a small network around it (bpjax check --help lists them), "
            "sizes: one example's shape in → out; Elman's and LSTM's δ: their per-step δ_t."
        )
    if not args.no_timing:
        caption += (
            " Times: median µs per call of the jitted manual value_and_grad and "
            "jax.value_and_grad(net.loss), and the median ratio manual/jax; nets under 1 MFLOP "
            "are dispatch-bound, and both sides are compiled with XLA's fast-compile settings "
            "(calls ~10% slower than with its defaults)."
        )
    caption += f" {elapsed:.1f} s on {jobs} process{'es' if jobs > 1 else ''}."
    rendered = table(
        results,
        title=f"bpjax check: {verdict}",
        caption=caption,
        timing=not args.no_timing,
    )
    # never squeeze the numbers: a terminal narrower than the table wraps its lines instead
    width = Measurement.get(console, console.options.update_width(10_000), rendered).maximum
    if width > console.width:
        console = Console(width=width, highlight=False)
    console.print(rendered)
    for result in failed:
        console.rule(failure_title(result.case))
        text = result.error if result.error else str(result.report)
        console.print(text, markup=False, soft_wrap=True)
    return 1 if failed else 0
