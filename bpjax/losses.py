"""Losses with hand-written gradients, and the fused canonical output pairs.

The batch loss is the mean of per-example losses, ``C = (1/B) Σ_n C_n(y_n, a^L_n)``, and a
per-example loss sums over output units. A :class:`Loss` gives ``value(z, a, y) -> C_n`` of shape
``(batch,)`` and ``grad(z, a, y) -> ∂C_n/∂a^L_n`` of shape ``(batch, n_L)``: the per-example error
at the output, unscaled by ``1/B``.

Three output activations are the canonical partners of their losses, and for them the output error
collapses to ``δ^L = a^L − y`` and the loss is computed from the logits ``z^L`` (no ``log`` of a
rounded-to-zero probability):

=========  ======================  ============================================  ==============
output     loss                    per-example value from the logits z           δ^L
=========  ======================  ============================================  ==============
softmax    cross_entropy           ``Σ_j y_j (logsumexp(z) − z_j)``              ``a Σ_j y_j − y``
sigmoid    binary_cross_entropy    ``Σ_j softplus(z_j) − y_j z_j``               ``a − y``
identity   squared_error           ``½‖y − z‖²``                                 ``z − y``
=========  ======================  ============================================  ==============

(for probability targets ``Σ_j y_j = 1`` and the softmax row reads ``a − y``; the general form keeps
the gradient exact for any non-negative target vector.) :func:`fused_output` finds the pair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlog1py, xlogy

from bpjax import activations as _act
from bpjax._types import Array

__all__ = [
    "LOSSES",
    "FusedOutput",
    "Loss",
    "fused_output",
    "get_loss",
]


def _float_targets(y: Array, batch: int, n_out: int, dtype: jnp.dtype, name: str) -> Array:
    """Checks ``y`` is ``(batch, n_out)`` and casts it to the network's dtype."""
    shape = jnp.shape(y)
    if shape != (batch, n_out):
        raise ValueError(
            f"y: {name} expects targets of shape (batch, n_L) = ({batch}, {n_out}), "
            f"got shape {shape}."
        )
    return jnp.asarray(y).astype(dtype)


class Loss(NamedTuple):
    """A per-example loss ``C_n(y_n, a^L_n)`` and its hand-written gradient.

    Attributes:
      name: the registry name, shown in reports and error messages.
      value: ``(z, a, y) -> C_n``; ``z`` and ``a`` of shape ``(batch, n_L)``, result ``(batch,)``.
      grad: ``(z, a, y) -> ∂C_n/∂a^L_n``, shape ``(batch, n_L)``, unscaled by ``1/B``.
      accepts: the activation ``output`` kinds (see :class:`bpjax.Activation`) the loss is
        defined on, or ``None`` for any.
      targets: ``(y, batch, n_L, dtype) -> y`` checks the targets' shape and dtype at trace time
        and returns them in the form ``value`` and ``grad`` take.
    """

    name: str
    value: Callable[[Array, Array, Array], Array]
    grad: Callable[[Array, Array, Array], Array]
    accepts: frozenset[str] | None = None
    targets: Callable[[Array, int, int, jnp.dtype], Array] | None = None

    def __repr__(self) -> str:  # the functions' reprs are addresses: the name identifies it
        return f"Loss(name={self.name!r})"


# squared_error: C_n = ½‖y_n − a_n‖², ∂C_n/∂a_n = a_n − y_n


def _squared_error_value(z: Array, a: Array, y: Array) -> Array:
    del z
    return 0.5 * jnp.sum((y - a) ** 2, axis=-1)


def _squared_error_grad(z: Array, a: Array, y: Array) -> Array:
    del z
    return a - y


def _squared_error_targets(y: Array, batch: int, n_out: int, dtype: jnp.dtype) -> Array:
    return _float_targets(y, batch, n_out, dtype, "squared_error")


# cross_entropy: C_n = −Σ_j y_j log a_j, ∂C_n/∂a_j = −y_j / a_j. Integer labels (batch,) are
# the one-hot targets y_j = [j = label].


def _one_hot(labels: Array, n: int, dtype: jnp.dtype) -> Array:
    return jax.nn.one_hot(labels, n, dtype=dtype)


def _cross_entropy_value(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        return -jnp.log(jnp.take_along_axis(a, y[:, None], axis=-1)[:, 0])
    return -jnp.sum(xlogy(y, a), axis=-1)


def _cross_entropy_grad(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        y = _one_hot(y, a.shape[-1], a.dtype)
    return jnp.where(y != 0, -y / a, jnp.zeros_like(a))


def _cross_entropy_targets(y: Array, batch: int, n_out: int, dtype: jnp.dtype) -> Array:
    shape, y_dtype = jnp.shape(y), jnp.result_type(y)
    if shape == (batch,):
        if not jnp.issubdtype(y_dtype, jnp.integer):
            raise TypeError(
                f"y: cross_entropy takes integer class labels of shape (batch,) = ({batch},) or "
                f"probabilities of shape (batch, n_L) = ({batch}, {n_out}); got shape {shape} "
                f"with dtype {y_dtype}. Cast labels with y.astype(jnp.int32)."
            )
        _check_label_range(y, n_out)
        return jnp.asarray(y)
    if shape == (batch, n_out):
        if not jnp.issubdtype(y_dtype, jnp.floating):
            raise TypeError(
                f"y: cross_entropy probability targets of shape (batch, n_L) must be floating, "
                f"got dtype {y_dtype}. Integer class labels have shape (batch,) = ({batch},)."
            )
        return jnp.asarray(y).astype(dtype)
    raise ValueError(
        f"y: cross_entropy expects integer labels of shape (batch,) = ({batch},) or "
        f"probabilities of shape (batch, n_L) = ({batch}, {n_out}), got shape {shape}."
    )


def _check_label_range(y: Array, n_out: int) -> None:
    """Checks 0 ≤ label < n_L where the labels are concrete (outside jit); traced ones can't be."""
    if isinstance(y, jax.core.Tracer) or jnp.size(y) == 0:
        return
    # NumPy, not jnp: concrete labels closed over by a jitted function must not become tracers
    labels = np.asarray(y)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(
            f"y: cross_entropy labels must lie in [0, n_L) = [0, {n_out}), got labels from "
            f"{lo} to {hi}."
        )


# binary_cross_entropy: C_n = −Σ_j [y_j log a_j + (1 − y_j) log(1 − a_j)],
# ∂C_n/∂a_j = (1 − y_j)/(1 − a_j) − y_j/a_j


def _binary_cross_entropy_value(z: Array, a: Array, y: Array) -> Array:
    del z
    return -jnp.sum(xlogy(y, a) + xlog1py(1 - y, -a), axis=-1)


def _binary_cross_entropy_grad(z: Array, a: Array, y: Array) -> Array:
    del z
    # 0 log 0 = 0 in the value, so a term whose target weight is 0 contributes 0, even where
    # its a or 1 − a rounded to 0
    zero = jnp.zeros_like(a)
    return jnp.where(y != 1, (1 - y) / (1 - a), zero) - jnp.where(y != 0, y / a, zero)


def _binary_cross_entropy_targets(y: Array, batch: int, n_out: int, dtype: jnp.dtype) -> Array:
    return _float_targets(y, batch, n_out, dtype, "binary_cross_entropy")


squared_error = Loss(
    "squared_error",
    _squared_error_value,
    _squared_error_grad,
    accepts=None,
    targets=_squared_error_targets,
)
cross_entropy = Loss(
    "cross_entropy",
    _cross_entropy_value,
    _cross_entropy_grad,
    accepts=frozenset({_act.SIMPLEX}),
    targets=_cross_entropy_targets,
)
binary_cross_entropy = Loss(
    "binary_cross_entropy",
    _binary_cross_entropy_value,
    _binary_cross_entropy_grad,
    accepts=frozenset({_act.UNIT_INTERVAL, _act.SIMPLEX}),
    targets=_binary_cross_entropy_targets,
)

LOSSES: dict[str, Loss] = {
    loss.name: loss for loss in (squared_error, cross_entropy, binary_cross_entropy)
}
"""Every built-in loss by name."""


def get_loss(loss: str | Loss, *, argname: str = "loss") -> Loss:
    """Returns the :class:`Loss` named ``loss``, or ``loss`` itself.

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
      TypeError: for anything that is neither a string nor a :class:`Loss`.
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        try:
            return LOSSES[loss]
        except KeyError:
            raise ValueError(
                f"{argname}: unknown loss {loss!r}; expected one of "
                f"{', '.join(sorted(LOSSES))}, or a bpjax.Loss."
            ) from None
    raise TypeError(
        f"{argname}: expected a loss name (str) or a bpjax.Loss, "
        f"got {type(loss).__name__}: {loss!r}."
    )


class FusedOutput(NamedTuple):
    """A canonical output pair's loss from the logits and its fused output error.

    Attributes:
      value: ``(z, y) -> C_n`` of shape ``(batch,)``, computed from the logits ``z^L``.
      delta: ``(z, a, y) -> δ^L = ∂C_n/∂z^L_n`` of shape ``(batch, n_L)``.
    """

    value: Callable[[Array, Array], Array]
    delta: Callable[[Array, Array, Array], Array]


def _softmax_cross_entropy_value(z: Array, y: Array) -> Array:
    log_a = jax.nn.log_softmax(z, axis=-1)
    if y.ndim == 1:
        return -jnp.take_along_axis(log_a, y[:, None], axis=-1)[:, 0]
    return -jnp.sum(y * log_a, axis=-1)


def _softmax_cross_entropy_delta(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        return a - _one_hot(y, a.shape[-1], a.dtype)
    # ∂/∂z of Σ_j y_j (lse(z) − z_j) is a Σ_j y_j − y: a − y for probability targets
    return a * jnp.sum(y, axis=-1, keepdims=True) - y


def _sigmoid_binary_cross_entropy_value(z: Array, y: Array) -> Array:
    # −[y log σ(z) + (1 − y) log(1 − σ(z))] = softplus(z) − y z, finite for any z
    return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)


def _sigmoid_binary_cross_entropy_delta(z: Array, a: Array, y: Array) -> Array:
    del z
    return a - y


def _identity_squared_error_value(z: Array, y: Array) -> Array:
    return 0.5 * jnp.sum((y - z) ** 2, axis=-1)


def _identity_squared_error_delta(z: Array, a: Array, y: Array) -> Array:
    del a
    return z - y


_FUSED: dict[tuple[_act.Activation, Loss], FusedOutput] = {
    (_act.softmax, cross_entropy): FusedOutput(
        _softmax_cross_entropy_value, _softmax_cross_entropy_delta
    ),
    (_act.sigmoid, binary_cross_entropy): FusedOutput(
        _sigmoid_binary_cross_entropy_value, _sigmoid_binary_cross_entropy_delta
    ),
    (_act.identity, squared_error): FusedOutput(
        _identity_squared_error_value, _identity_squared_error_delta
    ),
}


def fused_output(activation: _act.Activation, loss: Loss) -> FusedOutput | None:
    """The fused loss and output error of a canonical pair, or ``None`` for any other pair.

    Only the built-in activation and loss objects pair: a user's own ``Activation`` named
    ``"softmax"`` goes through the generic path.
    """
    return _FUSED.get((activation, loss))
