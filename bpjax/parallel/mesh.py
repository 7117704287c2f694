"""Meshes and hosts, and what every sharded step shares: checks, placement and padding.

:func:`device_mesh` builds the ``("data",)`` or ``("data", "model")`` mesh, :func:`initialize`
joins a multi-host job; :func:`check_mesh_axis`, :func:`check_batch`, :func:`check_global_batch`,
:func:`param_dtype`, :func:`place` and :func:`pad` are the steps of :mod:`bpjax.parallel.data` and
:mod:`bpjax.parallel.tensor` before their ``shard_map``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpjax._types import Array

__all__ = [
    "check_batch",
    "check_global_batch",
    "check_mesh_axis",
    "checking_labels",
    "device_mesh",
    "initialize",
    "pad",
    "param_dtype",
    "place",
]


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


# -- shared by the sharded steps ----------------------------------------------------------------


def check_mesh_axis(mesh: Any, axis: Any, argname: str) -> int:
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


def check_batch(x: Array, y: Array) -> int:
    """``B``, the batch of ``x``; raises unless it is non-empty and ``y`` has ``B`` rows."""
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] < 1:
        raise ValueError(f"x: expected a non-empty batch (batch, ...), got shape {jnp.shape(x)}.")
    batch = int(jnp.shape(x)[0])
    if jnp.ndim(y) < 1 or jnp.shape(y)[0] != batch:
        raise ValueError(
            f"y: expected {batch} targets (the batch of x, shape {jnp.shape(x)}), got shape "
            f"{jnp.shape(y)}."
        )
    return batch


def checking_labels(net: Any, jitted: Any) -> Callable[..., Any]:
    """``jitted(params, x, y)`` that first checks concrete labels (``net.check_labels(y)``).

    Inside ``jitted`` the labels are traced and only poisoned where out of range (NaN); checked
    here, while they are still concrete, an out-of-range label is a ``ValueError`` as in
    ``net.loss``. ``lower``, ``trace`` and ``eval_shape`` are ``jitted``'s own.
    """

    @functools.wraps(jitted)
    def call(params: Any, x: Array, y: Array) -> Any:
        return jitted(params, x, net.check_labels(y))

    for name in ("lower", "trace", "eval_shape"):
        setattr(call, name, getattr(jitted, name))
    return call


def check_global_batch(net: Any, params: Any, x: Array, y: Array) -> tuple[int, Array]:
    """``(B, x)`` after the network's own checks of ``params``, ``x`` and ``y`` on the whole
    batch, so that a bad input is named with the user's shapes, not one shard's.

    ``x`` comes back as ``net.check_inputs`` returns it (cast to the params' dtype).
    """
    batch = check_batch(x, y)
    x = net.check_inputs(params, x)
    net.check_targets(y, jnp.zeros((batch, *net.output_shape), param_dtype(params)))
    return batch, x


def param_dtype(params: Any) -> Any:
    """The dtype of the params' leaves (float32 for params without leaves)."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        return jnp.float32
    return jnp.result_type(leaves[0])


def place(tree: Any, mesh: Mesh, spec: Any) -> Any:
    """``tree`` laid out as ``spec``: a reshard on Explicit mesh axes, else a constraint."""

    def one(leaf: Any, leaf_spec: P) -> Any:
        sharding = NamedSharding(mesh, leaf_spec)
        if all(t == AxisType.Explicit for t in mesh.axis_types):
            return jax.sharding.reshard(leaf, sharding)
        return jax.lax.with_sharding_constraint(leaf, sharding)

    if isinstance(spec, P):
        return jax.tree.map(lambda leaf: one(leaf, spec), tree)
    return jax.tree.map(one, tree, spec, is_leaf=lambda s: isinstance(s, P))


def pad(x: Array, y: Array, shards: int, dtype: Any) -> tuple[Array, Array, Array]:
    """The batch padded to a multiple of ``shards`` with copies of real rows, and its 0/1 mask."""
    batch = x.shape[0]
    padded = -(-batch // shards) * shards
    mask = (jnp.arange(padded) < batch).astype(dtype)
    if padded == batch:
        return x, y, mask
    rows = jnp.arange(padded) % batch  # copies of real rows: finite, valid targets
    return jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0), mask
