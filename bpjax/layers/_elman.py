"""The Elman layer :class:`Elman`, ``h_t = f(x_t W_xhᵀ + h_{t−1} W_hhᵀ + b)``: BPTT written out.

The maths of backpropagation through time, truncation and the recorded ``δ_t``:
:mod:`bpjax.layers._recurrent`, which holds the helpers the recurrent layers share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.activations import Activation
from bpjax.layers._init import (
    checked_activation,
    orthogonal_weight,
    positive_int,
    truncated_normal_weight,
)
from bpjax.layers._recurrent import (
    check_error,
    check_in_shape,
    check_sequence,
    check_truncate,
    keep_mask,
    recurrent_example_grads,
    recurrent_example_sq_norms,
    recurrent_grads,
    recurrent_square_sums,
    shifted,
    time_major,
    zero_state,
)

__all__ = ["Elman", "ElmanCache"]


# -- Elman -----------------------------------------------------------------------------------


class ElmanCache(NamedTuple):
    """What :meth:`Elman.forward` keeps for backpropagation through time."""

    x: Array  # (batch, T, n_in): the input sequence
    z: Array  # (batch, T, hidden): the weighted inputs z_t
    h: Array  # (batch, T, hidden): the hidden states h_t = f(z_t), also the layer's output
    W_hh: Array  # (hidden, hidden): the recurrent weights the forward used (for the δ-recursion)


@dataclasses.dataclass(frozen=True, init=False)
class Elman:
    """An Elman recurrent layer: ``h_t = f(x_t W_xhᵀ + h_{t−1} W_hhᵀ + b)``, ``h_0 = 0``.

    Maps sequences ``x`` of shape ``(batch, T, n_in)`` to all hidden states ``h``, shape
    ``(batch, T, hidden)``. Params are ``{"W_xh": (hidden, n_in), "W_hh": (hidden, hidden),
    "b": (hidden,)}``. The backward is BPTT as in the module docstring: a reversed ``lax.scan``
    for ``δ_t = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)``, then the weight gradients and ``∂C/∂x`` as one
    matrix product each over all ``batch · T`` rows. :meth:`forward_shifted` is the forward with a
    shift ``dz_t`` added to every ``z_t``, whose ``jax.vjp`` at ``dz = 0`` is ``δ``:
    :func:`bpjax.check_network` checks the recorded ``δ`` against it.

    Args:
      hidden: the number of hidden units.
      activation: a name from :data:`bpjax.ACTIVATIONS` or a :class:`bpjax.Activation`;
        ``"tanh"`` by default.
      truncate: ``None`` for full BPTT, or ``k ≥ 1``: truncated BPTT in chunks of ``k`` steps
        (the state entering steps ``k, 2k, …``, 0-based, is a constant for the gradient). The
        recorded ``δ`` and the weight gradients are then the truncated ones, not ``∂C/∂z`` and
        ``∇C``: truncated BPTT is not the gradient of the loss, and :func:`bpjax.check_network`
        (whose references are the loss's true derivatives) reports the difference.

    Raises:
      ValueError: ``hidden`` or ``truncate`` not a positive integer, an unknown activation.
      TypeError: an activation that is neither a name nor an :class:`bpjax.Activation`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Elman(4)
      >>> params, out_shape = layer.init(jax.random.key(0), (5, 3))  # T = 5 steps of 3 features
      >>> y, cache = layer.forward(params, jnp.ones((2, 5, 3)))
      >>> grads, dx = layer.backward(params, cache, jnp.ones((2, 5, 4)))
      >>> out_shape, y.shape, grads["W_hh"].shape, dx.shape
      ((5, 4), (2, 5, 4), (4, 4), (2, 5, 3))
    """

    hidden: int
    activation: Activation  # a name is resolved to its Activation by __init__
    truncate: int | None

    def __init__(
        self,
        hidden: int,
        activation: str | Activation = "tanh",
        *,
        truncate: int | None = None,
    ) -> None:
        object.__setattr__(self, "hidden", positive_int(hidden, "hidden"))
        object.__setattr__(self, "activation", checked_activation(activation))
        object.__setattr__(self, "truncate", check_truncate(truncate))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``W_xh`` truncated normal (Glorot, He for ReLUs), ``W_hh`` orthogonal, ``b = 0``.

        Args:
          key: a PRNG key.
          in_shape: ``(T, n_in)``, one example's shape.
          dtype: the params' dtype.

        Returns:
          ``({"W_xh": (hidden, n_in), "W_hh": (hidden, hidden), "b": (hidden,)}, (T, hidden))``.

        Raises:
          ValueError: ``in_shape`` not ``(T, n_in)`` of positive integers.
        """
        steps, n_in = check_in_shape("Elman", in_shape)
        k_xh, k_hh = jax.random.split(key)
        params = {
            "W_xh": truncated_normal_weight(k_xh, (self.hidden, n_in), dtype, self.activation.init),
            "W_hh": orthogonal_weight(k_hh, (self.hidden, self.hidden), dtype),
            "b": jnp.zeros((self.hidden,), dtype),
        }
        return params, (steps, self.hidden)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, ElmanCache]:
        """All hidden states ``h``, shape ``(batch, T, hidden)``, and the cache ``(x, z, h, W_hh)``.

        ``x W_xhᵀ + b`` is one matrix product for all steps; the scan adds ``h_{t−1} W_hhᵀ``.

        Raises:
          ValueError: ``x`` not of shape ``(batch, T, n_in)`` (at trace time).
        """
        h, z = self.forward_shifted(params, x)
        return h, ElmanCache(x, z, h, params["W_hh"])

    def forward_shifted(
        self, params: dict[str, Array], x: Array, dz: Array | None = None
    ) -> tuple[Array, Array]:
        """The forward with ``dz_t`` added to every weighted input: ``(h, z)``, both per step.

        ``z_t = x_t W_xhᵀ + b + h_{t−1} W_hhᵀ + dz_t`` and ``h_t = f(z_t)``, the shift inside the
        recurrence, so ``h_{t+1}, h_{t+2}, …`` see it too; ``dz`` has the shape of ``δ``,
        ``(batch, T, hidden)``, and ``None`` is no shift (:meth:`forward`). ``∂C/∂dz`` at
        ``dz = 0`` is the full-BPTT ``δ`` (the optional ``forward_shifted`` of the layer
        protocol, which :func:`bpjax.check_network` differentiates with ``jax.vjp``).

        Raises:
          ValueError: ``x`` not of shape ``(batch, T, n_in)``, or ``dz`` not of ``z``'s shape
            (at trace time).
        """
        check_sequence("Elman", x, params["W_xh"].shape[1])
        w_hh, f = params["W_hh"], self.activation.forward
        u = x @ params["W_xh"].T + params["b"]  # (batch, T, hidden): x_t W_xhᵀ + b for every t
        u = shifted("Elman", u, dz)  # + dz_t: the shift is part of every step's z_t

        def step(h_prev: Array, u_t: Array) -> tuple[Array, tuple[Array, Array]]:
            z_t = u_t + h_prev @ w_hh.T  # z_t = x_t W_xhᵀ + b + h_{t−1} W_hhᵀ (+ dz_t)
            h_t = f(z_t)  # h_t = f(z_t)
            return h_t, (z_t, h_t)

        h0 = zero_state(u[:, 0], w_hh[0])  # h_0 = 0, (batch, hidden), typed like h_t (shard_map)
        _, (z, h) = jax.lax.scan(step, h0, time_major(u))
        return time_major(h), time_major(z)

    def delta(self, cache: ElmanCache, dy: Array) -> Array:
        """BPTT: ``δ_t = ∂C/∂z_t`` for every step, shape ``(batch, T, hidden)``.

        ``δ_t = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)`` by one reversed ``lax.scan`` (the activation's
        hand-written backward), with ``δ_{T+1} W_hh = 0`` and, under ``truncate=k``, the
        recurrent term ``δ_{t+1} W_hh`` reset to zero at every chunk boundary.
        """
        check_error("Elman", dy, cache.h.shape)
        w_hh, f_backward = cache.W_hh, self.activation.backward
        keep = keep_mask(cache.h.shape[1], self.truncate)

        def step(dh_next: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
            z_t, h_t, dy_t, *keep_t = xs
            delta_t = f_backward(z_t, h_t, dy_t + dh_next)  # δ_t = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)
            dh_prev = delta_t @ w_hh  # ∂C/∂h_{t−1} through the recurrence: δ_t W_hh
            if keep_t:  # truncated BPTT: h_{t−1} is a constant at a chunk boundary
                dh_prev = jnp.where(keep_t[0], dh_prev, jnp.zeros_like(dh_prev))
            return dh_prev, delta_t

        xs = tuple(time_major(a) for a in (cache.z, cache.h, dy))
        if keep is not None:
            xs = (*xs, jnp.asarray(keep))
        # δ_{T+1} W_hh = 0, (batch, hidden); every forward state shares h's type (zero_state)
        dh_last = zero_state(dy[:, 0], cache.h[:, 0], w_hh[0])
        _, delta = jax.lax.scan(step, dh_last, xs, reverse=True)
        return time_major(delta)

    def backward_delta(
        self, params: dict[str, Array], cache: ElmanCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """The weight gradients and ``dx`` from ``δ`` (shape ``(batch, T, hidden)``).

        ``∇W_xh = Σ_t δ_tᵀ x_t``, ``∇W_hh = Σ_t δ_tᵀ h_{t−1}``, ``∇b = Σ_{t,n} δ_{t,n}``,
        ``dx = δ W_xh``: each one matrix product over all ``batch · T`` rows; ``dx`` has shape
        ``(batch, T, n_in)``.
        """
        w_xh, w_hh, b, dx = recurrent_grads(delta, cache.x, cache.h, params["W_xh"])
        return {"W_xh": w_xh, "W_hh": w_hh, "b": b}, dx

    def backward(
        self, params: dict[str, Array], cache: ElmanCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂h`` (batch, T, hidden): :meth:`delta`, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))

    # -- extension rules (bpjax.extend.rules): sums over the steps of outer products --------

    def example_grads(
        self, params: dict[str, Array], cache: ElmanCache, delta: Array
    ) -> dict[str, Array]:
        """Per example ``Σ_t δ_t x_tᵀ``, ``Σ_t δ_t h_{t−1}ᵀ``, ``Σ_t δ_t``: ``(batch, *leaf)``."""
        return recurrent_example_grads(delta, cache.x, cache.h, ("W_xh", "W_hh", "b"))

    def example_sq_norms(
        self, params: dict[str, Array], cache: ElmanCache, delta: Array
    ) -> dict[str, Array]:
        """Per-example squared norms (the Gram form over steps where cheaper): ``(batch,)``."""
        return recurrent_example_sq_norms(delta, cache.x, cache.h, ("W_xh", "W_hh", "b"))

    def square_sum(
        self, params: dict[str, Array], cache: ElmanCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c Σ_n w_{c,n} (∇θ_{c,n})²``, like params."""
        return recurrent_square_sums(
            deltas, cache.x, cache.h, weights, ("W_xh", "W_hh", "b"), per_example=False
        )

    def example_square_sums(
        self, params: dict[str, Array], cache: ElmanCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (∇θ_{c,n})²`` per example, leaves ``(batch, *leaf)``."""
        return recurrent_square_sums(
            deltas, cache.x, cache.h, weights, ("W_xh", "W_hh", "b"), per_example=True
        )
