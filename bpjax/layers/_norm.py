"""Layer normalisation :class:`LayerNorm`: ``y = γ ∘ x̂ + β``, ``x̂ = (x − μ) / σ`` per example."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from bpjax._types import Array, PRNGKey, is_real

__all__ = ["LayerNorm", "LayerNormCache"]


def _stats_dtype(dtype: Any) -> Any:
    """The dtype of the statistics: float32 for half-precision inputs, else the input's.

    In float16/bfloat16 a mean over ``n`` features loses about ``log2 n`` of the few significant
    bits to rounding, and in float16 the squares ``(x − μ)²`` overflow once ``|x − μ| > 256``;
    so, as flax's layer norm does, half-precision inputs are normalised in float32 and the
    results cast back.
    """
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


class LayerNormCache(NamedTuple):
    """What :meth:`LayerNorm.forward` keeps for the backward pass."""

    x_hat: Array  # (batch, ..., n): the normalised input x̂ = (x − μ) / σ, in the input's dtype
    inv_sigma: Array  # (batch, ..., 1): 1 / σ = 1 / sqrt(var + eps), float32 for half precision


@dataclasses.dataclass(frozen=True)
class LayerNorm:
    """Layer normalisation over the last axis: ``y = γ ∘ x̂ + β``, ``x̂ = (x − μ) / σ``.

    For each example (and each position of any axes between the batch and the features) the
    ``n`` features of ``x`` are standardised with their own mean and variance,

        μ = (1/n) Σ_i x_i,   var = (1/n) Σ_i (x_i − μ)²,   σ = sqrt(var + eps),
        x̂ = (x − μ) / σ,     y = γ ∘ x̂ + β,

    with a learned per-feature ``scale`` ``γ`` and ``offset`` ``β`` (shape ``(n,)``, initialised
    to ones and zeros). The backward pass is the closed form of the VJP: with ``g = γ ∘ dy``,

        ∂C/∂x = (1/σ) (g − mean(g) − x̂ ∘ mean(g ∘ x̂)),
        ∂C/∂γ = Σ dy ∘ x̂,   ∂C/∂β = Σ dy,

    the means over the feature axis, the sums over every axis but the last. Half-precision inputs
    (float16, bfloat16) are normalised in float32 and the results cast back.

    Args:
      eps: added to the variance before the square root; a positive number.
      scale: learn the per-feature scale ``γ`` (else ``γ = 1`` and there is no ``"scale"`` param).
      offset: learn the per-feature offset ``β`` (else ``β = 0`` and there is no ``"offset"``).

    Raises:
      ValueError: ``eps`` not a positive finite number.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LayerNorm()
      >>> params, out_shape = layer.init(jax.random.key(0), (3,))
      >>> y, cache = layer.forward(params, jnp.array([[1.0, 2.0, 3.0]]))
      >>> grads, dx = layer.backward(params, cache, jnp.ones((1, 3)))
      >>> out_shape, sorted(params), [round(v, 3) for v in y[0].tolist()], dx.tolist()
      ((3,), ['offset', 'scale'], [-1.225, 0.0, 1.225], [[0.0, 0.0, 0.0]])
    """

    eps: float = 1e-5
    _: dataclasses.KW_ONLY
    scale: bool = True
    offset: bool = True

    def __post_init__(self) -> None:
        eps = self.eps
        if not is_real(eps) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(
                f"eps: expected a positive finite number added to the variance, got {eps!r}."
            )
        object.__setattr__(self, "eps", float(eps))
        object.__setattr__(self, "scale", bool(self.scale))
        object.__setattr__(self, "offset", bool(self.offset))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``scale = 1`` and ``offset = 0``, shape ``(n,)``; the output has the input's shape.

        Args:
          key: unused (the initial values are fixed).
          in_shape: ``(..., n)``: the features are the last axis.
          dtype: the params' floating dtype.

        Returns:
          ``({"scale": (n,), "offset": (n,)}, in_shape)``, without the disabled ones.

        Raises:
          ValueError: ``in_shape`` is ``()``: there is no feature axis to normalise over.
        """
        del key
        in_shape = tuple(in_shape)
        if not in_shape:
            raise ValueError(
                "in_shape: LayerNorm normalises over the last axis of (batch, ..., n) inputs, "
                "got a scalar feature shape (); give each example at least one feature axis."
            )
        n = in_shape[-1]
        params = {}
        if self.scale:
            params["scale"] = jnp.ones((n,), dtype)
        if self.offset:
            params["offset"] = jnp.zeros((n,), dtype)
        return params, in_shape

    def _check(self, params: dict[str, Array], x: Array) -> None:
        shape = jnp.shape(x)
        if not shape:
            raise ValueError("x: LayerNorm takes inputs (batch, ..., n), got a scalar.")
        for name in ("scale", "offset"):
            if name in params and jnp.shape(params[name]) != shape[-1:]:
                raise ValueError(
                    f"params[{name!r}]: expected shape {shape[-1:]} for inputs of shape {shape} "
                    f"(n = {shape[-1]} features on the last axis), got {jnp.shape(params[name])}."
                )

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, LayerNormCache]:
        """``y = γ ∘ x̂ + β``, shape ``(batch, ..., n)`` like ``x``, and the cache ``(x̂, 1/σ)``.

        Raises:
          ValueError: ``x`` has no feature axis, or not the params' ``n`` features.
        """
        self._check(params, x)
        xs = x.astype(_stats_dtype(x.dtype))
        mu = jnp.mean(xs, axis=-1, keepdims=True)  # μ = (1/n) Σ_i x_i
        xc = xs - mu
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)  # var = (1/n) Σ_i (x_i − μ)²
        inv_sigma = 1 / jnp.sqrt(var + self.eps)  # 1/σ
        x_hat = (xc * inv_sigma).astype(x.dtype)  # x̂ = (x − μ) / σ
        y = x_hat
        if self.scale:
            y = y * params["scale"]  # γ ∘ x̂
        if self.offset:
            y = y + params["offset"]  # + β
        return y, LayerNormCache(x_hat, inv_sigma)

    def example_grads(
        self, params: dict[str, Array], cache: LayerNormCache, dy: Array
    ) -> dict[str, Array]:
        """The extension rule (:mod:`bpjax.extend.rules`): per example ``Σ_t dy_t ∘ x̂_t`` and
        ``Σ_t dy_t`` over its positions, ``(batch, n)`` each; the other rules square these."""
        axes = tuple(range(1, dy.ndim - 1))  # the positions between the batch and the features
        grads = {}
        if self.scale:
            grads["scale"] = jnp.sum(dy * cache.x_hat, axis=axes)
        if self.offset:
            grads["offset"] = jnp.sum(dy, axis=axes)
        return grads

    def backward(
        self, params: dict[str, Array], cache: LayerNormCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``∂C/∂x = (1/σ)(g − mean(g) − x̂ ∘ mean(g ∘ x̂))``, ``g = γ ∘ dy``; ``∂C/∂γ``, ``∂C/∂β``.

        Args:
          params: as from :meth:`init`.
          cache: from :meth:`forward`.
          dy: ``∂C/∂y``, shape ``(batch, ..., n)``.

        Returns:
          ``(grads, dx)``: ``grads["scale"] = Σ dy ∘ x̂`` and ``grads["offset"] = Σ dy`` (sums
          over every axis but the last, shape ``(n,)``), and ``dx`` shaped like ``dy``.
        """
        x_hat, inv_sigma = cache
        lead = tuple(range(dy.ndim - 1))  # the batch axis and any axes before the features
        grads = {}
        if self.scale:
            grads["scale"] = jnp.sum(dy * x_hat, axis=lead)  # ∂C/∂γ = Σ dy ∘ x̂
        if self.offset:
            grads["offset"] = jnp.sum(dy, axis=lead)  # ∂C/∂β = Σ dy
        g = dy * params["scale"] if self.scale else dy  # g = ∂C/∂x̂ = γ ∘ dy
        compute = inv_sigma.dtype
        g, x_hat = g.astype(compute), x_hat.astype(compute)
        g_mean = jnp.mean(g, axis=-1, keepdims=True)  # mean(g)
        gx_mean = jnp.mean(g * x_hat, axis=-1, keepdims=True)  # mean(g ∘ x̂)
        dx = inv_sigma * (g - g_mean - x_hat * gx_mean)  # (1/σ)(g − mean(g) − x̂ mean(g x̂))
        return grads, dx.astype(dy.dtype)
