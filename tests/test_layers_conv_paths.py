"""The fast path of Conv2D's GGN square sums against its references.

- :func:`~bpjax.layers._conv.conv_patches`, built from strided slices (``conv_taps``), against
  :func:`jax.lax.conv_general_dilated_patches`: equal exactly. Both are copies of ``x``: the
  patches "convolution" multiplies each cell by a 0/1 kernel and adds the zeros, exact in IEEE
  arithmetic for finite ``x``. (``Conv2D`` has no dilation, so none is tested.)
- ``Conv2D.square_sum`` / ``example_square_sums`` (one batched product per column over those
  patches) against ``Σ_c w_{c,n} (g_{c,n})²`` with ``g_{c,n}`` from ``jax.vjp`` of
  :func:`jax.lax.conv_general_dilated`, in float64, norm-relative to ``1e-10``: each entry sums
  at most a few hundred products, each rounded at 2⁻⁵³ ≈ 1.1e-16, so the two orders of
  summation differ by ~1e-14 relative; ``1e-10`` leaves four orders of magnitude and still
  catches any wrong or missing term (each is ≥ 1e-3 of the total here).

Each check runs jitted and not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpjax.layers import Conv2D
from bpjax.layers._conv import conv_patches
from bpjax.layers._init import check_padding, resolve_pads

RTOL = 1e-10  # float64, the module docstring's margin

# (kernel, strides, padding, input shape): SAME, VALID, strided, asymmetric explicit pads, 1×1,
# a window wider than tall on odd sizes, and one output position
CONV_CASES = {
    "same-3x3": ((3, 3), (1, 1), "SAME", (2, 7, 6, 3)),
    "valid-strided": ((3, 2), (2, 1), "VALID", (2, 7, 6, 3)),
    "same-stride2-odd": ((3, 3), (2, 2), "SAME", (2, 7, 5, 2)),
    "explicit-pads": ((2, 3), (1, 2), ((1, 0), (2, 1)), (3, 5, 6, 2)),
    "1x1": ((1, 1), (1, 1), "VALID", (2, 4, 3, 3)),
    "one-position": ((3, 3), (1, 1), "VALID", (2, 3, 3, 2)),
}


def _wrap(jit: bool):
    return jax.jit if jit else (lambda f: f)


def _pads(kernel, strides, padding, shape):
    return resolve_pads(shape[1:3], kernel, strides, check_padding(padding))


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_taps_patches_equal_conv_general_dilated_patches(x64, case, jit):
    kernel, strides, padding, shape = case
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
    pads = _pads(kernel, strides, padding, shape)
    got = _wrap(jit)(lambda x: conv_patches(x, kernel, strides, pads))(x)
    want = lax.conv_general_dilated_patches(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "OIHW", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )  # fmt: skip
    np.testing.assert_array_equal(got, want.reshape(shape[0], -1, want.shape[-1]))
    # the kernel-order (HWI) patches are the same entries, (i, j) before c
    hwc = _wrap(jit)(lambda x: conv_patches(x, kernel, strides, pads, channel_major=False))(x)
    k = kernel[0] * kernel[1]
    reordered = got.reshape(*got.shape[:2], shape[3], k).swapaxes(2, 3).reshape(got.shape)
    np.testing.assert_array_equal(hwc, reordered)


def _kernel_grads(layer: Conv2D, params, x, deltas):
    """``g_{c,n} = ∂(δ_{c,n} · z_n)/∂W`` by ``jax.vjp`` of the convolution: ``(k, B, *W)``."""
    pads = _pads(layer.kernel_size, layer.strides, layer.padding, x.shape)

    def z_of(w, x_n):
        return lax.conv_general_dilated(
            x_n[None], w, layer.strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]

    def one(x_n, d_n):
        return jax.vjp(lambda w: z_of(w, x_n), params["W"])[1](d_n)[0]

    return jax.vmap(jax.vmap(one), in_axes=(None, 0))(x, deltas)


def _relative_error(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_conv_square_sums_equal_squared_vjp_kernel_grads(x64, case, jit):
    kernel, strides, padding, shape = case
    layer = Conv2D(4, kernel, strides, padding, activation="tanh")
    rng = np.random.default_rng(1)
    params, out_shape = layer.init(jax.random.key(0), shape[1:], jnp.float64)
    x = jnp.asarray(rng.normal(size=shape))
    _, cache = layer.forward(params, x)
    deltas = jnp.asarray(rng.normal(size=(3, shape[0], *out_shape)))  # k = 3 columns
    weights = jnp.asarray(rng.uniform(0.5, 1.5, size=(3, shape[0])) * [[1], [-1], [1]])  # signed
    g = _kernel_grads(layer, params, x, deltas)  # (k, B, k_h, k_w, C_in, features)
    want_example = np.einsum("cb,cb...->b...", weights, g**2)
    bias = deltas.sum(axis=(2, 3))  # (k, B, features)
    want_bias = np.einsum("cb,cbo->bo", weights, bias**2)

    total = _wrap(jit)(layer.square_sum)(params, cache, deltas, weights)
    example = _wrap(jit)(layer.example_square_sums)(params, cache, deltas, weights)
    assert _relative_error(total["W"], want_example.sum(0)) <= RTOL
    assert _relative_error(example["W"], want_example) <= RTOL
    assert _relative_error(total["b"], want_bias.sum(0)) <= RTOL
    assert _relative_error(example["b"], want_bias) <= RTOL
