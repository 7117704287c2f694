"""What :func:`bpjax.fit` checks and reshapes before training: a data set against a network.

:func:`check_data` judges a :class:`bpjax.Dataset` against a network (input size, output width,
the labels' range) with one-line messages; :func:`network_inputs` turns a data set's flat rows
into the network's input shape. :mod:`bpjax.train` re-exports both.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from bpjax._types import Array
from bpjax.datasets import Dataset
from bpjax.losses import check_labels
from bpjax.network import Serial

__all__ = ["check_data", "network_inputs"]


def network_inputs(net: Serial, x: Any) -> Array:
    """Flat data rows ``(n, n_0)`` as the network's inputs ``(n, *input_shape)``, C order.

    Raises:
      ValueError: ``n_0`` is not the size of one input, ``prod(input_shape)``.
    """
    x = jnp.asarray(x)
    size = math.prod(net.input_shape)
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(
            f"x: expected flat rows (n, {size}) for the network's input shape {net.input_shape}, "
            f"got {x.shape}."
        )
    return x.reshape(x.shape[0], *net.input_shape)


def check_data(net: Serial, data: Dataset, name: str) -> None:
    """Raises ``ValueError`` (a one-line message starting with ``name``) unless :func:`fit` can
    train ``net`` on ``data``: float inputs of the network's input size, ``(n_L,)`` outputs per
    example matching the data's classes or target columns; ``TypeError`` unless ``data`` is a
    :class:`bpjax.Dataset`."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{name}: expected a bpjax.Dataset (e.g. from bpjax.load_dataset), got "
            f"{type(data).__name__}."
        )
    if getattr(net.layers[0], "integer_input", False):
        raise ValueError(
            f"{name}: the network's first layer ({type(net.layers[0]).__name__}) takes integer "
            "indices, but data sets hold float features; train it with make_train_step."
        )
    if data.num_classes is None and np.ndim(data.y) != 2:
        raise ValueError(
            f"{name}: y of shape {np.shape(data.y)} with num_classes=None; expected class labels "
            "(n,) with num_classes=K, or regression targets (n, n_L)."
        )
    shape, out_shape = net.input_shape, net.output_shape
    size = math.prod(shape)
    if len(shape) == 1 and data.num_features != size:
        raise ValueError(
            f"{name}: the network takes n_0 = {size} inputs but the data have "
            f"{data.num_features} features."
        )
    if data.num_features != size:
        raise ValueError(
            f"{name}: the network takes inputs of shape {shape} ({size} values per example), "
            f"but the data have {data.num_features} features."
        )
    if len(out_shape) != 1:
        raise ValueError(
            f"{name}: the network's outputs have shape {out_shape} per example; data sets hold one "
            "label or target row per example, so the network must end in (n_L,)."
        )
    n_out = out_shape[0]
    if data.num_outputs != n_out:
        what = "classes" if data.num_classes is not None else "target columns"
        raise ValueError(
            f"{name}: the network has n_L = {n_out} outputs but the data have "
            f"{data.num_outputs} {what}."
        )
    # the labels themselves, not only the class count a Dataset claims: fit's jitted steps see
    # them traced, where an out-of-range one is NaN rather than an error
    labels = np.asarray(data.y)
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        check_labels(labels, n_out, argname=f"{name}.y", loss=net.objective.name)
