"""Recurrent layers with backpropagation through time written out: :class:`Elman`, :class:`LSTM`.

Also :class:`LastStep`, which keeps the last step of a sequence (many-to-one). All three are
exported by :mod:`bpjax.layers` and, as before, by :mod:`bpjax.rnn`.

A recurrent layer maps a batch of sequences ``x`` of shape ``(batch, T, n_in)`` to the sequence of
its hidden states, shape ``(batch, T, hidden)``, so it composes with the other layers in
:func:`bpjax.serial` (rows are examples ``n``, steps ``t = 1..T``)::

    many-to-many: serial(Elman(32), Dense(k, "softmax"), loss=..., input_shape=(T, n_in))
    many-to-one:  serial(LSTM(32), LastStep(), Dense(k, "softmax"), loss=..., input_shape=(T, n_in))

The initial state is zero (``h_0 = 0``, and ``c_0 = 0`` for the LSTM) and carries no parameters.

Backpropagation through time (BPTT) is the δ-recursion of the README run over time steps instead of
layers. For the Elman layer, with ``z_t = x_t W_xhᵀ + h_{t−1} W_hhᵀ + b`` and ``h_t = f(z_t)``,
the error ``δ_t = ∂C/∂z_t`` (rows: examples) obeys::

    δ_T     = f'(z_T) ∘ dy_T
    δ_t     = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)          t = T−1 … 1: one reversed lax.scan
    ∇W_xh C = Σ_t δ_tᵀ x_t,   ∇W_hh C = Σ_t δ_tᵀ h_{t−1},   ∇b C = Σ_t Σ_n δ_{t,n}
    ∂C/∂x_t = δ_t W_xh

where ``dy_t = ∂C/∂h_t`` is the error arriving from the layers above at step ``t`` (it carries the
``1/B`` of the batch mean, as everywhere in :mod:`bpjax.layers`). Only the recursion for ``δ`` is
sequential: the scan carries ``δ_{t+1} W_hh`` and stacks every ``δ_t``; the weight gradients and
``∂C/∂x`` are then each ONE matrix product over all ``batch · T`` rows, not ``T`` small ones.

Truncated BPTT (``truncate=k``): the hidden state is carried forward across chunk boundaries but
treated there as a constant, i.e. the gradient is that of the forward with ``stop_gradient`` on
the state entering steps ``k+1, 2k+1, …`` (0-based: steps ``k, 2k, …``). In the recursion, the
recurrent error ``δ_{t+1} W_hh`` is reset to zero at each chunk boundary; the weight gradients
keep every step's ``δ_tᵀ h_{t−1}``. ``truncate=None`` is full BPTT.

The recurrent layers split their backward at ``δ`` as :class:`~bpjax.layers.Dense` does:
``delta(cache, dy)`` runs the recursion and ``backward_delta(params, cache, δ)`` the matrix
products, so :func:`bpjax.layers.backprop` records the per-step errors ``δ_t`` of every example
(the truncated ones under ``truncate``). Since ``delta`` takes no params, the cache keeps a
reference to the recurrent weights (no copy).

Their recorded ``δ_t`` is not an elementwise ``f'(z_t) ∘ dy_t`` of the error at ``h_t``: it also
flows through every later step (and an LSTM has no single ``y = f(z)``). So both layers give the
optional ``forward_shifted(params, x, dz) -> (h, z)`` of the layer protocol, the forward with
``dz_t`` added to every weighted input ``z_t`` inside the scan, written from the forward maths
alone; ``∂C/∂dz`` at ``dz = 0`` is exactly ``δ``, which is what :func:`bpjax.check_network`
compares the recorded ``δ`` with. With ``truncate=k`` the recorded ``δ`` is the truncated BPTT
error, not ``∂C/∂z``, and truncated BPTT is not the gradient of the loss: check_network reports
the difference (in the ``δ`` rows and the weights' gradient rows), as it should.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import activations as _act
from bpjax._types import Array, PRNGKey, is_int
from bpjax.layers._init import (
    checked_activation,
    orthogonal_weight,
    positive_int,
    truncated_normal_weight,
    weight_grad,
)

__all__ = [
    "LSTM",
    "Elman",
    "ElmanCache",
    "LSTMCache",
    "LastStep",
    "LastStepCache",
]


# -- helpers ---------------------------------------------------------------------------------


def _check_truncate(truncate: Any) -> int | None:
    if truncate is not None and (not is_int(truncate) or truncate < 1):
        raise ValueError(
            f"truncate: expected None (full BPTT) or a positive number of steps, got {truncate!r}."
        )
    return None if truncate is None else int(truncate)


def _check_in_shape(layer: str, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """``in_shape`` must be ``(T, n_in)``: one example is a sequence of feature vectors."""
    shape = tuple(in_shape)
    if len(shape) != 2 or any(not is_int(n) or n < 1 for n in shape):
        raise ValueError(
            f"in_shape: {layer} takes sequences of shape (batch, T, n_in), so in_shape must be "
            f"(T, n_in) with positive integers; got {in_shape!r}."
        )
    return int(shape[0]), int(shape[1])


def _check_sequence(layer: str, x: Array, n_in: int) -> None:
    """``x`` must be ``(batch, T, n_in)`` with ``T ≥ 1``; checked at trace time."""
    shape = jnp.shape(x)
    if len(shape) != 3 or shape[1] < 1 or shape[2] != n_in:
        raise ValueError(
            f"x: {layer} expects sequences of shape (batch, T, {n_in}) with T ≥ 1, got {shape}."
        )


def _check_error(layer: str, dy: Array, want: tuple[int, ...]) -> None:
    if jnp.shape(dy) != want:
        raise ValueError(
            f"dy: {layer} expects the error at its output to have the output's shape {want}, "
            f"got {jnp.shape(dy)}."
        )


def _time_major(a: Array) -> Array:
    """``(batch, T, ...) -> (T, batch, ...)``: lax.scan runs over the leading axis."""
    return jnp.swapaxes(a, 0, 1)


def _previous(a: Array) -> Array:
    """``a_{t−1}`` for ``t = 1..T`` with ``a_0 = 0``: shape ``(batch, T, n)``, shifted by a step."""
    return jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)


def _recurrent_grads(
    delta: Array, x: Array, h: Array, w_in: Array
) -> tuple[Array, Array, Array, Array]:
    """A recurrent layer's gradients from its per-step δ, each one product over batch·T rows.

    ``δ`` is ``(batch, T, m)`` (``m = hidden``, or ``4·hidden`` for the LSTM's gates), ``x`` the
    input ``(batch, T, n_in)``, ``h`` the hidden states ``(batch, T, hidden)``. Returns
    ``(Σ_t δ_tᵀ x_t, Σ_t δ_tᵀ h_{t−1}, Σ_{t,n} δ_{t,n}, δ W_in)``.
    """
    flat_delta = delta.reshape(-1, delta.shape[-1])  # (batch·T, m)
    return (
        weight_grad(flat_delta, x.reshape(-1, x.shape[-1])),
        weight_grad(flat_delta, _previous(h).reshape(-1, h.shape[-1])),
        jnp.sum(flat_delta, axis=0),
        delta @ w_in,
    )


def _shifted(layer: str, u: Array, dz: Array | None) -> Array:
    """``u + dz``: the shift of every step's weighted input, checked to have z's shape.

    ``u_t = x_t Wᵀ + b`` is the part of ``z_t`` outside the recurrence, so the scan on ``u + dz``
    computes ``z_t + dz_t = x_t Wᵀ + b + h_{t−1} W_hᵀ + dz_t`` at every step.
    """
    if dz is None:
        return u
    if jnp.shape(dz) != u.shape:
        raise ValueError(
            f"dz: {layer} shifts its weighted input z, shape {u.shape}; got a shift of shape "
            f"{jnp.shape(dz)}."
        )
    return u + dz


def _keep_mask(steps: int, truncate: int | None) -> np.ndarray | None:
    """``keep[t]``: does the recurrent error flow from step ``t`` into step ``t − 1`` (0-based)?

    ``None`` for full BPTT (it always does; at ``t = 0`` it reaches the constant ``h_0`` and is
    dropped). With ``truncate=k`` it is cut at ``t = k, 2k, …``.
    """
    if truncate is None:
        return None
    return np.arange(steps) % truncate != 0


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
    activation: _act.Activation  # a name is resolved to its Activation by __init__
    truncate: int | None

    def __init__(
        self,
        hidden: int,
        activation: str | _act.Activation = "tanh",
        *,
        truncate: int | None = None,
    ) -> None:
        object.__setattr__(self, "hidden", positive_int(hidden, "hidden"))
        object.__setattr__(self, "activation", checked_activation(activation))
        object.__setattr__(self, "truncate", _check_truncate(truncate))

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
        steps, n_in = _check_in_shape("Elman", in_shape)
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
        _check_sequence("Elman", x, params["W_xh"].shape[1])
        w_hh, f = params["W_hh"], self.activation.forward
        u = x @ params["W_xh"].T + params["b"]  # (batch, T, hidden): x_t W_xhᵀ + b for every t
        u = _shifted("Elman", u, dz)  # + dz_t: the shift is part of every step's z_t

        def step(h_prev: Array, u_t: Array) -> tuple[Array, tuple[Array, Array]]:
            z_t = u_t + h_prev @ w_hh.T  # z_t = x_t W_xhᵀ + b + h_{t−1} W_hhᵀ (+ dz_t)
            h_t = f(z_t)  # h_t = f(z_t)
            return h_t, (z_t, h_t)

        h0 = jnp.zeros((u.shape[0], self.hidden), u.dtype)
        _, (z, h) = jax.lax.scan(step, h0, _time_major(u))
        return _time_major(h), _time_major(z)

    def delta(self, cache: ElmanCache, dy: Array) -> Array:
        """BPTT: ``δ_t = ∂C/∂z_t`` for every step, shape ``(batch, T, hidden)``.

        ``δ_t = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)`` by one reversed ``lax.scan`` (the activation's
        hand-written backward), with ``δ_{T+1} W_hh = 0`` and, under ``truncate=k``, the
        recurrent term ``δ_{t+1} W_hh`` reset to zero at every chunk boundary.
        """
        _check_error("Elman", dy, cache.h.shape)
        w_hh, f_backward = cache.W_hh, self.activation.backward
        keep = _keep_mask(cache.h.shape[1], self.truncate)

        def step(dh_next: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
            z_t, h_t, dy_t, *keep_t = xs
            delta_t = f_backward(z_t, h_t, dy_t + dh_next)  # δ_t = f'(z_t) ∘ (dy_t + δ_{t+1} W_hh)
            dh_prev = delta_t @ w_hh  # ∂C/∂h_{t−1} through the recurrence: δ_t W_hh
            if keep_t:  # truncated BPTT: h_{t−1} is a constant at a chunk boundary
                dh_prev = jnp.where(keep_t[0], dh_prev, jnp.zeros_like(dh_prev))
            return dh_prev, delta_t

        xs = tuple(_time_major(a) for a in (cache.z, cache.h, dy))
        if keep is not None:
            xs = (*xs, jnp.asarray(keep))
        dh_last = jnp.zeros_like(dy[:, 0])
        _, delta = jax.lax.scan(step, dh_last, xs, reverse=True)
        return _time_major(delta)

    def backward_delta(
        self, params: dict[str, Array], cache: ElmanCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """The weight gradients and ``dx`` from ``δ`` (shape ``(batch, T, hidden)``).

        ``∇W_xh = Σ_t δ_tᵀ x_t``, ``∇W_hh = Σ_t δ_tᵀ h_{t−1}``, ``∇b = Σ_{t,n} δ_{t,n}``,
        ``dx = δ W_xh``: each one matrix product over all ``batch · T`` rows; ``dx`` has shape
        ``(batch, T, n_in)``.
        """
        w_xh, w_hh, b, dx = _recurrent_grads(delta, cache.x, cache.h, params["W_xh"])
        return {"W_xh": w_xh, "W_hh": w_hh, "b": b}, dx

    def backward(
        self, params: dict[str, Array], cache: ElmanCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂h`` (batch, T, hidden): :meth:`delta`, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))


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
        object.__setattr__(self, "truncate", _check_truncate(self.truncate))

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
        steps, n_in = _check_in_shape("LSTM", in_shape)
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
        _check_sequence("LSTM", x, params["W_x"].shape[1])
        w_h, hidden = params["W_h"], self.hidden
        u = x @ params["W_x"].T + params["b"]  # (batch, T, 4·hidden): x_t W_xᵀ + b for every t
        u = _shifted("LSTM", u, dz)  # + dz_t: the shift is part of every step's z_t

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

        zeros = jnp.zeros((u.shape[0], hidden), u.dtype)
        _, seqs = jax.lax.scan(step, (zeros, zeros), _time_major(u))
        return tuple(_time_major(a) for a in seqs)

    def delta(self, cache: LSTMCache, dy: Array) -> Array:
        """BPTT: ``δ_t = ∂C/∂z_t`` at every step, shape ``(batch, T, 4·hidden)`` (gates i, f, g, o).

        One reversed ``lax.scan`` carrying ``(δ_{t+1} W_h, f_{t+1} ∘ dc_{t+1})``; see the class
        docstring for the per-step equations.
        """
        _check_error("LSTM", dy, cache.h.shape)
        w_h = cache.W_h
        keep = _keep_mask(cache.h.shape[1], self.truncate)

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

        xs = tuple(_time_major(a) for a in (cache.gates, _previous(cache.c), cache.tanh_c, dy))
        if keep is not None:
            xs = (*xs, jnp.asarray(keep))
        zeros = jnp.zeros_like(dy[:, 0])
        _, delta = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
        return _time_major(delta)

    def backward_delta(
        self, params: dict[str, Array], cache: LSTMCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """The weight gradients and ``dx`` from ``δ`` (shape ``(batch, T, 4·hidden)``).

        ``∇W_x = Σ_t δ_tᵀ x_t``, ``∇W_h = Σ_t δ_tᵀ h_{t−1}``, ``∇b = Σ_{t,n} δ_{t,n}``,
        ``dx = δ W_x``: each one matrix product over all ``batch · T`` rows; ``dx`` has shape
        ``(batch, T, n_in)``.
        """
        w_x, w_h, b, dx = _recurrent_grads(delta, cache.x, cache.h, params["W_x"])
        return {"W_x": w_x, "W_h": w_h, "b": b}, dx

    def backward(
        self, params: dict[str, Array], cache: LSTMCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂h`` (batch, T, hidden): :meth:`delta`, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))


# -- LastStep --------------------------------------------------------------------------------


class LastStepCache(NamedTuple):
    """What :meth:`LastStep.forward` keeps: the input, for its shape and dtype only."""

    x: Array  # (batch, T, ...): the input sequence (the backward reads only its shape)


@dataclasses.dataclass(frozen=True)
class LastStep:
    """The last step of a sequence, ``y = x_T``: many-to-one after a recurrent layer.

    Maps ``(batch, T, ...)`` to ``(batch, ...)``; no params. The backward puts ``dy`` at the
    last step and zeros at the others: ``∂C/∂x_t = [t = T] dy``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LastStep()
      >>> params, out_shape = layer.init(jax.random.key(0), (5, 3))
      >>> y, cache = layer.forward(params, jnp.arange(30.0).reshape(2, 5, 3))
      >>> grads, dx = layer.backward(params, cache, jnp.ones((2, 3)))
      >>> out_shape, y[0].tolist(), dx[0, :, 0].tolist()
      ((3,), [12.0, 13.0, 14.0], [0.0, 0.0, 0.0, 0.0, 1.0])
    """

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """No params; the output shape drops the time axis: ``(T, ...) -> (...)``.

        Raises:
          ValueError: ``in_shape`` without a time axis and a feature axis.
        """
        del key, dtype
        shape = tuple(in_shape)
        if len(shape) < 2 or shape[0] < 1:
            raise ValueError(
                f"in_shape: LastStep takes sequences of shape (batch, T, ...) with T ≥ 1, so "
                f"in_shape must be (T, ...) with at least one feature axis; got {in_shape!r}."
            )
        return {}, shape[1:]

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, LastStepCache]:
        """``y = x[:, −1]``, shape ``(batch, ...)``.

        Raises:
          ValueError: ``x`` without a time axis of length ≥ 1 (at trace time).
        """
        del params
        shape = jnp.shape(x)
        if len(shape) < 3 or shape[1] < 1:
            raise ValueError(
                f"x: LastStep expects sequences of shape (batch, T, ...) with T ≥ 1, got {shape}."
            )
        return x[:, -1], LastStepCache(x)

    def backward(
        self, params: dict[str, Array], cache: LastStepCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``∂C/∂x_t = dy`` at the last step ``t = T``, zero before; shape ``(batch, T, ...)``."""
        del params
        x = cache.x
        _check_error("LastStep", dy, (x.shape[0], *x.shape[2:]))
        return {}, jnp.zeros(x.shape, dy.dtype).at[:, -1].set(dy)
