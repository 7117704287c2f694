"""The skip connection :class:`Residual`: ``y = x + F(x)``, ``F`` a serial branch of layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.layers._core import backprop, chain_forward, chain_init, check_layers

__all__ = ["Residual", "ResidualCache"]


class ResidualCache(NamedTuple):
    """What :meth:`Residual.forward` keeps for the backward pass."""

    branch: list[Any]  # one cache per branch layer, from its forward


@dataclasses.dataclass(frozen=True, init=False)
class Residual:
    """A skip connection around a serial branch: ``y = x + F(x)``, ``F = L_k ∘ … ∘ L_1``.

    The branch ``F`` is the layers in series, input first, and must map an input to an output
    of the same shape. The backward pass is the sum of the two paths to ``x``:

        ∂C/∂x = dy + J_F(x)ᵀ dy,

    the identity path's ``dy`` plus the branch's ``dx``, which :func:`bpjax.layers.backprop` (the
    one δ-recursion) computes from ``output_error = dy``; the params' gradients are the branch's.
    Residuals nest: a branch layer may itself be a :class:`Residual`.

    Params are a list with one pytree per branch layer, as for :func:`bpjax.serial`. The layer
    takes a PRNG key (``needs_key``) when any branch layer does, and hands each of those its own
    key (``fold_in`` by position in the branch).

    Args:
      *layers: the branch: objects with the layer contract of :mod:`bpjax.layers`, input first.

    Raises:
      ValueError: no layers; a first layer that takes integer inputs (there is no float input
        to add); at :meth:`init`, a branch whose output shape differs from its input shape.
      TypeError: a layer without ``init``, ``forward`` and ``backward``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax.layers import Dense, LayerNorm
      >>> block = Residual(Dense(4, "tanh"), LayerNorm())
      >>> params, out_shape = block.init(jax.random.key(0), (4,))
      >>> y, cache = block.forward(params, jnp.ones((2, 4)))
      >>> grads, dx = block.backward(params, cache, jnp.ones((2, 4)))
      >>> out_shape, len(grads), sorted(grads[0]), dx.shape
      ((4,), 2, ['W', 'b'], (2, 4))
    """

    layers: tuple[Any, ...]

    def __init__(self, *layers: Any) -> None:
        if not layers:
            raise ValueError("layers: Residual expected at least one branch layer, got none.")
        check_layers(layers)
        if getattr(layers[0], "integer_input", False):
            raise ValueError(
                f"layers[0]: {type(layers[0]).__name__} takes integer inputs, but a Residual adds "
                "its input to the branch's output (y = x + F(x)); put it before the Residual."
            )
        object.__setattr__(self, "layers", tuple(layers))

    @property
    def needs_key(self) -> bool:
        """Whether any branch layer takes a PRNG key, and so ``forward`` hands one on."""
        return any(getattr(layer, "needs_key", False) for layer in self.layers)

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[list[Any], tuple[int, ...]]:
        """Each branch layer's params, in order from ``in_shape``; the output shape is ``in_shape``.

        Returns:
          ``(params, in_shape)``, ``params`` a list with one pytree per branch layer.

        Raises:
          ValueError: the branch's output shape is not ``in_shape``.
        """
        in_shape = tuple(in_shape)
        params, shape = chain_init(self.layers, key, in_shape, dtype)
        if tuple(shape) != in_shape:
            raise ValueError(
                f"layers: a Residual's branch must keep the shape of its input for y = x + F(x), "
                f"but it maps {in_shape} to {tuple(shape)}; make its last layer give {in_shape}."
            )
        return params, in_shape

    def forward(
        self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, ResidualCache]:
        """``y = x + F(x)``, shaped like ``x``, and the branch layers' caches.

        Args:
          params: one pytree per branch layer, as from :meth:`init`.
          x: the input, shape ``(batch, *in_shape)``.
          key: a PRNG key for the branch layers that take one (training), or ``None``.
        """
        if len(params) != len(self.layers):
            raise ValueError(
                f"params: expected one pytree per branch layer ({len(self.layers)}), "
                f"got {len(params)}."
            )
        h, caches = chain_forward(self.layers, params, x, key)  # the branch F
        return x + h, ResidualCache(caches)  # y = x + F(x)

    def backward(
        self, params: Sequence[Any], cache: ResidualCache, dy: Array
    ) -> tuple[list[Any], Array]:
        """``∂C/∂x = dy + J_F(x)ᵀ dy``: the identity path plus the branch's δ-recursion.

        Returns:
          ``(grads, dx)``: one gradient pytree per branch layer, and ``dx`` shaped like ``dy``.
        """
        grads, _, dx_branch = backprop(self.layers, params, cache.branch, output_error=dy)
        assert dx_branch is not None  # the constructor rejects a first layer with integer inputs
        return grads, dy + dx_branch  # the identity's dy + the branch's J_Fᵀ dy
