"""A convolution's kernel gradient ``∂C/∂W``, by the method measured fastest on the running CPU.

``∂C/∂W[i,j,c,o] = Σ_{n,p,q} x_pad[n, s_h p + i, s_w q + j, c] δ[n,p,q,o]`` has two forms:

- ``conv``: one convolution of the input with δ as the kernel (batch and positions contracted),
  as ``jax.vjp`` of ``lax.conv_general_dilated`` computes it;
- ``taps``: per kernel tap ``(i, j)`` one dot ``tapᵀ δ`` of the strided slice the tap reads
  (:func:`~bpjax.layers._init.conv_taps`, ``(B·H_out·W_out, C_in)``) with δ
  (``(B·H_out·W_out, features)``): ``k_h·k_w`` dots over ``B·P`` rows.

Which is faster depends on the CPU and the shape. On a 2-core AVX-512 EPYC (jax 0.10.2, XLA:CPU)
the benchmark CNN's first layer (32×32×3 → 32 features, 3×3, B = 128) took 28 ms as a
convolution and 8 ms by taps: XLA:CPU's convolution handles 3 input channels poorly. Its second
layer (16×16×32 → 64) took 19 ms as a convolution and 48 ms by taps. So the method is
**measured once per process** for each shape, on CPU, the first time a trace needs it, as the
dense weight gradient's layout is (:mod:`bpjax.layers._layout`): both forms compiled, timed in
interleaved rounds, ``taps`` kept only where it wins the median round by 3%.

``BPJAX_CONV_KERNEL_GRAD=conv`` or ``=taps`` pins the method (benchmarks, bit-for-bit
reproducible runs: the two sum in different orders); ``auto`` (or unset) measures. Kernel
gradients under :data:`~bpjax.layers._layout.MEASURE_FLOPS`, and every non-CPU backend, take
``conv``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bpjax._types import Array, is_int
from bpjax.layers._init import (
    Pads,
    check_padding,
    check_pair,
    conv_taps,
    out_spatial,
    positive_int,
)
from bpjax.layers._layout import MEASURE_FLOPS, paired_ratio, pinned_choice

__all__ = [
    "KERNEL_GRAD_ENV",
    "KERNEL_GRAD_METHODS",
    "conv_kernel_grad",
    "kernel_grad_method",
]

KERNEL_GRAD_METHODS = ("conv", "taps")
"""``conv``: one convolution over the batch; ``taps``: one dot per kernel tap."""

KERNEL_GRAD_ENV = "BPJAX_CONV_KERNEL_GRAD"
"""The environment variable that pins the method: one of :data:`KERNEL_GRAD_METHODS`, or
``auto``."""

_MARGIN = 0.97  # taps must win by this much: a near tie keeps XLA's convolution
# dW: channels of x as the convolution's batch, the batch as its contracted feature axis, δ as the
# kernel (n → input feature, its channels → output feature); the output comes out as HWIO
_CHWN_IHWO = ("CHWN", "IHWO", "HWNC")


def kernel_grad_method(
    x_shape: tuple[int, ...],
    features: int,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    dtype: Any,
) -> str:
    """``"conv"`` or ``"taps"`` for the kernel gradient of a convolution of an input of shape
    ``x_shape`` (NHWC) to ``features`` channels: the pin in ``BPJAX_CONV_KERNEL_GRAD`` if set,
    else ``"conv"`` off CPU and for small convolutions, else the faster on this CPU, measured
    once.

    Raises:
      ValueError: ``BPJAX_CONV_KERNEL_GRAD`` set to something else; ``x_shape`` not 4-D sizes,
        ``features`` not a positive integer, or the geometry as :func:`conv_kernel_grad` says.
    """
    window, strides, pads = _checked_geometry(window, strides, pads)
    if len(x_shape) != 4 or not all(is_int(n) and n >= 0 for n in x_shape):
        raise ValueError(f"x_shape: expected NHWC (batch, H, W, C_in), got {tuple(x_shape)}.")
    features = positive_int(features, "features")
    x_shape = tuple(int(n) for n in x_shape)
    pinned = pinned_choice(KERNEL_GRAD_ENV, KERNEL_GRAD_METHODS)
    if pinned is not None:
        return pinned
    h_out, w_out = _out_positions(x_shape, window, strides, pads)
    flops = 2 * x_shape[0] * h_out * w_out * window[0] * window[1] * x_shape[3] * features
    if flops < MEASURE_FLOPS or jax.default_backend() != "cpu":
        return "conv"
    return _measured_method(tuple(x_shape), features, window, strides, pads, jnp.dtype(dtype).name)


def _by_conv(
    x: Array, delta: Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads,
    precision: Any = None,
) -> Array:  # fmt: skip
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = pads
    rest_h = (x.shape[1] + top + bottom - kh) % sh  # rows no window reached
    rest_w = (x.shape[2] + left + right - kw) % sw
    return lax.conv_general_dilated(
        x,
        delta,
        (1, 1),
        ((top, bottom - rest_h), (left, right - rest_w)),
        rhs_dilation=(sh, sw),
        dimension_numbers=_CHWN_IHWO,
        precision=precision,
    )


def _by_taps(
    x: Array, delta: Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads,
    precision: Any = None,
) -> Array:  # fmt: skip
    d = delta.reshape(-1, delta.shape[-1])  # (B·P, features)
    blocks = [
        lax.dot_general(
            tap.reshape(-1, tap.shape[-1]), d, (((0,), (0,)), ((), ())), precision=precision
        )  # tapᵀ δ: (C_in, features)
        for tap in conv_taps(x, window, strides, pads)
    ]
    return jnp.stack(blocks).reshape(*window, x.shape[-1], delta.shape[-1])


def _out_positions(
    x_shape: tuple[int, ...], window: tuple[int, int], strides: tuple[int, int], pads: Pads
) -> tuple[int, int]:
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = pads
    return (
        (x_shape[1] + top + bottom - kh) // sh + 1,
        (x_shape[2] + left + right - kw) // sw + 1,
    )


def _checked_geometry(
    window: Any, strides: Any, pads: Any
) -> tuple[tuple[int, int], tuple[int, int], Pads]:
    """``window`` and ``strides`` as positive pairs, ``pads`` as ``((top, bottom), (left,
    right))`` of non-negative integers."""
    window = check_pair("window", window)
    strides = check_pair("strides", strides)
    try:
        checked = check_padding(pads)
    except ValueError:
        checked = "invalid"
    if isinstance(checked, str):  # "SAME"/"VALID" are not resolved pads
        raise ValueError(
            "pads: expected resolved pads ((top, bottom), (left, right)) of non-negative "
            f"integers, got {pads!r}."
        )
    return window, strides, checked


def _check_arrays(
    x: Array, delta: Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads
) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"x: expected NHWC (batch, H, W, C_in), got shape {jnp.shape(x)}.")
    for name, a in (("x", x), ("delta", delta)):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"{name}: expected a floating-point array, got {jnp.result_type(a)}.")
    if jnp.result_type(delta) != jnp.result_type(x):
        raise TypeError(
            f"delta: expected x's dtype {jnp.result_type(x)}, got {jnp.result_type(delta)}."
        )
    _, (h_out, w_out) = out_spatial("conv_kernel_grad", x.shape[1:], window, strides, pads, arg="x")
    want = (x.shape[0], h_out, w_out)
    if jnp.ndim(delta) != 4 or tuple(delta.shape[:3]) != want or delta.shape[3] < 1:
        raise ValueError(
            f"delta: expected ({want[0]}, {want[1]}, {want[2]}, features ≥ 1) for x of shape "
            f"{tuple(x.shape)} (window {window}, strides {strides}, pads {pads}), got shape "
            f"{jnp.shape(delta)}."
        )


def conv_kernel_grad(
    x: Array,
    delta: Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    precision: Any = None,
) -> Array:
    """``∂C/∂W``, HWIO ``(k_h, k_w, C_in, features)``, of ``z = x_pad ⋆_s W``.

    Args:
      x: the input, ``(batch, H, W, C_in)``.
      delta: ``∂C/∂z``, ``(batch, H_out, W_out, features)``.
      window, strides, pads: the convolution's, pads resolved (``((top, bottom), (left,
        right))``).
      precision: passed to the dots or the convolution.

    The method is :func:`kernel_grad_method`'s; both give the same sums in different orders.

    Raises:
      ValueError: ``window`` or ``strides`` not positive integers (or pairs), ``pads`` not
        resolved non-negative pads, the window not fitting ``x``, ``x`` or ``delta`` not 4-D,
        or ``delta``'s batch and positions not those of the convolution of ``x``.
      TypeError: ``x`` or ``delta`` not floating point, or of different dtypes.
    """
    window, strides, pads = _checked_geometry(window, strides, pads)
    _check_arrays(x, delta, window, strides, pads)
    method = kernel_grad_method(x.shape, delta.shape[-1], window, strides, pads, x.dtype)
    if method == "conv":
        return _by_conv(x, delta, window, strides, pads, precision)
    # the measurement was on CPU; a program lowered for another platform convolves
    return lax.platform_dependent(
        x,
        delta,
        cpu=lambda x, d: _by_taps(x, d, window, strides, pads, precision),
        default=lambda x, d: _by_conv(x, d, window, strides, pads, precision),
    )


@functools.cache
def _measured_method(
    x_shape: tuple[int, ...],
    features: int,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
    dtype: str,
) -> str:
    """``taps`` if it is faster by :data:`_MARGIN` in the median of interleaved paired timings
    of both compiled kernel gradients, else ``conv``."""
    h_out, w_out = _out_positions(x_shape, window, strides, pads)

    def make_args() -> tuple[Array, Array]:
        x = jnp.full(x_shape, 0.25, dtype)
        return x, jnp.full((x_shape[0], h_out, w_out, features), 0.5, dtype)

    taps, conv = (
        jax.jit(lambda x, d, f=f: f(x, d, window, strides, pads)) for f in (_by_taps, _by_conv)
    )
    ratio = paired_ratio(taps, conv, make_args)
    return "taps" if ratio < _MARGIN else "conv"
