"""The block :class:`Sequential`: layers in series as one layer, ``y = L_k(… L_1(x))``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.layers._core import backprop, chain_forward, chain_init, check_layers

__all__ = ["Sequential", "SequentialCache"]


class SequentialCache(NamedTuple):
    """What :meth:`Sequential.forward` keeps for the backward pass."""

    layers: list[Any]  # one cache per layer, from its forward


@dataclasses.dataclass(frozen=True, init=False)
class Sequential:
    """Layers in series as one layer: ``y = L_k ∘ … ∘ L_1 (x)``, so blocks nest.

    :func:`bpjax.serial` without a ``loss`` returns one (as stax's ``serial`` returns a layer):
    put it inside a :class:`Residual`, another ``serial``, or a network. Its backward is
    :func:`bpjax.layers.backprop` from ``output_error = dy``, the same δ-recursion a network runs;
    its params are a list with one pytree per layer.

    Args:
      *layers: objects with the layer contract of :mod:`bpjax.layers`, input first.

    Raises:
      ValueError: no layers.
      TypeError: a layer without ``init``, ``forward`` and ``backward``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax.layers import Dense
      >>> block = Sequential(Dense(4, "tanh"), Dense(3))
      >>> params, out_shape = block.init(jax.random.key(0), (2,))
      >>> y, cache = block.forward(params, jnp.ones((5, 2)))
      >>> grads, dx = block.backward(params, cache, jnp.ones((5, 3)))
      >>> out_shape, [g["W"].shape for g in grads], dx.shape
      ((3,), [(4, 2), (3, 4)], (5, 2))
    """

    layers: tuple[Any, ...]

    def __init__(self, *layers: Any) -> None:
        if not layers:
            raise ValueError("layers: Sequential expected at least one layer, got none.")
        check_layers(layers)
        object.__setattr__(self, "layers", tuple(layers))

    @property
    def needs_key(self) -> bool:
        """Whether any layer takes a PRNG key, and so ``forward`` hands one on."""
        return any(getattr(layer, "needs_key", False) for layer in self.layers)

    @property
    def integer_input(self) -> bool:
        """Whether the first layer takes integer inputs (then ``backward``'s ``dx`` is ``None``)."""
        return bool(getattr(self.layers[0], "integer_input", False))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[list[Any], tuple[int, ...]]:
        """Each layer's params in order from ``in_shape``; returns ``(params, out_shape)``."""
        return chain_init(self.layers, key, in_shape, dtype)

    def forward(
        self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, SequentialCache]:
        """``y = L_k(… L_1(x))`` and the layers' caches.

        Args:
          params: one pytree per layer, as from :meth:`init`.
          x: the input, shape ``(batch, *in_shape)``.
          key: a PRNG key for the layers that take one (training), or ``None``.
        """
        if len(params) != len(self.layers):
            raise ValueError(
                f"params: expected one pytree per layer of the Sequential ({len(self.layers)}), "
                f"got {len(params)}."
            )
        y, caches = chain_forward(self.layers, params, x, key)
        return y, SequentialCache(caches)

    def backward(
        self, params: Sequence[Any], cache: SequentialCache, dy: Array
    ) -> tuple[list[Any], Array | None]:
        """The δ-recursion through the block from ``dy = ∂C/∂y``: ``(grads, dx)``."""
        grads, _, dx = backprop(self.layers, params, cache.layers, output_error=dy)
        return grads, dx
