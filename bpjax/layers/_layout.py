"""The weight gradient ``∇W = δᵀ a`` and its dot layout, measured on the machine that runs it.

XLA:CPU hands a dot to its fast library (YNNPACK) only when the left operand is not transposed;
a plain ``δ.T`` is folded into the dot (contracting dimension 0), which then runs on XLA's own
kernels, as ``jax.grad``'s weight gradients do. Materialising ``δᵀ`` first (an ``O(B·n_l)`` copy)
sends the ``O(B·n_l·n_{l-1})`` dot to YNNPACK, which is faster — or slower: it depends on the CPU
and the shape (a 2048×2048 ``∇W`` at ``B = 512`` ran 28% faster through the copy on a 2-core
AVX2 EPYC, while at 784×512, ``B = 256`` the copy cost that machine 3% of the step; on 2-core
AVX-512 EPYCs the copy wins at every size of ``benchmarks/bench_mlp.py``, by 10–20% of the whole
step at the small one). A constant tuned on one machine loses on another, so the layout is
**measured once per process** for each ``(B, n_l, n_{l-1}, dtype)`` on the CPU that runs it, the
first time a trace needs it, and cached: both layouts are compiled as a loop of Dense backward
steps in one program (so that dispatch overhead does not drown a small dot, and the dot is timed
among the ops that surround it in a backward) and timed in 5–15 interleaved
rounds; folding is kept only where it wins the median round by 3% (a near tie materialises).
That costs about 0.2 s per shape, up to 1 s for 2048×2048 at ``B = 512``.

``BPJAX_WEIGHT_GRAD_LAYOUT=fold`` or ``=materialise`` pins the layout for every shape (for
benchmarks and bit-for-bit reproducible runs: the two layouts sum in different orders, so their
results differ in the last bits, and two runs measuring a near tie may choose differently);
``auto`` (or unset) measures. Dots under :data:`MEASURE_FLOPS` and every non-CPU backend fold.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._types import Array

__all__ = [
    "LAYOUTS",
    "LAYOUT_ENV",
    "MEASURE_FLOPS",
    "paired_ratio",
    "pinned_choice",
    "weight_grad",
    "weight_grad_layout",
]

LAYOUTS = ("fold", "materialise")
"""``fold``: ``δ.T @ a`` as XLA folds it; ``materialise``: ``δᵀ`` copied before the dot."""

LAYOUT_ENV = "BPJAX_WEIGHT_GRAD_LAYOUT"
"""The environment variable that pins the layout: one of :data:`LAYOUTS`, or ``auto``."""

MEASURE_FLOPS = 2**21
"""``2·B·n_l·n_{l-1}`` under which the dot folds unmeasured: a few microseconds, where the copy
cannot pay off by more than the measurement's noise (and tests of tiny layers pay nothing)."""

# Folding must win by this margin to be chosen: a near tie materialises (on every CPU measured
# so far the copy won or tied at 2048×2048, B = 512, the size where both cost the most).
_MARGIN = 0.97
# FLOPs of dot per timed call: the dot runs in a loop inside one program so that the ~10 µs of a
# dispatch does not drown a dot of a few microseconds; the verdict is the median of per-round
# paired ratios, which a burst of load in one round cannot swing.
_FLOPS_PER_CALL = 2e8
_MAX_REPEATS = 64
_ROUNDS = (5, 15)  # interleaved timed calls per layout: as many as fit _BUDGET_S, within these
_BUDGET_S = 0.2


def pinned_choice(env: str, choices: tuple[str, ...]) -> str | None:
    """The choice pinned by the environment variable ``env`` (any case, spaces stripped), or
    ``None`` where it is unset, empty or ``auto`` (measure).

    Raises:
      ValueError: ``env`` set to anything else, naming the variable and the choices.
    """
    pinned = os.environ.get(env, "auto").strip().lower() or "auto"
    if pinned in choices:
        return pinned
    if pinned != "auto":
        raise ValueError(f"{env}: expected one of {', '.join(choices)} or auto, got {pinned!r}.")
    return None


def weight_grad_layout(batch: int, n_out: int, n_in: int, dtype: Any) -> str:
    """The layout of ``δᵀ a`` for ``δ`` ``(batch, n_out)`` and ``a`` ``(batch, n_in)``.

    Returns:
      ``"fold"`` or ``"materialise"``: the pin in ``BPJAX_WEIGHT_GRAD_LAYOUT`` if set, else
      ``"fold"`` off CPU and for small dots, else the faster on this CPU, measured once.

    Raises:
      ValueError: ``BPJAX_WEIGHT_GRAD_LAYOUT`` set to something else.
    """
    pinned = pinned_choice(LAYOUT_ENV, LAYOUTS)
    if pinned is not None:
        return pinned
    if 2 * batch * n_out * n_in < MEASURE_FLOPS or jax.default_backend() != "cpu":
        return "fold"
    return _measured_layout(batch, n_out, n_in, jnp.dtype(dtype).name)


def _fold(delta: Array, a_prev: Array) -> Array:
    return delta.T @ a_prev


def _materialise(delta: Array, a_prev: Array) -> Array:
    return jax.lax.optimization_barrier(delta.T) @ a_prev


def _repeated(layout: Any, repeats: int) -> Any:
    """``repeats`` Dense backward steps in one compiled program, the weight gradient in ``layout``.

    Each step is what surrounds the dot in a network's backward: ``δ_i = g ∘ tanh'(z + iε)``
    (the elementwise op that makes δ; the ``iε`` keeps XLA from hoisting it out of the loop), then
    ``∇W = δ_iᵀ a`` and ``δ_i W``, both summed over the steps. Timing the dot alone misleads: on
    the AVX-512 EPYCs an isolated 128×128 dot folded a few per cent faster, while in these steps,
    as in the whole backward, the copy won by 15–20%.
    """

    def run(g: Array, z: Array, a_prev: Array, w: Array) -> tuple[Array, Array]:
        def body(i: Array, totals: tuple[Array, Array]) -> tuple[Array, Array]:
            delta = g * (1 - jnp.tanh(z + i.astype(z.dtype) * 1e-7) ** 2)
            return totals[0] + layout(delta, a_prev), totals[1] + delta @ w

        init = (jnp.zeros(w.shape, w.dtype), jnp.zeros(a_prev.shape, a_prev.dtype))
        return jax.lax.fori_loop(0, repeats, body, init)

    return jax.jit(run)


def paired_ratio(fn_a: Any, fn_b: Any, make_args: Callable[[], tuple[Any, ...]]) -> float:
    """The median over interleaved rounds of ``time(fn_a(*args)) / time(fn_b(*args))``.

    ``args = make_args()``. Both are compiled and warmed up first; then 5–15 rounds (as many as
    fit 0.2 s), each timing one call of each. A burst of load in one round cannot swing the
    median of per-round ratios. Safe inside a caller's trace: the arguments are built and the
    calls run at once (``jax.ensure_compile_time_eval``), not staged into the caller's program,
    and under ``jax.transfer_guard("allow")``, since a caller's guard is its rule for its own
    arrays, not for these.
    """
    with jax.ensure_compile_time_eval(), jax.transfer_guard("allow"):
        args = make_args()
        for fn in (fn_a, fn_b):
            jax.block_until_ready(fn(*args))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fn_a(*args))
        once = time.perf_counter() - start
        rounds = int(min(_ROUNDS[1], max(_ROUNDS[0], _BUDGET_S / max(once, 1e-6))))
        ratios = []
        for _ in range(rounds):
            took = []
            for fn in (fn_a, fn_b):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                took.append(time.perf_counter() - start)
            ratios.append(took[0] / took[1])
    return statistics.median(ratios)


@functools.cache
def _measured_layout(batch: int, n_out: int, n_in: int, dtype: str) -> str:
    """``fold`` if it is faster by :data:`_MARGIN` in the median of interleaved paired timings of
    both compiled loops of backward steps (:func:`_repeated`), else ``materialise``."""
    # two dots of 2·B·n_l·n_{l-1} FLOPs per step
    repeats = int(min(_MAX_REPEATS, max(1, _FLOPS_PER_CALL // (4 * batch * n_out * n_in))))

    def make_args() -> tuple[Array, ...]:
        return (
            jnp.full((batch, n_out), 0.5, dtype),  # g
            jnp.full((batch, n_out), 0.3, dtype),  # z
            jnp.full((batch, n_in), 0.25, dtype),  # a_prev
            jnp.full((n_out, n_in), 0.1, dtype),  # W
        )

    ratio = paired_ratio(_repeated(_fold, repeats), _repeated(_materialise, repeats), make_args)
    return "fold" if ratio < _MARGIN else "materialise"


def weight_grad(delta: Array, a_prev: Array) -> Array:
    """``δᵀ a_prev``, shape ``(n_l, n_{l-1})``: the batch-summed outer products.

    ``delta`` is ``(B, n_l)`` and ``a_prev`` is ``(B, n_{l-1})``, ``B`` the rows summed over (the
    batch, or batch times the steps of a sequence). The dot's layout is
    :func:`weight_grad_layout`'s; both give ``δᵀ a`` (summed in different orders).

    Raises:
      ValueError: ``delta`` or ``a_prev`` not 2-D, or their batches differ.
    """
    if delta.ndim != 2 or a_prev.ndim != 2 or delta.shape[0] != a_prev.shape[0]:
        raise ValueError(
            "weight_grad: expected delta (B, n_l) and a_prev (B, n_{l-1}) with the same B, got "
            f"delta {tuple(delta.shape)} and a_prev {tuple(a_prev.shape)}."
        )
    (batch, n_out), n_in = delta.shape, a_prev.shape[-1]
    if weight_grad_layout(batch, n_out, n_in, delta.dtype) == "fold":
        return _fold(delta, a_prev)
    # the measurement was on CPU; a program lowered for another platform folds
    return jax.lax.platform_dependent(delta, a_prev, cpu=_materialise, default=_fold)
