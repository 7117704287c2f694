"""Inverted dropout :class:`Dropout`: ``y = x ∘ m / (1 − rate)`` in training, ``y = x`` in eval."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array, PRNGKey, is_real

__all__ = ["Dropout", "DropoutCache"]


class DropoutCache(NamedTuple):
    """What :meth:`Dropout.forward` keeps for the backward pass."""

    mask: Array | None  # (batch, *in_shape) bool: m, True where x is kept; None in evaluation


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Inverted dropout: each input is kept with probability ``1 − rate``, and rescaled.

    In training (a PRNG ``key`` given) a mask ``m ~ Bernoulli(1 − rate)`` is drawn elementwise,
    ``m = jax.random.bernoulli(key, float32(1 − rate), x.shape)``, and

        y = x ∘ m / (1 − rate),      ∂C/∂x = dy ∘ m / (1 − rate),

    so that ``E[y] = x`` and the evaluation pass (``key=None``) is the identity ``y = x``,
    ``∂C/∂x = dy``. A network hands each layer its own key (:func:`bpjax.serial` with ``key=``);
    the same key gives the same mask, in the forward pass and wherever it is replayed. The
    comparison is of float32 uniforms whatever the dtype of ``x`` and the x64 mode, so a float16
    or float64 network draws the mask of a float32 one (and a bfloat16 uniform, with 8 bits,
    would round the rate).

    The forward pass caches the mask itself (one bool per element), not the key: the backward
    pass then costs one select, with no second draw of the random bits, and the cache holds
    exactly the ``m`` of the maths; regenerating from the key would save that memory at the cost
    of running the generator again in every backward pass.

    Args:
      rate: the probability of dropping each input, in ``[0, 1)``; ``0`` is the identity.

    Raises:
      ValueError: ``rate`` outside ``[0, 1)`` or not a number.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dropout(0.5)
      >>> params, out_shape = layer.init(jax.random.key(0), (4,))
      >>> y, cache = layer.forward(params, jnp.ones((2, 4)), key=jax.random.key(1))
      >>> sorted(set(y.ravel().tolist()))  # dropped, or kept and scaled by 1 / (1 − 0.5)
      [0.0, 2.0]
      >>> grads, dx = layer.backward(params, cache, jnp.ones((2, 4)))
      >>> bool((dx == y).all()), grads
      (True, {})
      >>> layer.forward(params, jnp.ones((2, 4)))[0].tolist()  # no key: evaluation, the identity
      [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """

    rate: float
    needs_key: ClassVar[bool] = True
    """``forward`` takes ``key=``: a PRNG key in training, ``None`` in evaluation."""

    def __post_init__(self) -> None:
        rate = self.rate
        if not is_real(rate) or not math.isfinite(rate) or not 0 <= rate < 1:
            raise ValueError(
                f"rate: expected the probability of dropping an input, in [0, 1), got {rate!r}."
            )
        object.__setattr__(self, "rate", float(rate))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """No params; the output has the input's shape: ``({}, in_shape)``."""
        del key, dtype
        return {}, tuple(in_shape)

    def forward(
        self, params: dict[str, Array], x: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, DropoutCache]:
        """``y = x ∘ m / (1 − rate)`` with ``key`` (training), ``y = x`` without (evaluation).

        Args:
          params: ``{}``.
          x: the input, shape ``(batch, ...)``.
          key: a PRNG key, or ``None`` in evaluation mode.

        Returns:
          ``(y, cache)``: ``y`` shaped like ``x``, the cache holding the mask ``m``.
        """
        del params
        if key is None or self.rate == 0:
            return x, DropoutCache(None)
        keep = 1 - self.rate
        # m ~ Bernoulli(1 − rate), drawn through float32 uniforms whatever x's dtype and the x64
        # mode: the mask depends on the key, the rate and the shape only. Drawn flat, then
        # reshaped: the same bits as a draw of shape x.shape (JAX counts elements in row-major
        # order), which XLA:CPU compiles up to 8× faster for inputs of rank 3 and more.
        mask = jax.random.bernoulli(key, jnp.float32(keep), (jnp.size(x),)).reshape(jnp.shape(x))
        y = jnp.where(mask, x / keep, jnp.zeros((), jnp.result_type(x)))  # x ∘ m / (1 − rate)
        return y, DropoutCache(mask)

    def backward(
        self, params: dict[str, Array], cache: DropoutCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``∂C/∂x = dy ∘ m / (1 − rate)`` (``dy`` in evaluation); no params: ``grads = {}``."""
        del params
        if cache.mask is None:
            return {}, dy
        keep = 1 - self.rate
        return {}, jnp.where(cache.mask, dy / keep, jnp.zeros((), dy.dtype))  # dy ∘ m / (1 − rate)
