"""KFAC: per layer Kronecker factors of the GGN, or its exact diagonal, and the damped inverse.

:func:`kfac_factors` contracts the loss-Hessian factor's columns sent down the δ-recursion
(:func:`~bpjax.extend.second_order.curvature_deltas`) into each layer's factors: a Dense or Conv2D
layer (one with a ``kfac_factors`` method beside its backward) gets :class:`KFACFactors`
``(A, G)`` with ``G ⊗ A`` approximating its GGN block (KFC over unfolded patches for a
convolution, Grosse & Martens 2016); any other layer with params (Embedding, LayerNorm, Elman,
LSTM, a user's layer) gets :class:`KFACDiagonal`, its exact GGN diagonal from the layer's
``square_sum`` rule (:mod:`bpjax.extend.rules`) — the diagonal block kfac-jax uses for
parameters without Kronecker structure. :func:`kfac_precondition` and :func:`kfac_preconditioner`
apply ``((G + λI) ⊗ (A + λI))^{-1}``, or ``(D + λ)^{-1}`` for a diagonal block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bpjax._types import Array, Grads, Params
from bpjax.extend import rules
from bpjax.extend.passes import (
    ForwardPass,
    check_net,
    check_positive,
    compiled,
    forward,
    positive_poison,
)
from bpjax.extend.second_order import column_weights, curvature_deltas

__all__ = [
    "KFACDiagonal",
    "KFACFactors",
    "LayerFactors",
    "check_kfac_net",
    "kfac_factors",
    "kfac_precondition",
    "kfac_preconditioner",
    "layer_kfac_factors",
]


class KFACFactors(NamedTuple):
    """One layer's Kronecker factors; ``A ⊗ G`` approximates its GGN block (see kfac_factors)."""

    A: Array  # (n_{l-1} + 1, n_{l-1} + 1): (1/B) Σ_n ā_n ā_nᵀ, ā = [a^{l-1}; 1] (conv: patches)
    G: Array  # (n_l, n_l): (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} (δ^l_{n,c})ᵀ


class KFACDiagonal(NamedTuple):
    """A layer without Kronecker factors: its exact GGN diagonal (see kfac_factors)."""

    diag: Any  # like the layer's params: (1/B) Σ_n Σ_c d_{n,c} (g_{n,c})², as diag_ggn's


LayerFactors = KFACFactors | KFACDiagonal | None
"""What :func:`kfac_factors` gives one layer."""


@compiled()
def kfac_factors(net: Any, params: Params, x: Array, y: Array) -> list[LayerFactors]:
    """Per layer the Kronecker factors ``A^l`` and ``G^l`` of the KFAC approximation of the GGN.

    ``A^l = (1/B) Σ_n ā_n ā_nᵀ`` with ``ā_n = [a^{l-1}_n; 1]`` and
    ``G^l = (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} (δ^l_{n,c})ᵀ`` from the backpropagated loss-Hessian
    factor (as in :func:`diag_ggn`). For the layer's parameters ``W̄ = [W | b]`` of shape
    ``(n_l, n_{l-1} + 1)``, flattened row-major (``W̄.ravel()``), the GGN block is approximated by
    ``G ⊗ A`` (``A ⊗ G`` for the column-major ``vec``); exact for a batch of one example.

    A :class:`~bpjax.layers.Conv2D` layer gets KFC's factors (Grosse & Martens 2016) over its
    unfolded patches, ``A`` the mean over output positions and ``G`` the sum, for
    ``W̃[o, (c, i, j)] = W[i, j, c, o]``; a Dense layer on inputs with positions, the same. A
    layer without params gets ``None``. Any other layer with params (Embedding, LayerNorm, Elman,
    LSTM, a user's layer) gets :class:`KFACDiagonal`: its exact GGN diagonal (what
    :func:`~bpjax.extend.diag_ggn` gives for it), kfac-jax's diagonal block for parameters
    without Kronecker structure.

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.

    Returns:
      One :class:`KFACFactors`, :class:`KFACDiagonal` or ``None`` per layer.
    """
    check_kfac_net(net, params)
    fwd = forward(net, params, x, y)
    column_deltas, signs = curvature_deltas(net, params, fwd)
    k, batch = column_deltas[0].shape[:2]
    weights = column_weights(signs, k, batch, column_deltas[0].dtype)
    return layer_kfac_factors(net, params, fwd, column_deltas, weights)


def check_kfac_net(net: Any, params: Params) -> None:
    """A ``TypeError`` unless ``net`` is a network (every layer has factors or a diagonal)."""
    del params  # every layer with params has a KFACDiagonal where it has no Kronecker factors
    check_net(net)


def layer_kfac_factors(
    net: Any,
    params: Params,
    fwd: ForwardPass,
    column_deltas: list[Array],
    weights: Array,
    example_weights: Array | None = None,
) -> list[LayerFactors]:
    """Each layer's own ``kfac_factors(params, cache, deltas, weights, example_weights)``.

    ``column_deltas`` from :func:`curvature_deltas` (``(k, batch, ...)`` per layer), ``weights``
    ``(k, batch)`` the GGN's ``w_{c,n}`` (:func:`column_weights`) for ``G``, and
    ``example_weights`` ``(batch,)`` the ``v_n`` of ``A = Σ_n v_n ā_n ā_nᵀ`` (``None``:
    ``1/B``). ``None`` for a layer without params; :class:`KFACDiagonal` (the ``square_sum``
    rule with ``weights``) for a layer with params and no ``kfac_factors``.
    """
    out: list[LayerFactors] = []
    records = rules.records(net, params, fwd.cache)
    for record, d in zip(records, column_deltas, strict=True):
        layer, p, c = record.layer, record.params, record.cache
        if not _has_params(p):
            out.append(None)
        elif not callable(getattr(layer, "kfac_factors", None)):
            out.append(KFACDiagonal(rules.square_sum(record, d, weights)))
        elif example_weights is None:
            out.append(KFACFactors(*layer.kfac_factors(p, c, d, weights)))
        else:
            out.append(KFACFactors(*layer.kfac_factors(p, c, d, weights, example_weights)))
    return out


def _has_params(params: Any) -> bool:
    return bool(jax.tree.leaves(params))


def _as_matrix(grads: dict[str, Array]) -> Array:
    """``[∇W | ∇b]`` as ``(m, n + 1)``: a Conv2D kernel HWIO as ``W̃[o, (c, i, j)]``."""
    w = grads["W"]
    if w.ndim == 4:  # (k_h, k_w, C_in, features) -> (features, C_in·k_h·k_w)
        w = jnp.transpose(w, (3, 2, 0, 1)).reshape(w.shape[3], -1)
    return jnp.concatenate([w, grads["b"][:, None]], axis=1)


def _from_matrix(m: Array, like: dict[str, Array]) -> dict[str, Array]:
    w = like["W"]
    w_part = m[:, :-1]
    if w.ndim == 4:
        kh, kw, c_in, f = w.shape
        w_part = jnp.transpose(w_part.reshape(f, c_in, kh, kw), (2, 3, 1, 0))
    return {"W": w_part, "b": m[:, -1]}


def _diagonal_solve(g: Array, d: Array, damping: Array) -> Array:
    """``g / (d + λ)``, NaN where ``d + λ ≤ 0`` (no positive definite damped block)."""
    damped = d + jnp.asarray(damping, d.dtype)
    return jnp.where(damped > 0, g / damped, jnp.nan)


def _damped_cholesky(m: Array, damping: Any) -> tuple[Array, bool]:
    """``(m + λI)^{-1}`` as a Cholesky factor, for symmetric PSD ``m``."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return jax.scipy.linalg.cho_factor(m + jnp.asarray(damping, m.dtype) * eye, lower=True)


def kfac_precondition(grads: Grads, factors: Sequence[LayerFactors], *, damping: float) -> Grads:
    """``(G + λI)^{-1} ∇W̄ (A + λI)^{-1}`` per layer, ``∇W̄ = [∇W | ∇b]`` (``(n_l, n_{l-1} + 1)``).

    The inverse of the damped KFAC approximation ``(G + λI) ⊗ (A + λI)`` applied to the gradient.
    A Conv2D kernel is read as ``W̃[o, (c, i, j)] = W[i, j, c, o]`` (KFC) and written back HWIO;
    a layer with a :class:`KFACDiagonal` ``D`` gets ``∇θ / (D + λ)`` elementwise (NaN where
    ``D + λ ≤ 0``: an indefinite loss Hessian's GGN, as the Kronecker factors' Cholesky gives);
    a layer whose factor is ``None`` (no params) keeps its gradient.

    Args:
      grads: like params (e.g. from ``net.value_and_grad``).
      factors: from :func:`kfac_factors`, one per layer.
      damping: ``λ > 0``, added to both factors.

    Returns:
      Like params: the preconditioned gradient.

    Raises:
      ValueError: ``damping`` not positive (a traced one makes the result NaN), ``factors`` not
        one per layer of ``grads``, or a factor whose shapes do not fit its layer.
      TypeError: a factor that is not a :class:`KFACFactors`, :class:`KFACDiagonal` or ``None``.
    """
    check_positive(damping, "damping")
    if isinstance(factors, (KFACFactors, KFACDiagonal)) or len(factors) != len(grads):
        raise ValueError(
            f"factors: expected one KFACFactors per layer ({len(grads)}), got {len(factors)}."
        )
    _check_factors(grads, factors)
    poison = positive_poison(damping, jnp.result_type(*jax.tree.leaves(grads)))
    out = _kfac_precondition(grads, list(factors), damping)
    return jax.tree.map(lambda leaf: leaf * poison, out)  # a traced λ ≤ 0 or NaN: NaN


def _check_factors(grads: Grads, factors: Sequence[Any]) -> None:
    """Each factor a :class:`KFACFactors` whose shapes fit its layer's ``[∇W | ∇b]``, a
    :class:`KFACDiagonal` shaped like its params, or ``None`` for a layer without params."""
    for i, (g, f) in enumerate(zip(grads, factors, strict=True)):
        if f is None:
            if _has_params(g):
                raise ValueError(
                    f"factors[{i}]: None, but layer {i} has params; pass kfac_factors' entry."
                )
            continue
        if isinstance(f, KFACDiagonal):
            _check_diagonal(i, g, f)
            continue
        if not isinstance(f, KFACFactors):
            raise TypeError(
                f"factors[{i}]: expected a KFACFactors, KFACDiagonal or None, got "
                f"{type(f).__name__}; pass the list kfac_factors returns, one entry per layer."
            )
        if not isinstance(g, dict) or set(g) != {"W", "b"}:
            raise ValueError(
                f"factors[{i}]: KFAC preconditions Dense and Conv2D layers' {{'W', 'b'}}, got "
                f"grads[{i}] with {sorted(g) if isinstance(g, dict) else type(g).__name__}."
            )
        m, n = jnp.shape(g["b"])[0], _matrix_width(g["W"])
        want = ((n + 1, n + 1), (m, m))
        got = (jnp.shape(f.A), jnp.shape(f.G))
        if got != want:
            raise ValueError(
                f"factors[{i}]: expected A {want[0]} and G {want[1]} for grads[{i}]['W'] of "
                f"shape {jnp.shape(g['W'])}, got A {got[0]} and G {got[1]}."
            )


def _check_diagonal(i: int, grads: Any, factor: KFACDiagonal) -> None:
    def shapes(tree: Any) -> Any:
        return jax.tree.map(jnp.shape, tree)

    if shapes(grads) != shapes(factor.diag):
        raise ValueError(
            f"factors[{i}]: a KFACDiagonal shaped {shapes(factor.diag)} does not fit grads[{i}] "
            f"shaped {shapes(grads)}; pass kfac_factors' entry for this layer."
        )


def _matrix_width(w: Any) -> int:
    shape = jnp.shape(w)
    return int(shape[0] * shape[1] * shape[2]) if len(shape) == 4 else int(shape[-1])


@jax.jit
def _kfac_precondition(grads: Grads, factors: list[LayerFactors], damping: Array) -> Grads:
    out = []
    for g, f in zip(grads, factors, strict=True):
        if f is None:
            out.append(g)
            continue
        if isinstance(f, KFACDiagonal):
            out.append(jax.tree.map(lambda gl, d: _diagonal_solve(gl, d, damping), g, f.diag))
            continue
        w_bar = _as_matrix(g)
        left = jax.scipy.linalg.cho_solve(_damped_cholesky(f.G, damping), w_bar)
        right = jax.scipy.linalg.cho_solve(_damped_cholesky(f.A, damping), left.T).T
        out.append(_from_matrix(right, g))
    return out


def kfac_preconditioner(*, damping: float) -> optax.GradientTransformationExtraArgs:
    """An optax transformation applying :func:`kfac_precondition` to the updates.

    Its ``update(updates, state, params=None, *, kfac_factors)`` takes the factors as an extra
    argument; chain it before a learning rate, e.g.
    ``optax.chain(kfac_preconditioner(damping=1e-3), optax.sgd(0.1))`` and call
    ``opt.update(grads, state, params, kfac_factors=kfac_factors(net, params, x, y))``.

    Args:
      damping: ``λ > 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.
    """
    check_positive(damping, "damping")

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(
        updates: Grads,
        state: optax.EmptyState,
        params: Any = None,
        *,
        kfac_factors: Sequence[LayerFactors] | None = None,
        **extra: Any,
    ) -> tuple[Grads, optax.EmptyState]:
        del params, extra
        if kfac_factors is None:
            raise ValueError(
                "kfac_factors: kfac_preconditioner's update needs "
                "kfac_factors=bpjax.extend.kfac_factors(net, params, x, y)."
            )
        return kfac_precondition(updates, kfac_factors, damping=damping), state

    return optax.GradientTransformationExtraArgs(init, update)
