"""Initialisers and shape helpers shared by the layers.

The names here are public so that a layer author can reuse them; the module itself is private
(:mod:`bpjax.layers` does not re-export them):

- initialisers: :data:`INIT_SCALING`, :func:`checked_activation`, :func:`truncated_normal_weight`,
  :func:`orthogonal_weight`;
- the weight gradient ``∇W = δᵀ a``: :func:`weight_grad` (from ``_layout``, where its dot layout
  is measured per machine);
- sizes (Python or NumPy integers): :func:`positive_int`;
- windows over NHWC images (convolution, pooling): :data:`Pads`, :data:`Padding`,
  :func:`check_pair`, :func:`check_padding`, :func:`resolve_pads`, :func:`out_spatial`,
  :func:`transposed_pads`, :func:`conv_taps` (the strided slices a window reads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpjax._types import Array, PRNGKey, is_int
from bpjax.activations import Activation, get_activation
from bpjax.layers._layout import weight_grad

__all__ = [
    "INIT_SCALING",
    "Padding",
    "Pads",
    "check_padding",
    "check_pair",
    "checked_activation",
    "conv_taps",
    "orthogonal_weight",
    "out_spatial",
    "positive_int",
    "resolve_pads",
    "transposed_pads",
    "truncated_normal_weight",
    "weight_grad",
]

# -- initialisers ----------------------------------------------------------------------------

# variance = scale / fan: He 2/n_in, Glorot 2/(n_in + n_out) = 1/fan_avg
INIT_SCALING: dict[str, tuple[float, Any]] = {
    "he": (2.0, "fan_in"),
    "glorot": (1.0, "fan_avg"),
}
"""``Activation.init`` → ``(scale, mode)`` of :func:`jax.nn.initializers.variance_scaling`."""


def checked_activation(activation: Any) -> Activation:
    """The :class:`bpjax.Activation` of a name or an activation, if it names an init we know.

    Raises:
      ValueError: an unknown name, or an activation whose ``init`` is not in
        :data:`INIT_SCALING`.
      TypeError: neither a name nor an :class:`bpjax.Activation`.
    """
    act = get_activation(activation)
    if act.init not in INIT_SCALING:
        raise ValueError(
            f"activation: {act.name!r} has init={act.init!r}; expected one of "
            f"{', '.join(sorted(INIT_SCALING))}."
        )
    return act


def truncated_normal_weight(
    key: PRNGKey,
    shape: tuple[int, ...],
    dtype: Any,
    scheme: str,
    *,
    in_axis: int = -1,
    out_axis: int = -2,
) -> Array:
    """A weight of ``shape``, truncated normal with the variance of ``INIT_SCALING[scheme]``.

    ``scheme`` is an ``Activation.init`` (``"glorot"`` or ``"he"``). The fans are the sizes of
    ``in_axis`` and ``out_axis`` times the other axes (the receptive field): the defaults fit a
    dense ``(n_out, n_in)`` matrix, ``in_axis=-2, out_axis=-1`` an HWIO kernel
    ``(k_h, k_w, C_in, C_out)``.
    """
    scale, mode = INIT_SCALING[scheme]
    size = math.prod(shape)
    fan_in, fan_out = (size // shape[out_axis], size // shape[in_axis])  # each × receptive field
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    # jax.nn.initializers.variance_scaling's truncated normal, drawn flat and reshaped: the same
    # numbers (the bits are drawn flat either way), but XLA:CPU compiles a 4-D draw many times
    # slower (seconds per HWIO kernel shape)
    variance = jnp.array(scale / fan, dtype=dtype)
    stddev = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)  # N(0,1) cut at ±2
    return (jax.random.truncated_normal(key, -2, 2, (size,), dtype) * stddev).reshape(shape)


def orthogonal_weight(key: PRNGKey, shape: tuple[int, int], dtype: Any) -> Array:
    """An orthogonal ``(m, n)`` matrix (orthonormal columns) for recurrent weights.

    Drawn (by QR) in float32 or wider, then cast to ``dtype``.
    """
    wide = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32  # QR in at least float32
    return jax.nn.initializers.orthogonal()(key, shape, wide).astype(dtype)


# -- windows over NHWC images ----------------------------------------------------------------

Pads = tuple[tuple[int, int], tuple[int, int]]
"""Explicit pads of an image ``((top, bottom), (left, right))``."""

Padding = str | Pads
"""A normalised ``padding`` argument: ``"SAME"``, ``"VALID"`` or explicit :data:`Pads`."""


def positive_int(value: Any, name: str) -> int:
    """``value`` as a Python ``int`` if it is an integer ``>= 1`` (NumPy integers included).

    Raises:
      ValueError: anything else; the message names the argument ``name``.
    """
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
    return int(value)


def check_pair(name: str, value: Any, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints ``>= minimum`` (a kernel size, strides) as ``(along H, along W)``.

    Raises:
      ValueError: anything else; the message names the argument ``name``.
    """
    if isinstance(value, np.ndarray):  # sizes read from an array
        value = value.tolist()
    if is_int(value):
        value = (value, value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_int(v) and v >= minimum for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(
        f"{name}: expected an integer >= {minimum} or a pair of them (along H, along W), "
        f"got {value!r}."
    )


def check_padding(value: Any) -> Padding:
    """A ``padding`` argument as :data:`Padding`.

    Takes ``"SAME"``/``"VALID"`` (any case), ``p`` (all sides), ``(ph, pw)`` or
    ``((top, bottom), (left, right))``, all non-negative.

    Raises:
      ValueError: anything else.
    """
    if isinstance(value, np.ndarray):  # pads read from an array
        value = value.tolist()
    if isinstance(value, str):
        if value.upper() in ("SAME", "VALID"):
            return value.upper()
    elif is_int(value) and value >= 0:
        return ((int(value), int(value)), (int(value), int(value)))
    elif isinstance(value, Sequence) and len(value) == 2:
        if all(is_int(v) and v >= 0 for v in value):
            return ((int(value[0]), int(value[0])), (int(value[1]), int(value[1])))
        if all(
            isinstance(v, Sequence) and len(v) == 2 and all(is_int(p) and p >= 0 for p in v)
            for v in value
        ):
            (t, b), (l, r) = value
            return ((int(t), int(b)), (int(l), int(r)))
    raise ValueError(
        f"padding: expected 'SAME', 'VALID', a non-negative integer p, a pair (ph, pw) or "
        f"((top, bottom), (left, right)), got {value!r}."
    )


def resolve_pads(
    spatial: tuple[int, int], window: tuple[int, int], strides: tuple[int, int], padding: Padding
) -> Pads:
    """Explicit pads of a window over an image of ``spatial = (H, W)``.

    ``"SAME"``/``"VALID"`` go through :func:`jax.lax.padtype_to_pads`; explicit pads come back
    as they are.
    """
    if isinstance(padding, str):
        (t, b), (l, r) = lax.padtype_to_pads(spatial, window, strides, padding)
        return ((int(t), int(b)), (int(l), int(r)))
    return padding


def _out_size(size: int, pads: tuple[int, int], window: int, stride: int) -> int:
    """``⌊(size + pads − window) / stride⌋ + 1`` output positions along one axis (< 1: none)."""
    return (size + pads[0] + pads[1] - window) // stride + 1


def out_spatial(
    what: str,
    in_shape: tuple[int, ...],
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: Padding,
    *,
    arg: str = "in_shape",
) -> tuple[Pads, tuple[int, int]]:
    """The explicit pads and output ``(H_out, W_out)`` of a window over an ``(H, W, C)`` input.

    ``what`` names the layer and ``arg`` the argument in the error messages.

    Raises:
      ValueError: ``in_shape`` is not ``(H, W, C)``, or the window does not fit it.
    """
    if len(in_shape) != 3:
        raise ValueError(
            f"{arg}: {what} takes NHWC inputs, (batch, H, W, C); expected an example shape "
            f"(H, W, C), got {tuple(in_shape)}. Add a channel axis of size 1 to single-channel "
            "images."
        )
    spatial = (int(in_shape[0]), int(in_shape[1]))
    pads = resolve_pads(spatial, window, strides, padding)
    out = tuple(_out_size(*a) for a in zip(spatial, pads, window, strides, strict=True))
    if min(out) < 1:
        raise ValueError(
            f"{arg}: the {window[0]}×{window[1]} window of {what} does not fit the "
            f"{spatial[0]}×{spatial[1]} input with pads {pads}; use a smaller window, more "
            "padding or padding='SAME'."
        )
    return pads, (out[0], out[1])


def transposed_pads(size: int, pads: tuple[int, int], window: int, stride: int) -> tuple[int, int]:
    """Pads of the transposed window that maps ``∂C/∂y`` (dilated by ``stride``) back onto ``x``.

    Along one axis of ``size`` input cells with forward pads ``(lo, hi)``:
    ``y[p] = Σ_i x_pad[s p + i] w[i]`` so ``∂C/∂x[h] = Σ_i d[h + lo' − (k−1) + i'] w[k−1−i']``
    over the dilated ``d[s p] = ∂C/∂y[p]`` (zeros between): a stride-1 correlation with the flipped
    window, ``d`` padded by ``(k − 1 − lo, k − 1 − hi + r)`` where
    ``r = (size + lo + hi − k) mod s`` counts the rows the forward's stride never reached (they
    get zero gradient). Pads may be negative: then they crop.
    """
    lo, hi = pads
    rest = (size + lo + hi - window) % stride
    return window - 1 - lo, window - 1 - hi + rest


def conv_taps(
    x: Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    *,
    channels_first: bool = False,
) -> list[Array]:
    """The ``k_h·k_w`` strided slices of the zero-padded input that a convolution reads.

    Tap ``(i, j)`` is ``x_pad[n, s_h p + i, s_w q + j, c]`` for every output position ``(p, q)``,
    shape ``(batch, H_out, W_out, C)``; the list runs over ``(i, j)`` row-major. With
    ``channels_first`` ``x`` is ``(batch, C, H, W)`` and each tap ``(batch, C, H_out, W_out)``.
    Slices are copies at memory speed: :func:`jax.lax.conv_general_dilated_patches` computes the
    same values as a convolution with an identity kernel, which XLA:CPU runs 3× slower on a
    3-channel input (16 ms against 5 ms for the first layer of the benchmark CNN, 32×32×3 at
    B=128) and no faster on 32 channels.
    """
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = pads
    row, col = (2, 3) if channels_first else (1, 2)
    config = [(0, 0, 0)] * 4
    config[row], config[col] = (top, bottom, 0), (left, right, 0)
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), config)
    h_out = (x_pad.shape[row] - kh) // sh + 1
    w_out = (x_pad.shape[col] - kw) // sw + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            start, limit, step = [0] * 4, list(x_pad.shape), [1] * 4
            start[row], limit[row], step[row] = i, i + sh * (h_out - 1) + 1, sh
            start[col], limit[col], step[col] = j, j + sw * (w_out - 1) + 1, sw
            taps.append(lax.slice(x_pad, start, limit, step))
    return taps
