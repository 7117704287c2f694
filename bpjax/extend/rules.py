"""Per-layer extension rules: per-example gradients and their sums, from a layer's recorded error.

For any layer, example ``n``'s gradient ``∇_θ C_n`` is the layer's own backward applied to that
example's row of the error the δ-recursion recorded at the layer (``δ = ∂C_n/∂z`` for a layer
with a weighted input, ``∂C_n/∂y`` at its output otherwise) and of its cache. Every quantity of
:mod:`bpjax.extend` is built from four rules, each of which a layer may define beside its
backward (a closed form). A layer without ``example_grads``, a user's
:class:`~bpjax.layers.Layer` included, gets the **generic rule**: its ``backward`` (or
``backward_delta``) under ``jax.vmap`` over the batch, one example at a time; the other three
rules, where a layer does not define them, are computed from its ``example_grads`` (its own or
the generic one)::

    example_grads(params, cache, error)                -> like params, leaves (batch, *leaf)
        g_n = ∇_θ C_n
    example_sq_norms(params, cache, error)             -> like params, leaves (batch,)
        ‖g_n‖² per leaf
    square_sum(params, cache, errors, weights)         -> like params
        Σ_c Σ_n w_{c,n} (g_{c,n})²   (elementwise)
    example_square_sums(params, cache, errors, weights) -> like params, leaves (batch, *leaf)
        Σ_c w_{c,n} (g_{c,n})²

``error`` is ``(batch, ...)``, shaped as the layer records it, unscaled (``w_n = 1``);
``errors`` is ``(k, batch, ...)``, ``k`` errors per example (the columns of a loss-Hessian
factor sent down the recursion, or ``k = 1``), and ``g_{c,n}`` the gradient from column ``c``
of example ``n``; ``weights`` is ``(k, batch)``. Weighted sums of gradients need no rule: a
backward is linear in its error, so ``Σ_n w_n g_n`` is the backward of ``w_n error_n``
(:func:`weighted_grads`).

The generic rule needs to know which axis of each cache leaf is the batch. It finds out from
the layer's forward itself: ``jax.eval_shape`` of the network's forward on a batch one larger
(:func:`batch_axes`); the axis whose size moved from ``B`` to ``B + 1`` is the batch, a leaf
whose shape did not move is shared by all examples. A cache leaf that mixes the batch with
another axis (``(B·T, …)``) cannot be split this way and gets a ``TypeError`` asking for a rule.
The rules assume examples do not interact in the forward (no batch statistics), as per-example
gradients do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array
from bpjax.layers import column_sum

__all__ = [
    "RULES",
    "LayerRecord",
    "batch_axes",
    "example_grads",
    "example_sq_norms",
    "example_square_sums",
    "has_rule",
    "layer_grads",
    "records",
    "square_sum",
    "weighted_grads",
]

RULES = ("example_grads", "example_sq_norms", "square_sum", "example_square_sums")
"""The extension rules a layer may define as methods (the module docstring gives the maths)."""


class LayerRecord(NamedTuple):
    """What the forward and the δ-recursion leave for one layer, as the rules take it."""

    position: int  # the layer's index in the network (0-based), for messages
    layer: Any
    params: Any
    cache: Any  # the layer's own cache, from its forward (batch B)
    axes: tuple[int | None, ...]  # per flattened cache leaf: its batch axis, None if shared


def has_rule(layer: Any, rule: str) -> bool:
    """Whether ``layer`` defines the closed form ``rule`` (one of :data:`RULES`)."""
    return callable(getattr(layer, rule, None))


def _has_params(params: Any) -> bool:
    return bool(jax.tree.leaves(params))


def layer_grads(layer: Any, params: Any, cache: Any, error: Array) -> Any:
    """``Σ_n`` over the error's rows of the layer's gradient: its backward from ``error``."""
    if hasattr(layer, "backward_delta"):
        return layer.backward_delta(params, cache, error)[0]
    return layer.backward(params, cache, error)[0]


def _scale_rows(error: Array, weights: Array) -> Array:
    return error * weights.astype(error.dtype).reshape(-1, *([1] * (error.ndim - 1)))


def weighted_grads(record: LayerRecord, error: Array, weights: Array) -> Any:
    """``Σ_n w_n g_n``: the layer's backward from the error with row ``n`` scaled by ``w_n``."""
    return layer_grads(record.layer, record.params, record.cache, _scale_rows(error, weights))


def batch_axes(net: Any, params: Any, cache: Any) -> list[tuple[int | None, ...]]:
    """Each layer's cache leaves' batch axes, from the network's forward on a batch one larger.

    Args:
      net: the network (its ``forward``).
      params: its params (only their shapes are read).
      cache: the network's :class:`~bpjax.network.Cache` from a forward on ``B`` examples.

    Returns:
      One tuple per layer, an entry per flattened leaf of its cache: the batch axis, or ``None``.

    Raises:
      TypeError: a cache leaf whose shape moves in more than one axis, or not by one example.
    """
    x = cache.x
    batch = x.shape[0]
    bigger = jax.ShapeDtypeStruct((batch + 1, *x.shape[1:]), x.dtype)
    spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params)
    big_cache = jax.eval_shape(lambda p, xs: net.forward(p, xs)[1], spec, bigger)
    out = []
    for i, (small, big) in enumerate(zip(cache.layers, big_cache.layers, strict=True)):
        axes: list[int | None] = []
        for leaf, big_leaf in zip(jax.tree.leaves(small), jax.tree.leaves(big), strict=True):
            s, b = jnp.shape(leaf), big_leaf.shape
            moved = [ax for ax, (u, v) in enumerate(zip(s, b, strict=True)) if u != v]
            if not moved:
                axes.append(None)
            elif len(moved) == 1 and (s[moved[0]], b[moved[0]]) == (batch, batch + 1):
                axes.append(moved[0])
            else:
                raise TypeError(
                    f"net: layer {i} ({type(net.layers[i]).__name__}) keeps a cache leaf of shape "
                    f"{s} whose batch axis cannot be found (at batch {batch + 1} it is {b}); "
                    "the generic per-example rule slices each leaf along one batch axis. Keep "
                    "the batch as an axis of its own, or give the layer the rules "
                    "example_grads, example_sq_norms, square_sum, example_square_sums."
                )
        out.append(tuple(axes))
    return out


def records(net: Any, params: Sequence[Any], cache: Any) -> list[LayerRecord]:
    """A :class:`LayerRecord` per layer of ``net`` from its params and a forward's cache."""
    axes = batch_axes(net, params, cache)
    return [
        LayerRecord(i, layer, p, c, ax)
        for i, (layer, p, c, ax) in enumerate(
            zip(net.layers, params, cache.layers, axes, strict=True)
        )
    ]


def _generic_example_grads(record: LayerRecord, error: Array) -> Any:
    leaves, treedef = jax.tree.flatten(record.cache)

    def one(leaves_n: list[Any], error_n: Array) -> Any:
        restored = [
            leaf if ax is None else jnp.expand_dims(leaf, ax)
            for leaf, ax in zip(leaves_n, record.axes, strict=True)
        ]
        cache_n = jax.tree.unflatten(treedef, restored)
        return layer_grads(record.layer, record.params, cache_n, error_n[None])

    return jax.vmap(one, in_axes=(list(record.axes), 0))(leaves, error)


def _example_grads(record: LayerRecord, error: Array) -> Any:
    if has_rule(record.layer, "example_grads"):
        return record.layer.example_grads(record.params, record.cache, error)
    return _generic_example_grads(record, error)


def example_grads(record: LayerRecord, error: Array) -> Any:
    """``g_n = ∇_θ C_n`` for every example: like params, leaves ``(batch, *leaf)``."""
    if not _has_params(record.params):
        return record.params
    return _example_grads(record, error)


def example_sq_norms(record: LayerRecord, error: Array) -> Any:
    """``‖g_n‖²`` per leaf: like params, leaves ``(batch,)``."""
    if not _has_params(record.params):
        return record.params
    if has_rule(record.layer, "example_sq_norms"):
        return record.layer.example_sq_norms(record.params, record.cache, error)
    grads = _example_grads(record, error)
    return jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), grads)


def square_sum(record: LayerRecord, errors: Array, weights: Array) -> Any:
    """``Σ_c Σ_n w_{c,n} (g_{c,n})²``, like params; ``errors`` ``(k, batch, ...)``, ``weights``
    ``(k, batch)``."""
    if not _has_params(record.params):
        return record.params
    if has_rule(record.layer, "square_sum"):
        return record.layer.square_sum(record.params, record.cache, errors, weights)

    def term(error: Array, w: Array) -> Any:
        grads = _example_grads(record, error)
        return jax.tree.map(lambda g: jnp.tensordot(w.astype(g.dtype), g * g, axes=1), grads)

    return column_sum(term, errors, weights)


def example_square_sums(record: LayerRecord, errors: Array, weights: Array) -> Any:
    """``Σ_c w_{c,n} (g_{c,n})²`` per example: like params, leaves ``(batch, *leaf)``."""
    if not _has_params(record.params):
        return record.params
    if has_rule(record.layer, "example_square_sums"):
        return record.layer.example_square_sums(record.params, record.cache, errors, weights)

    def term(error: Array, w: Array) -> Any:
        return jax.tree.map(lambda g: _scale_rows(g * g, w), _example_grads(record, error))

    return column_sum(term, errors, weights)
