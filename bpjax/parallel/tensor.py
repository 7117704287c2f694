"""Tensor parallelism: the rows of every ``W^l`` split over a model axis, collectives written out.

Per layer, with ``a^{l-1}`` whole on every model shard: ``z^l_m`` and ``a^l_m`` local, then an
all-gather of ``a^l`` forward, and a reduce-scatter of ``δ^l W^l`` backward (the maths is in
:mod:`bpjax.parallel`). Dense layers only: :func:`check_dense_net`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bpjax._types import Array, Grads, Params
from bpjax.activations import ACTIVATIONS
from bpjax.extend import passes
from bpjax.layers import Dense
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
    "check_dense_net",
    "data_tensor_parallel",
    "sharded_layers",
    "tensor_parallel",
    "tensor_parallel_specs",
]

# Activations known to act elementwise: a row-sharded hidden layer applies them to its own slice.
_ELEMENTWISE = tuple(a for a in ACTIVATIONS.values() if a.name != "softmax")


def check_dense_net(net: Any) -> tuple[Dense, ...]:
    """``net``'s layers, or a ``TypeError`` unless it is a network of Dense layers on vectors."""
    if not isinstance(net, Serial):
        raise TypeError(
            f"net: tensor parallelism shards Dense layers: expected a bpjax.MLP or a bpjax.serial "
            f"network of bpjax.layers.Dense layers, got {type(net).__name__}."
        )
    return passes.check_dense_net(net, purpose="tensor parallelism shards")


def sharded_layers(net: Any, model: int) -> tuple[bool, ...]:
    """Which layers have their rows split over a model axis of size ``model``."""
    layers = check_dense_net(net)
    if model == 1:
        return (False,) * len(layers)
    sharded = tuple(layer.n_out % model == 0 for layer in layers)
    for i, (layer, split) in enumerate(zip(layers[:-1], sharded[:-1], strict=True)):
        if split and layer.activation not in _ELEMENTWISE:
            raise ValueError(
                f"net: layer {i} ({layer.n_out} units, activation {layer.activation.name!r}) "
                f"would be split over the model axis of size {model}, but a row-sharded hidden "
                f"layer needs an elementwise built-in activation (not softmax or a user "
                f"activation); change its width so that {model} does not divide it, or its "
                f"activation."
            )
    return sharded


def tensor_parallel_specs(net: Any, mesh: Mesh, axis: str = "model") -> list[dict[str, P]]:
    """The :class:`~jax.sharding.PartitionSpec` of each param under tensor parallelism.

    ``W^l`` is split by rows, ``P(axis, None)``, and ``b^l`` as ``P(axis)`` where the axis size
    ``M`` divides ``n_l``; other layers are replicated, ``P()``. Put params on the mesh with
    ``jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))``.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers.
      mesh: a :class:`jax.sharding.Mesh` with axis ``axis``.
      axis: the model axis.

    Returns:
      A list with one ``{"W": PartitionSpec, "b": PartitionSpec}`` per layer.

    Example:
      >>> import bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> mesh = bp.parallel.device_mesh(1, 1)  # a model axis of 1: nothing split
      >>> tensor_parallel_specs(net, mesh)[0]
      {'W': P(), 'b': P()}
    """
    model = check_mesh_axis(mesh, axis, "axis")
    return [
        {"W": P(axis, None), "b": P(axis)} if split else {"W": P(), "b": P()}
        for split in sharded_layers(net, model)
    ]


def _tensor_local(
    net: Any,
    sharded: tuple[bool, ...],
    model_axis: str,
    data_axis: str | None,
    params: Params,
    x: Array,
    y: Array,
    w: Array,
) -> tuple[Array, Grads]:
    """One device's forward and δ-recursion with the model-axis collectives written out."""
    layers = net.layers
    last = len(layers) - 1
    shard = jax.lax.axis_index(model_axis)

    def gather(v: Array) -> Array:  # all-gather over the model axis, (B, n/M) -> (B, n)
        return jax.lax.all_gather(v, model_axis, axis=1, tiled=True, to="invarying")

    def own_columns(v: Array, width: int) -> Array:  # this shard's slice of a whole (B, n)
        return jax.lax.dynamic_slice_in_dim(v, shard * width, width, axis=1)

    # forward: a^{l-1} whole, z^l_m and a^l_m local, then a^l = all_gather(a^l_m)
    a = x
    caches = []
    for l, (layer, layer_params) in enumerate(zip(layers, params, strict=True)):
        a_local, cache = layer.forward(layer_params, a)  # z^l_m = a^{l-1} (W^l_m)ᵀ + b^l_m
        caches.append(cache)
        if l < last:
            a = gather(a_local) if sharded[l] else a_local
    z_out = gather(caches[-1].z) if sharded[-1] else caches[-1].z  # z^L whole for the loss
    out_act = layers[-1].activation
    a_out = out_act.forward(z_out)
    y = net.check_targets(y, z_out)  # z^L has the output's shape, (B, n_L)
    per_example = net.output_loss(z_out, a_out, y)
    fused = net.fused
    if fused is not None:
        delta = fused.delta(z_out, a_out, y)
    else:
        delta = out_act.backward(z_out, a_out, net.objective.grad(z_out, a_out, y))
    delta = delta * w[:, None]  # δ^L_n w_n: the batch mean's weights, applied once
    loss = jnp.sum(w * per_example)

    # backward: local grads, then ∂C/∂a^{l-1} = Σ_m δ^l_m W^l_m by reduce-scatter (or psum)
    grads: list[Any] = [None] * len(layers)
    if sharded[-1]:
        delta = own_columns(delta, caches[-1].z.shape[1])  # δ^L_m
    for l in reversed(range(len(layers))):
        grads[l], partial = layers[l].backward_delta(params[l], caches[l], delta)
        if l == 0:
            break
        if sharded[l] and sharded[l - 1]:
            dy = jax.lax.psum_scatter(partial, model_axis, scatter_dimension=1, tiled=True)
        elif sharded[l]:
            dy = jax.lax.psum(partial, model_axis)  # the layer below is whole: all-reduce
        elif sharded[l - 1]:
            dy = own_columns(partial, caches[l - 1].z.shape[1])  # whole δW: take own columns
        else:
            dy = partial
        delta = layers[l - 1].delta(caches[l - 1], dy)  # δ^{l-1}_m = f'(z^{l-1}_m) ∘ dy_m
    if data_axis is not None:
        loss, grads = jax.lax.psum((loss, grads), data_axis)  # all-reduce over the data axis
    return loss, grads


def data_tensor_parallel(
    net: Any, mesh: Mesh, *, data_axis: str | None = "data", model_axis: str = "model"
) -> Callable[[Params, Array, Array], tuple[Array, Grads]]:
    """A jitted ``(params, x, y) -> (loss, grads)`` on a 2-D mesh: batch × rows of ``W^l``.

    The batch is split over ``data_axis`` (padded and masked as in :func:`data_parallel`) and the
    rows of every ``W^l`` whose width the model axis size divides over ``model_axis``
    (:func:`tensor_parallel_specs`); the forward and the δ-recursion run with the collectives
    of the module docstring: all-gather of activations forward, reduce-scatter of ``δ^l W^l``
    backward, within each data shard, and the weight gradients all-reduced over ``data_axis``.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers on ``(batch, n_0)`` inputs.
      mesh: a :class:`jax.sharding.Mesh` with both axes.
      data_axis: the batch axis, or ``None`` for tensor parallelism alone (the batch replicated).
      model_axis: the axis the rows of ``W^l`` are split over.

    Returns:
      ``step(params, x, y) -> (loss, grads)``, jitted; the grads of split layers come back
      sharded by rows over ``model_axis``, equal to ``net.value_and_grad`` on the whole batch.

    Raises:
      TypeError: a network with layers other than Dense.
      ValueError: an axis the mesh lacks, or a split hidden layer with a non-elementwise
        activation.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
      >>> loss, grads = data_tensor_parallel(net, bp.parallel.device_mesh(1, 1))(params, x, y)
      >>> bool(jnp.allclose(loss, net.loss(params, x, y)))
      True
    """
    model = check_mesh_axis(mesh, model_axis, "model_axis")
    shards = 1 if data_axis is None else check_mesh_axis(mesh, data_axis, "data_axis")
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis: must differ from model_axis, both are {model_axis!r}.")
    sharded = sharded_layers(net, model)
    param_specs = [
        {"W": P(model_axis, None), "b": P(model_axis)} if split else {"W": P(), "b": P()}
        for split in sharded
    ]
    batch_spec = P() if data_axis is None else P(data_axis)

    def local(params: Params, x: Array, y: Array, w: Array) -> tuple[Array, Grads]:
        return _tensor_local(net, sharded, model_axis, data_axis, params, x, y, w)

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs, batch_spec, batch_spec, batch_spec),
        out_specs=(P(), param_specs),
    )

    def step(params: Params, x: Array, y: Array) -> tuple[Array, Grads]:
        batch, x = check_global_batch(net, params, x, y)
        dtype = param_dtype(params)
        xp, yp, mask = pad(x, jnp.asarray(y), shards, dtype)
        w = mask / jnp.asarray(batch, dtype)
        params = place(params, mesh, param_specs)
        xp, yp, w = place((xp, yp, w), mesh, batch_spec)
        return run(params, xp, yp, w)

    return checking_labels(net, jax.jit(step))


def tensor_parallel(
    net: Any, mesh: Mesh, axis: str = "model"
) -> Callable[[Params, Array, Array], tuple[Array, Grads]]:
    """:func:`data_tensor_parallel` with no data axis: the rows of ``W^l`` split over ``axis``.

    Every device holds the whole batch; see the module docstring for the collectives.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> step = tensor_parallel(net, bp.parallel.device_mesh(1, 1))
      >>> loss, grads = step(params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> grads[0]["W"].shape
      (4, 3)
    """
    return data_tensor_parallel(net, mesh, data_axis=None, model_axis=axis)
