"""Conv2D, MaxPool2D, AvgPool2D and Flatten against JAX autodiff of their plain-JAX forwards.

The references are written from the forward maths alone: ``lax.conv_general_dilated`` in NHWC/HWIO
plus the bias, ``lax.reduce_window`` with ``max`` (padding ``−∞``) or ``add`` divided by the count
of input cells per window, and ``jnp.reshape``; each layer's hand-written backward is compared with
``jax.vjp`` of that reference, in float64, norm-relative to 1e-10, over random shapes, strides and
paddings (hypothesis), jitted and eagerly. Max pooling inputs are tie-free there (a permutation of
distinct values); the tie rule has its own test. A small CNN goes through ``bp.check_grads``.

Compilation dominates the cost: every drawn case compiles anew. Under ``jit`` each case is one
program (the layer and the reference together), a fraction of a second; eagerly every primitive of
a new shape compiles on its own, several times slower, so the eager samples are small.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.example_libraries import stax

import bpjax as bp
from bpjax.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D
from tests.reference import JAX_NN_FORWARD

RTOL = 1e-10
# Compilation dominates: every drawn shape compiles afresh (one program per example under jit, each
# primitive of a new shape eagerly, which costs several times more).
JIT_EXAMPLES = 60
EAGER_EXAMPLES = 8
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def assert_close(manual: Any, reference: Any, what: str, rtol: float = RTOL) -> None:
    """``‖manual − reference‖ ≤ rtol ‖reference‖`` (exact equality where the reference is 0)."""
    manual, reference = np.asarray(manual), np.asarray(reference)
    assert manual.shape == reference.shape, (what, manual.shape, reference.shape)
    assert manual.dtype == reference.dtype, (what, manual.dtype, reference.dtype)
    err, scale = np.linalg.norm(manual - reference), np.linalg.norm(reference)
    assert err <= rtol * scale or err == 0.0, f"{what}: relative error {err / scale:.3g}"


def _wrap(jit: bool):
    return jax.jit if jit else (lambda f: f)


# -- strategies ---------------------------------------------------------------------------------

sizes = st.integers(1, 9)
pairs = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))


def paddings(max_pad: tuple[int, int] = (3, 3)):
    """``"SAME"``, ``"VALID"``, ``p``, ``(p_h, p_w)`` or ``((top, bottom), (left, right))``."""
    ph, pw = st.integers(0, max_pad[0]), st.integers(0, max_pad[1])
    return st.one_of(
        st.sampled_from(["SAME", "VALID", "same"]),
        st.integers(0, min(max_pad)),
        st.tuples(ph, pw),
        st.tuples(st.tuples(ph, ph), st.tuples(pw, pw)),
    )


@st.composite
def conv_cases(draw):
    """A Conv2D config and an input shape it fits."""
    kernel = draw(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    layer = Conv2D(draw(st.integers(1, 4)), kernel, draw(pairs), draw(paddings()))
    shape = (draw(st.integers(1, 3)), draw(sizes), draw(sizes), draw(st.integers(1, 4)))
    assume(_fits(layer.kernel_size, layer.strides, layer.padding, shape))
    return layer, shape, draw(st.integers(0, 2**32 - 1))


@st.composite
def pool_cases(draw, cls):
    """A pooling layer config and an input shape it fits."""
    window = draw(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    kh, kw = (window, window) if isinstance(window, int) else window
    strides = draw(st.one_of(st.none(), pairs))
    padding = draw(paddings((kh - 1, kw - 1)))
    kwargs = {"count_include_pad": draw(st.booleans())} if cls is AvgPool2D else {}
    layer = cls(window, strides, padding, **kwargs)
    shape = (draw(st.integers(1, 3)), draw(sizes), draw(sizes), draw(st.integers(1, 4)))
    assume(_fits(layer.window, layer.strides, layer.padding, shape))
    return layer, shape, draw(st.integers(0, 2**32 - 1))


def _pads(window, strides, padding, shape):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(shape[1:3], window, strides, padding))
    return padding


def _fits(window, strides, padding, shape) -> bool:
    pads = _pads(window, strides, padding, shape)
    return all(n + lo + hi >= k for n, (lo, hi), k in zip(shape[1:3], pads, window, strict=True))


# -- the plain-JAX references -------------------------------------------------------------------


def ref_conv(layer: Conv2D, params, x):
    """``z = x_pad ⋆_s W + b`` in NHWC/HWIO, the zero padding written out as ``jnp.pad``.

    Padding inside the convolution would be the same function, but ``jax.vjp`` of it aborts the
    process for some configurations (an XLA bug that ``Conv2D`` works around; see
    ``test_conv2d_stride_edge_cases``): written this way, its transpose is a slice.
    """
    (top, bottom), (left, right) = _pads(layer.kernel_size, layer.strides, layer.padding, x.shape)
    x_pad = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    z = lax.conv_general_dilated(
        x_pad, params["W"], layer.strides, "VALID", dimension_numbers=NHWC_HWIO
    )
    return z + params["b"]


def ref_pool(layer, x):
    """Max over each window (pads ``−∞``), or its sum over the count of (input) cells."""
    pads = _pads(layer.window, layer.strides, layer.padding, x.shape)
    args = dict(
        window_dimensions=(1, *layer.window, 1),
        window_strides=(1, *layer.strides, 1),
        padding=((0, 0), *pads, (0, 0)),
    )
    if isinstance(layer, MaxPool2D):
        return lax.reduce_window(x, -jnp.inf, lax.max, **args)
    total = lax.reduce_window(x, 0.0, lax.add, **args)
    if layer.count_include_pad:
        return total / (layer.window[0] * layer.window[1])
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return total / lax.reduce_window(ones, 0.0, lax.add, **args)


# -- Conv2D -------------------------------------------------------------------------------------


def _conv_results(layer: Conv2D, activation: str, params, x, dy) -> dict[str, tuple]:
    """Each quantity by ``layer`` and by ``jax.vjp`` of the plain-JAX forward, side by side."""
    y, cache = layer.forward(params, x)
    grads, dx = layer.backward(params, cache, dy)
    z_ref, conv_vjp = jax.vjp(lambda p, x: ref_conv(layer, p, x), params, x)
    y_ref, act_vjp = jax.vjp(JAX_NN_FORWARD[activation], z_ref)
    (delta_ref,) = act_vjp(dy)
    grads_ref, dx_ref = conv_vjp(delta_ref)
    return {
        "z": (cache.z, z_ref),
        "y": (y, y_ref),
        "delta": (layer.delta(cache, dy), delta_ref),
        "dx": (dx, dx_ref),
        "dW": (grads["W"], grads_ref["W"]),
        "db": (grads["b"], grads_ref["b"]),
    }


def _conv_check(case, jit: bool, activation: str = "identity") -> None:
    """Conv2D against the reference on one drawn case, in float64, jitted (one program) or not."""
    config, shape, seed = case
    layer = Conv2D(
        config.features, config.kernel_size, config.strides, config.padding, activation=activation
    )
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        params, out_shape = layer.init(jax.random.key(seed % 1000), shape[1:], jnp.float64)
        params = {"W": params["W"], "b": jnp.asarray(rng.normal(size=config.features))}
        x = jnp.asarray(rng.normal(size=shape))
        dy = jnp.asarray(rng.normal(size=(shape[0], *out_shape)))
        results = _wrap(jit)(functools.partial(_conv_results, layer, activation))(params, x, dy)
        for what, (manual, reference) in results.items():
            assert_close(manual, reference, what)


@pytest.mark.slow
@settings(max_examples=EAGER_EXAMPLES)
@given(case=conv_cases())
def test_conv2d_backward_is_the_vjp_of_lax_conv(case):
    _conv_check(case, jit=False)


@pytest.mark.slow
@settings(max_examples=JIT_EXAMPLES)
@given(case=conv_cases())
def test_conv2d_backward_is_the_vjp_of_lax_conv_jitted(case):
    _conv_check(case, jit=True)


@pytest.mark.slow
@settings(max_examples=JIT_EXAMPLES // 2)
@given(case=conv_cases(), activation=st.sampled_from(["tanh", "relu", "sigmoid", "softmax"]))
def test_conv2d_with_an_activation_records_delta_at_z(case, activation):
    _conv_check(case, jit=True, activation=activation)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"),
    [
        (8, 3, 2, "VALID"),  # (8 − 3) mod 2 = 1: the last row is never reached
        (9, 4, 3, ((1, 0), (0, 1))),  # (9 + 1 − 4) mod 3 = 0 along H, 1 along W
        (5, 2, 3, "SAME"),
        (3, 1, 1, ((3, 2), (0, 4))),  # pads beyond k − 1: the transposed pads are negative
        (1, 4, 3, 3),  # a 1×1 image inside its padding
        # kernel 2 and stride 2 along H with transposed pads (0, 0), a wider kernel along W:
        # XLA's operand swap aborted on dx's convolution here (see _conv._dodge_group_dim)
        (4, (2, 4), (2, 1), ((1, 1), (3, 0))),
    ],
)
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_conv2d_stride_edge_cases(x64, size, kernel, stride, padding, jit):
    """Rows and columns no window reaches get zero gradient; pads larger than the kernel crop."""
    layer = Conv2D(3, kernel, stride, padding)
    _conv_check((layer, (2, size, size - 1 if size > 3 else size + 1, 2), size), jit=jit)
    if padding == "VALID":
        x = jnp.ones((1, size, size, 2))
        params, _ = layer.init(jax.random.key(0), x.shape[1:], jnp.float64)
        y, cache = layer.forward(params, x)
        _, dx = layer.backward(params, cache, jnp.ones_like(y))
        np.testing.assert_array_equal(dx[:, -1], 0.0)  # the last row is never reached
        np.testing.assert_array_equal(dx[:, :, -1], 0.0)


def test_conv2d_init_shapes_and_scaling(x64):
    """HWIO kernel; He for relu (variance 2/fan_in), Glorot otherwise, fans over k_h k_w."""
    relu = Conv2D(64, (3, 5), activation="relu")
    params, out_shape = relu.init(jax.random.key(0), (10, 12, 16), jnp.float64)
    assert params["W"].shape == (3, 5, 16, 64) and params["b"].shape == (64,)
    assert out_shape == (8, 8, 64)
    assert not params["b"].any()
    fan_in, fan_out = 3 * 5 * 16, 3 * 5 * 64
    np.testing.assert_allclose(np.var(params["W"]), 2 / fan_in, rtol=0.1)
    tanh = Conv2D(64, (3, 5), activation="tanh")
    params, _ = tanh.init(jax.random.key(0), (10, 12, 16), jnp.float64)
    np.testing.assert_allclose(np.var(params["W"]), 2 / (fan_in + fan_out), rtol=0.1)
    assert Conv2D(4, 3, 2, "SAME").init(jax.random.key(0), (7, 8, 1))[1] == (4, 4, 4)


def test_conv2d_backward_is_two_convolutions_and_no_autodiff(x64):
    """The jaxpr of the backward: two ``conv_general_dilated``, one ``reduce_sum``, nothing else."""
    layer = Conv2D(4, 3, 2, "SAME", activation="tanh")
    params, _ = layer.init(jax.random.key(0), (8, 8, 3), jnp.float64)
    y, cache = layer.forward(params, jnp.ones((2, 8, 8, 3)))
    jaxpr = jax.make_jaxpr(layer.backward_delta)(params, cache, y)
    prims = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert prims.count("conv_general_dilated") == 2, prims
    assert "transpose" not in prims  # the flipped kernel is read HWOI, not copied
    assert not any("jvp" in p or "vjp" in p or "transpose" in p for p in prims), prims


# -- pooling ------------------------------------------------------------------------------------


def _pool_results(layer, params, x, dy) -> dict[str, tuple]:
    y, cache = layer.forward(params, x)
    grads, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(lambda x: ref_pool(layer, x), x)
    return {"y": (y, y_ref), "dx": (dx, vjp(dy)[0]), "grads": (grads, {})}


def _pool_check(case, jit: bool) -> None:
    """A pooling layer against the reference on one drawn case, in float64."""
    layer, shape, seed = case
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        # distinct values: no ties, so every window's maximum is unique
        x = jnp.asarray(rng.permutation(math.prod(shape)).reshape(shape) / math.prod(shape) - 0.5)
        params, out_shape = layer.init(jax.random.key(0), shape[1:])
        assert params == {}
        dy = jnp.asarray(rng.normal(size=(shape[0], *out_shape)))
        results = _wrap(jit)(functools.partial(_pool_results, layer))(params, x, dy)
        assert results.pop("grads") == ({}, {})
        for what, (manual, reference) in results.items():
            assert_close(manual, reference, what)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@settings(max_examples=EAGER_EXAMPLES)
@given(data=st.data())
def test_pool_backward_is_the_vjp_of_reduce_window(cls, data):
    _pool_check(data.draw(pool_cases(cls)), jit=False)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@settings(max_examples=JIT_EXAMPLES)
@given(data=st.data())
def test_pool_backward_is_the_vjp_of_reduce_window_jitted(cls, data):
    _pool_check(data.draw(pool_cases(cls)), jit=True)


def _first_maximum_rule(x: np.ndarray, layer: MaxPool2D, dy: np.ndarray) -> np.ndarray:
    """The tie rule by loops: each window's dy to its first maximal input cell, row-major."""
    (kh, kw), (sh, sw) = layer.window, layer.strides
    (top, _), (left, _) = _pads(layer.window, layer.strides, layer.padding, x.shape)
    dx = np.zeros_like(x)
    for n, p, q, c in np.ndindex(*dy.shape):
        cells = [
            (h, w)
            for h in range(p * sh - top, p * sh - top + kh)
            for w in range(q * sw - left, q * sw - left + kw)
            if 0 <= h < x.shape[1] and 0 <= w < x.shape[2]
        ]
        best = max(x[n, h, w, c] for h, w in cells)
        h, w = next((h, w) for h, w in cells if x[n, h, w, c] == best)
        dx[n, h, w, c] += dy[n, p, q, c]
    return dx


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer",
    [MaxPool2D(2), MaxPool2D(3, 1, "SAME"), MaxPool2D((2, 3), (1, 2), ((1, 0), (0, 2)))],
    ids=["tiling", "overlapping-same", "explicit"],
)
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_max_pool_ties_go_to_the_first_maximum_in_the_window(x64, layer, jit):
    """Ties: the first maximal input cell in row-major window order gets all of ``dy``."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(2, 6, 7, 2)).astype(np.float64)  # many ties
    x[1] = 1.0  # every window a tie
    y, cache = layer.forward({}, jnp.asarray(x))
    dy = rng.integers(-9, 10, size=y.shape).astype(np.float64)  # sums exact in any order
    _, dx = _wrap(jit)(layer.backward)({}, cache, jnp.asarray(dy))
    np.testing.assert_array_equal(dx, _first_maximum_rule(x, layer, dy))
    # the same rule as jax.vjp of reduce_window max (select_and_scatter_add with >=) on CPU
    _, vjp = jax.vjp(lambda x: ref_pool(layer, x), jnp.asarray(x))
    np.testing.assert_array_equal(dx, vjp(jnp.asarray(dy))[0])


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize(("window", "strides"), [((2, 2), None), ((3, 2), (2, 1))])
def test_pools_agree_with_stax(x64, padding, window, strides):
    """stax's MaxPool and AvgPool (padded cells do not count) in value and VJP."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 6, 3)))
    for ours, theirs in [(MaxPool2D, stax.MaxPool), (AvgPool2D, stax.AvgPool)]:
        layer = ours(window, strides, padding)
        _, apply = theirs(window, strides or window, padding)  # stax's default stride is 1
        y, cache = layer.forward({}, x)
        y_ref, vjp = jax.vjp(lambda x, apply=apply: apply((), x), x)
        assert_close(y, y_ref, f"{ours.__name__} y")
        dy = jnp.cos(y_ref)
        assert_close(layer.backward({}, cache, dy)[1], vjp(dy)[0], f"{ours.__name__} dx")


def test_avg_pool_count_include_pad(x64):
    """Corners of a SAME 3×3 average: 4 input cells; with the padding counted, 9."""
    x = jnp.ones((1, 4, 4, 1))
    excluded, _ = AvgPool2D(3, 1, "SAME").forward({}, x)
    included, _ = AvgPool2D(3, 1, "SAME", count_include_pad=True).forward({}, x)
    np.testing.assert_allclose(excluded, 1.0)
    assert included[0, 0, 0, 0] == 4 / 9 and included[0, 1, 1, 0] == 1.0


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
def test_pool_backward_has_no_scatter_and_no_autodiff(x64, cls):
    layer = cls(3, 2, "SAME")
    y, cache = layer.forward({}, jnp.ones((2, 8, 8, 3)))
    prims = {eqn.primitive.name for eqn in jax.make_jaxpr(layer.backward)({}, cache, y).eqns}
    assert not any("scatter" in p or "select_and" in p or "transpose" in p for p in prims), prims


# -- Flatten ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 7), (1, 2, 3)])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_flatten_backward_is_the_vjp_of_reshape(x64, shape, jit):
    layer = Flatten()
    params, out_shape = layer.init(jax.random.key(0), shape[1:])
    assert params == {} and out_shape == (math.prod(shape[1:]),)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
    y, cache = _wrap(jit)(layer.forward)(params, x)
    y_ref, vjp = jax.vjp(lambda x: x.reshape(shape[0], -1), x)
    np.testing.assert_array_equal(y, y_ref)
    dy = jnp.sin(y)
    grads, dx = _wrap(jit)(layer.backward)(params, cache, dy)
    assert grads == {}
    np.testing.assert_array_equal(dx, vjp(dy)[0])


# -- a small CNN through the harness ------------------------------------------------------------


def _cnn(activation: str):
    return bp.serial(
        Conv2D(4, 3, activation=activation, padding="SAME"),
        MaxPool2D(2),
        Conv2D(6, (2, 3), 1, ((0, 1), (1, 1)), activation=activation),
        AvgPool2D(2),
        Flatten(),
        Dense(10, "softmax"),
        loss="cross_entropy",
        input_shape=(8, 8, 1),
    )


def ref_cnn_loss(params, x, y, activation: str):
    """The CNN's batch-mean cross-entropy from the forward maths (lax primitives, log-softmax)."""
    f = JAX_NN_FORWARD[activation]
    conv1, _, conv2, _, _, dense = params
    a = f(
        lax.conv_general_dilated(x, conv1["W"], (1, 1), "SAME", dimension_numbers=NHWC_HWIO)
        + conv1["b"]
    )
    window = dict(window_dimensions=(1, 2, 2, 1), window_strides=(1, 2, 2, 1), padding="VALID")
    a = lax.reduce_window(a, -jnp.inf, lax.max, **window)
    a = f(
        lax.conv_general_dilated(
            a, conv2["W"], (1, 1), ((0, 1), (1, 1)), dimension_numbers=NHWC_HWIO
        )
        + conv2["b"]
    )
    a = lax.reduce_window(a, 0.0, lax.add, **window) / 4
    logits = a.reshape(a.shape[0], -1) @ dense["W"].T + dense["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_small_cnn_passes_the_harness(x64, activation, jit):
    net = _cnn(activation)
    params = net.init(jax.random.key(0), jnp.float64)
    assert [p["W"].shape for p in params if p] == [(3, 3, 1, 4), (2, 3, 4, 6), (10, 24)]
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (5, 8, 8, 1), jnp.float64)
    y = jax.random.randint(ky, (5,), 0, 10)
    np.testing.assert_allclose(
        net.loss(params, x, y), ref_cnn_loss(params, x, y, activation), rtol=1e-13
    )
    report = bp.check_grads(net.value_and_grad, net.loss, params, x, y, jit=jit)
    assert report.ok, str(report)
    # and against the independent reference's autodiff
    _, grads = net.value_and_grad(params, x, y)
    grads_ref = jax.grad(ref_cnn_loss)(params, x, y, activation)
    for (path, g), g_ref in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_ref), strict=True
    ):
        assert_close(g, g_ref, jax.tree_util.keystr(path))


@pytest.mark.slow
def test_cnn_records_delta_at_each_conv_z(x64):
    """The δ the recursion records at a Conv2D is ``∂C_n/∂z``, per example, of ``z``'s shape."""
    net = _cnn("tanh")
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float64)
    y = jnp.array([0, 4, 9])
    _, cache = net.forward(params, x)
    deltas = net.backward(params, cache, y).deltas
    assert [d.shape for d in deltas] == [
        (3, 8, 8, 4),
        (3, 4, 4, 4),
        (3, 4, 4, 6),
        (3, 2, 2, 6),
        (3, 24),
        (3, 10),
    ]

    def per_example(e1, e2):  # C_n with offsets added to each conv's z
        conv1, _, conv2, _, _, dense = params
        a = jnp.tanh(ref_conv(net.layers[0], conv1, x) + e1)
        a = ref_pool(net.layers[1], a)
        a = jnp.tanh(ref_conv(net.layers[2], conv2, a) + e2)
        a = ref_pool(net.layers[3], a).reshape(3, -1)
        logp = jax.nn.log_softmax(a @ dense["W"].T + dense["b"])
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    zeros = (jnp.zeros_like(cache.layers[0].z), jnp.zeros_like(cache.layers[2].z))
    _, vjp = jax.vjp(per_example, *zeros)
    d1, d2 = vjp(jnp.ones(3))
    assert_close(deltas[0], d1, "δ of conv 1")
    assert_close(deltas[2], d2, "δ of conv 2")


@pytest.mark.slow
def test_cnn_on_digits_sized_batches_jits_once(key):
    """Conv-Pool-Conv-Pool-Flatten-Dense at batch 64 in float32: one trace, finite grads."""
    net = bp.serial(
        Conv2D(8, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Conv2D(16, 3, padding="SAME", activation="relu"),
        AvgPool2D(2),
        Flatten(),
        Dense(10, "softmax"),
        loss="cross_entropy",
        input_shape=(8, 8, 1),
    )
    params = net.init(key)
    traces = []

    def value_and_grad(params, x, y):
        traces.append(None)
        return net.value_and_grad(params, x, y)

    step = jax.jit(value_and_grad)
    x = jax.random.uniform(key, (64, 8, 8, 1))
    y = jnp.arange(64) % 10
    for _ in range(2):
        loss, grads = step(params, x, y)
    assert len(traces) == 1
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert hash(net) == hash(_digits_net_copy())


def _digits_net_copy():
    return bp.serial(
        Conv2D(8, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Conv2D(16, 3, padding="SAME", activation="relu"),
        AvgPool2D(2),
        Flatten(),
        Dense(10, "softmax"),
        loss="cross_entropy",
        input_shape=(8, 8, 1),
    )


# -- bad configurations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features": 0, "kernel_size": 3}, "features"),
        ({"features": 2.0, "kernel_size": 3}, "features"),
        ({"features": 2, "kernel_size": 0}, "kernel_size"),
        ({"features": 2, "kernel_size": (3,)}, "kernel_size"),
        ({"features": 2, "kernel_size": (3, True)}, "kernel_size"),
        ({"features": 2, "kernel_size": 3, "strides": 0}, "strides"),
        ({"features": 2, "kernel_size": 3, "strides": (1, 2, 3)}, "strides"),
        ({"features": 2, "kernel_size": 3, "padding": "FULL"}, "padding"),
        ({"features": 2, "kernel_size": 3, "padding": -1}, "padding"),
        ({"features": 2, "kernel_size": 3, "padding": ((1,), (1,))}, "padding"),
        ({"features": 2, "kernel_size": 3, "padding": ((1, 2, 3), (1, 1))}, "padding"),
        ({"features": 2, "kernel_size": 3, "activation": "nope"}, "nope"),
    ],
)
def test_conv2d_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv2D(**kwargs)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0,), "window"),
        (((2, 0),), "window"),
        ((2, 0), "strides"),
        ((2, None, "full"), "padding"),
        ((2, None, 2), "smaller than the window"),
        ((3, None, ((0, 3), (0, 0))), "smaller than the window"),
    ],
)
def test_pool_bad_configuration(cls, args, match):
    with pytest.raises(ValueError, match=match):
        cls(*args)


@pytest.mark.parametrize(
    "layer", [Conv2D(2, 3), MaxPool2D(3), AvgPool2D(3)], ids=["conv", "max", "avg"]
)
def test_bad_input_shapes_are_reported(layer):
    with pytest.raises(ValueError, match=r"in_shape: .*\(H, W, C\)"):
        layer.init(jax.random.key(0), (8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        layer.init(jax.random.key(0), (2, 8, 1))
    params, _ = layer.init(jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match="x: "):
        layer.forward(params, jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        layer.forward(params, jnp.ones((1, 8, 2, 1)))


def test_conv2d_wrong_channels_are_reported():
    layer = Conv2D(2, 3)
    params, _ = layer.init(jax.random.key(0), (8, 8, 3))
    with pytest.raises(ValueError, match=r"x: Conv2D takes NHWC inputs \(batch, H, W, 3\)"):
        layer.forward(params, jnp.ones((1, 8, 8, 1)))


@pytest.mark.slow
def test_serial_cnn_with_a_wrong_input_shape_is_reported():
    net = _cnn("tanh")
    params = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 8, 8, 1\)"):
        net.forward(params, jnp.ones((2, 8, 8)))
