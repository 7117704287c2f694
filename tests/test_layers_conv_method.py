"""Conv2D's kernel gradient and its method: pinned, measured once, the same maths either way.

Nothing here times anything: which method is faster is the machine's business (the benchmarks
record it); the tests check that the choice is one of the two, made once per shape, pinned by the
environment variable, and that both methods compute ``∂C/∂W`` as ``jax.vjp`` of the forward
convolution does, in float64, norm-relative to ``1e-10``: each entry sums at most a few hundred
products, each rounded at 2⁻⁵³ ≈ 1.1e-16, so two orders of summation differ by ~1e-14 relative;
``1e-10`` leaves four orders of magnitude and still catches any wrong or missing tap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpjax as bp
from bpjax.layers import (
    KERNEL_GRAD_ENV,
    Conv2D,
    _conv_method,
    conv_kernel_grad,
    kernel_grad_method,
)
from bpjax.layers._init import check_padding, resolve_pads
from tests.test_layers_conv_paths import CONV_CASES

RTOL = 1e-10
# (B, H, W, C_in), features, window, strides, pads: 2·B·P·k_h·k_w·C_in·features ≈ 2^22.8 ≥
# MEASURE_FLOPS, measured in auto
BIG = ((16, 16, 16, 3), 32, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _conv_net(in_channels: int) -> bp.Serial:
    """Conv2D(8, 3×3) → Flatten → Dense(3) on 12×12 images of ``in_channels`` channels."""
    return bp.serial(
        Conv2D(8, 3, padding="SAME", activation="relu"), bp.layers.Flatten(),
        bp.layers.Dense(3, "softmax"), loss="cross_entropy", input_shape=(12, 12, in_channels),
    )  # fmt: skip


@pytest.mark.parametrize("method", ["conv", "taps", " TAPS "])
def test_the_environment_pins_the_method(monkeypatch, method):
    monkeypatch.setenv(KERNEL_GRAD_ENV, method)
    assert kernel_grad_method(*BIG, jnp.float32) == method.strip().lower()
    small = ((1, 4, 4, 1), 2, (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert kernel_grad_method(*small, jnp.float32) == method.strip().lower()


def test_a_bad_pin_is_named(monkeypatch):
    monkeypatch.setenv(KERNEL_GRAD_ENV, "im2col")
    with pytest.raises(ValueError, match=f"{KERNEL_GRAD_ENV}: expected one of conv, taps"):
        kernel_grad_method(*BIG, jnp.float32)


def test_auto_convolves_small_kernels_and_measures_big_ones_once(monkeypatch):
    monkeypatch.delenv(KERNEL_GRAD_ENV, raising=False)
    small = ((2, 8, 8, 2), 4, (3, 3), (1, 1), ((1, 1), (1, 1)))  # 2^15.4 FLOPs
    assert kernel_grad_method(*small, jnp.float32) == "conv"
    first = kernel_grad_method(*BIG, jnp.float32)
    assert first in _conv_method.KERNEL_GRAD_METHODS
    misses = _conv_method._measured_method.cache_info().misses
    assert kernel_grad_method(*BIG, jnp.float32) == first  # cached: no second measurement
    assert _conv_method._measured_method.cache_info().misses == misses


def _vjp_kernel_grad(layer: Conv2D, w, x, delta):
    pads = resolve_pads(x.shape[1:3], layer.kernel_size, layer.strides, layer.padding)

    def z_of(w):
        return lax.conv_general_dilated(
            x, w, layer.strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )  # fmt: skip

    return np.asarray(jax.vjp(z_of, w)[1](delta)[0])


@pytest.mark.parametrize("method", ["conv", "taps"])
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_both_methods_equal_the_vjp_kernel_gradient(monkeypatch, x64, method, case, jit):
    monkeypatch.setenv(KERNEL_GRAD_ENV, method)
    kernel, strides, padding, shape = case
    layer = Conv2D(4, kernel, strides, check_padding(padding), activation="tanh")
    params, out_shape = layer.init(jax.random.key(0), shape[1:], jnp.float64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape))
    delta = jnp.asarray(rng.normal(size=(shape[0], *out_shape)))
    _, cache = layer.forward(params, x)
    backward = jax.jit(layer.backward_delta) if jit else layer.backward_delta
    got = np.asarray(backward(params, cache, delta)[0]["W"])
    want = _vjp_kernel_grad(layer, params["W"], x, delta)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= RTOL * np.linalg.norm(want)


def test_a_network_traces_with_a_measured_method_under_jit_and_vmap(monkeypatch):
    # the measurement runs while the caller's program is being traced: it must not be staged
    monkeypatch.delenv(KERNEL_GRAD_ENV, raising=False)
    net = _conv_net(5)
    params = net.init(jax.random.key(0))
    x = jnp.ones((2, 40, 12, 12, 5))  # B = 40: a shape no other test measured
    y = jnp.zeros((2, 40), jnp.int32)
    misses = _conv_method._measured_method.cache_info().misses
    grads = jax.vmap(jax.jit(net.value_and_grad), in_axes=(None, 0, 0))(params, x, y)[1]
    assert _conv_method._measured_method.cache_info().misses > misses  # measured in the trace
    assert grads[0]["W"].shape == (2, 3, 3, 5, 8)
    assert bool(jnp.all(jnp.isfinite(grads[0]["W"])))


@pytest.mark.parametrize(
    ("x_shape", "delta_shape", "name"),
    [
        ((2, 6, 6), (2, 6, 6, 4), "x"),  # no channel axis
        ((2, 6, 6, 3), (2, 6, 6), "delta"),  # no feature axis
        ((2, 6, 6, 3), (3, 6, 6, 4), "delta"),  # another batch
        ((2, 6, 6, 3), (2, 5, 6, 4), "delta"),  # positions of another convolution
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_shapes_that_do_not_fit_are_named(x_shape, delta_shape, name, jit):
    window, strides, pads = (3, 3), (1, 1), ((1, 1), (1, 1))

    def kernel_grad(x, delta):
        return conv_kernel_grad(x, delta, window, strides, pads)

    with pytest.raises(ValueError, match=f"^{name}: expected"):
        (jax.jit(kernel_grad) if jit else kernel_grad)(jnp.ones(x_shape), jnp.ones(delta_shape))
    with pytest.raises(ValueError, match="x_shape: expected NHWC"):
        kernel_grad_method((2, 6, 6), 4, window, strides, pads, jnp.float32)


@pytest.mark.parametrize(
    ("window", "strides", "pads", "match"),
    [
        ((3.0, 3.0), (1, 1), ((1, 1), (1, 1)), "^window: expected"),
        ((0, 0), (1, 1), ((0, 0), (0, 0)), "^window: expected"),
        ((3, 3), (0, 0), ((1, 1), (1, 1)), "^strides: expected"),
        ((3, 3), (1, 1), "SAME", "^pads: expected resolved pads"),
        ((3, 3), (1, 1), ((-1, 1), (1, 1)), "^pads: expected resolved pads"),
        ((7, 7), (1, 1), ((0, 0), (0, 0)), "^x: the 7×7 window of conv_kernel_grad does not fit"),
    ],
)
@pytest.mark.parametrize("method", ["conv", "taps"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_geometry_that_does_not_fit_is_named(
    monkeypatch, window, strides, pads, match, method, jit
):
    monkeypatch.setenv(KERNEL_GRAD_ENV, method)

    def kernel_grad(x, delta):
        return conv_kernel_grad(x, delta, window, strides, pads)

    with pytest.raises(ValueError, match=match):
        (jax.jit(kernel_grad) if jit else kernel_grad)(
            jnp.ones((2, 6, 6, 3)), jnp.ones((2, 6, 6, 5))
        )
    if not match.startswith("^x"):  # the method's own arguments, pinned or not
        with pytest.raises(ValueError, match=match):
            kernel_grad_method((2, 6, 6, 3), 5, window, strides, pads, jnp.float32)


@pytest.mark.parametrize(
    ("x_dtype", "delta_dtype", "match"),
    [
        (jnp.float32, jnp.float16, "^delta: expected x's dtype float32, got float16"),
        (jnp.int32, jnp.int32, "^x: expected a floating-point array, got int32"),
    ],
)
@pytest.mark.parametrize("method", ["conv", "taps"])
def test_dtypes_that_do_not_fit_are_named(monkeypatch, x_dtype, delta_dtype, match, method):
    monkeypatch.setenv(KERNEL_GRAD_ENV, method)
    window, strides, pads = (3, 3), (1, 1), ((1, 1), (1, 1))
    x, delta = jnp.ones((2, 6, 6, 3), x_dtype), jnp.ones((2, 6, 6, 5), delta_dtype)
    for wrap in (lambda f: f, jax.jit):
        with pytest.raises(TypeError, match=match):
            wrap(lambda x, d: conv_kernel_grad(x, d, window, strides, pads))(x, delta)


def test_the_measurement_runs_under_a_callers_transfer_guard(monkeypatch):
    # measuring builds its own inputs inside the caller's trace: a disallowing guard is the
    # caller's rule for its own arrays, not for the measurement's
    monkeypatch.delenv(KERNEL_GRAD_ENV, raising=False)
    net = _conv_net(6)
    params = net.init(jax.random.key(0))
    x = jnp.ones((36, 12, 12, 6))  # a shape no other test measured
    y = jnp.zeros(36, jnp.int32)
    misses = _conv_method._measured_method.cache_info().misses
    with jax.transfer_guard("disallow"):
        loss, _ = jax.jit(net.value_and_grad)(params, x, y)
    assert _conv_method._measured_method.cache_info().misses > misses
    assert bool(jnp.isfinite(loss))
