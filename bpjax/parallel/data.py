"""Data parallelism: the batch split over a mesh axis, one all-reduce of the weighted sums.

Each shard runs the network's forward and δ-recursion on its rows with per-example weights
``w_n = 1/B`` (``0`` on padding rows) in the output error, through the network protocol
(``net.output_error(cache, y, weights=w)`` and ``net.backprop``), so every network takes the one
code path; ``psum`` over the data axis adds the shards (the maths is in :mod:`bpjax.parallel`).
:func:`data_parallel_extend` does the same for the batch sums of :mod:`bpjax.extend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bpjax._types import Array, Params
from bpjax.extend import rules
from bpjax.extend.first_order import batch_grad, batch_l2_grad, variance_from_sums
from bpjax.extend.kfac import check_kfac_net, layer_kfac_factors
from bpjax.extend.passes import check_net, example_deltas, forward
from bpjax.extend.second_order import batch_diag_ggn, column_weights, curvature_deltas
from bpjax.network import Serial
from bpjax.parallel.mesh import (
    check_global_batch,
    check_mesh_axis,
    checking_labels,
    pad,
    param_dtype,
    place,
)

__all__ = [
    "DATA_PARALLEL_QUANTITIES",
    "data_parallel",
    "data_parallel_extend",
    "weighted_value_and_grad",
]

DATA_PARALLEL_QUANTITIES = (
    "batch_diag_ggn",
    "batch_grad",
    "batch_l2_grad",
    "diag_ggn",
    "kfac_factors",
    "sum_grad_squared",
    "variance",
)
"""The :mod:`bpjax.extend` quantities :func:`data_parallel_extend` computes over a data axis."""


def _check_any_net(net: Any) -> None:
    if not isinstance(net, Serial):
        raise TypeError(f"net: expected a bpjax.MLP or a bpjax.serial network, got {type(net)}.")


def weighted_value_and_grad(
    net: Serial, params: Any, x: Array, y: Array, w: Array
) -> tuple[Array, Any]:
    """``(Σ_n w_n C_n, Σ_n w_n ∇_θ C_n)`` by the forward pass and the δ-recursion.

    The batch-mean ``value_and_grad`` is the case ``w_n = 1/B``; here the weights scale the
    output error (``net.output_error(..., weights=w)``) and ``net.backprop`` runs as always, for
    any network. ``w`` has shape ``(batch,)``.
    """
    out, cache = net.forward(params, x)
    y = net.check_targets(y, out)
    per_example = net.example_losses(cache, y)
    grads, _, _ = net.backprop(params, cache, net.output_error(cache, y, weights=w))
    return jnp.sum(w * per_example), grads


def data_parallel(
    net: Serial, mesh: Mesh, axis: str = "data"
) -> Callable[[Any, Array, Array], tuple[Array, Any]]:
    """A jitted ``(params, x, y) -> (loss, grads)`` with the batch sharded over ``mesh``'s ``axis``.

    Each of the ``D`` shards runs ``net``'s forward and δ-recursion on its ``⌈B/D⌉`` rows with
    the output error scaled by ``w_n = 1/B`` (``0`` for padding rows, see the module docstring),
    then ``psum`` over ``axis`` adds the shards' weighted sums::

        C = psum_d Σ_{n∈d} w_n C_n,   ∇_θ C = psum_d Σ_{n∈d} w_n ∇_θ C_n

    equal to ``net.value_and_grad`` on the whole batch, for any ``B`` (no divisibility needed).
    Params are replicated; other mesh axes (a model axis) replicate the work.

    Args:
      net: a :class:`bpjax.MLP` or a :func:`bpjax.serial` network (evaluation mode: no dropout
        key).
      mesh: a :class:`jax.sharding.Mesh`, e.g. :func:`device_mesh`.
      axis: the mesh axis the batch is split over.

    Returns:
      ``step(params, x, y) -> (loss, grads)``, jitted: ``x`` of shape ``(batch, ...)``, ``y`` as
      ``net.loss`` takes it; ``loss`` a scalar and ``grads`` with the params' structure, both
      replicated over the mesh. Multi-host: pass global arrays (e.g. from
      :func:`jax.make_array_from_process_local_data`).

    Raises:
      TypeError: ``net`` or ``mesh`` of the wrong type.
      ValueError: ``axis`` not an axis of ``mesh``; at trace time an empty batch, ``y``
        whose batch differs from ``x``'s, or what ``net.loss`` refuses (params, ``x``, ``y``),
        named with the whole batch's shapes.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
      >>> step = data_parallel(net, bp.parallel.device_mesh())
      >>> loss, grads = step(params, x, y)
      >>> bool(jnp.allclose(loss, net.loss(params, x, y)))
      True
    """
    _check_any_net(net)
    shards = check_mesh_axis(mesh, axis, "axis")

    def local(params: Any, x: Array, y: Array, w: Array) -> tuple[Array, Any]:
        loss, grads = weighted_value_and_grad(net, params, x, y, w)
        return jax.lax.psum(loss, axis), jax.lax.psum(grads, axis)  # all-reduce over the data axis

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=(P(), P())
    )

    def step(params: Any, x: Array, y: Array) -> tuple[Array, Any]:
        batch, x = check_global_batch(net, params, x, y)
        dtype = param_dtype(params)
        xp, yp, mask = pad(x, jnp.asarray(y), shards, dtype)
        w = mask / jnp.asarray(batch, dtype)
        params = place(params, mesh, P())
        xp, yp, w = place((xp, yp, w), mesh, P(axis))
        return sharded(params, xp, yp, w)

    return checking_labels(net, jax.jit(step))


def _local_quantity(
    net: Any, quantity: str, batch: int, params: Params, x: Array, y: Array, mask: Array, axis: str
) -> Any:
    """One shard's contribution to ``quantity``, all-reduced over ``axis`` where it is a sum.

    The layers' rules (:mod:`bpjax.extend.rules`) take per-example weights: the padding rows
    get weight 0, so they add nothing to a sum, and per-example quantities keep them (dropped
    after the gather).
    """
    if quantity == "batch_grad":
        return batch_grad(net, params, x, y)
    if quantity == "batch_l2_grad":
        return batch_l2_grad(net, params, x, y)
    if quantity == "batch_diag_ggn":
        # each example's share is (1/B_local) Σ_c ...: rescale to the global batch's 1/B
        share = batch_diag_ggn(net, params, x, y)
        return jax.tree.map(lambda v: v * (mask.shape[0] / batch), share)
    fwd = forward(net, params, x, y)
    records = rules.records(net, params, fwd.cache)
    if quantity in ("sum_grad_squared", "variance"):
        errors = example_deltas(net, params, fwd)
        pairs = zip(records, errors, strict=True)
        sgs = jax.lax.psum([rules.square_sum(r, e[None], mask[None]) for r, e in pairs], axis)
        if quantity == "sum_grad_squared":
            return sgs
        grad_sum = [rules.weighted_grads(r, e, mask) for r, e in zip(records, errors, strict=True)]
        return variance_from_sums(sgs, jax.lax.psum(grad_sum, axis), batch)
    column_deltas, signs = curvature_deltas(net, params, fwd)
    k = column_deltas[0].shape[0]
    weights = column_weights(signs, k, mask.shape[0], mask.dtype) * mask[None, :]
    weights = weights * (mask.shape[0] / batch)  # 1/B of the whole batch, not the shard's
    if quantity == "diag_ggn":
        out = [rules.square_sum(r, d, weights) for r, d in zip(records, column_deltas, strict=True)]
        return jax.lax.psum(out, axis)
    # kfac_factors: each layer's own factors (checked by check_kfac_net), A with v_n = mask_n / B
    factors = layer_kfac_factors(net, params, fwd, column_deltas, weights, mask / batch)
    return jax.lax.psum(factors, axis)


def data_parallel_extend(
    net: Any, mesh: Mesh, quantity: str, axis: str = "data"
) -> Callable[[Params, Array, Array], Any]:
    """A jitted ``(params, x, y) -> quantity`` of :mod:`bpjax.extend`, the batch split on a mesh.

    The batch sums reduce as the gradient does: each shard computes its rows' sum by the layers'
    own rules (:mod:`bpjax.extend.rules`, the same as :mod:`bpjax.extend`'s) with weight 0 on
    its padding rows, then ``psum`` over ``axis``::

        sum_grad_squared  psum_d Σ_{n∈d} (g_n)²
        variance          max(0, psum_d(Σ_n (g_n)²)/B − (psum_d(Σ_n g_n)/B)²)
        diag_ggn          psum_d Σ_{n∈d} Σ_c d_{n,c} (g_{n,c})² / B
        kfac_factors      A = psum_d Σ_{n∈d} ā_n ā_nᵀ / B,  G = psum_d Σ_{n∈d} Σ_c d_{n,c} δ δᵀ / B
                          (per layer by its own kfac_factors, as bpjax.extend's: Dense, and
                          Conv2D's KFC over patches with A's mean over positions; any other
                          layer with params its GGN diagonal, a KFACDiagonal, as diag_ggn)

    The per-example ``batch_grad``, ``batch_l2_grad`` and ``batch_diag_ggn`` need no
    collective: they stay sharded over ``axis`` on their batch axis, padding rows dropped.

    Args:
      net: a :class:`bpjax.MLP` or a :func:`bpjax.serial` network of any layers, recurrent
        (Elman, LSTM) and convolutional ones included.
      mesh: a :class:`jax.sharding.Mesh`.
      quantity: one of :data:`DATA_PARALLEL_QUANTITIES`.
      axis: the mesh axis the batch is split over.

    Returns:
      ``f(params, x, y)``, jitted, equal to ``bpjax.extend.<quantity>(net, params, x, y)``.

    Raises:
      ValueError: an unknown ``quantity`` or ``axis``.
      TypeError: ``net`` not a network.
    """
    check_net(net)
    shards = check_mesh_axis(mesh, axis, "axis")
    if quantity not in DATA_PARALLEL_QUANTITIES:
        raise ValueError(
            f"quantity: expected one of {', '.join(DATA_PARALLEL_QUANTITIES)}, got {quantity!r}."
        )
    per_example = quantity in ("batch_grad", "batch_l2_grad", "batch_diag_ggn")
    out_spec = P(axis) if per_example else P()

    def run(params: Params, x: Array, y: Array) -> Any:
        batch, x = check_global_batch(net, params, x, y)
        if quantity == "kfac_factors":
            check_kfac_net(net, params)
        dtype = param_dtype(params)
        xp, yp, mask = pad(x, jnp.asarray(y), shards, dtype)

        def local(params: Params, x: Array, y: Array, mask: Array) -> Any:
            return _local_quantity(net, quantity, batch, params, x, y, mask, axis)

        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=out_spec
        )
        params = place(params, mesh, P())
        xp, yp, mask = place((xp, yp, mask), mesh, P(axis))
        out = sharded(params, xp, yp, mask)
        if per_example:
            out = jax.tree.map(lambda leaf: leaf[:batch], out)
        return out

    return checking_labels(net, jax.jit(run))
