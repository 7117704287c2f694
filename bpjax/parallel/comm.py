"""Communication volume: the collectives a sharded step implies, and those XLA compiled.

:func:`communication_volume` derives them from the sharding (the formulas of
:mod:`bpjax.parallel`'s docstring); :func:`compiled_collectives` reads them from a compiled
program's HLO text, costed the same way (ring algorithms), so the two can be compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax.sharding import Mesh

from bpjax._types import is_int
from bpjax._validate import param_dtype
from bpjax.parallel.tensor import check_dense_net, sharded_layers

__all__ = ["Collective", "CommVolume", "communication_volume", "compiled_collectives", "ring_bytes"]


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


def ring_bytes(op: str, elements: int, group: int, itemsize: int) -> float:
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

    Raises:
      ValueError: ``batch`` or an axis size not a positive integer, or an axis not in the mesh.
      TypeError: ``net`` not a network of Dense layers, or ``dtype`` not a floating dtype.

    Example:
      >>> import bpjax as bp
      >>> net = bp.MLP((8, 16, 4), ("tanh", "softmax"), "cross_entropy")
      >>> vol = communication_volume(net, {"data": 4}, 32)
      >>> vol.bytes_per_device  # 2·(3/4)·(16·8 + 16 + 4·16 + 4 + 1)·4 bytes
      1278.0
    """
    layers = check_dense_net(net)
    if not is_int(batch) or batch < 1:
        raise ValueError(f"batch: expected the global batch, a positive integer, got {batch!r}.")
    shape = _mesh_sizes(mesh_shape)
    for name in (data_axis, model_axis):
        if name is not None and name not in shape:
            raise ValueError(f"mesh_shape: has no axis {name!r}; its axes are {tuple(shape)}.")
    d = 1 if data_axis is None else shape[data_axis]
    m = 1 if model_axis is None else shape[model_axis]
    itemsize = param_dtype(dtype).itemsize
    rows = -(-int(batch) // d)
    sizes = [net.input_shape[0]] + [layer.n_out for layer in layers]
    sharded = sharded_layers(net, m)
    out: list[Collective] = []

    def add(op: str, axis: str | None, what: str, elements: int, group: int) -> None:
        if axis is not None and group > 1:
            out.append(
                Collective(
                    op, axis, what, elements, group, ring_bytes(op, elements, group, itemsize)
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


def _mesh_sizes(mesh_shape: Any) -> dict[str, int]:
    """``{axis: size}`` of a mesh or of a dict of positive integer sizes."""
    if isinstance(mesh_shape, Mesh):
        return dict(mesh_shape.shape)
    if not isinstance(mesh_shape, Mapping):
        raise TypeError(
            "mesh_shape: expected a jax.sharding.Mesh or a dict {axis: size}, got "
            f"{type(mesh_shape).__name__}."
        )
    bad = {k: v for k, v in mesh_shape.items() if not is_int(v) or v < 1}
    if bad:
        raise ValueError(f"mesh_shape: expected positive integer axis sizes, got {bad}.")
    return {k: int(v) for k, v in mesh_shape.items()}


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
                ring_bytes(op, elements, group, itemsize),
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
