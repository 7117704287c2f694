"""Per-example sums of outer products: the closed forms the weight layers' extension rules share.

A weight layer's gradient for one example is a sum over its positions ``t`` (none for a Dense
layer on vectors, the time steps of a sequence, the output pixels of a convolution) of outer
products of the error ``δ_{n,t}`` (``m`` entries) and the input ``a_{n,t}`` (``n`` entries, a
convolution's unfolded patch)::

    g_n = Σ_t δ_{n,t} a_{n,t}ᵀ                                   shape (m, n)

:class:`~bpjax.layers.Dense`, :class:`~bpjax.layers.Conv2D`, :class:`~bpjax.layers.Elman` and
:class:`~bpjax.layers.LSTM` reshape their error and input to ``(batch, P, m)`` and ``(batch, P, n)``
and call these functions from their extension rules (the protocol is in :mod:`bpjax.extend.rules`).

Where ``P`` is large (a convolution's output pixels) the inputs are taken once transposed,
``(batch, n, P)``, and ``g_nᵀ`` is formed with them as the dot's left operand
(:func:`example_outer_t`; Conv2D, one call per kernel tap).

The squared norm ``‖g_n‖²_F`` has two forms: materialising ``g_n`` costs ``P·m·n`` multiply-adds
and ``m·n`` memory per example; the Gram form
``Σ_{t,t'} (δ_t·δ_{t'}) (a_t·a_{t'})`` costs ``P²·(m + n)`` and ``P²`` memory. The cheaper is
taken, the Gram form when ``P·(m + n) < m·n`` (for ``P = 1`` both are ``‖δ‖²‖a‖²``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bpjax._types import Array

__all__ = [
    "UNROLLED_COLUMNS",
    "column_sum",
    "example_outer",
    "example_outer_sq_norms",
    "example_outer_square_sums",
    "example_outer_t",
    "kfac_outer",
    "outer_square_sum",
    "use_gram",
]


def column_sum(term: Callable[[Array, Array], Any], deltas: Array, weights: Array) -> Any:
    """``Σ_c term(deltas[c], weights[c])``, a pytree sum, one column in memory at a time.

    The first column starts the sum, so the total carries the columns' own sharding (under
    ``shard_map`` a zero start would be replicated while the terms vary over the data axis).
    Up to :data:`UNROLLED_COLUMNS` columns are added in straight-line code: inside a
    ``lax.scan`` body XLA:CPU lays out a vmapped (grouped) convolution for a loop and runs it
    10–25× slower (a CNN's ``diag_ggn``, 10 columns: 150 s per call against 6 s unrolled); more
    columns (a sequence output's ``P·n_L``) go through ``lax.scan``, bounding the compiled size.
    """
    k = deltas.shape[0]
    first = term(deltas[0], weights[0])
    if k <= UNROLLED_COLUMNS:
        total = first
        for c in range(1, k):
            total = jax.tree.map(jnp.add, total, term(deltas[c], weights[c]))
        return total

    def add(total: Any, column: tuple[Array, Array]) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, term(*column)), None

    return jax.lax.scan(add, first, (deltas[1:], weights[1:]))[0]


UNROLLED_COLUMNS = 32
"""How many columns :func:`column_sum` adds unrolled before it loops (``lax.scan``)."""


def use_gram(positions: int, m: int, n: int) -> bool:
    """Whether the Gram form of ``‖Σ_t δ_t a_tᵀ‖²`` is cheaper: ``P·(m + n) < m·n``."""
    return positions > 1 and positions * (m + n) < m * n


def example_outer(delta: Array, a: Array) -> Array:
    """``g_n = Σ_t δ_{n,t} a_{n,t}ᵀ``: ``(batch, P, m)``, ``(batch, P, n)`` -> ``(batch, m, n)``."""
    return jnp.einsum("bpm,bpn->bmn", delta, a)


def example_outer_sq_norms(delta: Array, a: Array) -> Array:
    """``‖g_n‖²_F``, shape ``(batch,)``, by the cheaper of the two forms (module docstring)."""
    _, positions, m = delta.shape
    n = a.shape[-1]
    if positions == 1:
        return jnp.sum(delta[:, 0] ** 2, axis=-1) * jnp.sum(a[:, 0] ** 2, axis=-1)
    if use_gram(positions, m, n):
        gram_delta = jnp.einsum("bpm,bqm->bpq", delta, delta)
        gram_a = jnp.einsum("bpn,bqn->bpq", a, a)
        return jnp.sum(gram_delta * gram_a, axis=(1, 2))
    return jnp.sum(example_outer(delta, a) ** 2, axis=(1, 2))


def outer_square_sum(deltas: Array, a: Array, weights: Array) -> Array:
    """``Σ_c Σ_n w_{c,n} (g_{c,n})²`` elementwise, shape ``(m, n)``.

    Args:
      deltas: ``(k, batch, P, m)``: ``k`` errors per example (columns of a loss-Hessian factor,
        or ``k = 1`` for the gradient itself).
      a: ``(batch, P, n)``: the inputs, shared by the columns.
      weights: ``(k, batch)``: ``w_{c,n}`` (``1``; ``±1/B`` for a GGN; ``0`` on padding rows).

    For ``P = 1`` the square of ``δ aᵀ`` factorises, ``(Σ_c w δ_c²)ᵀ a²``: one product. Otherwise
    each column's ``g_{c,n}`` is materialised in turn (``batch·m·n`` memory at a time).
    """
    if deltas.shape[2] == 1:
        d2 = jnp.einsum("cb,cbm->bm", weights, deltas[:, :, 0] ** 2)
        return d2.T @ (a[:, 0] ** 2)

    return column_sum(
        lambda delta, w: jnp.einsum("b,bmn->mn", w, example_outer(delta, a) ** 2), deltas, weights
    )


def example_outer_square_sums(deltas: Array, a: Array, weights: Array) -> Array:
    """``Σ_c w_{c,n} (g_{c,n})²`` per example, shape ``(batch, m, n)``; arguments as for
    :func:`outer_square_sum`."""
    if deltas.shape[2] == 1:
        d2 = jnp.einsum("cb,cbm->bm", weights, deltas[:, :, 0] ** 2)
        return d2[:, :, None] * (a[:, 0] ** 2)[:, None, :]

    return column_sum(
        lambda delta, w: w[:, None, None] * example_outer(delta, a) ** 2, deltas, weights
    )


def example_outer_t(a_t: Array, delta: Array, precision: Any = None) -> Array:
    """``g_nᵀ = Σ_t a_{n,t} δ_{n,t}ᵀ``: ``(batch, n, P)``, ``(batch, P, m)`` -> ``(batch, n, m)``.

    The inputs, already transposed, are the left operand and contract over their last axis, the
    error over its middle one: the canonical ``(b, n, P)·(b, P, m)`` batched product, which
    XLA:CPU runs without first copying either operand into another layout. The transpose of the
    inputs is made once and shared by every column; ``δ``, new per column, is read as it is. (On
    the benchmark CNN's ``diag_ggn`` ``δ`` on the left was 1.03× slower, paired median of 8
    interleaved calls on 2 shared cores: within the noise, not a reason on its own.)
    """
    return lax.dot_general(a_t, delta, (((2,), (1,)), ((0,), (0,))), precision=precision)


def kfac_outer(
    deltas: Array, a: Array, weights: Array, example_weights: Array | None = None
) -> tuple[Array, Array]:
    """KFAC's Kronecker factors of ``W̄ = [W | b]`` for ``g = Σ_t δ_t [a_t; 1]ᵀ``.

    ``A = (1/(B·P)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ`` with ``ā = [a; 1]`` (``(n + 1, n + 1)``) and
    ``G = Σ_c Σ_n w_{c,n} Σ_t δ_{c,n,t} δ_{c,n,t}ᵀ`` (``(m, m)``). For ``P = 1``, and one example,
    ``G ⊗ A`` is the GGN block of ``W̄`` exactly (``w = d/B``); with positions it is KFC's
    approximation (Grosse & Martens 2016: the positions' errors uncorrelated, the statistics the
    same at every position), ``E[Σ_{t,t'} δ_t δ_{t'}ᵀ ⊗ ā_t ā_{t'}ᵀ] ≈ (Σ_t δ_t δ_tᵀ) ⊗
    mean_t(ā_t ā_tᵀ)``.

    With ``example_weights`` ``v``, ``A = (1/P) Σ_n v_n Σ_t ā_{n,t} ā_{n,t}ᵀ`` instead: the
    default is ``v_n = 1/B``; a shard of a split batch passes ``1/B`` of the whole batch, ``0``
    on padding rows (:func:`bpjax.parallel.data_parallel_extend`), so the shards' sum is ``A``.

    Args:
      deltas: ``(k, batch, P, m)``.
      a: ``(batch, P, n)``.
      weights: ``(k, batch)``.
      example_weights: ``(batch,)`` or ``None`` (``1/B`` each).
    """
    batch, positions = a.shape[:2]
    a_bar = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=-1)
    if example_weights is None:
        factor_a = jnp.einsum("bpi,bpj->ij", a_bar, a_bar) / (batch * positions)
    else:
        factor_a = jnp.einsum("b,bpi,bpj->ij", example_weights, a_bar, a_bar) / positions
    factor_g = jnp.einsum("cb,cbpm,cbpk->mk", weights, deltas, deltas)
    return factor_a, factor_g
