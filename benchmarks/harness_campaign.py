"""The gradient-checking harness measured as a product: planted bugs caught, false alarms raised.

Written against the public API only (``bp.check_grads``, ``bp.check_mlp``, ``bp.MLP``), so the
same campaign runs before and after a change to the harness's tolerances.

**Planted bugs.** Random :class:`bpjax.MLP` networks (1–4 layers; widths 1–32 from the grid
:data:`WIDTHS`; hidden activations drawn from :data:`bpjax.ACTIVATIONS`; output and loss drawn from
the canonical pairs softmax + cross_entropy, sigmoid + binary_cross_entropy, identity +
squared_error; batch 1–32; inputs ``s · N(0, 1)`` with ``s`` from ``1e-6`` to ``1e2``, float16 from
``1e-2`` to ``10``, the values it can hold). For every params leaf and every bug kind, the manual
gradient is ``net.value_and_grad``'s with one bug planted in that leaf:

============  ===========================  ==========================================
dtype         kind                          bug (``g`` the leaf's true gradient)
============  ===========================  ==========================================
float32       ``element``                   one random element ``+= 1e-3 ‖g‖``
float32       ``scale``                     the leaf ``× (1 + 1e-3)``
float32       ``zero``                      the leaf replaced by zeros
bfloat16/16   ``element``                   one random element ``+= 0.05 ‖g‖``
bfloat16/16   ``scale``                     the leaf ``× 1.05``
============  ===========================  ==========================================

``bp.check_grads(manual, net.loss, params, x, y)`` (and, on every ``--mlp-every``-th network,
``bp.check_mlp`` with a ``backward=`` that plants the same bug into ``net.backward``'s grads)
*catches* a bug when the report is not ok and its failing paths include the bugged leaf. Each
leaf's own roundoff ``‖g_autodiff − g64‖ / ‖g64‖`` (``jax.grad`` of ``net.loss`` in the working
dtype against float64 on the same values) is measured: a miss on a leaf whose roundoff exceeds a
tenth of the planted relative error (``1e-4`` for the ``1e-3`` float32 bugs, ``5e-3`` for the
``0.05`` low-precision ones, ``0.1`` for zeroing) is counted apart, as *uncatchable*, not hidden.
A leaf whose float64 gradient is exactly zero (a dead unit's weights) has no bug to plant: skipped.

**False alarms.** Correct gradients (``manual = net.value_and_grad`` and ``bp.check_mlp(net,
params, x, y)``) on the same networks with fresh params and data, plus special cases: softmax +
cross-entropy and sigmoid + binary cross-entropy with logits of magnitude 20–80 and confidently
right or wrong labels, dead relu units, batch 1, width 1.

**Cost.** Nearly all the time is compiling: per network, the harness's reference functions, its
random directions (``jax.random`` compiles once per leaf shape, hence the width grid, which lets
networks share shapes) and ``check_mlp``'s functions. jax.jit caches compiled code by function
identity, so each network's manual functions are built once and read the bug to plant from the host
when they run (``jax.pure_callback``): one compile per network, however many bugs. With no bug
planted they return ``net.value_and_grad``'s grads bitwise (``g × 1 + 0``). The campaign is split
into tasks seeded by ``(--seed, task)``, so its numbers do not depend on ``--jobs`` or on the order
the tasks finish in; the worker processes share JAX's persistent compilation cache
(``--compile-cache``, kept in the temporary directory between runs, so a rerun compiles little).

Nothing here hard-codes a verdict: every number is counted from the reports.

Usage::

    python benchmarks/harness_campaign.py                 # see below for the time
    python benchmarks/harness_campaign.py --quick         # ~1 minute smoke run (2 cold)
    python benchmarks/harness_campaign.py --nets 50 --correct 200 --low 50 --seed 0 \\
        --out benchmarks/results/harness_campaign.json

Measured on 2 cores of an AMD EPYC shared with other work (load average 5–7): the default run took
21–26 minutes cold (2,500–3,100 task-seconds, nearly all compiling) and 6 minutes with the
compilation cache warm; ``--quick`` 40 s warm, 110 s cold. Two runs with the same seed gave the same
counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from benchmarks.machine import cpu_isa, cpu_model, xla_max_isa

DEFAULT_OUT = Path(__file__).parent / "results" / "harness_campaign.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bpjax_harness_campaign_jax_cache"

# The canonical output pairs MLP fuses: (output activation, loss).
PAIRS = (("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy"),
         ("identity", "squared_error"))  # fmt: skip
HIDDEN = tuple(bp.ACTIVATIONS)
# Widths 1–32 on a grid: the harness compiles its random directions once per leaf shape, and
# networks drawn from a grid share those compiles (uniform 1–32 would almost never repeat a shape).
WIDTHS = (1, 2, 3, 5, 8, 16, 32)  # every built-in activation may be a hidden layer's
SCALES = (1e-6, 1e-3, 1e-1, 1.0, 10.0, 1e2)  # input scales, tiny to large
# float16's smallest normal is 6.1e-5 and its largest value 65504: inputs it can hold
SCALES_FLOAT16 = (1e-2, 1e-1, 1.0, 10.0)

BUGS: dict[str, dict[str, float]] = {
    # kind: relative size of the planted error, ‖bug‖ / ‖g‖
    "float32": {"element": 1e-3, "scale": 1e-3, "zero": 1.0},
    "bfloat16": {"element": 0.05, "scale": 0.05},
    "float16": {"element": 0.05, "scale": 0.05},
}
UNCATCHABLE_RATIO = 0.1  # a miss is "uncatchable" when roundoff > this × the bug's relative size


# -- planting a bug without recompiling ---------------------------------------------------------


class Planter:
    """Plants one bug into a grads tree, read from the host when the compiled code runs.

    ``grads_leaf ← grads_leaf × mult + add`` for every leaf, computed in at least float32 and cast
    back: with ``mult = 1`` and ``add = 0`` (no bug) the grads come out bitwise unchanged.
    """

    def __init__(self, params: Any) -> None:
        leaves, self.treedef = jax.tree.flatten(params)
        self.shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        self.clear()

    def clear(self) -> None:
        self.mult = [1.0] * len(self.shapes)
        self.add = [np.zeros(s) for s in self.shapes]

    def set(self, leaf: int, *, mult: float = 1.0, add: np.ndarray | None = None) -> None:
        self.clear()
        self.mult[leaf] = mult
        if add is not None:
            self.add[leaf] = add

    def plant(self, grads: Any) -> Any:
        leaves = jax.tree.leaves(grads)
        work = [jnp.promote_types(jnp.result_type(g), jnp.float32) for g in leaves]
        specs = [
            (jax.ShapeDtypeStruct((), w), jax.ShapeDtypeStruct(s, w))
            for w, s in zip(work, self.shapes, strict=True)
        ]

        def host() -> list[tuple[np.ndarray, np.ndarray]]:
            return [
                (np.asarray(m, np.dtype(w)), np.asarray(a, np.dtype(w)))
                for m, a, w in zip(self.mult, self.add, work, strict=True)
            ]

        bugs = jax.pure_callback(host, specs)
        out = [
            (g.astype(w) * m + a).astype(g.dtype)
            for g, w, (m, a) in zip(leaves, work, bugs, strict=True)
        ]
        return jax.tree.unflatten(jax.tree.structure(grads), out)


@dataclasses.dataclass
class Net:
    """One network of the campaign and the functions built once for it."""

    name: str
    net: bp.MLP
    dtype: Any
    batch: int
    scale: float
    planter: Planter
    manual_bug: Callable[..., Any]  # (params, x, y) -> (loss, grads with the current bug)
    backward_bug: Callable[..., Any]  # (params, cache, y) -> Backward with the current bug
    grad: Callable[..., Any]  # jitted jax.grad(net.loss)


def build(name: str, net: bp.MLP, dtype: Any, batch: int, scale: float) -> Net:
    planter = Planter(init_params(np.random.default_rng(0), net, dtype))

    def manual_bug(p: Any, x: Any, y: Any) -> Any:
        value, grads = net.value_and_grad(p, x, y)
        return value, planter.plant(grads)

    def backward_bug(p: Any, cache: Any, y: Any) -> Any:
        bw = net.backward(p, cache, y)
        return bw._replace(grads=planter.plant(bw.grads))

    grad = jax.jit(jax.grad(net.loss))
    return Net(name, net, dtype, batch, scale, planter, manual_bug, backward_bug, grad)


def init_params(rng: np.random.Generator, net: bp.MLP, dtype: Any) -> list[dict[str, Any]]:
    """``net.init``'s scaling (Glorot or He normal weights by activation), biases 0.1 N(0, 1).

    Drawn with NumPy: ``jax.random`` compiles once per shape, which would dominate the run.
    """
    params = []
    for n_in, n_out, act in zip(net.sizes[:-1], net.sizes[1:], net.activations, strict=True):
        var = 2.0 / n_in if act.init == "he" else 2.0 / (n_in + n_out)
        params.append({
            "W": jnp.asarray(math.sqrt(var) * rng.standard_normal((n_out, n_in)), dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(n_out), dtype),
        })  # fmt: skip
    return params


# -- drawing networks and data ------------------------------------------------------------------


def draw_net(rng: np.random.Generator, name: str, dtype: Any) -> Net:
    depth = int(rng.integers(1, 5))
    out, loss = PAIRS[int(rng.integers(len(PAIRS)))]
    widths = [int(w) for w in rng.choice(WIDTHS, size=depth + 1)]
    if out == "softmax":  # a softmax of width 1 is the constant 1: every gradient is zero
        widths[-1] = max(widths[-1], 2)
    acts = [str(rng.choice(HIDDEN)) for _ in range(depth - 1)] + [out]
    scales = SCALES_FLOAT16 if jnp.dtype(dtype) == jnp.float16 else SCALES
    scale = float(scales[int(rng.integers(len(scales)))])
    net = bp.MLP(widths, acts, loss)
    return build(name, net, dtype, int(rng.integers(1, 33)), scale)


def draw_data(rng: np.random.Generator, n: Net, *, scale: float | None = None) -> tuple:
    """Params (:func:`init_params`), inputs ``scale · N(0, 1)`` and targets."""
    net, dtype = n.net, n.dtype
    params = init_params(rng, net, dtype)
    scale = n.scale if scale is None else scale
    x = jnp.asarray(scale * rng.standard_normal((n.batch, net.sizes[0])), dtype)
    return params, x, draw_targets(rng, net, n.batch, dtype)


def draw_targets(rng: np.random.Generator, net: bp.MLP, batch: int, dtype: Any) -> Any:
    k, loss = net.sizes[-1], net.objective.name
    if loss == "cross_entropy":
        return jnp.asarray(rng.integers(0, k, batch), jnp.int32)
    if loss == "binary_cross_entropy":
        return jnp.asarray(rng.uniform(size=(batch, k)), dtype)
    return jnp.asarray(rng.standard_normal((batch, k)), dtype)


def paths_of(params: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _f64(a: Any) -> Any:
    return jnp.asarray(a, jnp.float64)


def leaf_gradients(n: Net, params: Any, x: Any, y: Any) -> tuple[list, list]:
    """``jax.grad`` of ``net.loss`` in the working dtype and in float64, leaves as float64."""
    g_low = [np.asarray(g, np.float64) for g in jax.tree.leaves(n.grad(params, x, y))]
    with jax.enable_x64(True):
        p64 = jax.tree.map(_f64, params)
        y64 = y if jnp.issubdtype(y.dtype, jnp.integer) else _f64(y)
        x64 = _f64(x)
        g64 = [np.asarray(g, np.float64) for g in jax.tree.leaves(n.grad(p64, x64, y64))]
    return g_low, g64


# -- the planted-bug campaign -------------------------------------------------------------------


def bug_of(kind: str, size: float, g64: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    norm = float(np.linalg.norm(g64))
    if kind == "element":
        add = np.zeros(g64.shape)
        index = np.unravel_index(int(rng.integers(g64.size)), g64.shape)
        add[index] = size * norm
        return {"add": add}
    if kind == "scale":
        return {"mult": 1.0 + size}
    return {"mult": 0.0}  # zero


def verdict(report: Any, path: str) -> dict[str, Any]:
    failing = list(report.failing_paths)
    return {"ok": bool(report.ok), "caught": (not report.ok) and path in failing,
            "failing": failing}  # fmt: skip


def plant_campaign(
    n: Net, rng: np.random.Generator, *, with_mlp: bool, data: tuple | None = None
) -> list[dict[str, Any]]:
    """Every bug kind on every leaf of one network: one record per (leaf, kind, checker)."""
    params, x, y = draw_data(rng, n) if data is None else data
    g_low, g64 = leaf_gradients(n, params, x, y)
    tree_max = max(float(np.max(np.abs(g))) for g in g64 if g.size)
    dtype = jnp.dtype(n.dtype).name
    records = []
    for leaf, (path, gl, gt) in enumerate(zip(paths_of(params), g_low, g64, strict=True)):
        norm = float(np.linalg.norm(gt))
        roundoff = float(np.linalg.norm(gl - gt)) / norm if norm > 0 else None
        base = {
            "net": n.name, "arch": repr(n.net), "dtype": dtype, "batch": n.batch,
            "scale": n.scale, "leaf": path, "leaf_norm": norm, "roundoff": roundoff,
            "leaf_max_over_tree_max": float(np.max(np.abs(gt))) / tree_max if tree_max else 0.0,
        }  # fmt: skip
        for kind, size in BUGS[dtype].items():
            if norm == 0:  # the true gradient is exactly 0: no bug to plant in it
                records.append({**base, "kind": kind, "checker": "check_grads", "skipped": True})
                continue
            n.planter.set(leaf, **bug_of(kind, size, gt, rng))
            checkers = [("check_grads", lambda: bp.check_grads(n.manual_bug, n.net.loss,
                                                               params, x, y))]  # fmt: skip
            if with_mlp:
                checkers.append(("check_mlp", lambda: bp.check_mlp(
                    n.net, params, x, y, backward=n.backward_bug)))  # fmt: skip
            for checker, run in checkers:
                record = {**base, "kind": kind, "checker": checker, "skipped": False,
                          "bug_rel": size}  # fmt: skip
                record |= verdict(run(), path)
                assert roundoff is not None  # norm > 0 here
                record["uncatchable"] = (not record["caught"]) and roundoff > (
                    UNCATCHABLE_RATIO * size
                )
                records.append(record)
        n.planter.clear()
    return records


def repro_case() -> list[dict[str, Any]]:
    """The issue's reproduction: tiny inputs, the first layer's ∇W replaced by zeros."""
    net = bp.MLP((4, 8, 3), ("tanh", "softmax"), "cross_entropy")
    n = build("repro", net, jnp.float32, 16, 1e-6)
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 4)) * 1e-6
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    g_low, g64 = leaf_gradients(n, params, x, y)
    gl, gt = g_low[0], g64[0]
    roundoff = float(np.linalg.norm(gl - gt) / np.linalg.norm(gt))
    n.planter.set(0, mult=0.0)
    out = []
    for checker, report in (
        ("check_grads", bp.check_grads(n.manual_bug, net.loss, params, x, y)),
        ("check_mlp", bp.check_mlp(net, params, x, y, backward=n.backward_bug)),
    ):
        record = {"net": "repro", "arch": repr(net), "dtype": "float32", "leaf": "[0]['W']",
                  "kind": "zero", "checker": checker, "roundoff": roundoff, "skipped": False,
                  "summary": report.summary()}  # fmt: skip
        record |= verdict(report, "[0]['W']")
        record["uncatchable"] = (not record["caught"]) and roundoff > UNCATCHABLE_RATIO
        out.append(record)
    n.planter.clear()
    return out


# -- false alarms -------------------------------------------------------------------------------


def correct_checks(n: Net, params: Any, x: Any, y: Any, case: str) -> list[dict[str, Any]]:
    """The right gradient through both checkers; a failing report is a false alarm."""
    out = []
    for checker, run in (
        ("check_grads", lambda: bp.check_grads(n.net.value_and_grad, n.net.loss, params, x, y)),
        ("check_mlp", lambda: bp.check_mlp(n.net, params, x, y)),
    ):
        report = run()
        out.append({"net": n.name, "arch": repr(n.net), "dtype": jnp.dtype(n.dtype).name,
                    "case": case, "checker": checker, "ok": bool(report.ok),
                    "failing": list(report.failing_paths),
                    "summary": "" if report.ok else report.summary()})  # fmt: skip
    return out


def _logits(net: bp.MLP, params: Any, x: Any) -> np.ndarray:
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        _, cache = net.forward(p64, jnp.asarray(x, jnp.float64))
        return np.asarray(cache.z[-1])


def saturate(
    rng: np.random.Generator, n: Net, params: Any, x: Any, *, right: bool
) -> tuple[Any, Any]:
    """Scales the last layer so that the largest |logit| is 20–80; confident right/wrong labels."""
    z = _logits(n.net, params, x)
    target = rng.uniform(20.0, 80.0)
    s = target / max(float(np.max(np.abs(z))), 1e-30)
    last = params[-1]
    params = [*params[:-1], {"W": (last["W"].astype(jnp.float32) * s).astype(n.dtype),
                             "b": (last["b"].astype(jnp.float32) * s).astype(n.dtype)}]  # fmt: skip
    z = _logits(n.net, params, x)
    if n.net.objective.name == "cross_entropy":
        labels = np.argmax(z, axis=1) if right else np.argmin(z, axis=1)
        return params, jnp.asarray(labels, jnp.int32)
    targets = (z > 0) if right else (z < 0)
    return params, jnp.asarray(targets.astype(np.float64), n.dtype)


def kill_units(rng: np.random.Generator, n: Net, params: Any, x: Any) -> Any:
    """Biases of half the first layer's relu units so negative that they are dead on every input."""
    first = params[0]
    w, b = np.asarray(first["W"], np.float64), np.asarray(first["b"], np.float64)
    reach = float(np.max(np.abs(np.asarray(x, np.float64) @ w.T))) + 1.0
    dead = rng.permutation(w.shape[0])[: max(1, w.shape[0] // 2)]
    b = b.copy()
    b[dead] = -2.0 * reach
    return [{"W": first["W"], "b": jnp.asarray(b, n.dtype)}, *params[1:]]


SPECIAL = (
    # (name, sizes, activations, loss, batch, what makes it special)
    ("sat-softmax", (8, 16, 5), ("tanh", "softmax"), "cross_entropy", 12, "saturated softmax+CE"),
    ("sat-sigmoid", (8, 16, 3), ("tanh", "sigmoid"), "binary_cross_entropy", 12,
     "saturated sigmoid+BCE"),
    ("dead-relu", (5, 16, 8, 3), ("relu", "relu", "softmax"), "cross_entropy", 10,
     "dead relu units"),
    ("batch1", (5, 8, 3), ("gelu", "softmax"), "cross_entropy", 1, "batch 1"),
    ("width1", (1, 1, 1), ("tanh", "sigmoid"), "binary_cross_entropy", 6, "width 1"),
    ("width1-hidden", (5, 1, 3), ("softplus", "identity"), "squared_error", 8,
     "width-1 hidden layer"),
)  # fmt: skip


def special_cases(
    rng: np.random.Generator, dtype: Any, which: int, count: int
) -> list[dict[str, Any]]:
    """``count`` correct cases on special network ``which`` (saturated, dead units, tiny shapes)."""
    name, sizes, acts, loss, batch, what = SPECIAL[which]
    n = build(f"{jnp.dtype(dtype).name}-{name}", bp.MLP(sizes, acts, loss), dtype, batch, 1.0)
    out = []
    for i in range(count):
        params, x, y = draw_data(rng, n)
        case = what
        if what.startswith("saturated"):
            right = i % 2 == 0
            params, y = saturate(rng, n, params, x, right=right)
            case = f"{what}, confident {'right' if right else 'wrong'} labels"
        elif what == "dead relu units":
            params = kill_units(rng, n, params, x)
        out += correct_checks(n, params, x, y, case)
    return out


def use_compile_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: the worker processes share their compiles."""
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_task(
    task: tuple[Any, ...], seed: int, mlp_every: int, cache: str | None = None
) -> dict[str, Any]:
    """One independent piece of the campaign, seeded by (seed, task): the same records whichever
    process runs it and in whatever order.

    Tasks: ``("repro",)``; ``(dtype, i, correct_draws)``: network ``i`` of that dtype, every bug on
    every leaf, then ``correct_draws`` correct cases (the first on the bugs' data);
    ``("special", dtype, which, count)``: correct cases on a special network.
    """
    use_compile_cache(cache)
    start = time.perf_counter()
    rng = np.random.default_rng([seed, *(_code(t) for t in task)])
    planted: list[dict[str, Any]] = []
    correct: list[dict[str, Any]] = []
    if task[0] == "repro":
        planted = repro_case()
        label = "issue reproduction"
    elif task[0] == "special":
        _, dtype, which, count = task
        correct = special_cases(rng, jnp.dtype(dtype), which, count)
        label = f"{dtype} special {SPECIAL[which][0]} ({count} cases)"
    else:
        dtype, i, draws = task
        n = draw_net(rng, f"{dtype}-{i}", jnp.dtype(dtype))
        data = draw_data(rng, n)
        planted = plant_campaign(n, rng, with_mlp=i % mlp_every == 0, data=data)
        for d in range(draws):
            correct += correct_checks(n, *(data if d == 0 else draw_data(rng, n)), "random")
        label = f"{dtype} net {i}: {n.net!r}, batch {n.batch}, scale {n.scale:g}"
    return {"task": list(task), "label": label, "planted": planted, "correct": correct,
            "elapsed_s": time.perf_counter() - start}  # fmt: skip


def _code(part: Any) -> int:
    """A task part as an int for the seed sequence (names hashed stably, not by hash())."""
    if isinstance(part, int):
        return part
    return int.from_bytes(str(part).encode()[:8].ljust(8, b"\0"), "little")


# -- the report -------------------------------------------------------------------------------


def tally(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counts per (checker, kind): planted, caught, missed, missed-uncatchable, skipped."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        key = f"{r['checker']} / {r['kind']}"
        t = out.setdefault(key, {"planted": 0, "caught": 0, "missed": 0, "uncatchable": 0,
                                 "skipped": 0, "missed_small_leaf": 0})  # fmt: skip
        if r["skipped"]:
            t["skipped"] += 1
            continue
        t["planted"] += 1
        if r["caught"]:
            t["caught"] += 1
        elif r["uncatchable"]:
            t["uncatchable"] += 1
        else:
            t["missed"] += 1
            t["missed_small_leaf"] += r.get("leaf_max_over_tree_max", 1.0) < 0.1
    return out


RATIO_BUCKETS = (0.01, 0.1, 0.5)


def misses_by_roundoff(records: list[dict[str, Any]]) -> dict[str, int]:
    """Every miss (uncatchable or not) by its leaf's roundoff over the planted relative error."""
    edges = [f"<= {e:g}" for e in RATIO_BUCKETS] + [f"> {RATIO_BUCKETS[-1]:g}"]
    out = dict.fromkeys(edges, 0)
    for r in records:
        if r["skipped"] or r["caught"] or "bug_rel" not in r:
            continue
        ratio = r["roundoff"] / r["bug_rel"]
        k = next((i for i, e in enumerate(RATIO_BUCKETS) if ratio <= e), len(RATIO_BUCKETS))
        out[edges[k]] += 1
    return out


def alarms(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in records:
        t = out.setdefault(r["checker"], {"cases": 0, "false_alarms": 0})
        t["cases"] += 1
        t["false_alarms"] += not r["ok"]
    return out


def print_tally(title: str, table: dict[str, dict[str, int]]) -> None:
    print(f"\n{title}")
    head = ("checker / kind", "planted", "caught", "missed", "uncatchable", "skipped",
            "missed: leaf < 0.1 tree max")  # fmt: skip
    rows = [(k, *(str(v[c]) for c in ("planted", "caught", "missed", "uncatchable", "skipped",
                                      "missed_small_leaf"))) for k, v in table.items()]  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]  # fmt: skip
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def environment() -> dict[str, Any]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "cpu": cpu_model(), "cpu_isa": cpu_isa(),
            "xla_max_isa": xla_max_isa(), "backend": jax.default_backend(),
            "bpjax": str(Path(bp.__file__).parent)}  # fmt: skip


def float16_compiles() -> bool:
    """XLA:CPU without F16C cannot compile float16 at all (see tests/conftest.py)."""
    try:
        jax.block_until_ready(
            jax.jit(lambda a: (a.astype(jnp.float16) + 1).astype(a.dtype))(jnp.ones(3))
        )
    except Exception:  # XlaRuntimeError, whose module path differs across jaxlib versions
        return False
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", type=int, default=50, help="float32 networks with planted bugs")
    p.add_argument(
        "--low-nets",
        type=int,
        default=20,
        help="bfloat16 and float16 networks with planted bugs (each)",
    )
    p.add_argument("--correct", type=int, default=200, help="correct float32 cases (at least)")
    p.add_argument("--low", type=int, default=50, help="correct bfloat16 cases (at least)")
    p.add_argument(
        "--special", type=int, default=4, help="correct cases per special network, per dtype"
    )
    p.add_argument(
        "--special-nets",
        type=int,
        default=len(SPECIAL),
        help=f"how many of the {len(SPECIAL)} special networks to use",
    )
    p.add_argument(
        "--mlp-every",
        type=int,
        default=5,
        help="also plant every bug through check_mlp on every k-th network",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1: in this one)")
    p.add_argument(
        "--compile-cache",
        default=str(DEFAULT_CACHE),
        help="JAX's persistent compilation cache, shared by the workers and kept between runs "
        "(most of a cold run is compiling); '' for a fresh temporary one",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--note", default="", help="free text kept in the JSON (which code was measured)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.nets, args.low_nets, args.correct, args.low, args.special = 2, 1, 6, 4, 1
        args.special_nets, args.mlp_every = 2, 2
    return args


def tasks_of(args: argparse.Namespace, low_dtypes: list[str]) -> list[tuple[Any, ...]]:
    """The campaign as independent tasks; the special networks' cases count toward the totals."""
    tasks: list[tuple[Any, ...]] = [("repro",)]
    for dtype in ("float32", *low_dtypes):
        nets = args.nets if dtype == "float32" else args.low_nets
        special = args.special * args.special_nets if dtype != "float16" else 0
        wanted = {"float32": args.correct, "bfloat16": args.low}.get(dtype, 0) - special
        draws = max(1, math.ceil(max(wanted, 0) / max(nets, 1)))
        tasks += [(dtype, i, draws) for i in range(nets)]
        if special:
            tasks += [("special", dtype, k, args.special) for k in range(args.special_nets)]
    return tasks


def run_all(tasks: list[tuple[Any, ...]], args: argparse.Namespace) -> list[dict[str, Any]]:
    start, results = time.perf_counter(), []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        print(f"  [{len(results)}/{len(tasks)}, {time.perf_counter() - start:.0f} s] "
              f"{result['label']} ({result['elapsed_s']:.1f} s)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="harness_campaign_") as tmp:
        cache = args.compile_cache or tmp
        if args.jobs <= 1:
            for task in tasks:
                done(run_task(task, args.seed, args.mlp_every, cache))
            return _in_order(results, tasks)
        ctx = multiprocessing.get_context("spawn")  # JAX does not survive fork
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_task, t, args.seed, args.mlp_every, cache) for t in tasks]
            for future in concurrent.futures.as_completed(futures):
                done(future.result())
    return _in_order(results, tasks)


def _in_order(results: list[dict[str, Any]], tasks: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    order = {json.dumps(list(t)): k for k, t in enumerate(tasks)}
    return sorted(results, key=lambda r: order[json.dumps(r["task"])])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    low_dtypes = ["bfloat16"] + (["float16"] if float16_compiles() else [])
    result: dict[str, Any] = {"environment": environment(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "bugs": BUGS, "uncatchable_ratio": UNCATCHABLE_RATIO,
        "float16_compiles": "float16" in low_dtypes}  # fmt: skip
    print(f"harness campaign, {result['environment']}")
    results = run_all(tasks_of(args, low_dtypes), args)

    planted: dict[str, list[dict[str, Any]]] = {}
    correct: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for record in r["planted"]:
            planted.setdefault(record["dtype"], []).append(record)
        for record in r["correct"]:
            correct.setdefault(record["dtype"], []).append(record)

    titles = {"float32": "float32 (one element + 1e-3 ‖g‖, × (1 + 1e-3), zeroed)",
              "bfloat16": "bfloat16 (one element + 0.05 ‖g‖, × 1.05)",
              "float16": "float16 (one element + 0.05 ‖g‖, × 1.05)"}  # fmt: skip
    for dtype, records in planted.items():
        rows = [r for r in records if r["net"] != "repro"]
        nets = len({r["net"] for r in rows})
        print_tally(f"Planted bugs, {titles[dtype]}, over {nets} networks", tally(rows))
        buckets = ", ".join(f"{k}: {v}" for k, v in misses_by_roundoff(rows).items())
        print(f"  misses by the leaf's own roundoff / the bug's relative size: {buckets}")
    repro = [r for r in planted.get("float32", []) if r["net"] == "repro"]
    print("\nThe issue's reproduction (MLP (4, 8, 3), x ~ 1e-6 N(0, 1), ∇W¹ zeroed):")
    for r in repro:
        print(f"  {r['checker']:12s} {'caught' if r['caught'] else 'MISSED'}: {r['summary']}")

    print("\nFalse alarms (correct gradients)")
    for dtype, records in correct.items():
        for checker, t in alarms(records).items():
            print(f"  {dtype:9s} {checker:12s} {t['false_alarms']} of {t['cases']} cases")
    false = [r for records in correct.values() for r in records if not r["ok"]]
    for r in false:
        print(f"  FALSE ALARM {r['dtype']} {r['checker']} {r['arch']} [{r['case']}]: "
              f"{r['summary']}")  # fmt: skip

    result["planted"] = {
        d: tally([r for r in records if r["net"] != "repro"]) for d, records in planted.items()
    }
    result["misses_by_roundoff_ratio"] = {
        d: misses_by_roundoff([r for r in records if r["net"] != "repro"])
        for d, records in planted.items()
    }
    result["repro"] = repro
    result["false_alarms"] = {d: alarms(records) for d, records in correct.items()}
    result["false_alarm_cases"] = false
    result["tasks"] = [{"task": r["task"], "label": r["label"], "elapsed_s": r["elapsed_s"]}
                       for r in results]  # fmt: skip
    result["records"] = {"planted": planted, "correct": correct}
    result["elapsed_s"] = time.perf_counter() - start
    busy = sum(r["elapsed_s"] for r in results)
    print(f"\n{result['elapsed_s']:.0f} s wall, {busy:.0f} s in tasks ({args.jobs} jobs, "
          f"load average {os.getloadavg()[0]:.1f} at the end); written to {args.out}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return result


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    main()
