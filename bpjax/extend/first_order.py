"""Per-example first-order quantities, for every network: the layers' rules, no vmap(grad).

Each layer's per-example gradient ``g_n = ∇_θ C_n`` comes from its extension rules
(:mod:`bpjax.extend.rules`) applied to the per-example error the δ-recursion recorded at it:
closed forms beside the layer's backward (for a Dense layer ``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ``
and ``∇_{b^l} C_n = δ^l_n``), or the layer's own backward under ``vmap`` over the batch.
:func:`batch_grad`, :func:`batch_l2_grad`, :func:`sum_grad_squared`, :func:`variance` and
:func:`clipped_grad` are contractions of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._types import Array, Grads, Params
from bpjax.extend import rules
from bpjax.extend.passes import (
    check_positive,
    compiled,
    example_deltas,
    forward,
    positive_poison,
)
from bpjax.layers import DenseCache

__all__ = [
    "batch_grad",
    "batch_l2_grad",
    "clip_scale",
    "clipped_grad",
    "example_sq_norms",
    "layer_records",
    "sum_grad_squared",
    "sum_grad_squared_of",
    "variance",
    "variance_from_sums",
]


def layer_records(
    net: Any, params: Params, x: Array, y: Array
) -> tuple[list[rules.LayerRecord], list[Array]]:
    """The forward pass and the δ-recursion: each layer's record and its per-example error."""
    fwd = forward(net, params, x, y)
    return rules.records(net, params, fwd.cache), example_deltas(net, params, fwd)


def example_sq_norms(records: Sequence[rules.LayerRecord], errors: Sequence[Array]) -> Array:
    """``‖∇_θ C_n‖²`` over every leaf of every layer, shape ``(batch,)``."""
    total = [
        leaf
        for r, e in zip(records, errors, strict=True)
        for leaf in jax.tree.leaves(rules.example_sq_norms(r, e))
    ]
    return sum(total[1:], total[0])


@compiled()
def batch_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example gradients ``∇_θ C_n``, each leaf with a leading batch axis.

    For a Dense layer ``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ`` and ``∇_{b^l} C_n = δ^l_n`` (summed
    over positions for inputs ``(batch, ..., n)``); every layer by its rule
    (:mod:`bpjax.extend.rules`). Unscaled: their mean over the batch is the gradient of the
    batch-mean loss.

    Args:
      net: a :class:`bpjax.MLP` or a :func:`bpjax.serial` network of any layers.
      params: as from ``net.init``.
      x: inputs of shape ``(batch, *input_shape)``.
      y: targets as ``net.loss`` takes them.

    Returns:
      Like params, every leaf with a leading batch axis: ``(batch, *leaf)``.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> g = batch_grad(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> g[0]["W"].shape, g[1]["b"].shape
      ((5, 4, 3), (5, 2))
    """
    records, errors = layer_records(net, params, x, y)
    return [rules.example_grads(r, e) for r, e in zip(records, errors, strict=True)]


@compiled()
def batch_l2_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example squared L2 norms of each leaf's gradient, shape ``(batch,)`` per leaf.

    For a Dense layer on vectors ``‖∇_{W^l} C_n‖² = ‖δ^l_n‖² ‖a^{l-1}_n‖²`` and
    ``‖∇_{b^l} C_n‖² = ‖δ^l_n‖²``; with positions (sequences, a convolution's pixels) the Gram
    form ``Σ_{t,t'} (δ_t·δ_{t'})(a_t·a_{t'})`` where it is cheaper than materialising
    (:mod:`bpjax.layers`' outer-product rules); every layer by its rule.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params, every leaf of shape ``(batch,)``; the total ``‖∇_θ C_n‖²`` is the sum of the
      leaves.
    """
    records, errors = layer_records(net, params, x, y)
    return [rules.example_sq_norms(r, e) for r, e in zip(records, errors, strict=True)]


def sum_grad_squared_of(deltas: Sequence[Array], caches: Sequence[DenseCache]) -> Grads:
    """``Σ_n (∇_θ C_n)²`` per leaf from Dense layers' per-example ``δ^l`` and caches.

    ``(δ^l ∘ δ^l)ᵀ (a^{l-1} ∘ a^{l-1})`` for ``W^l``, ``Σ_n (δ^l_n)²`` for ``b^l``; rows of
    ``deltas`` that are zero (masked padding) add nothing. (Any network: :func:`sum_grad_squared`.)
    """
    out = []
    for d, c in zip(deltas, caches, strict=True):
        d2 = d * d
        out.append({"W": d2.T @ (c.x * c.x), "b": jnp.sum(d2, axis=0)})
    return out


def _square_sums(
    records: Sequence[rules.LayerRecord], errors: Sequence[Array], weights: Array
) -> Grads:
    return [
        rules.square_sum(r, e[None], weights[None]) for r, e in zip(records, errors, strict=True)
    ]


@compiled()
def sum_grad_squared(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """``Σ_n (∇_θ C_n)²``, elementwise per leaf.

    For a Dense layer on vectors ``(δ^l ∘ δ^l)ᵀ (a^{l-1} ∘ a^{l-1})`` for ``W^l`` and
    ``Σ_n (δ^l_n)²`` for ``b^l``: one matrix product per layer; every layer by its rule.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    records, errors = layer_records(net, params, x, y)
    return _square_sums(records, errors, jnp.ones(errors[0].shape[0], errors[0].dtype))


def variance_from_sums(square_sum: Any, grad_sum: Any, batch: int) -> Any:
    """``max(0, Σ(g²)/B − (Σg/B)²)`` per element, exactly ``0`` for ``B = 1``.

    The two sums are computed independently, so where the per-example gradients (nearly) agree
    the difference cancels to a few units of roundoff of ``Σ(g²)/B``, of either sign; the
    variance is non-negative, so a negative difference is roundoff and is clipped to 0, and a
    batch of one has no spread at all.
    """

    def one(s: Array, g: Array) -> Array:
        if batch == 1:
            return jnp.zeros_like(s)
        return jnp.maximum(s / batch - (g / batch) ** 2, 0)

    return jax.tree.map(one, square_sum, grad_sum)


@compiled()
def variance(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The per-element variance of the per-example gradients over the batch.

    ``(1/B) Σ_n (∇C_n)² − ((1/B) Σ_n ∇C_n)²`` (the population variance, as BackPACK's), from
    :func:`sum_grad_squared` and the batch gradient. Never negative: where the one-pass formula
    cancels below zero it is roundoff, clipped to 0, and a batch of one gives exactly 0
    (:func:`variance_from_sums`).

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    records, errors = layer_records(net, params, x, y)
    batch = errors[0].shape[0]
    ones = jnp.ones(batch, errors[0].dtype)
    sgs = _square_sums(records, errors, ones)
    grad_sum = [rules.weighted_grads(r, e, ones) for r, e in zip(records, errors, strict=True)]
    return variance_from_sums(sgs, grad_sum, batch)


def clip_scale(sq_norms: Array, max_norm: Any) -> Array:
    """``s_n = min(1, c / ‖g_n‖)`` from ``‖g_n‖²`` (``1`` where ``‖g_n‖ = 0``: nothing to clip)."""
    c = jnp.asarray(max_norm, sq_norms.dtype)
    norm = jnp.sqrt(sq_norms)
    return jnp.where(norm > c, c / jnp.where(norm > c, norm, c), jnp.ones_like(norm))


@compiled(positive=("max_norm",))
def clipped_grad(net: Any, params: Params, x: Array, y: Array, max_norm: float) -> Grads:
    """The mean of per-example gradients clipped to norm ``max_norm`` (DP-SGD's clipping).

    ``(1/B) Σ_n s_n ∇_θ C_n`` with ``s_n = min(1, c / ‖∇_θ C_n‖)``. ``‖∇_θ C_n‖²`` is the sum of
    :func:`batch_l2_grad`'s leaves (closed forms, no per-example gradient materialised where the
    layer's rule has one: Dense, and the Gram form for sequences and convolutions); the clipped
    sum is each layer's own backward from its recorded error with row ``n`` scaled by
    ``s_n / B`` (ghost clipping). (Add the noise and rescale as your DP-SGD variant prescribes.)

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      max_norm: the clipping norm ``c > 0`` (a Python number or a scalar array).

    Returns:
      Like params.

    Raises:
      ValueError: ``max_norm`` not a positive scalar (checked when it is concrete; a traced one
        that is not positive makes the result NaN).
    """
    check_positive(max_norm, "max_norm")
    records, errors = layer_records(net, params, x, y)
    scale = clip_scale(example_sq_norms(records, errors), max_norm) / errors[0].shape[0]
    scale = scale * positive_poison(max_norm, scale.dtype)  # a traced c ≤ 0 or NaN: NaN
    return [rules.weighted_grads(r, e, scale) for r, e in zip(records, errors, strict=True)]
