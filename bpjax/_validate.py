"""Trace-time argument checks shared by the public entry points.

Every check raises ``ValueError`` or ``TypeError`` with one message format: the argument's name
first, then what was expected and what came (``"key: expected a PRNG key …, got None."``). They
read only shapes, dtypes and Python values, so they run the same eagerly and under ``jax.jit``.

:func:`output_kind` follows what the values of a network's output can be (an
:class:`bpjax.Activation`'s ``output``: real, positive, in the unit interval, or a probability
vector) through every built-in layer, so that :func:`check_output` can refuse a loss/last-layer
pair the loss is not defined on (``cross_entropy`` after a ``LayerNorm``, say) when the network
is built, instead of a NaN loss with finite gradients at the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._types import is_int
from bpjax.activations import ACTIVATIONS, REAL, SIMPLEX, UNIT_INTERVAL, Activation
from bpjax.layers import (
    LSTM,
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Elman,
    Embedding,
    Flatten,
    LastStep,
    LayerNorm,
    MaxPool2D,
    Residual,
    Sequential,
)
from bpjax.losses import Loss

__all__ = [
    "PARAM_DTYPES",
    "check_key",
    "check_output",
    "describe",
    "input_shape",
    "output_kind",
    "param_dtype",
]

PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes params may have: ``Serial.init``'s ``dtype``."""


def describe(value: Any) -> str:
    """A short account of ``value`` for an error message: its type, and shape and dtype if any."""
    if value is None:
        return "None"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"


def param_dtype(dtype: Any) -> jnp.dtype:
    """``dtype`` as a floating :class:`numpy.dtype` params may have.

    Raises:
      TypeError: ``None``, a name NumPy does not know, or a dtype not in :data:`PARAM_DTYPES`.
    """
    expected = f"a floating dtype ({', '.join(PARAM_DTYPES)})"
    try:
        resolved = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None:
        raise TypeError(f"dtype: expected {expected}, got {dtype!r}.")
    if resolved.name not in PARAM_DTYPES:
        raise TypeError(f"dtype: expected {expected}, got {resolved}.")
    return resolved


def input_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` (one example's shape) as a tuple of Python ints; NumPy integers are accepted.

    Raises:
      ValueError: not a non-empty sequence of positive integers.
    """
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or any(not is_int(n) or n < 1 for n in dims):
        raise ValueError(f"input_shape: expected positive integers, got {shape!r}.")
    return tuple(int(n) for n in dims)


def check_key(key: Any, argname: str = "key") -> None:
    """Raises ``TypeError`` unless ``key`` is one PRNG key: a ``jax.random.key(seed)`` (shape
    ``()``) or a legacy ``jax.random.PRNGKey(seed)`` (``uint32``, shape ``(2,)``).

    Reads only the dtype and shape, so it works on traced keys under ``jax.jit``.
    """
    expected = "a PRNG key from jax.random.key(seed) (or the legacy jax.random.PRNGKey(seed))"
    if not (hasattr(key, "dtype") and hasattr(key, "shape")):
        raise TypeError(f"{argname}: expected {expected}, got {describe(key)}.")
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and tuple(key.shape) == ():
        return
    if not typed and key.dtype == jnp.uint32 and tuple(key.shape) == (2,):
        return
    hint = " (a batch of keys: pass one, e.g. keys[0])" if typed else ""
    raise TypeError(
        f"{argname}: expected {expected}, got an array of shape {tuple(key.shape)} and dtype "
        f"{key.dtype}{hint}."
    )


# -- what a network's output values can be ------------------------------------------------------


def _pooled(kind: str, keeps_simplex: bool) -> str:
    """A window's max or mean of each channel: a probability vector over the channels stays one
    under the mean of whole cells only."""
    if kind == SIMPLEX and not keeps_simplex:
        return UNIT_INTERVAL
    return kind


def _layer_kind(layer: Any, kind: str) -> str | None:
    """The kind of ``layer``'s outputs given its inputs' ``kind``; ``None``: unknown."""
    if isinstance(layer, (Dense, Conv2D, Elman)):
        return layer.activation.output
    if isinstance(layer, (LSTM, LayerNorm, Embedding, Residual)):
        return REAL  # o ∘ tanh(c); a normalised, scaled and offset x; a table row; x + F(x)
    if isinstance(layer, Sequential):
        return output_kind(layer.layers, kind)
    if isinstance(layer, LastStep):
        return kind
    if isinstance(layer, MaxPool2D):
        return _pooled(kind, keeps_simplex=False)
    if isinstance(layer, AvgPool2D):
        return _pooled(kind, keeps_simplex=not layer.count_include_pad)
    if isinstance(layer, Flatten):
        # (…, n) probability vectors flattened together no longer sum to one
        return UNIT_INTERVAL if kind == SIMPLEX else kind
    if isinstance(layer, Dropout):
        return kind if layer.rate == 0 else REAL  # kept values grow by 1/(1 − rate)
    return None


def output_kind(layers: Sequence[Any], kind: str = REAL) -> str | None:
    """What the values of ``layers``' output can be, for inputs of ``kind``.

    One of the :class:`bpjax.Activation` ``output`` kinds (``"real"``, ``"positive"``,
    ``"unit_interval"``, ``"simplex"``), or ``None`` when a layer is not a built-in one (a user's
    layer), whose outputs cannot be known.
    """
    current: str | None = kind
    for layer in layers:
        if current is None:
            return None
        current = _layer_kind(layer, current)
    return current


def _last_activation(layers: Sequence[Any]) -> Activation | None:
    """The activation that makes the last output, when the last (innermost) layer has one."""
    last = layers[-1]
    if isinstance(last, Sequential):
        return _last_activation(last.layers)
    if isinstance(last, (Dense, Conv2D, Elman)):
        return last.activation
    return None


def _layer_name(layer: Any) -> str:
    if isinstance(layer, Sequential):
        return _layer_name(layer.layers[-1])
    return getattr(layer, "name", "") or type(layer).__name__


def check_output(objective: Loss, layers: Sequence[Any], argname: str) -> None:
    """Raises ``ValueError`` when the output of ``layers`` is not what ``objective`` is defined
    on (``argname`` names the argument in the message).

    Layers whose outputs cannot be known (a user's layer) pass.
    """
    if objective.accepts is None:
        return
    kind = output_kind(layers)
    if kind is None or kind in objective.accepts:
        return
    act = _last_activation(layers)
    source = (
        f"the output activation {act.name!r}"
        if act is not None
        else f"the last layer {_layer_name(layers[-1])}"
    )
    hint, partner = {
        "cross_entropy": ("; cross_entropy needs probabilities: use a 'softmax' output", "softmax"),
        "binary_cross_entropy": ("; use a 'sigmoid' output", "sigmoid"),
    }.get(objective.name, ("", ""))
    if act is None and partner:
        hint += f", e.g. end the network with Dense(n_out, {partner!r})"
    elif act is not None and ACTIVATIONS.get(act.name) is not act:
        # a user's activation states its range itself (its output defaults to real values)
        accepted = " or ".join(repr(k) for k in sorted(objective.accepts))
        hint += (
            f"; an Activation of your own declares its range: Activation(..., output={accepted})"
        )
    raise ValueError(
        f"{argname}: the loss {objective.name!r} is defined on outputs that are "
        f"{' or '.join(sorted(objective.accepts))} but {source} gives {kind} values{hint}."
    )
