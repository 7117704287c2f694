"""The long short-term memory layer :class:`LSTM`, BPTT written out.

The maths of backpropagation through time, truncation and the recorded ``δ_t``:
:mod:`bpjax.layers._recurrent`, which holds the helpers the recurrent layers share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.layers._init import (
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
    previous,
    recurrent_example_grads,
    recurrent_example_sq_norms,
    recurrent_grads,
    recurrent_square_sums,
    shifted,
    time_major,
    zero_state,
)

__all__ = ["LSTM", "LSTMCache"]


# -- LSTM ------------------------------------------------------------------------------------


class LSTMCache(NamedTuple):
    """What :meth:`LSTM.forward` keeps for backpropagation through time."""

    x: Array  # (batch, T, n_in): the input sequence
    gates: Array  # (batch, T, 4·hidden): the gate activations [i, f, g, o] at each step
    c: Array  # (batch, T, hidden): the cell states c_t
    tanh_c: Array  # (batch, T, hidden): tanh(c_t)
    h: Array  # (batch, T, hidden): the hidden states h_t, also the layer's output
    W_h: Array  # (4·hidden, hidden): the recurrent weights the forward used


@dataclasses.dataclass(frozen=True)
class LSTM:
    """A long short-term memory layer, ``h_0 = c_0 = 0``, with gates in the order ``i, f, g, o``.

    With ``z_t = x_t W_xᵀ + h_{t−1} W_hᵀ + b`` split into four blocks of ``hidden`` columns
    ``[z^i, z^f, z^g, z^o]`` (input gate, forget gate, cell candidate, output gate; PyTorch's
    order)::

        i_t = σ(z^i_t)   f_t = σ(z^f_t)   g_t = tanh(z^g_t)   o_t = σ(z^o_t)
        c_t = f_t ∘ c_{t−1} + i_t ∘ g_t
        h_t = o_t ∘ tanh(c_t)

    Backpropagation through time carries ``(∂C/∂h_{t−1}, ∂C/∂c_{t−1})`` in a reversed
    ``lax.scan``; at step ``t``, with ``dh = dy_t + δ_{t+1} W_h`` and ``dc`` the cell error
    carried from step ``t+1`` (``f_{t+1} ∘ dc_{t+1}``)::

        dc_t   = dc + dh ∘ o_t ∘ (1 − tanh²(c_t))
        δ^i_t  = dc_t ∘ g_t ∘ i_t (1 − i_t)        δ^f_t = dc_t ∘ c_{t−1} ∘ f_t (1 − f_t)
        δ^g_t  = dc_t ∘ i_t ∘ (1 − g_t²)           δ^o_t = dh ∘ tanh(c_t) ∘ o_t (1 − o_t)
        ∂C/∂h_{t−1} = δ_t W_h,   ∂C/∂c_{t−1} = dc_t ∘ f_t

    and, as for :class:`Elman`, ``∇W_x = Σ_t δ_tᵀ x_t``, ``∇W_h = Σ_t δ_tᵀ h_{t−1}``,
    ``∇b = Σ δ``, ``∂C/∂x = δ W_x``, each one matrix product over all ``batch · T`` rows.
    ``truncate=k`` resets both carried errors to zero at steps ``k, 2k, …`` (0-based).
    :meth:`forward_shifted` is the forward with a shift ``dz_t`` added to every ``z_t``, whose
    ``jax.vjp`` at ``dz = 0`` is ``δ``: :func:`bpjax.check_network` checks the recorded ``δ``
    against it.

    Params are ``{"W_x": (4·hidden, n_in), "W_h": (4·hidden, hidden), "b": (4·hidden,)}``.
    Init: ``W_x`` Glorot truncated normal, ``W_h`` orthogonal (orthonormal columns), ``b = 0``
    except the forget-gate bias ``b^f = 1`` (so the cell remembers at the start of training;
    Gers et al. 2000, Jozefowicz et al. 2015, Keras's ``unit_forget_bias``).

    Args:
      hidden: the number of hidden units (and cell units).
      truncate: ``None`` for full BPTT, or ``k ≥ 1``: truncated BPTT in chunks of ``k`` steps.
        The recorded ``δ`` and the weight gradients are then the truncated ones: not the
        gradient of the loss, and :func:`bpjax.check_network` reports the difference.

    Raises:
      ValueError: ``hidden`` or ``truncate`` not a positive integer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LSTM(4, truncate=2)
      >>> params, out_shape = layer.init(jax.random.key(0), (5, 3))
      >>> y, cache = layer.forward(params, jnp.ones((2, 5, 3)))
      >>> grads, dx = layer.backward(params, cache, jnp.ones((2, 5, 4)))
      >>> out_shape, grads["W_h"].shape, dx.shape, params["b"][4:8].tolist()
      ((5, 4), (16, 4), (2, 5, 3), [1.0, 1.0, 1.0, 1.0])
    """

    hidden: int
    truncate: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", positive_int(self.hidden, "hidden"))
        object.__setattr__(self, "truncate", check_truncate(self.truncate))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``W_x`` Glorot, ``W_h`` orthogonal, ``b = 0`` but the forget-gate block ``b^f = 1``.

        Args:
          key: a PRNG key.
          in_shape: ``(T, n_in)``, one example's shape.
          dtype: the params' dtype.

        Returns:
          ``({"W_x": (4·hidden, n_in), "W_h": (4·hidden, hidden), "b": (4·hidden,)},
          (T, hidden))``.

        Raises:
          ValueError: ``in_shape`` not ``(T, n_in)`` of positive integers.
        """
        steps, n_in = check_in_shape("LSTM", in_shape)
        hidden = self.hidden
        k_x, k_h = jax.random.split(key)
        params = {
            "W_x": truncated_normal_weight(k_x, (4 * hidden, n_in), dtype, "glorot"),
            "W_h": orthogonal_weight(k_h, (4 * hidden, hidden), dtype),
            "b": jnp.zeros((4 * hidden,), dtype).at[hidden : 2 * hidden].set(1),
        }
        return params, (steps, hidden)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, LSTMCache]:
        """All hidden states ``h``, shape ``(batch, T, hidden)``, and an :class:`LSTMCache`.

        Raises:
          ValueError: ``x`` not of shape ``(batch, T, n_in)`` (at trace time).
        """
        gates, c, tanh_c, h = self._scan(params, x, None, keep_z=False)
        return h, LSTMCache(x, gates, c, tanh_c, h, params["W_h"])

    def forward_shifted(
        self, params: dict[str, Array], x: Array, dz: Array | None = None
    ) -> tuple[Array, Array]:
        """The forward with ``dz_t`` added to every step's gate pre-activations: ``(h, z)``.

        ``z_t = x_t W_xᵀ + b + h_{t−1} W_hᵀ + dz_t``, shape ``(batch, T, 4·hidden)`` (blocks
        ``i, f, g, o``, the shape of ``δ``), then the gate equations of the class docstring, the
        shift inside the recurrence; ``None`` is no shift. ``∂C/∂dz`` at ``dz = 0`` is the
        full-BPTT ``δ`` (the optional ``forward_shifted`` of the layer protocol, which
        :func:`bpjax.check_network` differentiates with ``jax.vjp``).

        Raises:
          ValueError: ``x`` not of shape ``(batch, T, n_in)``, or ``dz`` not of ``z``'s shape
            (at trace time).
        """
        *_, h, z = self._scan(params, x, dz, keep_z=True)
        return h, z

    def _scan(
        self, params: dict[str, Array], x: Array, dz: Array | None, *, keep_z: bool
    ) -> tuple[Array, ...]:
        """``(gates, c, tanh_c, h)`` per step, ``(batch, T, ·)``, and ``z`` too with ``keep_z``."""
        check_sequence("LSTM", x, params["W_x"].shape[1])
        w_h, hidden = params["W_h"], self.hidden
        u = x @ params["W_x"].T + params["b"]  # (batch, T, 4·hidden): x_t W_xᵀ + b for every t
        u = shifted("LSTM", u, dz)  # + dz_t: the shift is part of every step's z_t

        def step(
            carry: tuple[Array, Array], u_t: Array
        ) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
            h_prev, c_prev = carry
            z_t = u_t + h_prev @ w_h.T  # z_t = x_t W_xᵀ + b + h_{t−1} W_hᵀ, (batch, 4·hidden)
            z_i, z_f, z_g, z_o = jnp.split(z_t, 4, axis=-1)
            i, f, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jax.nn.sigmoid(z_o)
            g = jnp.tanh(z_g)
            c_t = f * c_prev + i * g  # c_t = f ∘ c_{t−1} + i ∘ g
            tanh_c = jnp.tanh(c_t)
            h_t = o * tanh_c  # h_t = o ∘ tanh(c_t)
            seqs = (jnp.concatenate([i, f, g, o], axis=-1), c_t, tanh_c, h_t)
            return (h_t, c_t), ((*seqs, z_t) if keep_z else seqs)

        zeros = zero_state(u[:, 0, :hidden], w_h[0])  # h_0 = c_0 = 0, (batch, hidden)
        _, seqs = jax.lax.scan(step, (zeros, zeros), time_major(u))
        return tuple(time_major(a) for a in seqs)

    def delta(self, cache: LSTMCache, dy: Array) -> Array:
        """BPTT: ``δ_t = ∂C/∂z_t`` at every step, shape ``(batch, T, 4·hidden)`` (gates i, f, g, o).

        One reversed ``lax.scan`` carrying ``(δ_{t+1} W_h, f_{t+1} ∘ dc_{t+1})``; see the class
        docstring for the per-step equations.
        """
        check_error("LSTM", dy, cache.h.shape)
        w_h = cache.W_h
        keep = keep_mask(cache.h.shape[1], self.truncate)

        def step(
            carry: tuple[Array, Array], xs: tuple[Array, ...]
        ) -> tuple[tuple[Array, Array], Array]:
            dh_next, dc_next = carry
            gates_t, c_prev, tanh_c, dy_t, *keep_t = xs
            i, f, g, o = jnp.split(gates_t, 4, axis=-1)
            dh = dy_t + dh_next  # ∂C/∂h_t = dy_t + δ_{t+1} W_h
            dc = dc_next + dh * o * (1 - tanh_c * tanh_c)  # ∂C/∂c_t; tanh' = 1 − tanh²
            delta_i = dc * g * (i * (1 - i))  # ∂c/∂i = g, σ' = σ(1 − σ)
            delta_f = dc * c_prev * (f * (1 - f))  # ∂c/∂f = c_{t−1}
            delta_g = dc * i * (1 - g * g)  # ∂c/∂g = i
            delta_o = dh * tanh_c * (o * (1 - o))  # ∂h/∂o = tanh(c_t)
            delta_t = jnp.concatenate([delta_i, delta_f, delta_g, delta_o], axis=-1)
            dh_prev = delta_t @ w_h  # ∂C/∂h_{t−1} = δ_t W_h
            dc_prev = dc * f  # ∂C/∂c_{t−1} = dc_t ∘ f_t
            if keep_t:  # truncated BPTT: (h_{t−1}, c_{t−1}) is a constant at a chunk boundary
                dh_prev = jnp.where(keep_t[0], dh_prev, jnp.zeros_like(dh_prev))
                dc_prev = jnp.where(keep_t[0], dc_prev, jnp.zeros_like(dc_prev))
            return (dh_prev, dc_prev), delta_t

        xs = tuple(time_major(a) for a in (cache.gates, previous(cache.c), cache.tanh_c, dy))
        if keep is not None:
            xs = (*xs, jnp.asarray(keep))
        # (δ_{T+1} W_h, f_{T+1} ∘ dc_{T+1}) = 0; every forward state shares h's type (zero_state)
        zeros = zero_state(dy[:, 0], cache.h[:, 0], w_h[0])
        _, delta = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
        return time_major(delta)

    def backward_delta(
        self, params: dict[str, Array], cache: LSTMCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """The weight gradients and ``dx`` from ``δ`` (shape ``(batch, T, 4·hidden)``).

        ``∇W_x = Σ_t δ_tᵀ x_t``, ``∇W_h = Σ_t δ_tᵀ h_{t−1}``, ``∇b = Σ_{t,n} δ_{t,n}``,
        ``dx = δ W_x``: each one matrix product over all ``batch · T`` rows; ``dx`` has shape
        ``(batch, T, n_in)``.
        """
        w_x, w_h, b, dx = recurrent_grads(delta, cache.x, cache.h, params["W_x"])
        return {"W_x": w_x, "W_h": w_h, "b": b}, dx

    def backward(
        self, params: dict[str, Array], cache: LSTMCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂h`` (batch, T, hidden): :meth:`delta`, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))

    # -- extension rules (bpjax.extend.rules): sums over the steps of outer products --------

    def example_grads(
        self, params: dict[str, Array], cache: LSTMCache, delta: Array
    ) -> dict[str, Array]:
        """Per example ``Σ_t δ_t x_tᵀ``, ``Σ_t δ_t h_{t−1}ᵀ``, ``Σ_t δ_t``: ``(batch, *leaf)``."""
        return recurrent_example_grads(delta, cache.x, cache.h, ("W_x", "W_h", "b"))

    def example_sq_norms(
        self, params: dict[str, Array], cache: LSTMCache, delta: Array
    ) -> dict[str, Array]:
        """Per-example squared norms (the Gram form over steps where cheaper): ``(batch,)``."""
        return recurrent_example_sq_norms(delta, cache.x, cache.h, ("W_x", "W_h", "b"))

    def square_sum(
        self, params: dict[str, Array], cache: LSTMCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c Σ_n w_{c,n} (∇θ_{c,n})²``, like params."""
        return recurrent_square_sums(
            deltas, cache.x, cache.h, weights, ("W_x", "W_h", "b"), per_example=False
        )

    def example_square_sums(
        self, params: dict[str, Array], cache: LSTMCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (∇θ_{c,n})²`` per example, leaves ``(batch, *leaf)``."""
        return recurrent_square_sums(
            deltas, cache.x, cache.h, weights, ("W_x", "W_h", "b"), per_example=True
        )
