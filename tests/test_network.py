"""Serial networks and the layer contract: one δ-recursion for the MLP and for any composition."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.layers import Dense


class Scale(NamedTuple):
    """A user's layer: ``y = x ∘ s`` with a learned per-feature scale ``s``."""

    def init(self, key, in_shape, dtype=jnp.float32):
        del key
        return {"s": jnp.ones(in_shape, dtype)}, in_shape

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, cache, dy):
        x = cache
        return {"s": jnp.sum(dy * x, axis=0)}, dy * params["s"]


def _data(key, batch, n_in, n_out, dtype, labels=True):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, n_in), dtype)
    if labels:
        return x, jax.random.randint(ky, (batch,), 0, n_out)
    return x, jax.random.normal(ky, (batch, n_out), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "generic"])
def test_serial_of_dense_layers_is_the_mlp(x64, fuse):
    """The MLP and serial(Dense, ...) run the same recursion: equal to the last bit or nearly."""
    net = bp.MLP((5, 7, 6, 4), ("tanh", "relu", "softmax"), "cross_entropy", fuse_output=fuse)
    ser = bp.serial(
        Dense(7, "tanh"),
        Dense(6, "relu"),
        Dense(4, "softmax"),
        loss="cross_entropy",
        input_shape=(5,),
        fuse_output=fuse,
    )
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = _data(jax.random.key(1), 9, 5, 4, jnp.float64)
    out, cache = net.forward(params, x)
    s_out, s_cache = ser.forward(params, x)
    np.testing.assert_array_equal(out, s_out)
    mlp_bw, ser_bw = net.backward(params, cache, y), ser.backward(params, s_cache, y)
    for a, b in zip(jax.tree.leaves(mlp_bw), jax.tree.leaves(ser_bw), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ser.loss(params, x, y), net.loss(params, x, y), rtol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_a_users_layer_in_a_serial_network_checks_out(x64, jit):
    net = bp.serial(
        Dense(6, "tanh"),
        Scale(),
        Dense(3, "identity"),
        loss="squared_error",
        input_shape=(4,),
    )
    params = net.init(jax.random.key(0), jnp.float64)
    params[1] = {"s": jnp.linspace(0.5, 1.5, 6)}
    x, y = _data(jax.random.key(1), 5, 4, 3, jnp.float64, labels=False)
    report = bp.check_grads(net.value_and_grad, net.loss, params, x, y, jit=jit)
    assert report.ok, str(report)
    assert "[1]['s']" in {row.path for row in report.rows}
    # the error recorded at the Scale layer is ∂C_n/∂y there, per example
    _, cache = net.forward(params, x)
    bw = net.backward(params, cache, y)
    assert [d.shape for d in bw.deltas] == [(5, 6), (5, 6), (5, 3)]
    np.testing.assert_allclose(
        bw.input_grad, jax.grad(net.loss, argnums=1)(params, x, y), rtol=1e-12
    )


@pytest.mark.slow
def test_serial_is_hashable_jits_without_static_args_and_vmaps():
    def build():
        return bp.serial(
            Dense(5, "relu"), Dense(3, "sigmoid"), loss="binary_cross_entropy", input_shape=(2,)
        )

    net = build()
    assert net == build() and hash(net) == hash(build())
    # float64: vmapped and jitted against eager is one computation compiled two ways, so they
    # differ by roundoff alone, and each gradient element is a batch sum whose terms can cancel.
    # A sum of K ≤ 6 terms rounds by ≤ γ_6 ≈ 7e-16 of its terms' magnitudes (O(1) here, through
    # two 5- and 3-wide layers), so rtol 1e-12 with atol 1e-13 holds with a margin of 100; in
    # float32 the same bound is 4e-7 of the terms, too close to a fixed atol to hold on any CPU.
    with jax.enable_x64(True):
        params = net.init(jax.random.key(0), jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (4, 6, 2), jnp.float64)
        ys = jax.random.uniform(jax.random.key(2), (4, 6, 3), jnp.float64)
        losses, grads = jax.jit(jax.vmap(net.value_and_grad, in_axes=(None, 0, 0)))(params, xs, ys)
        for i in range(4):
            loss_i, grads_i = net.value_and_grad(params, xs[i], ys[i])
            np.testing.assert_allclose(losses[i], loss_i, rtol=1e-12)
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_i), strict=True):
                np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-13)


def test_dense_layer_backward_matches_vjp(x64):
    layer = Dense(4, "gelu")
    params, out_shape = layer.init(jax.random.key(0), (3,), jnp.float64)
    assert out_shape == (4,)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    dy = jax.random.normal(jax.random.key(2), (6, 4), jnp.float64)
    _, cache = layer.forward(params, x)
    grads, dx = layer.backward(params, cache, dy)
    _, pullback = jax.vjp(lambda p, x: layer.forward(p, x)[0], params, x)
    want_grads, want_dx = pullback(dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12)
    for key in ("W", "b"):
        np.testing.assert_allclose(grads[key], want_grads[key], rtol=1e-12)


def test_backprop_takes_exactly_one_output_error():
    with pytest.raises(ValueError, match="exactly one of output_error and output_delta"):
        bp.backprop([Dense(2)], [{}], [None])


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: bp.serial(loss="squared_error", input_shape=(2,)), ValueError, "at least one"),
        (
            lambda: bp.serial(object(), loss="squared_error", input_shape=(2,)),
            TypeError,
            r"layers\[0\]: expected a layer with init, forward and backward, got object",
        ),
        (
            lambda: bp.serial(Dense(2), loss="squared_error", input_shape=(0,)),
            ValueError,
            "input_shape: expected positive integers",
        ),
        (
            lambda: bp.serial(Dense(2, "tanh"), loss="cross_entropy", input_shape=(3,)),
            ValueError,
            r"layers\[-1\]: the loss 'cross_entropy' is defined on outputs that are simplex",
        ),
        (lambda: Dense(0), ValueError, "n_out: expected a positive integer, got 0"),
        (lambda: Dense(2, "nope"), ValueError, "unknown activation 'nope'"),
    ],
)
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_bad_inputs_and_params(jit):
    net = bp.serial(Dense(3, "tanh"), Dense(2), loss="squared_error", input_shape=(4,))
    params = net.init(jax.random.key(0))
    wrap: Any = jax.jit if jit else (lambda f: f)
    x, y = jnp.ones((5, 4)), jnp.ones((5, 2))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 4\), got \(5, 3\)"):
        wrap(net.loss)(params, jnp.ones((5, 3)), y)
    with pytest.raises(TypeError, match="x: expected floating inputs, got dtype int32"):
        wrap(net.loss)(params, jnp.ones((5, 4), jnp.int32), y)
    bad = [params[0], {"W": jnp.ones((2, 4)), "b": jnp.ones(2)}]
    with pytest.raises(
        ValueError, match=r"params\[1\]\['W'\]: expected shape \(2, 3\), got \(2, 4\)"
    ):
        wrap(net.value_and_grad)(bad, x, y)
    with pytest.raises(ValueError, match=r"y: squared_error expects targets of shape"):
        wrap(net.value_and_grad)(params, x, jnp.ones((5, 3)))


def _noise_forward(params, x, *, key=None):
    """y = x ∘ (1 + ε), ε ~ N(0, 0.1²) in training; the identity in evaluation."""
    del params
    if key is None:
        return x, jnp.ones_like(x)
    scale = 1 + 0.1 * jax.random.normal(key, x.shape, x.dtype)
    return x * scale, scale


def _noise_backward(params, scale, dy):
    del params
    return {}, dy * scale


_NOISE = bp.layers.Layer(
    init=lambda key, shape, dtype: ({}, shape),
    forward=_noise_forward,
    backward=_noise_backward,
    needs_key=True,
)


@pytest.mark.slow
def test_a_key_reaches_the_layers_that_need_one(x64, maybe_jit):
    """Training mode (a key) draws the same noise in the manual and the reference loss."""
    net = bp.serial(
        Dense(6, "tanh"), _NOISE, Dense(3, "softmax"), loss="cross_entropy", input_shape=(4,)
    )
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = _data(jax.random.key(1), 7, 4, 3, jnp.float64)
    k = jax.random.key(2)
    loss, grads = maybe_jit(net.value_and_grad)(params, x, y, key=k)
    ref_loss, ref_grads = jax.value_and_grad(net.loss)(params, x, y, key=k)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-14)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)
    # evaluation mode is deterministic and differs from training mode
    eval_out = net(params, x)
    np.testing.assert_array_equal(eval_out, net(params, x, key=None))
    assert not np.allclose(eval_out, net(params, x, key=k))
    np.testing.assert_array_equal(net(params, x, key=k), net(params, x, key=k))


@pytest.mark.slow
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "probabilities"])
def test_outputs_with_positions_take_the_mean_over_them(x64, maybe_jit, labels):
    """A (batch, T, n) output: C_n is the mean over the T positions of each example."""
    net = bp.serial(Dense(6, "tanh"), Dense(3, "softmax"), loss="cross_entropy", input_shape=(5, 4))
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
    if labels:
        y = jax.random.randint(jax.random.key(2), (2, 5), 0, 3)
        one_hot = jax.nn.one_hot(y, 3, dtype=jnp.float64)
    else:
        y = one_hot = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 5, 3), jnp.float64))
    out = net(params, x)
    expected = -jnp.mean(jnp.sum(one_hot * jnp.log(out), axis=-1), axis=1)
    np.testing.assert_allclose(net.per_example_loss(params, x, y), expected, rtol=1e-12)
    loss, grads = maybe_jit(net.value_and_grad)(params, x, y)
    ref_loss, ref_grads = jax.value_and_grad(net.loss)(params, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)
    # per-example, unscaled errors: ∂C_n/∂z_{n,t} = (a_{n,t} − y_{n,t}) / T
    _, cache = net.forward(params, x)
    deltas = net.backward(params, cache, y).deltas
    np.testing.assert_allclose(deltas[-1], (out - one_hot) / 5, rtol=1e-12, atol=1e-15)


def test_outputs_with_positions_reject_mismatched_targets():
    net = bp.serial(Dense(3, "softmax"), loss="cross_entropy", input_shape=(5, 4))
    params = net.init(jax.random.key(0))
    x = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match=r"y: the network's output has shape \(2, 5, 3\)"):
        net.loss(params, x, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_L\)"):
        net.loss(params, x, jnp.full((2, 5), 3))


# -- loss/last-layer pairs: what every built-in layer's outputs can be --------------------------

_SOFTMAX = Dense(3, "softmax")
_L = bp.layers


@pytest.mark.parametrize(
    "layers, input_shape, culprit",
    [
        ((Dense(3), _L.LayerNorm()), (4,), "the last layer LayerNorm gives real"),
        ((Dense(3, "tanh"),), (4,), "the output activation 'tanh' gives real"),
        ((_SOFTMAX, _L.Dropout(0.5)), (4,), "the last layer Dropout gives real"),
        ((_SOFTMAX, _L.Residual(Dense(3))), (4,), "the last layer Residual gives real"),
        ((_L.Embedding(5, 3),), (2,), "the last layer Embedding gives real"),
        ((_L.Conv2D(2, 1),), (2, 2, 1), "the output activation 'identity' gives real"),
        (
            (_L.Conv2D(2, 1, activation="softmax"), _L.MaxPool2D(2)),
            (2, 2, 1),
            "MaxPool2D gives unit",
        ),
        ((_L.Conv2D(2, 1), _L.AvgPool2D(2)), (2, 2, 1), "the last layer AvgPool2D gives real"),
        ((_L.Elman(3), _L.LastStep()), (3, 2), "the last layer LastStep gives real"),
        ((_L.LSTM(3),), (3, 2), "the last layer LSTM gives real"),
        ((_L.Conv2D(2, 1, activation="softmax"), _L.Flatten()), (1, 2, 1), "Flatten gives unit"),
        ((bp.serial(Dense(3, "tanh")),), (4,), "the output activation 'tanh' gives real"),
    ],
    ids=[
        "LayerNorm",
        "Dense-tanh",
        "Dropout",
        "Residual",
        "Embedding",
        "Conv2D",
        "MaxPool2D",
        "AvgPool2D",
        "LastStep",
        "LSTM",
        "Flatten",
        "Sequential",
    ],
)
def test_cross_entropy_refuses_every_last_layer_without_probabilities(layers, input_shape, culprit):
    with pytest.raises(ValueError) as info:
        bp.serial(*layers, loss="cross_entropy", input_shape=input_shape)
    message = str(info.value)
    assert message.startswith(
        "layers[-1]: the loss 'cross_entropy' is defined on outputs that are simplex"
    )
    assert culprit in message and "softmax" in message


@pytest.mark.parametrize(
    "layers, input_shape, loss",
    [
        ((_L.Conv2D(2, 1, activation="softmax"), _L.AvgPool2D(2)), (2, 2, 1), "cross_entropy"),
        (
            (_L.Conv2D(2, 1, activation="softmax"), _L.MaxPool2D(2)),
            (2, 2, 1),
            "binary_cross_entropy",
        ),
        ((_L.Elman(3, "softmax"), _L.LastStep()), (3, 2), "cross_entropy"),
        ((Dense(3, "sigmoid"), _L.Dropout(0.0)), (4,), "binary_cross_entropy"),
        ((bp.serial(Dense(3, "softmax")),), (4,), "cross_entropy"),
        ((Dense(3), _L.LayerNorm()), (4,), "squared_error"),
    ],
)
def test_outputs_that_keep_their_range_are_accepted(layers, input_shape, loss):
    bp.serial(*layers, loss=loss, input_shape=input_shape)


def test_a_users_layer_is_not_judged():
    identity = _L.Layer(
        init=lambda key, shape, dtype: ({}, shape),
        forward=lambda params, x: (x, None),
        backward=lambda params, cache, dy: ({}, dy),
    )
    bp.serial(Dense(3), identity, loss="cross_entropy", input_shape=(4,))


# -- NumPy sizes, keys, dtypes, caches -------------------------------------------------------


def test_numpy_integers_are_sizes():
    n = np.int64
    net = bp.serial(
        _L.Conv2D(n(2), np.array([1, 1]), strides=n(1)), _L.Flatten(), Dense(n(3), "softmax"),
        loss="cross_entropy", input_shape=np.array([2, 2, 1]),
    )  # fmt: skip
    assert net.input_shape == (2, 2, 1) and type(net.layers[2].n_out) is int
    assert [type(v) for v in (_L.Embedding(n(5), n(3)).vocab_size, _L.LSTM(n(2)).hidden)] == [
        int,
        int,
    ]
    assert repr(net) == repr(
        bp.serial(
            _L.Conv2D(2, 1),
            _L.Flatten(),
            Dense(3, "softmax"),
            loss="cross_entropy",
            input_shape=(2, 2, 1),
        )
    )


@pytest.mark.parametrize(
    "make_key, match",
    [
        (lambda: None, r"key: expected a PRNG key from jax\.random\.key\(seed\).*got None\."),
        (lambda: 0, r"key: expected a PRNG key .*got int: 0\."),
        (lambda: jnp.ones(2), r"key: .*got an array of shape \(2,\) and dtype float32\."),
        (
            lambda: jax.random.split(jax.random.key(0)),
            r"key: .*shape \(2,\) and dtype key<fry> .*pass one",
        ),
    ],
    ids=["None", "int", "float-array", "batch-of-keys"],
)
def test_init_and_forward_name_a_bad_key(make_key, match, maybe_jit):
    key = make_key()  # built in the test: collection reads parameters as dtypes
    net = bp.serial(Dense(3), _L.Dropout(0.5), Dense(2), loss="squared_error", input_shape=(4,))
    with pytest.raises(TypeError, match=match):
        net.init(key)
    if key is None:
        return  # None is the forward's evaluation mode
    params = net.init(jax.random.key(0))
    with pytest.raises(TypeError, match="key: expected a PRNG key"):
        maybe_jit(lambda p, x: net.loss(p, x, jnp.ones((2, 2)), key=key))(params, jnp.ones((2, 4)))


@pytest.mark.parametrize("dtype", ["bogus", None, jnp.int32, jnp.complex64, bool])
def test_init_names_a_bad_dtype(dtype):
    net = bp.serial(Dense(2), loss="squared_error", input_shape=(3,))
    with pytest.raises(TypeError, match=r"dtype: expected a floating dtype \(float16, bfloat16"):
        net.init(jax.random.key(0), dtype)


@pytest.mark.parametrize("cache", [None, (1, 2), "forward"])
def test_backward_names_a_bad_cache(cache, maybe_jit):
    net = bp.serial(Dense(3, "tanh"), Dense(2), loss="squared_error", input_shape=(4,))
    params = net.init(jax.random.key(0))
    y = jnp.ones((2, 2))
    if cache == "forward":  # another network's cache: one layer too few
        other = bp.serial(Dense(2), loss="squared_error", input_shape=(4,))
        cache = other.forward(other.init(jax.random.key(0)), jnp.ones((2, 4)))[1]
        error, match = ValueError, r"cache.layers: expected 2 layer caches \(one per layer\), got 1"
    else:
        error, match = TypeError, r"cache: expected the Cache from net.forward\(params, x\)"
    with pytest.raises(error, match=match):
        maybe_jit(net.backward)(params, cache, y)


_NETS = {
    "Dense": (lambda: (Dense(2, "softmax"),), (3,), jnp.float32),
    "Conv2D": (lambda: (_L.Conv2D(2, 1), _L.Flatten(), _SOFTMAX), (2, 2, 1), jnp.float32),
    "MaxPool2D": (lambda: (_L.MaxPool2D(2), _L.Flatten(), _SOFTMAX), (2, 2, 1), jnp.float32),
    "AvgPool2D": (lambda: (_L.AvgPool2D(2), _L.Flatten(), _SOFTMAX), (2, 2, 1), jnp.float32),
    "LayerNorm": (lambda: (_L.LayerNorm(), _SOFTMAX), (3,), jnp.float32),
    "Residual": (lambda: (_L.Residual(Dense(3)), _SOFTMAX), (3,), jnp.float32),
    "Embedding": (lambda: (_L.Embedding(4, 2), _L.Flatten(), _SOFTMAX), (2,), jnp.int32),
    "Dropout": (lambda: (_L.Dropout(0.5), _SOFTMAX), (3,), jnp.float32),
    "Elman": (lambda: (_L.Elman(2), _L.LastStep(), _SOFTMAX), (2, 2), jnp.float32),
    "LSTM": (lambda: (_L.LSTM(2), _L.LastStep(), _SOFTMAX), (2, 2), jnp.float32),
}


@pytest.mark.parametrize("kind", sorted(_NETS))
def test_every_layer_type_names_an_empty_batch_and_integer_params(kind, maybe_jit):
    layers, shape, x_dtype = _NETS[kind]
    net = bp.serial(*layers(), loss="cross_entropy", input_shape=shape)
    params = net.init(jax.random.key(0))
    y = jnp.zeros((0,), jnp.int32)
    with pytest.raises(ValueError, match=r"x: the batch is empty \(shape \(0,"):
        maybe_jit(net.value_and_grad)(params, jnp.zeros((0, *shape), x_dtype), y)
    ints = jax.tree.map(lambda leaf: leaf.astype(jnp.int32), params)
    with pytest.raises(ValueError, match=r"params\[\d+\]\S*: expected a floating dtype, got int32"):
        maybe_jit(net.loss)(ints, jnp.ones((2, *shape), x_dtype), jnp.zeros(2, jnp.int32))
