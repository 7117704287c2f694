"""Recurrent layers with backpropagation through time written out: :class:`Elman`, :class:`LSTM`.

Also :class:`LastStep`, which keeps the last step of a sequence (many-to-one), and the helpers
the recurrent layers share; :class:`Elman` is in ``_elman.py`` and :class:`LSTM` in ``_lstm.py``.
All three are exported by :mod:`bpjax.layers` and, as before, by :mod:`bpjax.rnn`.

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

import jax.numpy as jnp
import numpy as np

from bpjax._types import Array, PRNGKey, is_int
from bpjax.layers._init import (
    weight_grad,
)
from bpjax.layers._outer import (
    example_outer,
    example_outer_sq_norms,
    example_outer_square_sums,
    outer_square_sum,
)

__all__ = [
    "LastStep",
    "LastStepCache",
    "check_error",
    "check_in_shape",
    "check_sequence",
    "check_truncate",
    "keep_mask",
    "previous",
    "recurrent_example_grads",
    "recurrent_example_sq_norms",
    "recurrent_grads",
    "recurrent_square_sums",
    "shifted",
    "time_major",
    "zero_state",
]


# -- helpers ---------------------------------------------------------------------------------


def check_truncate(truncate: Any) -> int | None:
    if truncate is not None and (not is_int(truncate) or truncate < 1):
        raise ValueError(
            f"truncate: expected None (full BPTT) or a positive number of steps, got {truncate!r}."
        )
    return None if truncate is None else int(truncate)


def check_in_shape(layer: str, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """``in_shape`` must be ``(T, n_in)``: one example is a sequence of feature vectors."""
    shape = tuple(in_shape)
    if len(shape) != 2 or any(not is_int(n) or n < 1 for n in shape):
        raise ValueError(
            f"in_shape: {layer} takes sequences of shape (batch, T, n_in), so in_shape must be "
            f"(T, n_in) with positive integers; got {in_shape!r}."
        )
    return int(shape[0]), int(shape[1])


def check_sequence(layer: str, x: Array, n_in: int) -> None:
    """``x`` must be ``(batch, T, n_in)`` with ``T ≥ 1``; checked at trace time."""
    shape = jnp.shape(x)
    if len(shape) != 3 or shape[1] < 1 or shape[2] != n_in:
        raise ValueError(
            f"x: {layer} expects sequences of shape (batch, T, {n_in}) with T ≥ 1, got {shape}."
        )


def check_error(layer: str, dy: Array, want: tuple[int, ...]) -> None:
    if jnp.shape(dy) != want:
        raise ValueError(
            f"dy: {layer} expects the error at its output to have the output's shape {want}, "
            f"got {jnp.shape(dy)}."
        )


def time_major(a: Array) -> Array:
    """``(batch, T, ...) -> (T, batch, ...)``: lax.scan runs over the leading axis."""
    return jnp.swapaxes(a, 0, 1)


def zero_state(like: Array, *inputs: Array) -> Array:
    """Zeros of ``like``'s shape and dtype, typed as varying wherever ``like`` or ``inputs`` vary.

    A scan's initial carry (``h_0 = c_0 = 0`` forward, ``δ_{T+1} W_h = 0`` backward).
    ``lax.scan`` needs the carry to enter with the type the body gives it back, and under
    :func:`jax.shard_map` that type records the mesh axes a value varies over: the body's
    carry is computed from the step inputs and the recurrent weights, so it varies wherever
    any of them does (the data axis, once the batch is split on it). ``jnp.zeros`` would be
    replicated; here ``zeros_like`` of ``like`` (e.g. a slice of the weighted input ``u``),
    plus ``zeros_like`` of each of ``inputs`` (each broadcasting to ``like``'s shape), inherit
    their varying-ness. The values are exactly ``0`` (zeros added to zeros, no input read), and
    outside ``shard_map``, under ``jit`` or ``vmap``, it is plain zeros of shape ``like.shape``.
    """
    zeros = jnp.zeros_like(like)
    for a in inputs:
        zeros = zeros + jnp.zeros_like(a, dtype=zeros.dtype)
    return zeros


def previous(a: Array) -> Array:
    """``a_{t−1}`` for ``t = 1..T`` with ``a_0 = 0``: shape ``(batch, T, n)``, shifted by a step."""
    return jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)


def recurrent_grads(
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
        weight_grad(flat_delta, previous(h).reshape(-1, h.shape[-1])),
        jnp.sum(flat_delta, axis=0),
        delta @ w_in,
    )


def shifted(layer: str, u: Array, dz: Array | None) -> Array:
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


def keep_mask(steps: int, truncate: int | None) -> np.ndarray | None:
    """``keep[t]``: does the recurrent error flow from step ``t`` into step ``t − 1`` (0-based)?

    ``None`` for full BPTT (it always does; at ``t = 0`` it reaches the constant ``h_0`` and is
    dropped). With ``truncate=k`` it is cut at ``t = k, 2k, …``.
    """
    if truncate is None:
        return None
    return np.arange(steps) % truncate != 0


# -- extension rules (bpjax.extend.rules) --------------------------------------------------
#
# With the per-step errors δ_{n,t} the layer records, example n's gradients are sums over its
# T steps of outer products: ∇W_x C_n = Σ_t δ_t x_tᵀ, ∇W_h C_n = Σ_t δ_t h_{t−1}ᵀ,
# ∇b C_n = Σ_t δ_t, the outer-product forms of layers._outer with the steps as positions.


def recurrent_example_grads(
    delta: Array, x: Array, h: Array, names: tuple[str, str, str]
) -> dict[str, Array]:
    """Per-example ``(Σ_t δ_t x_tᵀ, Σ_t δ_t h_{t−1}ᵀ, Σ_t δ_t)`` under ``names``."""
    return {
        names[0]: example_outer(delta, x),
        names[1]: example_outer(delta, previous(h)),
        names[2]: jnp.sum(delta, axis=1),
    }


def recurrent_example_sq_norms(
    delta: Array, x: Array, h: Array, names: tuple[str, str, str]
) -> dict[str, Array]:
    """Per-example squared norms of :func:`recurrent_example_grads`, ``(batch,)`` each."""
    return {
        names[0]: example_outer_sq_norms(delta, x),
        names[1]: example_outer_sq_norms(delta, previous(h)),
        names[2]: jnp.sum(jnp.sum(delta, axis=1) ** 2, axis=-1),
    }


def recurrent_square_sums(
    deltas: Array,
    x: Array,
    h: Array,
    weights: Array,
    names: tuple[str, str, str],
    *,
    per_example: bool,
) -> dict[str, Array]:
    """``Σ_c (Σ_n) w_{c,n} g_{c,n}²`` of the three gradients; ``deltas`` ``(k, batch, T, m)``."""
    square = example_outer_square_sums if per_example else outer_square_sum
    bias = jnp.einsum(
        "cb,cbm->bm" if per_example else "cb,cbm->m", weights, jnp.sum(deltas, axis=2) ** 2
    )
    return {
        names[0]: square(deltas, x, weights),
        names[1]: square(deltas, previous(h), weights),
        names[2]: bias,
    }


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
        check_error("LastStep", dy, (x.shape[0], *x.shape[2:]))
        return {}, jnp.zeros(x.shape, dy.dtype).at[:, -1].set(dy)
