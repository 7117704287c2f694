"""Per-example first-order quantities: contractions of ``δ^l_n`` with ``a^{l-1}_n``, no vmap(grad).

``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ`` and ``∇_{b^l} C_n = δ^l_n``: :func:`batch_grad`,
:func:`batch_l2_grad`, :func:`sum_grad_squared`, :func:`variance` and :func:`clipped_grad` each
contract the δ-recursion's per-example errors with the layer inputs of the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from bpjax._types import Array, Grads, Params
from bpjax.extend.passes import check_positive, compiled, example_deltas, forward
from bpjax.layers import DenseCache

__all__ = [
    "batch_grad",
    "batch_l2_grad",
    "clipped_grad",
    "sum_grad_squared",
    "sum_grad_squared_of",
    "variance",
]


@compiled()
def batch_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example gradients ``∇_θ C_n``, each leaf with a leading batch axis.

    ``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ`` and ``∇_{b^l} C_n = δ^l_n``, unscaled: their mean over
    the batch is the gradient of the batch-mean loss.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers.
      params: a list with one ``{"W": (n_l, n_{l-1}), "b": (n_l,)}`` per layer.
      x: inputs of shape ``(batch, n_0)``.
      y: targets as ``net.loss`` takes them.

    Returns:
      Like params, with leaves ``(batch, n_l, n_{l-1})`` and ``(batch, n_l)``.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> g = batch_grad(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> g[0]["W"].shape, g[1]["b"].shape
      ((5, 4, 3), (5, 2))
    """
    fwd = forward(net, params, x, y)
    deltas = example_deltas(net, params, fwd)
    return [
        {"W": d[:, :, None] * c.x[:, None, :], "b": d}
        for d, c in zip(deltas, fwd.caches, strict=True)
    ]


@compiled()
def batch_l2_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example squared L2 norms of each leaf's gradient, shape ``(batch,)`` per leaf.

    ``‖∇_{W^l} C_n‖² = ‖δ^l_n (a^{l-1}_n)ᵀ‖²_F = ‖δ^l_n‖² ‖a^{l-1}_n‖²`` and
    ``‖∇_{b^l} C_n‖² = ‖δ^l_n‖²``: O(batch · n_l) work, no per-example gradient materialised.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params, every leaf of shape ``(batch,)``; the total ``‖∇_θ C_n‖²`` is the sum of the
      leaves.
    """
    fwd = forward(net, params, x, y)
    deltas = example_deltas(net, params, fwd)
    out = []
    for d, c in zip(deltas, fwd.caches, strict=True):
        d2 = jnp.sum(d * d, axis=1)
        out.append({"W": d2 * jnp.sum(c.x * c.x, axis=1), "b": d2})
    return out


def sum_grad_squared_of(deltas: Sequence[Array], caches: Sequence[DenseCache]) -> Grads:
    """``Σ_n (∇_θ C_n)²`` per leaf from the per-example ``δ^l`` and the layers' caches.

    ``(δ^l ∘ δ^l)ᵀ (a^{l-1} ∘ a^{l-1})`` for ``W^l``, ``Σ_n (δ^l_n)²`` for ``b^l``; rows of
    ``deltas`` that are zero (masked padding) add nothing.
    """
    out = []
    for d, c in zip(deltas, caches, strict=True):
        d2 = d * d
        out.append({"W": d2.T @ (c.x * c.x), "b": jnp.sum(d2, axis=0)})
    return out


@compiled()
def sum_grad_squared(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """``Σ_n (∇_θ C_n)²``, elementwise per leaf.

    ``Σ_n (δ^l_n (a^{l-1}_n)ᵀ)² = (δ^l ∘ δ^l)ᵀ (a^{l-1} ∘ a^{l-1})`` for ``W^l`` and
    ``Σ_n (δ^l_n)²`` for ``b^l``: one matrix product per layer.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    fwd = forward(net, params, x, y)
    return sum_grad_squared_of(example_deltas(net, params, fwd), fwd.caches)


@compiled()
def variance(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The per-element variance of the per-example gradients over the batch.

    ``(1/B) Σ_n (∇C_n)² − ((1/B) Σ_n ∇C_n)²`` (the population variance, as BackPACK's), from
    :func:`sum_grad_squared` and the batch gradient ``(1/B) (δ^l)ᵀ a^{l-1}``.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    fwd = forward(net, params, x, y)
    deltas = example_deltas(net, params, fwd)
    batch = deltas[0].shape[0]
    sgs = sum_grad_squared_of(deltas, fwd.caches)
    out = []
    for s, d, c in zip(sgs, deltas, fwd.caches, strict=True):
        mean = {"W": d.T @ c.x / batch, "b": jnp.sum(d, axis=0) / batch}
        out.append({k: s[k] / batch - mean[k] ** 2 for k in ("W", "b")})
    return out


@compiled(positive=("max_norm",))
def clipped_grad(net: Any, params: Params, x: Array, y: Array, max_norm: float) -> Grads:
    """The mean of per-example gradients clipped to norm ``max_norm`` (DP-SGD's clipping).

    ``(1/B) Σ_n s_n ∇_θ C_n`` with ``s_n = min(1, c / ‖∇_θ C_n‖)``, ``‖∇_θ C_n‖²`` summed over
    every leaf by :func:`batch_l2_grad`'s ``‖δ_n‖² (‖a_n‖² + 1)``. The clipped sum is the
    δ-recursion's own weight gradient with scaled errors, ``(s ∘ δ^l)ᵀ a^{l-1}``: no per-example
    gradient is materialised. (Add the noise and rescale as your DP-SGD variant prescribes.)

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      max_norm: the clipping norm ``c > 0`` (a Python number or a scalar array).

    Returns:
      Like params.

    Raises:
      ValueError: ``max_norm`` not a positive scalar (checked when it is concrete).
    """
    check_positive(max_norm, "max_norm")
    fwd = forward(net, params, x, y)
    deltas = example_deltas(net, params, fwd)
    dtype = deltas[0].dtype
    batch = deltas[0].shape[0]
    sq = sum(
        jnp.sum(d * d, axis=1) * (jnp.sum(c.x * c.x, axis=1) + 1)
        for d, c in zip(deltas, fwd.caches, strict=True)
    )
    c = jnp.asarray(max_norm, dtype)
    # s_n = min(1, c/‖g_n‖); ‖g_n‖ = 0 gives s_n = 1 (nothing to clip)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > c, c / jnp.where(norm > c, norm, c), jnp.ones_like(norm)) / batch
    out = []
    for d, cache in zip(deltas, fwd.caches, strict=True):
        sd = d * scale[:, None]
        out.append({"W": sd.T @ cache.x, "b": jnp.sum(sd, axis=0)})
    return out
