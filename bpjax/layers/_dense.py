"""The fully connected layer :class:`Dense`: ``z = x Wᵀ + b``, ``a = f(z)``."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax import activations as _act
from bpjax._types import Array, PRNGKey

__all__ = ["Dense", "DenseCache"]

# variance = scale / fan: He 2/n_in, Glorot 2/(n_in + n_out) = 1/fan_avg
_INIT_SCALING: dict[str, tuple[float, Any]] = {
    "he": (2.0, "fan_in"),
    "glorot": (1.0, "fan_avg"),
}

# 2·B·n_l·n_{l-1} FLOPs above which ∇W materialises δᵀ on CPU (see _weight_grad). Measured with
# benchmarks/bench_mlp.py on a 2-core x86 CPU: a 2048×2048 ∇W at B=512 runs 28% faster through the
# copy; 2048×1024 at B=512 breaks even; at 512×784 and B=256 the copy costs the whole step ~3%.
_MATERIALISE_DELTA_T_FLOPS = 2**31


def _weight_grad(delta: Array, a_prev: Array) -> Array:
    """``δᵀ a_prev``, shape ``(n_l, n_{l-1})``: the batch-summed outer products.

    XLA:CPU hands a dot to its fast library (YNNPACK) only when the left operand is not
    transposed, and folds a plain ``δ.T`` into the dot; so for large dots on CPU ``δᵀ`` is
    materialised first, an O(B·n_l) copy that makes the O(B·n_l·n_{l-1}) dot up to 28% faster.
    Small dots and other platforms take ``δ.T`` as it is.
    """
    (batch, n_out), n_in = delta.shape, a_prev.shape[-1]
    if 2 * batch * n_out * n_in <= _MATERIALISE_DELTA_T_FLOPS:
        return delta.T @ a_prev
    return jax.lax.platform_dependent(
        delta,
        a_prev,
        cpu=lambda d, a: jax.lax.optimization_barrier(d.T) @ a,
        default=lambda d, a: d.T @ a,
    )


class DenseCache(NamedTuple):
    """What :meth:`Dense.forward` keeps for the backward pass."""

    x: Array  # (batch, ..., n_in): the layer's input a^{l-1}
    z: Array  # (batch, ..., n_out): the weighted input z^l
    a: Array  # (batch, ..., n_out): the activation a^l = f(z^l)


@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer ``z = x Wᵀ + b``, ``a = f(z)``; ``W`` has shape ``(n_out, n_in)``.

    Args:
      n_out: the number of units.
      activation: a name from :data:`bpjax.ACTIVATIONS` or a :class:`bpjax.Activation`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dense(3, "tanh")
      >>> params, out_shape = layer.init(jax.random.key(0), (2,))
      >>> y, cache = layer.forward(params, jnp.ones((4, 2)))
      >>> grads, dx = layer.backward(params, cache, jnp.ones((4, 3)))
      >>> out_shape, grads["W"].shape, dx.shape
      ((3,), (3, 2), (4, 2))
    """

    n_out: int
    activation: _act.Activation = _act.identity

    def __post_init__(self) -> None:
        if isinstance(self.n_out, bool) or not isinstance(self.n_out, int) or self.n_out < 1:
            raise ValueError(f"n_out: expected a positive integer, got {self.n_out!r}.")
        act = _act.get_activation(self.activation)
        if act.init not in _INIT_SCALING:
            raise ValueError(
                f"activation: {act.name!r} has init={act.init!r}; expected one of "
                f"{', '.join(sorted(_INIT_SCALING))}."
            )
        object.__setattr__(self, "activation", act)

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``W`` truncated normal (Glorot, or He for the ReLU family), ``b = 0``.

        ``in_shape`` is ``(n_in,)``, or ``(..., n_in)`` for inputs with leading axes (time steps,
        positions), which share the weights: the layer acts on the last axis.

        Returns:
          ``({"W": (n_out, n_in), "b": (n_out,)}, (..., n_out))``.
        """
        if len(in_shape) < 1:
            raise ValueError(
                "in_shape: Dense takes inputs of shape (batch, ..., n_in), got a scalar feature "
                "shape (); give each example at least one feature axis."
            )
        *lead, n_in = in_shape
        initializer = jax.nn.initializers.variance_scaling(
            *_INIT_SCALING[self.activation.init], "truncated_normal", in_axis=-1, out_axis=-2
        )
        params = {
            "W": initializer(key, (self.n_out, n_in), dtype),
            "b": jnp.zeros((self.n_out,), dtype),
        }
        return params, (*lead, self.n_out)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, DenseCache]:
        """``a = f(x Wᵀ + b)``, shape ``(batch, n_out)``, and the cache ``(x, z, a)``."""
        z = x @ params["W"].T + params["b"]
        a = self.activation.forward(z)
        return a, DenseCache(x, z, a)

    def delta(self, cache: DenseCache, dy: Array) -> Array:
        """``δ = J_f(z)ᵀ dy``, shape ``(batch, n_out)``: the error at the weighted input."""
        return self.activation.backward(cache.z, cache.a, dy)

    def backward_delta(
        self, params: dict[str, Array], cache: DenseCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``δ``: ``∇W = δᵀ x``, ``∇b = Σ_n δ_n``, ``dx = δ W`` (shape ``(batch, n_in)``).

        With leading axes, ``(batch, ..., n)``, the sums run over the batch and those axes.
        """
        n_out, n_in = params["W"].shape
        flat_delta, flat_x = delta.reshape(-1, n_out), cache.x.reshape(-1, n_in)
        grads = {"W": _weight_grad(flat_delta, flat_x), "b": jnp.sum(flat_delta, axis=0)}
        return grads, delta @ params["W"]

    def backward(
        self, params: dict[str, Array], cache: DenseCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂a``: ``δ = J_fᵀ dy``, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))
