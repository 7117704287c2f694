"""The fully connected layer :class:`Dense`: ``z = x Wᵀ + b``, ``a = f(z)``."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.activations import Activation
from bpjax.layers._init import (
    checked_activation,
    positive_int,
    truncated_normal_weight,
    weight_grad,
)
from bpjax.layers._outer import (
    example_outer,
    example_outer_sq_norms,
    example_outer_square_sums,
    kfac_outer,
    outer_square_sum,
)

__all__ = ["Dense", "DenseCache"]


class DenseCache(NamedTuple):
    """What :meth:`Dense.forward` keeps for the backward pass."""

    x: Array  # (batch, ..., n_in): the layer's input a^{l-1}
    z: Array  # (batch, ..., n_out): the weighted input z^l
    a: Array  # (batch, ..., n_out): the activation a^l = f(z^l)


@dataclasses.dataclass(frozen=True, init=False)
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
    activation: Activation  # a name is resolved to its Activation by __init__

    def __init__(self, n_out: int, activation: str | Activation = "identity") -> None:
        object.__setattr__(self, "n_out", positive_int(n_out, "n_out"))
        object.__setattr__(self, "activation", checked_activation(activation))

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
        params = {
            "W": truncated_normal_weight(key, (self.n_out, n_in), dtype, self.activation.init),
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
        grads = {"W": weight_grad(flat_delta, flat_x), "b": jnp.sum(flat_delta, axis=0)}
        return grads, delta @ params["W"]

    def backward(
        self, params: dict[str, Array], cache: DenseCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂a``: ``δ = J_fᵀ dy``, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))

    # -- extension rules (bpjax.extend.rules): g_n = Σ_t δ_{n,t} x_{n,t}ᵀ over the positions t ----

    def example_grads(
        self, params: dict[str, Array], cache: DenseCache, delta: Array
    ) -> dict[str, Array]:
        """``∇W_n = Σ_t δ_{n,t} x_{n,t}ᵀ``, ``∇b_n = Σ_t δ_{n,t}``: ``(batch, n_out, n_in)``,
        ``(batch, n_out)``."""
        d, x = _rows(delta), _rows(cache.x)
        return {"W": example_outer(d, x), "b": jnp.sum(d, axis=1)}

    def example_sq_norms(
        self, params: dict[str, Array], cache: DenseCache, delta: Array
    ) -> dict[str, Array]:
        """``‖∇W_n‖²`` (``‖δ_n‖²‖x_n‖²`` on vectors, else the cheaper of the Gram form and the
        materialised ``∇W_n``) and ``‖∇b_n‖²``, each ``(batch,)``."""
        d, x = _rows(delta), _rows(cache.x)
        return {"W": example_outer_sq_norms(d, x), "b": jnp.sum(jnp.sum(d, axis=1) ** 2, axis=-1)}

    def square_sum(
        self, params: dict[str, Array], cache: DenseCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c Σ_n w_{c,n} (∇θ_{c,n})²``; on vectors ``(Σ_c w δ_c²)ᵀ x²``, one product."""
        d, x = _column_rows(deltas), _rows(cache.x)
        bias = jnp.einsum("cb,cbm->m", weights, jnp.sum(d, axis=2) ** 2)
        return {"W": outer_square_sum(d, x, weights), "b": bias}

    def example_square_sums(
        self, params: dict[str, Array], cache: DenseCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (∇θ_{c,n})²`` per example: ``(batch, n_out, n_in)``, ``(batch, n_out)``."""
        d, x = _column_rows(deltas), _rows(cache.x)
        bias = jnp.einsum("cb,cbm->bm", weights, jnp.sum(d, axis=2) ** 2)
        return {"W": example_outer_square_sums(d, x, weights), "b": bias}

    def kfac_factors(
        self,
        params: dict[str, Array],
        cache: DenseCache,
        deltas: Array,
        weights: Array,
        example_weights: Array | None = None,
    ) -> tuple[Array, Array]:
        """KFAC's ``(A, G)`` for ``W̄ = [W | b]``; with ``P`` positions (KFC's independence of
        positions) ``A = (1/(B·P)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ``, ``ā = [x; 1]``, and
        ``G = Σ_c Σ_n w_{c,n} Σ_t δ_{c,n,t} δ_{c,n,t}ᵀ``; ``deltas`` ``(k, batch, ..., n_out)``.
        ``example_weights`` ``(batch,)`` replace ``A``'s ``1/B`` (see ``kfac_outer``)."""
        return kfac_outer(_column_rows(deltas), _rows(cache.x), weights, example_weights)


def _rows(v: Array) -> Array:
    """``(batch, ..., n)`` as ``(batch, P, n)``: the positions between batch and features."""
    return v.reshape(v.shape[0], -1, v.shape[-1])


def _column_rows(v: Array) -> Array:
    """``(k, batch, ..., n)`` as ``(k, batch, P, n)``."""
    return v.reshape(v.shape[0], v.shape[1], -1, v.shape[-1])
