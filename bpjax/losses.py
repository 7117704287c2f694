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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.scipy.special import xlog1py, xlogy

from bpjax._types import Array
from bpjax.activations import (
    SIMPLEX,
    UNIT_INTERVAL,
    Activation,
    identity,
    sigmoid,
    softmax,
)
from bpjax.runtime_checks import checks_enabled

__all__ = [
    "LOSSES",
    "FusedOutput",
    "Loss",
    "check_labels",
    "fused_output",
    "get_loss",
    "label_poison",
    "one_hot_labels",
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
      labels: whether ``y`` may be integer class labels in ``[0, n_L)``: concrete ones are
        range-checked before anything is traced (:meth:`bpjax.Serial.check_labels`), traced
        ones poisoned where out of range (:func:`label_poison`).
    """

    name: str
    value: Callable[[Array, Array, Array], Array]
    grad: Callable[[Array, Array, Array], Array]
    accepts: frozenset[str] | None = None
    targets: Callable[[Array, int, int, jnp.dtype], Array] | None = None
    labels: bool = False

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
#
# A label outside [0, n_L) has no one-hot row. Concrete labels are checked before anything is
# computed (check_labels); traced ones cannot be, and jnp's indexing would wrap −1 to the last
# class or fill with NaN in the value only: a finite wrong gradient. Every use of traced labels
# multiplies by label_poison instead, NaN for such an example, so its loss and every gradient
# it reaches are NaN (never finite and wrong), and bpjax.checked turns the same condition into
# an error naming the label.


def label_poison(labels: Array, n: int, dtype: jnp.dtype) -> Array:
    """``(batch,)``: 1 where ``0 ≤ labels_n < n``, NaN where a label is out of range.

    Multiplying an example's loss or output error by it leaves a valid example unchanged
    (exactly: ``x · 1 = x``) and makes an out-of-range one NaN in the value *and* in every
    gradient, ``jax.grad`` included (the factor multiplies the cotangent). Under
    :func:`bpjax.checked` (``jax.experimental.checkify``) an out-of-range label raises instead,
    with its index and value.

    Args:
      labels: integer class labels, any shape (flattened row-major in the message).
      n: the number of classes ``n_L``.
      dtype: the floating dtype of the factor.
    """
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < n)
    # stated only under bpjax.checked: a check in a plain program is an effect, which would send
    # every call of the caller's jitted function down JAX's slow dispatch path
    if checks_enabled():
        flat = jnp.ravel(valid)
        first_bad = jnp.argmin(flat) if flat.size else jnp.zeros((), jnp.int32)
        checkify.debug_check(
            jnp.all(valid),
            f"y: class label y.ravel()[{{}}] = {{}} is outside [0, n_L) = [0, {n}).",
            first_bad,
            jnp.ravel(labels)[first_bad] if flat.size else jnp.zeros((), labels.dtype),
        )
    return jnp.where(valid, jnp.ones((), dtype), jnp.full((), jnp.nan, dtype))


def one_hot_labels(labels: Array, n: int, dtype: jnp.dtype) -> Array:
    """``(batch, n)`` one-hot rows ``[j = labels_n]``; a row of NaN for a label outside ``[0, n)``.

    ``jax.nn.one_hot`` gives such a label a row of zeros, a valid-looking target ("no class")
    that trains to a finite wrong gradient; see :func:`label_poison`.
    """
    rows = jax.nn.one_hot(labels, n, dtype=dtype)
    # a select, not rows · label_poison: XLA rewrites (0/1 mask) · x into a select that drops x,
    # and with it the NaN
    poisoned = jnp.isnan(label_poison(labels, n, dtype))[..., None]
    return jnp.where(poisoned, jnp.full((), jnp.nan, dtype), rows)


def check_labels(labels: Any, n: int, *, argname: str = "y", loss: str = "cross_entropy") -> None:
    """Checks concrete integer class labels lie in ``[0, n)``; traced labels pass through.

    Traced labels cannot be checked at trace time: every computation on them is poisoned instead
    (:func:`label_poison`) and :func:`bpjax.checked` raises at run time.

    Raises:
      ValueError: a label outside ``[0, n)``, naming ``argname`` and the range found.
    """
    if isinstance(labels, jax.core.Tracer) or jnp.size(labels) == 0:
        return
    if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
        return  # a multi-host global array: no process sees all of it (poisoned if bad)
    # NumPy, not jnp: concrete labels closed over by a jitted function must not become tracers
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= n:
        bad = int(np.flatnonzero((values.ravel() < 0) | (values.ravel() >= n))[0])
        raise ValueError(
            f"{argname}: {loss} labels must lie in [0, n_L) = [0, {n}), got labels from "
            f"{lo} to {hi}. The first out of range: {argname}.ravel()[{bad}] = "
            f"{int(values.ravel()[bad])}."
        )


def _label_rows(a: Array, labels: Array, values: Array) -> Array:
    """``values[n, labels_n]`` for each row, poisoned (NaN) where a label is out of range."""
    n = a.shape[-1]
    picked = jnp.take_along_axis(values, jnp.clip(labels, 0, n - 1)[:, None], axis=-1)[:, 0]
    return picked * label_poison(labels, n, a.dtype)


def _cross_entropy_value(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        return -jnp.log(_label_rows(a, y, a))
    return -jnp.sum(xlogy(y, a), axis=-1)


def _cross_entropy_grad(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        y = one_hot_labels(y, a.shape[-1], a.dtype)
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
        check_labels(y, n_out)
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
    accepts=frozenset({SIMPLEX}),
    targets=_cross_entropy_targets,
    labels=True,
)
binary_cross_entropy = Loss(
    "binary_cross_entropy",
    _binary_cross_entropy_value,
    _binary_cross_entropy_grad,
    accepts=frozenset({UNIT_INTERVAL, SIMPLEX}),
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
        return -_label_rows(log_a, y, log_a)
    return -jnp.sum(y * log_a, axis=-1)


def _softmax_cross_entropy_delta(z: Array, a: Array, y: Array) -> Array:
    del z
    if y.ndim == 1:
        # times the poison, not minus NaN rows: forward mode (hvp) carries the NaN too
        n = a.shape[-1]
        return (a - jax.nn.one_hot(y, n, dtype=a.dtype)) * label_poison(y, n, a.dtype)[:, None]
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


_FUSED: dict[tuple[Activation, Loss], FusedOutput] = {
    (softmax, cross_entropy): FusedOutput(
        _softmax_cross_entropy_value, _softmax_cross_entropy_delta
    ),
    (sigmoid, binary_cross_entropy): FusedOutput(
        _sigmoid_binary_cross_entropy_value, _sigmoid_binary_cross_entropy_delta
    ),
    (identity, squared_error): FusedOutput(
        _identity_squared_error_value, _identity_squared_error_delta
    ),
}


def fused_output(activation: Activation, loss: Loss) -> FusedOutput | None:
    """The fused loss and output error of a canonical pair, or ``None`` for any other pair.

    Only the built-in activation and loss objects pair: a user's own ``Activation`` named
    ``"softmax"`` goes through the generic path.
    """
    return _FUSED.get((activation, loss))
