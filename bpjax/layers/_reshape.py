"""Reshaping layers: :class:`Flatten`, ``(batch, *shape) -> (batch, prod(shape))``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from bpjax._types import Array, PRNGKey

__all__ = ["Flatten"]


@dataclasses.dataclass(frozen=True)
class Flatten:
    """Flattens each example: ``(batch, d_1, …, d_k) -> (batch, d_1 ⋯ d_k)``, row-major.

    A reshape moves no value, so its backward is the inverse reshape of ``dy``:
    ``∂C/∂x = reshape(∂C/∂y, x.shape)``. The cache is the input ``x`` itself, whose shape the
    backward restores. It has no params (``{}``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Flatten()
      >>> layer.init(jax.random.key(0), (4, 4, 2))
      ({}, (32,))
      >>> y, cache = layer.forward({}, jnp.ones((3, 4, 4, 2)))
      >>> _, dx = layer.backward({}, cache, y)
      >>> y.shape, dx.shape
      ((3, 32), (3, 4, 4, 2))
    """

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """No params; the output shape ``(d_1 ⋯ d_k,)``."""
        del key, dtype
        return {}, (math.prod(int(n) for n in in_shape),)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, Array]:
        """``y = reshape(x, (batch, d_1 ⋯ d_k))``; the cache is ``x``."""
        del params
        if jnp.ndim(x) < 1:
            raise ValueError(f"x: Flatten takes inputs (batch, ...), got a scalar of shape {()}.")
        return jnp.reshape(x, (x.shape[0], math.prod(x.shape[1:]))), x

    def backward(
        self, params: dict[str, Array], cache: Array, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``({}, dx)`` with ``dx = reshape(dy, x.shape)``."""
        del params
        return {}, jnp.reshape(dy, jnp.shape(cache))
