"""Pytree helpers shared by the backward check and its contracts."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bpjax._trees import to_dtype
from bpjax._types import ArrayTree
from bpjax.check.grads import first_difference


def manual_leaves(cts: tuple[Any, ...], primals: tuple[Any, ...]) -> tuple[list[Any] | None, str]:
    """The manual cotangent of every primal leaf in flat order, or ``None`` and what is wrong.

    ``cts`` has one entry per primal: ``None`` (not differentiated: every leaf ``None``) or a tree
    of the primal's structure whose leaves may themselves be ``None``.
    """
    if len(cts) != len(primals):
        return None, f"backward returned {len(cts)} cotangents for {len(primals)} primals"
    leaves: list[Any] = []
    for i, (ct, primal) in enumerate(zip(cts, primals, strict=True)):
        expected: Any = jax.tree.structure(primal)
        if ct is None:
            leaves += [None] * expected.num_leaves
            continue
        got = jax.tree.structure(ct, is_leaf=lambda x: x is None)
        if got != expected:
            return None, f"cotangent {i} {first_difference(ct, primal)}"
        leaves += jax.tree.leaves(ct, is_leaf=lambda x: x is None)
    return leaves, ""


def random_like(rng: np.random.Generator, tree: ArrayTree) -> ArrayTree:
    """Standard normal leaves with the shapes and dtypes of ``tree``'s leaves.

    Drawn with NumPy on the host: eager ``jax.random`` would compile once per new shape.
    """
    return jax.tree.map(lambda x: to_dtype(rng.standard_normal(np.shape(x)), x.dtype), tree)


def host_map(fn: Any, *trees: ArrayTree) -> ArrayTree:
    """``fn`` on the leaves as float64 NumPy arrays, the result back in the first tree's dtypes."""
    return jax.tree.map(
        lambda x, *rest: to_dtype(fn(*(np.asarray(t, np.float64) for t in (x, *rest))), x.dtype),
        *trees,
    )
