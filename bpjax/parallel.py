"""The hand-written backward sharded over many devices and hosts: data, tensor and 2-D parallel.

Everything here runs the δ-recursion of the README per shard inside :func:`jax.shard_map`, with the
collectives that the maths needs written out. ``B`` is the global batch, ``D`` the size of the
mesh's data axis and ``M`` that of its model axis.

Data parallel (:func:`data_parallel`). The batch mean is a sum over examples,
``∇C = Σ_n w_n ∇C_n`` with ``w_n = 1/B``, so each shard ``d`` runs the forward and the
δ-recursion on its rows with the output error scaled by ``w_n`` instead of ``1/B_d``, and one
all-reduce over the data axis adds the shards::

    δ^L_{d,n} = w_n ∂C_n/∂z^L_n,   ∇_{W^l} C = psum_d (δ^l_d)ᵀ a^{l-1}_d,   C = psum_d Σ_n w_n C_n

A batch that does not divide by ``D`` is padded to ``⌈B/D⌉·D`` rows (copies of real rows, so
nothing non-finite enters) and the pads get ``w_n = 0``: the weights, not the shard sizes, carry
the ``1/B`` of the true batch. Per-example quantities that are sums over the batch
(:func:`data_parallel_extend`: ``sum_grad_squared``, ``variance``, ``diag_ggn``,
``kfac_factors``) reduce the same way, with the pads masked out.

Tensor parallel (:func:`tensor_parallel`, :func:`data_tensor_parallel`). The rows of ``W^l``
(output features) and ``b^l`` are split over the model axis,
``W^l = [W^l_1; …; W^l_M]``, shard ``m`` holding ``W^l_m`` of shape ``(n_l/M, n_{l-1})``. Per
layer, with ``a^{l-1}`` whole on every shard::

    forward   z^l_m = a^{l-1} (W^l_m)ᵀ + b^l_m                       local, (B, n_l/M)
              a^l_m = f^l(z^l_m)                                    local (elementwise f)
              a^l   = all_gather_m(a^l_m)                           all-gather, (B, n_l)
    output    z^L   = all_gather_m(z^L_m);  C_n, δ^L from the whole z^L (softmax needs all of it)
    backward  ∇_{W^l_m} C = (δ^l_m)ᵀ a^{l-1},  ∇_{b^l_m} C = Σ_n δ^l_{m,n}   local
              ∂C/∂a^{l-1} = δ^l W^l = Σ_m δ^l_m W^l_m                   a sum over shards:
              ∂C/∂a^{l-1}_m = psum_scatter_m(δ^l_m W^l_m)            reduce-scatter, (B, n_{l-1}/M)
              δ^{l-1}_m = (f^{l-1})'(z^{l-1}_m) ∘ ∂C/∂a^{l-1}_m        local

so each hidden layer costs one all-gather forward and one reduce-scatter backward of a
``(B, n_l)`` activation, and no weight ever moves. A layer whose width ``M`` does not divide is
kept whole on every model shard (replicated: computed redundantly, no collective of its own;
the reduce-scatter into it becomes an all-reduce, ``psum``, and out of it a local slice). With a
data axis as well (:func:`data_tensor_parallel`) every collective above runs within one data
shard's model group, and the weight gradients are then all-reduced over the data axis as in data
parallel.

Several hosts: :func:`initialize` wires :func:`jax.distributed.initialize` from environment
variables (one process per host); after it ``jax.devices()`` lists every host's devices, a mesh
over them spans the hosts, and the functions above run unchanged (see the README for a launch).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpjax import activations as _act
from bpjax import extend as _extend
from bpjax._types import Array, Grads, Params
from bpjax.layers import Dense, DenseCache, backprop
from bpjax.mlp import MLP
from bpjax.network import Serial, _positions

__all__ = [
    "DATA_PARALLEL_QUANTITIES",
    "Collective",
    "CommVolume",
    "communication_volume",
    "compiled_collectives",
    "data_parallel",
    "data_parallel_extend",
    "data_tensor_parallel",
    "device_mesh",
    "initialize",
    "tensor_parallel",
    "tensor_parallel_specs",
]

DATA_PARALLEL_QUANTITIES = (
    "batch_grad",
    "batch_l2_grad",
    "diag_ggn",
    "kfac_factors",
    "sum_grad_squared",
    "variance",
)
"""The :mod:`bpjax.extend` quantities :func:`data_parallel_extend` computes over a data axis."""

# Activations known to act elementwise: a row-sharded hidden layer applies them to its own slice.
_ELEMENTWISE = tuple(a for a in _act.ACTIVATIONS.values() if a.name != "softmax")


# -- meshes and hosts ----------------------------------------------------------------------------


def device_mesh(
    data: int | None = None, model: int | None = None, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh over the first ``data × model`` devices, axes ``("data",)`` or ``("data", "model")``.

    Args:
      data: the size of the ``"data"`` axis; ``None`` takes every device (divided by ``model``).
      model: the size of a ``"model"`` axis; ``None`` builds a 1-D data mesh.
      devices: the devices to take them from, in order; ``jax.devices()`` (every host's, after
        :func:`initialize`) by default.

    Returns:
      A :class:`jax.sharding.Mesh` with ``Auto`` axes (arrays it produces mix freely with
      unsharded ones).

    Raises:
      ValueError: a size that is not a positive integer, or more devices asked for than exist
        (the message says how to get more CPU devices).

    Example:
      >>> mesh = device_mesh(1)
      >>> dict(mesh.shape)
      {'data': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("data", data), ("model", model)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}: expected a positive integer or None, got {value!r}.")
    model_size = 1 if model is None else model
    data_size = len(devices) // model_size if data is None else data
    needed = data_size * model_size
    if data_size < 1 or needed > len(devices):
        raise ValueError(
            f"device_mesh: data × model = {data_size if data is not None else '?'} × "
            f"{model_size} needs {max(needed, model_size)} devices, but only {len(devices)} "
            f"exist ({devices[0].platform if devices else 'none'}). On CPU, start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N (or set "
            f"jax.config.update('jax_num_cpu_devices', N) before first use of JAX)."
        )
    shape, names = (
        ((data_size,), ("data",))
        if model is None
        else (
            (data_size, model_size),
            ("data", "model"),
        )
    )
    grid = np.array(devices[:needed], dtype=object).reshape(shape)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-host JAX job: :func:`jax.distributed.initialize`, wired up.

    Call it once per process (one process per host), before any other JAX call. Each argument
    left ``None`` is read from the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
    process 0, reachable from every host), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (0 on the
    coordinator) and ``BPJAX_CPU_DEVICES``; whatever is still unset JAX detects from a cluster
    manager (SLURM, Open MPI, Kubernetes, Cloud TPU) where there is one.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: the number of processes in the job.
      process_id: this process's index, ``0 ≤ process_id < num_processes``.
      cpu_devices: on CPU hosts, how many devices this process exposes (``jax_num_cpu_devices``);
        collectives between CPU processes go over TCP (gloo).
      initialization_timeout: seconds to wait for every process to join.

    Raises:
      ValueError: an environment variable that is not an integer, or a ``process_id`` outside
        ``[0, num_processes)``.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES", num_processes)
    process_id = _env_int("JAX_PROCESS_ID", process_id)
    cpu_devices = _env_int("BPJAX_CPU_DEVICES", cpu_devices)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: expected 0 ≤ process_id < num_processes = {num_processes}, "
            f"got {process_id}."
        )
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {raw!r}.") from None


# -- checks --------------------------------------------------------------------------------------


def _check_mesh_axis(mesh: Any, axis: Any, argname: str) -> int:
    """The size of ``mesh``'s axis ``axis``; raises naming ``argname`` if it has none."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh: expected a jax.sharding.Mesh (bpjax.parallel.device_mesh or "
            f"jax.make_mesh), got {type(mesh).__name__}."
        )
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{argname}: the mesh has no axis {axis!r}; its axes are {tuple(mesh.axis_names)}."
        )
    return int(mesh.shape[axis])


def _check_any_net(net: Any) -> None:
    if not isinstance(net, (MLP, Serial)):
        raise TypeError(f"net: expected a bpjax.MLP or a bpjax.serial network, got {type(net)}.")


def _check_dense_net(net: Any) -> tuple[Dense, ...]:
    if not isinstance(net, (MLP, Serial)):
        raise TypeError(
            f"net: tensor parallelism shards Dense layers: expected a bpjax.MLP or a bpjax.serial "
            f"network of bpjax.layers.Dense layers, got {type(net).__name__}."
        )
    return _extend._check_net(net, purpose="tensor parallelism shards")


def _check_batch(x: Array, y: Array) -> int:
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] < 1:
        raise ValueError(f"x: expected a non-empty batch (batch, ...), got shape {jnp.shape(x)}.")
    batch = int(jnp.shape(x)[0])
    if jnp.ndim(y) < 1 or jnp.shape(y)[0] != batch:
        raise ValueError(
            f"y: expected {batch} targets (the batch of x, shape {jnp.shape(x)}), got shape "
            f"{jnp.shape(y)}."
        )
    return batch


def _param_dtype(params: Any) -> Any:
    leaves = jax.tree.leaves(params)
    if not leaves:
        return jnp.float32
    return jnp.result_type(leaves[0])


def _place(tree: Any, mesh: Mesh, spec: Any) -> Any:
    """``tree`` laid out as ``spec``: a reshard on Explicit mesh axes, else a constraint."""

    def one(leaf: Any, leaf_spec: P) -> Any:
        sharding = NamedSharding(mesh, leaf_spec)
        if all(t == AxisType.Explicit for t in mesh.axis_types):
            return jax.sharding.reshard(leaf, sharding)
        return jax.lax.with_sharding_constraint(leaf, sharding)

    if isinstance(spec, P):
        return jax.tree.map(lambda leaf: one(leaf, spec), tree)
    return jax.tree.map(one, tree, spec, is_leaf=lambda s: isinstance(s, P))


def _pad(x: Array, y: Array, shards: int, dtype: Any) -> tuple[Array, Array, Array]:
    """The batch padded to a multiple of ``shards`` with copies of real rows, and its 0/1 mask."""
    batch = x.shape[0]
    padded = -(-batch // shards) * shards
    mask = (jnp.arange(padded) < batch).astype(dtype)
    if padded == batch:
        return x, y, mask
    rows = jnp.arange(padded) % batch  # copies of real rows: finite, valid targets
    return jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0), mask


# -- data parallel -------------------------------------------------------------------------------


def _mlp_caches(net: MLP, cache: Any) -> list[DenseCache]:
    return [
        DenseCache(x, z, a)
        for x, z, a in zip([cache.x, *cache.a[:-1]], cache.z, cache.a, strict=True)
    ]


def _weighted_value_and_grad(
    net: MLP | Serial, params: Any, x: Array, y: Array, w: Array
) -> tuple[Array, Any]:
    """``(Σ_n w_n C_n, Σ_n w_n ∇_θ C_n)`` by the forward pass and the δ-recursion.

    The batch-mean ``value_and_grad`` is the case ``w_n = 1/B``; here the weights scale the
    output error ``δ^L_n`` (or ``∂C_n/∂a^L_n``) instead of ``1/B``, and :func:`bpjax.backprop`
    runs as always. ``w`` has shape ``(batch,)``.
    """
    if isinstance(net, MLP):
        _, cache = net.forward(params, x)
        y = net._check_targets(y, cache)
        per_example = net.output_loss(cache.z[-1], cache.a[-1], y)
        delta = net.output_delta(cache, y) * w[:, None]
        grads, _, _ = backprop(net.layers, params, _mlp_caches(net, cache), output_delta=delta)
        return jnp.sum(w * per_example), grads
    out, serial_cache = net.forward(params, x)
    y = net._check_targets(y, out)
    per_example = net._output_loss(serial_cache, y)
    # C_n is the mean over the example's output positions: weight w_n / positions per position
    positions = out.size // (out.shape[0] * out.shape[-1])
    scale = (w / positions).reshape(-1, *([1] * (out.ndim - 1)))
    fused = net.fused
    if fused is not None:
        last = serial_cache.layers[-1]
        delta = fused.delta(_positions(last.z), _positions(last.a), y).reshape(out.shape)
        grads, _, _ = backprop(net.layers, params, serial_cache.layers, output_delta=delta * scale)
    else:
        flat = _positions(out)
        error = net.objective.grad(flat, flat, y).reshape(out.shape)
        grads, _, _ = backprop(net.layers, params, serial_cache.layers, output_error=error * scale)
    return jnp.sum(w * per_example), grads


def data_parallel(
    net: MLP | Serial, mesh: Mesh, axis: str = "data"
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
      ValueError: ``axis`` not an axis of ``mesh``; at trace time an empty batch, or ``y``
        whose batch differs from ``x``'s.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
      >>> step = data_parallel(net, device_mesh())
      >>> loss, grads = step(params, x, y)
      >>> bool(jnp.allclose(loss, net.loss(params, x, y)))
      True
    """
    _check_any_net(net)
    shards = _check_mesh_axis(mesh, axis, "axis")

    def local(params: Any, x: Array, y: Array, w: Array) -> tuple[Array, Any]:
        loss, grads = _weighted_value_and_grad(net, params, x, y, w)
        return jax.lax.psum(loss, axis), jax.lax.psum(grads, axis)  # all-reduce over the data axis

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=(P(), P())
    )

    def step(params: Any, x: Array, y: Array) -> tuple[Array, Any]:
        batch = _check_batch(x, y)
        dtype = _param_dtype(params)
        xp, yp, mask = _pad(jnp.asarray(x), jnp.asarray(y), shards, dtype)
        w = mask / jnp.asarray(batch, dtype)
        params = _place(params, mesh, P())
        xp, yp, w = _place((xp, yp, w), mesh, P(axis))
        return sharded(params, xp, yp, w)

    return jax.jit(step)


def _masked_sum_grad_squared(
    deltas: Sequence[Array], caches: Sequence[DenseCache], mask: Array
) -> Grads:
    return _extend._sum_grad_squared([d * mask[:, None] for d in deltas], caches)


def _local_quantity(
    net: Any, quantity: str, batch: int, params: Params, x: Array, y: Array, mask: Array, axis: str
) -> Any:
    """One shard's contribution to ``quantity``, all-reduced over ``axis`` where it is a sum."""
    if quantity == "batch_grad":
        return _extend.batch_grad(net, params, x, y)
    if quantity == "batch_l2_grad":
        return _extend.batch_l2_grad(net, params, x, y)
    fwd = _extend._forward(net, params, x, y)
    if quantity in ("sum_grad_squared", "variance"):
        deltas = _extend._deltas(net, params, fwd)
        sgs = jax.lax.psum(_masked_sum_grad_squared(deltas, fwd.caches, mask), axis)
        if quantity == "sum_grad_squared":
            return sgs
        mean = [
            {"W": (d * mask[:, None]).T @ c.x / batch, "b": jnp.sum(d * mask[:, None], 0) / batch}
            for d, c in zip(deltas, fwd.caches, strict=True)
        ]
        mean = jax.lax.psum(mean, axis)
        return [
            {k: s[k] / batch - m[k] ** 2 for k in ("W", "b")}
            for s, m in zip(sgs, mean, strict=True)
        ]
    factor_deltas, signs = _extend._curvature_deltas(net, params, fwd)
    if quantity == "diag_ggn":
        out = []
        for d, c in zip(factor_deltas, fwd.caches, strict=True):
            d2 = _extend._signed_square_sum(d, signs) * mask[:, None]
            out.append({"W": d2.T @ (c.x * c.x) / batch, "b": jnp.sum(d2, axis=0) / batch})
        return jax.lax.psum(out, axis)
    # kfac_factors
    factors = []
    for d, c in zip(factor_deltas, fwd.caches, strict=True):
        rows = c.x.shape[0]
        a_bar = jnp.concatenate([c.x, jnp.ones((rows, 1), c.x.dtype)], axis=1)
        weighted = d * mask[None, :, None]
        if signs is not None:
            weighted = weighted * signs.T[:, :, None]
        k = d.shape[0]
        g = weighted.reshape(k * rows, -1).T @ d.reshape(k * rows, -1) / batch
        a = (a_bar * mask[:, None]).T @ a_bar / batch
        factors.append(_extend.KFACFactors(A=a, G=g))
    return jax.lax.psum(factors, axis)


def data_parallel_extend(
    net: Any, mesh: Mesh, quantity: str, axis: str = "data"
) -> Callable[[Params, Array, Array], Any]:
    """A jitted ``(params, x, y) -> quantity`` of :mod:`bpjax.extend`, the batch split on a mesh.

    The batch sums reduce as the gradient does: each shard computes its rows' sum from its own
    ``δ^l_n`` and ``a^{l-1}_n`` with padding rows masked out, then ``psum`` over ``axis``::

        sum_grad_squared  psum_d (δ_d ∘ δ_d)ᵀ (a_d ∘ a_d)
        variance          psum_d(Σ_n (∇C_n)²)/B − (psum_d(Σ_n ∇C_n)/B)²
        diag_ggn          psum_d Σ_{n∈d} Σ_c d_{n,c} (δ^l_{n,c})² (a^{l-1}_n)²ᵀ / B
        kfac_factors      A = psum_d Σ_{n∈d} ā_n ā_nᵀ / B,  G = psum_d Σ_{n∈d} Σ_c d_{n,c} δ δᵀ / B

    The per-example ``batch_grad`` and ``batch_l2_grad`` need no collective: they stay sharded
    over ``axis`` on their batch axis, padding rows dropped.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers (as :mod:`bpjax.extend`).
      mesh: a :class:`jax.sharding.Mesh`.
      quantity: one of :data:`DATA_PARALLEL_QUANTITIES`.
      axis: the mesh axis the batch is split over.

    Returns:
      ``f(params, x, y)``, jitted, equal to ``bpjax.extend.<quantity>(net, params, x, y)``.

    Raises:
      ValueError: an unknown ``quantity`` or ``axis``.
      TypeError: ``net`` not a network of Dense layers.
    """
    _extend._check_net(net)
    shards = _check_mesh_axis(mesh, axis, "axis")
    if quantity not in DATA_PARALLEL_QUANTITIES:
        raise ValueError(
            f"quantity: expected one of {', '.join(DATA_PARALLEL_QUANTITIES)}, got {quantity!r}."
        )
    per_example = quantity in ("batch_grad", "batch_l2_grad")
    out_spec = P(axis) if per_example else P()

    def run(params: Params, x: Array, y: Array) -> Any:
        batch = _check_batch(x, y)
        dtype = _param_dtype(params)
        xp, yp, mask = _pad(jnp.asarray(x), jnp.asarray(y), shards, dtype)

        def local(params: Params, x: Array, y: Array, mask: Array) -> Any:
            return _local_quantity(net, quantity, batch, params, x, y, mask, axis)

        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)), out_specs=out_spec
        )
        params = _place(params, mesh, P())
        xp, yp, mask = _place((xp, yp, mask), mesh, P(axis))
        out = sharded(params, xp, yp, mask)
        if per_example:
            out = jax.tree.map(lambda leaf: leaf[:batch], out)
        return out

    return jax.jit(run)


# -- tensor parallel -----------------------------------------------------------------------------


def _sharded_layers(net: Any, model: int) -> tuple[bool, ...]:
    """Which layers have their rows split over a model axis of size ``model``."""
    layers = _check_dense_net(net)
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
      >>> tensor_parallel_specs(net, device_mesh(1, 1))[0]  # a model axis of 1: nothing split
      {'W': P(), 'b': P()}
    """
    model = _check_mesh_axis(mesh, axis, "axis")
    return [
        {"W": P(axis, None), "b": P(axis)} if split else {"W": P(), "b": P()}
        for split in _sharded_layers(net, model)
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
    targets = net.objective.targets
    batch, n_out = z_out.shape
    y = jnp.asarray(y) if targets is None else targets(y, batch, n_out, z_out.dtype)
    fused = net.fused
    if fused is not None:
        per_example = fused.value(z_out, y)
        delta = fused.delta(z_out, a_out, y)
    else:
        per_example = net.objective.value(z_out, a_out, y)
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
      >>> loss, grads = data_tensor_parallel(net, device_mesh(1, 1))(params, x, y)
      >>> bool(jnp.allclose(loss, net.loss(params, x, y)))
      True
    """
    model = _check_mesh_axis(mesh, model_axis, "model_axis")
    shards = 1 if data_axis is None else _check_mesh_axis(mesh, data_axis, "data_axis")
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis: must differ from model_axis, both are {model_axis!r}.")
    sharded = _sharded_layers(net, model)
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
        batch = _check_batch(x, y)
        x = net._check_inputs(params, x)  # params against the spec, x's width and dtype
        dtype = _param_dtype(params)
        xp, yp, mask = _pad(x, jnp.asarray(y), shards, dtype)
        w = mask / jnp.asarray(batch, dtype)
        params = _place(params, mesh, param_specs)
        xp, yp, w = _place((xp, yp, w), mesh, batch_spec)
        return run(params, xp, yp, w)

    return jax.jit(step)


def tensor_parallel(
    net: Any, mesh: Mesh, axis: str = "model"
) -> Callable[[Params, Array, Array], tuple[Array, Grads]]:
    """:func:`data_tensor_parallel` with no data axis: the rows of ``W^l`` split over ``axis``.

    Every device holds the whole batch; see the module docstring for the collectives.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> step = tensor_parallel(net, device_mesh(1, 1))
      >>> loss, grads = step(params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> grads[0]["W"].shape
      (4, 3)
    """
    return data_tensor_parallel(net, mesh, data_axis=None, model_axis=axis)


# -- communication volume ------------------------------------------------------------------------


class Collective(NamedTuple):
    """One collective of a training step, and what it moves."""

    op: str  # "all-reduce", "all-gather" or "reduce-scatter"
    axis: str  # the mesh axis it runs over
    what: str  # what it carries, e.g. "∇W^1, ∇b^1" or "a^1 (forward)"
    elements: int  # elements of the whole (un-split) array, per group
    group: int  # devices per group (the axis size)
    bytes_per_device: float  # sent by each device (ring algorithm)


class CommVolume(NamedTuple):
    """The communication of one step: every collective, and the totals."""

    collectives: tuple[Collective, ...]
    bytes_per_device: float  # Σ over the collectives, sent by one device
    total_bytes: float  # bytes_per_device × the number of devices


def _ring_bytes(op: str, elements: int, group: int, itemsize: int) -> float:
    """Bytes each device sends for ``op`` on an array of ``elements`` (ring algorithms).

    All-gather and reduce-scatter move ``(p − 1)/p`` of the array per device; an all-reduce is a
    reduce-scatter then an all-gather, ``2 (p − 1)/p``.
    """
    if group == 1:
        return 0.0
    factor = 2.0 if op == "all-reduce" else 1.0
    return factor * (group - 1) / group * elements * itemsize


def communication_volume(
    net: Any,
    mesh_shape: dict[str, int] | Mesh,
    batch: int,
    *,
    data_axis: str | None = "data",
    model_axis: str | None = None,
    dtype: Any = jnp.float32,
) -> CommVolume:
    """The collectives of one :func:`data_tensor_parallel` (or :func:`data_parallel`) step.

    Computed from the sharding alone, as the module docstring derives it: with ``D`` data
    shards of ``b = ⌈B/D⌉`` rows and ``M`` model shards, each split hidden layer all-gathers
    ``a^l`` (``b × n_l``) forward and reduce-scatters ``δ^{l+1} W^{l+1}`` (``b × n_l``) backward
    (an all-reduce when its upper neighbour is split and it is not), a split output layer
    all-gathers ``z^L``, and the data axis all-reduces every weight gradient a device holds
    (``n_l n_{l-1}/M + n_l/M`` for a split layer) and the loss. Bytes are those a device sends
    under ring algorithms.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers.
      mesh_shape: a mesh, or its ``{axis: size}``.
      batch: the global batch ``B``.
      data_axis: the batch axis, or ``None``.
      model_axis: the model axis, or ``None`` for data parallelism alone.
      dtype: the params' and activations' dtype.

    Returns:
      A :class:`CommVolume`.

    Example:
      >>> import bpjax as bp
      >>> net = bp.MLP((8, 16, 4), ("tanh", "softmax"), "cross_entropy")
      >>> vol = communication_volume(net, {"data": 4}, 32)
      >>> vol.bytes_per_device  # 2·(3/4)·(16·8 + 16 + 4·16 + 4 + 1)·4 bytes
      1278.0
    """
    layers = _check_dense_net(net)
    shape = dict(mesh_shape.shape) if isinstance(mesh_shape, Mesh) else dict(mesh_shape)
    for name in (data_axis, model_axis):
        if name is not None and name not in shape:
            raise ValueError(f"mesh_shape: has no axis {name!r}; its axes are {tuple(shape)}.")
    d = 1 if data_axis is None else shape[data_axis]
    m = 1 if model_axis is None else shape[model_axis]
    itemsize = jnp.dtype(dtype).itemsize
    rows = -(-batch // d)
    sizes = [net.sizes[0] if isinstance(net, MLP) else net.input_shape[0]] + [
        layer.n_out for layer in layers
    ]
    sharded = _sharded_layers(net, m)
    out: list[Collective] = []

    def add(op: str, axis: str | None, what: str, elements: int, group: int) -> None:
        if axis is not None and group > 1:
            out.append(
                Collective(
                    op, axis, what, elements, group, _ring_bytes(op, elements, group, itemsize)
                )
            )

    for l in range(len(layers)):
        if sharded[l]:
            name = f"z^{l + 1}" if l == len(layers) - 1 else f"a^{l + 1}"
            add("all-gather", model_axis, f"{name} (forward)", rows * sizes[l + 1], m)
    for l in reversed(range(1, len(layers))):
        elements = rows * sizes[l]
        if sharded[l] and sharded[l - 1]:
            add("reduce-scatter", model_axis, f"δ^{l + 1} W^{l + 1} (backward)", elements, m)
        elif sharded[l]:
            add("all-reduce", model_axis, f"δ^{l + 1} W^{l + 1} (backward)", elements, m)
    for l in range(len(layers)):
        per_device = (sizes[l + 1] * sizes[l] + sizes[l + 1]) // (m if sharded[l] else 1)
        add("all-reduce", data_axis, f"∇W^{l + 1}, ∇b^{l + 1}", per_device, d)
    add("all-reduce", data_axis, "loss", 1, d)
    per_device_bytes = float(sum(c.bytes_per_device for c in out))
    return CommVolume(tuple(out), per_device_bytes, per_device_bytes * d * m)


_HLO_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter)\((?P<rest>.*)$"
)
_HLO_ARRAY = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+)\[(?P<dims>[\d,]*)\]")
_HLO_GROUPS = re.compile(r"replica_groups=(?:\{\{(?P<first>[\d,]*)\}|\[\d+,(?P<size>\d+)\]<=)")


def compiled_collectives(compiled_text: str) -> tuple[Collective, ...]:
    """The collectives in a compiled XLA program's text, with the bytes each device sends.

    Reads ``jax.jit(f).lower(*args).compile().as_text()``: every ``all-reduce``, ``all-gather``
    and ``reduce-scatter`` with its result shape(s) and replica-group size ``p``, costed as in
    :func:`communication_volume` (ring: all-gather ``(p − 1)/p`` of its result, reduce-scatter
    ``(p − 1)/p`` of its operand, all-reduce twice that), so the two can be compared: what the
    sharding implies against what XLA runs (which may merge several all-reduces into one).

    Args:
      compiled_text: the compiled HLO text.

    Returns:
      One :class:`Collective` per instruction (``axis`` is ``"p=<size>"``: HLO names no mesh
      axes; ``what`` the instruction's result type).
    """
    out = []
    for line in compiled_text.splitlines():
        match = _HLO_COLLECTIVE.search(line)
        if match is None:
            continue
        groups = _HLO_GROUPS.search(line)
        if groups is None:
            continue
        first = groups.group("first")
        group = len(first.split(",")) if first is not None else int(groups.group("size"))
        itemsize = elements = 0
        for array in _HLO_ARRAY.finditer(match.group("type")):
            dims = [int(d) for d in array.group("dims").split(",") if d]
            elements += math.prod(dims)
            itemsize = max(
                itemsize, jnp.dtype(_HLO_DTYPES.get(array.group("dtype"), "float32")).itemsize
            )
        op = match.group("op")
        if op == "reduce-scatter":
            elements *= group  # the operand: the whole array being reduced
        out.append(
            Collective(
                op,
                f"p={group}",
                match.group("type"),
                elements,
                group,
                _ring_bytes(op, elements, group, itemsize),
            )
        )
    return tuple(out)


_HLO_DTYPES = {
    "pred": "bool",
    "s8": "int8",
    "s16": "int16",
    "s32": "int32",
    "s64": "int64",
    "u8": "uint8",
    "u32": "uint32",
    "bf16": "bfloat16",
    "f16": "float16",
    "f32": "float32",
    "f64": "float64",
}
