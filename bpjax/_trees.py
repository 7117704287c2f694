"""Pytree helpers for floating leaves, shared by the harness and :mod:`bpjax.testing`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._types import Array, ArrayTree


def is_float(x: Any) -> bool:
    """Whether ``x`` (an array, a tracer or a Python number) has a floating dtype."""
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.floating))


def to_dtype(x: Any, dtype: Any) -> Array:
    """``x`` as a device array of ``dtype``, converted on the host (no compilation)."""
    return jnp.asarray(np.asarray(np.asarray(x), np.float64).astype(jnp.dtype(dtype)))


def cast_floats(tree: ArrayTree, dtype: Any) -> ArrayTree:
    """Every floating leaf of ``tree`` as ``dtype`` (exact when casting up); others unchanged."""
    return jax.tree.map(lambda x: to_dtype(x, dtype) if is_float(x) else x, tree)
