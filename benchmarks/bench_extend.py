"""Time bpjax.extend's per-example and curvature quantities against vmap(grad) and BackPACK.

For each network (ReLU hidden layers, softmax + cross-entropy, float32, the same params and data
for all three) and each quantity this times:

* ``bpjax``: the :mod:`bpjax.extend` function, jitted: one forward and one δ-recursion (the
  curvature ones push the ``n_L`` columns of the loss-Hessian factor down the recursion);
* ``vmap(grad)``: the same quantity from JAX autodiff per example, jitted:
  ``vmap(grad(loss of one example))`` (and per example and Hessian-factor column for the GGN
  diagonal, ``jax.jvp(jax.grad(loss))`` for ``hvp``), chunked over the batch with ``lax.map`` /
  ``lax.scan`` so that no more than ``--chunk-gib`` of per-example gradients live at once;
* ``BackPACK``: the matching ``backpack.extensions`` extension on the equivalent
  ``torch.nn.Sequential`` (BatchGrad, BatchL2Grad, SumGradSquared, Variance, DiagGGNExact,
  DiagGGNMC, KFLR, and BatchGrad plus clipping for DP-SGD; none for ``hvp``). Skipped, with a line
  saying so, when torch or backpack-for-pytorch is not installed (``pip install ".[bench]"``).

Each function is run once to compile and warm up, then the three are called in interleaved
rounds, the order reversed every other round; the table gives medians and the speed-ups
``vmap(grad) / bpjax`` and ``BackPACK / bpjax`` (medians of the per-round paired ratios). A quantity
whose output or per-example gradients would not fit in ``--max-gib`` (``batch_grad`` of the large
network is 21 GB) is skipped for every implementation, with a line saying so.

Usage::

    python benchmarks/bench_extend.py                               # medium and large
    python benchmarks/bench_extend.py --sizes medium --json benchmarks/results/bench_extend_cpu.json
    python benchmarks/bench_extend.py --sizes 64,128,10@64 --quantities batch_l2_grad diag_ggn
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from rich.console import Console
from rich.table import Table

from bpjax import MLP
from bpjax import extend as bx
from bpjax._types import Array, Params

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_mlp import Case, Stats, machine_info, parse_case, time_interleaved

DTYPE = jnp.float32
CASES: dict[str, Case] = {
    "medium": Case("medium", (784, 512, 512, 10), 256),
    "large": Case("large", (1024, 2048, 2048, 2048, 10), 512),
}
"""The issue's two sizes, by name."""

QUANTITIES = (
    "batch_grad",
    "batch_l2_grad",
    "sum_grad_squared",
    "variance",
    "clipped_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "kfac_factors",
    "hvp",
)
"""Every quantity timed, in table order."""

IMPLEMENTATIONS = ("bpjax", "vmap(grad)", "BackPACK")
MAX_NORM = 1.0


# -- the problem ---------------------------------------------------------------------------------


def build_net(case: Case) -> MLP:
    """ReLU hidden layers, a softmax output and cross-entropy."""
    return MLP(case.sizes, ("relu",) * (len(case.sizes) - 2) + ("softmax",), "cross_entropy")


def make_problem(net: MLP, batch: int, seed: int) -> tuple[Params, Array, Array]:
    """``(params, x, y)``: the net's init, standard normal ``x``, uniform integer labels ``y``."""
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = net.init(k_p, DTYPE)
    x = jax.random.normal(k_x, (batch, net.sizes[0]), DTYPE)
    y = jax.random.randint(k_y, (batch,), 0, net.sizes[-1])
    return jax.block_until_ready((params, x, y))


def num_params(sizes: Sequence[int]) -> int:
    return sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(sizes))


def output_gib(quantity: str, case: Case) -> float:
    """GiB of the largest array a quantity materialises in any implementation (in float32)."""
    p = num_params(case.sizes)
    per_example = {"batch_grad", "clipped_grad"}  # BackPACK's clipping goes through BatchGrad
    return 4 * p * (case.batch if quantity in per_example else 2) / 2**30


# -- bpjax ---------------------------------------------------------------------------------------


def bpjax_functions(net: MLP) -> dict[str, Callable[..., Any]]:
    """Each quantity by :mod:`bpjax.extend`, jitted, as ``f(params, x, y, key, v)``."""
    return {
        "batch_grad": lambda p, x, y, k, v: bx.batch_grad(net, p, x, y),
        "batch_l2_grad": lambda p, x, y, k, v: bx.batch_l2_grad(net, p, x, y),
        "sum_grad_squared": lambda p, x, y, k, v: bx.sum_grad_squared(net, p, x, y),
        "variance": lambda p, x, y, k, v: bx.variance(net, p, x, y),
        "clipped_grad": lambda p, x, y, k, v: bx.clipped_grad(net, p, x, y, MAX_NORM),
        "diag_ggn": lambda p, x, y, k, v: bx.diag_ggn(net, p, x, y),
        "diag_ggn_mc": lambda p, x, y, k, v: bx.diag_ggn_mc(net, p, x, y, k),
        "kfac_factors": lambda p, x, y, k, v: bx.kfac_factors(net, p, x, y),
        "hvp": lambda p, x, y, k, v: bx.hvp(net, p, x, y, v),
    }


# -- JAX autodiff per example (vmap(grad)), chunked ----------------------------------------------


def _chunks(batch: int, bytes_per_example: int, budget_gib: float) -> int:
    """The largest divisor of ``batch`` whose chunk of per-example arrays fits the budget."""
    most = max(1, int(budget_gib * 2**30 // max(bytes_per_example, 1)))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= most)


def autodiff_functions(net: MLP, case: Case, chunk_gib: float) -> dict[str, Callable[..., Any]]:
    """Each quantity from JAX autodiff per example, as ``f(params, x, y, key, v)``."""
    n_out = case.sizes[-1]
    bytes_grad = 4 * num_params(case.sizes)
    chunk = _chunks(case.batch, bytes_grad, chunk_gib)
    chunk_k = _chunks(case.batch, bytes_grad * n_out, chunk_gib)

    def one_loss(p: Params, xn: Array, yn: Array) -> Array:
        return net.loss(p, xn[None], yn[None])

    per_example = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))

    def split(a: Array, size: int) -> Array:
        return a.reshape(a.shape[0] // size, size, *a.shape[1:])

    def scan_sum(fn: Callable[..., Any], size: int, p: Params, *batched: Array) -> Any:
        """``Σ`` over chunks of ``fn(p, *chunk)`` by lax.scan."""
        if size == batched[0].shape[0]:  # one chunk: no loop
            return fn(p, *batched)
        parts = [split(a, size) for a in batched]
        first = jax.eval_shape(fn, p, *(a[0] for a in parts))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

        def body(acc: Any, xs: Any) -> tuple[Any, None]:
            return jax.tree.map(jnp.add, acc, fn(p, *xs)), None

        return jax.lax.scan(body, zero, parts)[0]

    def batch_grad(p, x, y, k, v):
        out = jax.lax.map(lambda xy: per_example(p, *xy), (split(x, chunk), split(y, chunk)))
        return jax.tree.map(lambda g: g.reshape(case.batch, *g.shape[2:]), out)

    def batch_l2_grad(p, x, y, k, v):
        def norms(xy):
            g = per_example(p, *xy)
            return jax.tree.map(lambda t: jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1), g)

        out = jax.lax.map(norms, (split(x, chunk), split(y, chunk)))
        return jax.tree.map(lambda n: n.reshape(case.batch), out)

    def sums(p, xc, yc):
        g = per_example(p, xc, yc)
        return jax.tree.map(lambda t: jnp.sum(t**2, axis=0), g), jax.tree.map(
            lambda t: jnp.sum(t, axis=0), g
        )

    def sum_grad_squared(p, x, y, k, v):
        return scan_sum(lambda p, xc, yc: sums(p, xc, yc)[0], chunk, p, x, y)

    def variance(p, x, y, k, v):
        sq, s = scan_sum(sums, chunk, p, x, y)
        return jax.tree.map(lambda a, b: a / case.batch - (b / case.batch) ** 2, sq, s)

    def clipped_grad(p, x, y, k, v):
        def clipped_sum(p, xc, yc):
            g = per_example(p, xc, yc)
            sq = sum(jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1) for t in jax.tree.leaves(g))
            scale = jnp.minimum(1.0, MAX_NORM / jnp.sqrt(sq))
            return jax.tree.map(lambda t: jnp.tensordot(scale, t, axes=1), g)

        total = scan_sum(clipped_sum, chunk, p, x, y)
        return jax.tree.map(lambda t: t / case.batch, total)

    def logits(p: Params, xn: Array) -> Array:
        return net.forward(p, xn[None])[1].z[-1][0]

    def loss_of_z(zn: Array, yn: Array) -> Array:
        return net.output_loss(zn[None], jax.nn.softmax(zn)[None], yn[None])[0]

    def ggn_columns(p, xn, columns):
        """``Σ_c (J_nᵀ s_c)²`` over the columns ``(n_out, k)``, by vjp of ``z^L_n``."""
        _, pullback = jax.vjp(lambda q: logits(q, xn), p)
        g = jax.vmap(lambda s: pullback(s)[0], in_axes=1)(columns)
        return jax.tree.map(lambda t: jnp.sum(t**2, axis=0), g)

    def diag_ggn(p, x, y, k, v):
        def chunk_sum(p, xc, yc):
            def one(xn, yn):
                hess = jax.hessian(loss_of_z)(logits(p, xn), yn)
                lam, q = jnp.linalg.eigh(hess)
                return ggn_columns(p, xn, q * jnp.sqrt(jnp.maximum(lam, 0.0)))

            return jax.tree.map(lambda t: jnp.sum(t, axis=0), jax.vmap(one)(xc, yc))

        total = scan_sum(chunk_sum, chunk_k, p, x, y)
        return jax.tree.map(lambda t: t / case.batch, total)

    def diag_ggn_mc(p, x, y, k, v):
        keys = jax.random.split(k, case.batch)

        def chunk_sum(p, xc, yc, kc):
            def one(xn, yn, kn):
                zn = logits(p, xn)
                sample = jax.random.categorical(kn, zn)
                g = jax.grad(loss_of_z)(zn, sample)
                return ggn_columns(p, xn, g[:, None])

            return jax.tree.map(lambda t: jnp.sum(t, axis=0), jax.vmap(one)(xc, yc, kc))

        total = scan_sum(chunk_sum, chunk, p, x, y, keys)
        return jax.tree.map(lambda t: t / case.batch, total)

    def kfac_factors(p, x, y, k, v):
        """``A`` from the inputs; ``G`` from vjp's of ``S_nᵀ z^L`` in perturbations of every z^l."""
        _, cache = net.forward(p, x)
        inputs = [cache.x, *cache.a[:-1]]
        eps = [jnp.zeros_like(z) for z in cache.z]

        def logits_eps(e):
            a = cache.x
            for layer, act, e_l in zip(p, net.activations, e, strict=True):
                z = a @ layer["W"].T + layer["b"] + e_l
                a = act.forward(z)
            return z

        z_out, pullback = jax.vjp(logits_eps, eps)

        def factor(zn, yn):
            lam, q = jnp.linalg.eigh(jax.hessian(loss_of_z)(zn, yn))
            return q * jnp.sqrt(jnp.maximum(lam, 0.0))

        s = jax.vmap(factor)(z_out, y)  # (batch, n_out, k)
        deltas = jax.vmap(lambda c: pullback(c)[0], in_axes=2)(s)  # L × (k, batch, n_l)
        out = []
        for d, a in zip(deltas, inputs, strict=True):
            a_bar = jnp.concatenate([a, jnp.ones((case.batch, 1), a.dtype)], axis=1)
            flat = d.reshape(-1, d.shape[-1])
            out.append(bx.KFACFactors(a_bar.T @ a_bar / case.batch, flat.T @ flat / case.batch))
        return out

    def hvp(p, x, y, k, v):
        return jax.jvp(lambda q: jax.grad(net.loss)(q, x, y), (p,), (v,))[1]

    return {
        "batch_grad": batch_grad,
        "batch_l2_grad": batch_l2_grad,
        "sum_grad_squared": sum_grad_squared,
        "variance": variance,
        "clipped_grad": clipped_grad,
        "diag_ggn": diag_ggn,
        "diag_ggn_mc": diag_ggn_mc,
        "kfac_factors": kfac_factors,
        "hvp": hvp,
    }


# -- BackPACK ------------------------------------------------------------------------------------


def backpack_functions(
    net: MLP, params: Params, x: Array, y: Array
) -> tuple[dict[str, Callable[[], Any]], str]:
    """Each quantity by BackPACK on the same architecture, params and data, as ``f()``.

    Returns ``({}, why)`` when torch or backpack-for-pytorch is missing.
    """
    try:
        import torch
        from backpack import backpack, extend
        from backpack import extensions as ext
    except ImportError as err:
        return {}, f"BackPACK skipped: {err} (pip install '.[bench]')"
    # BackPACK's hooks fire on module outputs when the inputs need no gradient: expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    modules: list[Any] = []
    for i, layer in enumerate(params):
        n_out, n_in = layer["W"].shape
        linear = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(layer["W"])))
            linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
        modules.append(linear)
        if i < len(params) - 1:
            modules.append(torch.nn.ReLU())
    model = extend(torch.nn.Sequential(*modules))
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    tx = torch.from_numpy(np.array(x))
    ty = torch.from_numpy(np.array(y)).long()

    def run(extension: Any, attribute: str) -> list[Any]:
        model.zero_grad()
        loss = lossfunc(model(tx), ty)
        with backpack(extension):
            loss.backward()
        return [getattr(q, attribute) for q in model.parameters()]

    def clipped() -> list[Any]:
        # DP-SGD with BackPACK: per-example gradients (of the mean loss: ∇C_n / B), clip, sum
        grads = run(ext.BatchGrad(), "grad_batch")
        batch = grads[0].shape[0]
        sq = sum(((g.reshape(batch, -1) * batch) ** 2).sum(dim=1) for g in grads)
        scale = torch.clamp(MAX_NORM / sq.sqrt(), max=1.0)
        return [torch.einsum("n,n...->...", scale, g) for g in grads]

    return {
        "batch_grad": lambda: run(ext.BatchGrad(), "grad_batch"),
        "batch_l2_grad": lambda: run(ext.BatchL2Grad(), "batch_l2"),
        "sum_grad_squared": lambda: run(ext.SumGradSquared(), "sum_grad_squared"),
        "variance": lambda: run(ext.Variance(), "variance"),
        "clipped_grad": clipped,
        "diag_ggn": lambda: run(ext.DiagGGNExact(), "diag_ggn_exact"),
        "diag_ggn_mc": lambda: run(ext.DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
        "kfac_factors": lambda: run(ext.KFLR(), "kflr"),
    }, ""


# -- timing --------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One quantity on one case."""

    quantity: str
    times: dict[str, Stats]  # by implementation
    speedup: dict[str, Stats]  # "vmap(grad)", "BackPACK": other / bpjax (paired per round)
    repeats: int
    mismatch: float | None  # max |bpjax − vmap(grad)| / max |vmap(grad)|
    note: str = ""


def mismatch(got: Any, want: Any) -> float:
    """``max |got − want|`` over every leaf, relative to ``max |want|``."""
    diffs = [
        float(jnp.max(jnp.abs(g - w)))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    return max(diffs) / max(scale, 1e-30)


def bench_case(
    case: Case,
    quantities: Sequence[str],
    *,
    budget: float,
    min_repeats: int,
    max_gib: float,
    skip_vmap: Sequence[str],
    warm_runs: int,
    chunk_gib: float,
    seed: int,
    console: Console,
    pause: float | None = None,
) -> list[Row]:
    """Checks and times ``quantities`` on ``case``; one :class:`Row` each.

    With ``pause=None`` the implementations run in the same interleaved rounds and every
    speed-up is the median of per-round paired ratios. With ``pause`` (seconds) the JAX ones
    (bpjax and vmap(grad)) run their interleaved rounds first, then, after the pause, BackPACK
    runs its rounds alone and the pause follows again, so that PyTorch's CPU thread pool and
    XLA's do not take cores from each other; BackPACK's speed-up is then each of its times over
    the median bpjax time.
    """
    net = build_net(case)
    params, x, y = make_problem(net, case.batch, seed)
    key = jax.random.key(seed + 1)
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(seed + 2), flat.shape, DTYPE))
    args = (params, x, y, key, v)
    ours = bpjax_functions(net)
    theirs = autodiff_functions(net, case, chunk_gib)
    peers, why = backpack_functions(net, params, x, y)
    if why:
        console.print(why)
    rows = []
    for q in quantities:
        gib = output_gib(q, case)
        if gib > max_gib and q != "clipped_grad":  # only BackPACK's clipping uses BatchGrad
            note = f"skipped: materialises {gib:.1f} GiB of per-example gradients (> --max-gib)"
            console.print(f"{case.name} {q}: {note}")
            rows.append(Row(q, {}, {}, 0, None, note))
            continue
        fns: dict[str, Callable[[], Any]] = {"bpjax": functools.partial(jax.jit(ours[q]), *args)}
        if q not in skip_vmap:
            fns["vmap(grad)"] = functools.partial(jax.jit(theirs[q]), *args)
        if q in peers and not (q == "clipped_grad" and gib > max_gib):
            fns["BackPACK"] = peers[q]
        once = {}
        outputs = {}
        for name, fn in fns.items():
            outputs[name] = jax.block_until_ready(fn())  # compile
            if warm_runs:
                start = time.perf_counter()
                for _ in range(warm_runs):
                    outputs[name] = jax.block_until_ready(fn())
                once[name] = (time.perf_counter() - start) / warm_runs
            else:
                once[name] = math.nan
        diff = (
            mismatch(outputs["bpjax"], outputs["vmap(grad)"])
            if "vmap(grad)" in outputs and q != "diag_ggn_mc"
            else None
        )
        del outputs
        round_s = sum(once.values())
        repeats = min_repeats if math.isnan(round_s) else int(budget / max(round_s, 1e-9))
        repeats = max(min_repeats, min(51, repeats)) | 1
        first = ", ".join(f"{n} {t * 1e3:.4g} ms" for n, t in once.items() if t == t)
        console.log(f"{case.name} {q}: {first or 'compiled'}; {repeats} rounds")
        if pause is None:
            samples = time_interleaved(fns, (), repeats=repeats)
        else:
            jax_fns = {n: f for n, f in fns.items() if n != "BackPACK"}
            samples = time_interleaved(jax_fns, (), repeats=repeats)
            if "BackPACK" in fns:
                time.sleep(pause)
                samples |= time_interleaved({"BackPACK": fns["BackPACK"]}, (), repeats=repeats)
                time.sleep(pause)
        times = {n: Stats.of(s) for n, s in samples.items()}
        ours_s = samples["bpjax"]  # paired per round with what ran in the same rounds
        speedup = {
            n: Stats.of(samples[n] / (np.median(ours_s) if apart else ours_s))
            for n in samples
            if n != "bpjax"
            for apart in [pause is not None and n == "BackPACK"]
        }
        note = "vmap(grad) not run (--skip-vmap)" if q in skip_vmap else ""
        if q == "clipped_grad" and gib > max_gib:
            note = f"BackPACK not run: its BatchGrad would materialise {gib:.1f} GiB"
        rows.append(Row(q, times, speedup, repeats, diff, note))
        medians = ", ".join(f"{n} {t.median * 1e3:.4g} ms" for n, t in times.items())
        console.log(f"{case.name} {q}: medians {medians}")
    return rows


# -- reporting -----------------------------------------------------------------------------------


def _ms(stats: Stats | None) -> str:
    if stats is None:
        return "—"
    return f"{stats.median * 1e3:.3g}" if stats.median < 1 else f"{stats.median * 1e3:.0f}"


def _x(stats: Stats | None) -> str:
    return "—" if stats is None else f"{stats.median:.3g}×"


def render(case: Case, rows: Sequence[Row]) -> Table:
    table = Table(title=f"{case.name}: {','.join(map(str, case.sizes))} @ B={case.batch}, float32")
    table.add_column("quantity", no_wrap=True)
    for header in (
        "bpjax ms",
        "vmap(grad) ms",
        "vmap / bpjax",
        "BackPACK ms",
        "BackPACK / bpjax",
        "rounds",
        "max|Δ| vs vmap",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        if not r.times:
            table.add_row(r.quantity, r.note, "", "", "", "", "", "")
            continue
        table.add_row(
            r.quantity,
            _ms(r.times.get("bpjax")),
            _ms(r.times.get("vmap(grad)")),
            _x(r.speedup.get("vmap(grad)")),
            _ms(r.times.get("BackPACK")),
            _x(r.speedup.get("BackPACK")),
            str(r.repeats),
            "—" if r.mismatch is None else f"{r.mismatch:.1e}",
        )
    return table


def markdown(case: Case, rows: Sequence[Row]) -> str:
    """The table as GitHub markdown (for the README)."""
    lines = [
        f"{case.name} `{','.join(map(str, case.sizes))}` @ B={case.batch}:",
        "",
        "| quantity | bpjax ms | vmap(grad) ms | vmap / bpjax | BackPACK ms | BackPACK / bpjax |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if not r.times:
            lines.append(f"| {r.quantity} | {r.note} | | | | |")
            continue
        lines.append(
            f"| {r.quantity} | {_ms(r.times.get('bpjax'))} | {_ms(r.times.get('vmap(grad)'))} | "
            f"{_x(r.speedup.get('vmap(grad)'))} | {_ms(r.times.get('BackPACK'))} | "
            f"{_x(r.speedup.get('BackPACK'))} |"
        )
    return "\n".join(lines)


def row_to_json(r: Row) -> dict[str, Any]:
    return {
        "quantity": r.quantity,
        "times_s": {n: s._asdict() for n, s in r.times.items()},
        "speedup_over_bpjax": {n: s._asdict() for n, s in r.speedup.items()},
        "repeats": r.repeats,
        "mismatch_vs_vmap": r.mismatch,
        "note": r.note,
    }


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["medium", "large"],
        metavar="CASE",
        help="medium, large or 'n0,n1,...,nL@B' (default: medium large)",
    )
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per quantity")
    parser.add_argument("--min-repeats", type=int, default=5, help="rounds at least (default 5)")
    parser.add_argument(
        "--max-gib", type=float, default=8.0, help="skip larger per-example outputs"
    )
    parser.add_argument(
        "--chunk-gib", type=float, default=1.0, help="per-example gradients per vmap(grad) chunk"
    )
    parser.add_argument(
        "--skip-vmap",
        nargs="*",
        default=[],
        choices=QUANTITIES,
        metavar="QUANTITY",
        help="quantities whose vmap(grad) version is not run (too slow at the large size)",
    )
    parser.add_argument(
        "--warm-runs",
        type=int,
        default=1,
        help="timed runs after the compiling one, to size the rounds (0: just --min-repeats)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        metavar="SECONDS",
        help="time BackPACK apart from the JAX functions, pausing this long between "
        "(default: all three in the same interleaved rounds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    try:
        args.sizes = [CASES[s] if s in CASES else parse_case(s) for s in args.sizes]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--sizes: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    m = machine_info()
    console.print(
        f"jax {m['jax']}, backend {m['backend']}, CPUs {m['cpu_count']} ({m['cpus_usable']} "
        f"usable), {m['machine']}; relu hidden, softmax + cross_entropy, float32"
    )
    results = []
    for case in args.sizes:
        start = time.perf_counter()
        rows = bench_case(
            case,
            args.quantities,
            budget=args.budget,
            min_repeats=args.min_repeats,
            max_gib=args.max_gib,
            skip_vmap=args.skip_vmap,
            warm_runs=args.warm_runs,
            chunk_gib=args.chunk_gib,
            seed=args.seed,
            console=console,
            pause=args.pause,
        )
        console.print(render(case, rows))
        console.print(markdown(case, rows), markup=False, highlight=False)
        console.print(f"({time.perf_counter() - start:.0f} s)")
        results.append((case, rows))
    if args.json is not None:
        payload = {
            "machine": m,
            "settings": {k: v for k, v in vars(args).items() if k not in ("sizes", "json")},
            "results": [
                {
                    "case": c.name,
                    "sizes": list(c.sizes),
                    "batch": c.batch,
                    "rows": [row_to_json(r) for r in rows],
                }
                for c, rows in results
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
