"""The fast paths of Conv2D's GGN square sums and MaxPool2D's backward against their references.

- :func:`~bpjax.layers._conv.conv_patches`, built from strided slices (``_init.conv_taps``, whose
  channels-first slices equal the channels-last ones transposed), against
  :func:`jax.lax.conv_general_dilated_patches`: equal exactly. Both are copies of ``x``: the
  patches "convolution" multiplies each cell by a 0/1 kernel and adds the zeros, exact in IEEE
  arithmetic for finite ``x``. (``Conv2D`` has no dilation, so none is tested.)
- ``Conv2D.square_sum`` / ``example_square_sums`` and ``example_grads`` / ``example_sq_norms``
  (one batched product per column and kernel tap, over the channels-first taps) against
  ``Σ_c w_{c,n} (g_{c,n})²`` and ``g_n`` with ``g`` from ``jax.vjp`` of
  :func:`jax.lax.conv_general_dilated`, in float64, norm-relative to ``1e-10``: each entry sums
  at most a few hundred products, each rounded at 2⁻⁵³ ≈ 1.1e-16, so the two orders of
  summation differ by ~1e-14 relative; ``1e-10`` leaves four orders of magnitude and still
  catches any wrong or missing term (each is ≥ 1e-3 of the total here).
- :func:`~bpjax.layers._pool.max_routes_by_tiles` against the general
  :func:`~bpjax.layers._pool.max_routes_by_offsets` and ``jax.vjp`` of ``reduce_window`` max,
  with ties and a NaN window: equal exactly. Where windows tile, each input cell receives at
  most one ``dy`` and otherwise zeros, so every path's sums are exact.

Each check runs jitted and not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpjax.layers import Conv2D, MaxPool2D, _conv
from bpjax.layers._conv import conv_patches
from bpjax.layers._init import check_padding, conv_taps, resolve_pads
from bpjax.layers._pool import max_routes_by_offsets, max_routes_by_tiles, windows_tile

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
    # channels-first taps are the channels-last ones transposed
    first = conv_taps(jnp.moveaxis(x, 3, 1), kernel, strides, pads, channels_first=True)
    for tap_first, tap_last in zip(first, conv_taps(x, kernel, strides, pads), strict=True):
        np.testing.assert_array_equal(tap_first, jnp.moveaxis(tap_last, 3, 1))


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


def _tanh_conv_on_random_input(case, rng: np.random.Generator):
    """A 4-feature tanh Conv2D for ``case``, its float64 params, a random input and the cache:
    ``(layer, params, out_shape, x, cache)``."""
    kernel, strides, padding, shape = case
    layer = Conv2D(4, kernel, strides, padding, activation="tanh")
    params, out_shape = layer.init(jax.random.key(0), shape[1:], jnp.float64)
    x = jnp.asarray(rng.normal(size=shape))
    _, cache = layer.forward(params, x)
    return layer, params, out_shape, x, cache


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_conv_square_sums_equal_squared_vjp_kernel_grads(x64, case, jit):
    shape = case[3]
    rng = np.random.default_rng(1)
    layer, params, out_shape, x, cache = _tanh_conv_on_random_input(case, rng)
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


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "taps"])
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_example_kernel_grads_equal_vjp_kernel_grads(x64, monkeypatch, case, jit, gram):
    # one product per tap, g_n[i, j] = Σ_positions x_pad[n, s p + (i, j)] δ_nᵀ: the same sums as
    # the vjp's in another order, so they meet at the module docstring's margin. The norms take
    # the Gram form where it is cheaper, else the taps' products: forced here, each on every case
    monkeypatch.setattr(_conv, "use_gram", lambda *shape: gram)
    shape = case[3]
    rng = np.random.default_rng(3)
    layer, params, out_shape, x, cache = _tanh_conv_on_random_input(case, rng)
    delta = jnp.asarray(rng.normal(size=(shape[0], *out_shape)))
    want = np.asarray(_kernel_grads(layer, params, x, delta[None]))[0]  # (B, k_h, k_w, C, O)
    got = _wrap(jit)(layer.example_grads)(params, cache, delta)
    assert got["W"].shape == want.shape
    assert _relative_error(got["W"], want) <= RTOL
    norms = _wrap(jit)(layer.example_sq_norms)(params, cache, delta)["W"]
    np.testing.assert_allclose(norms, (want**2).sum(axis=(1, 2, 3, 4)), rtol=RTOL)


# (window, strides, padding, input shape) where the windows tile: even and odd sizes (the odd
# last row/column in no window), SAME on sizes the window divides, a non-square window
TILING = {
    "2-valid-even": ((2, 2), (2, 2), "VALID", (2, 6, 6, 3)),
    "2-valid-odd": ((2, 2), (2, 2), "VALID", (2, 7, 5, 3)),
    "2-same-even": ((2, 2), (2, 2), "SAME", (2, 8, 4, 2)),
    "3x2-valid-odd": ((3, 2), (3, 2), "VALID", (2, 8, 7, 2)),
    "1": ((1, 1), (1, 1), "VALID", (1, 3, 4, 2)),
}


def _tie_input(shape: tuple[int, ...]) -> np.ndarray:
    """Values in {0, 1} (ties in most windows), the last example all ones (ties everywhere)."""
    x = np.random.default_rng(2).integers(0, 2, size=shape).astype(np.float64)
    x[-1] = 1.0
    return x


@pytest.mark.parametrize("case", TILING.values(), ids=TILING.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_max_pool_tiling_path_equals_general_path_and_vjp(x64, case, jit):
    window, strides, padding, shape = case
    layer = MaxPool2D(window, strides, padding)
    pads = _pads(window, strides, padding, shape)
    assert windows_tile(window, strides, pads)
    x = jnp.asarray(_tie_input(shape))
    y, cache = layer.forward({}, x)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=y.shape))
    tiles = _wrap(jit)(lambda x, y, dy: max_routes_by_tiles(x, y, dy, window))(x, y, dy)
    offsets = _wrap(jit)(lambda x, y, dy: max_routes_by_offsets(x, y, dy, window, strides, pads))(
        x, y, dy
    )
    np.testing.assert_array_equal(tiles, offsets)
    np.testing.assert_array_equal(_wrap(jit)(layer.backward)({}, cache, dy)[1], tiles)
    args = dict(
        window_dimensions=(1, *window, 1),
        window_strides=(1, *strides, 1),
        padding=((0, 0), *pads, (0, 0)),
    )
    _, vjp = jax.vjp(lambda x: lax.reduce_window(x, -jnp.inf, lax.max, **args), x)
    np.testing.assert_array_equal(tiles, vjp(dy)[0])


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_max_pool_tiling_path_passes_nothing_from_a_nan_window(x64, jit):
    x = _tie_input((2, 4, 4, 1))
    x[0, 0, 1, 0] = np.nan  # window (0, 0) of example 0: its maximum is NaN
    x = jnp.asarray(x)
    y, _ = MaxPool2D(2).forward({}, x)
    dy = jnp.ones_like(y)
    tiles = _wrap(jit)(lambda x, y, dy: max_routes_by_tiles(x, y, dy, (2, 2)))(x, y, dy)
    offsets = max_routes_by_offsets(x, y, dy, (2, 2), (2, 2), ((0, 0), (0, 0)))
    np.testing.assert_array_equal(tiles, offsets)
    assert not np.any(np.asarray(tiles)[0, :2, :2])  # the NaN window's block got nothing
    assert np.asarray(tiles).sum() == dy.size - 1  # every other window passed its 1


@pytest.mark.parametrize(
    ("window", "strides", "padding", "shape"),
    [
        ((2, 2), (2, 2), "SAME", (1, 7, 6, 1)),  # an odd side: SAME pads it
        ((3, 3), (2, 2), "VALID", (1, 7, 7, 1)),  # overlapping windows
        ((2, 2), (2, 2), 1, (1, 6, 6, 1)),  # explicit padding
    ],
)
def test_max_pool_takes_the_general_path_where_windows_do_not_tile(window, strides, padding, shape):
    assert not windows_tile(window, strides, _pads(window, strides, padding, shape))
