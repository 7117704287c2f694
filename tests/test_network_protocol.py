"""One network type and its public protocol: MLP is the serial network of Dense layers, blocks
nest, weighted output errors, and the tools (fit, make_train_step) on any network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax.datasets import Dataset
from bpjax.layers import (
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    LayerNorm,
    MaxPool2D,
    Residual,
    Sequential,
)

# float64 comparisons of two exact formulas for the same gradient: each is a sum of O(10²)
# products of O(1) values, so each carries roundoff of a few hundred ulps of its largest term at
# worst, ~1e-13 relative; 1e-10 leaves three orders of margin and is still 10⁶ below any bug.
RTOL64 = 1e-10


def _nested_net():
    block = bp.serial(Dense(6, "tanh"), Dense(4))  # no loss: a layer
    return bp.serial(
        Dense(4, "tanh"),
        Residual(block),
        bp.serial(Dense(5, "relu"), LayerNorm()),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(3,),
    )


def _close(got, want, rtol=RTOL64):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale)


def test_an_mlp_is_the_serial_network_of_its_dense_layers():
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    assert isinstance(net, bp.Serial)
    assert net.layers == (Dense(4, "tanh"), Dense(2, "softmax"))
    assert net.input_shape == (3,) and net.output_shape == (2,) and net.sizes == (3, 4, 2)
    assert hash(net) == hash(bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy"))
    params = net.init(jax.random.key(0))
    x = jnp.ones((5, 3))
    out, cache = net.forward(params, x)
    assert isinstance(cache, bp.Cache) and bp.SerialCache is bp.Cache
    assert [type(c) for c in cache.layers] == [bp.DenseCache, bp.DenseCache]
    assert cache.z[1] is cache.layers[1].z and cache.a[-1] is out and cache.x.shape == (5, 3)


def test_cache_z_names_the_layer_without_one():
    net = bp.serial(
        Dense(4, "tanh"), LayerNorm(), Dense(2, "softmax"), loss="cross_entropy", input_shape=(3,)
    )
    _, cache = net.forward(net.init(jax.random.key(0)), jnp.ones((2, 3)))
    with pytest.raises(AttributeError, match=r"cache\.z: layer 2's cache \(LayerNormCache\)"):
        _ = cache.z


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_a_nested_serial_inside_a_residual_agrees_with_jax_grad(x64, jit):
    net = _nested_net()
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
    y = jnp.array([0, 1, 2, 1, 0, 2, 1])
    wrap = jax.jit if jit else (lambda f: f)
    loss, grads = wrap(net.value_and_grad)(params, x, y)
    want_loss, want_grads = wrap(jax.value_and_grad(net.loss))(params, x, y)
    _close(loss, want_loss)
    _close(grads, want_grads)
    _, cache = net.forward(params, x)
    input_grad = wrap(net.backward)(params, cache, y).input_grad
    _close(input_grad, jax.grad(net.loss, argnums=1)(params, x, y))
    report = bp.check_network(net, params, x, y, jit=jit)
    assert report.ok, report.summary()
    assert report.layer_names == ("Dense", "Residual", "Sequential", "Dense")


def test_serial_without_a_loss_is_a_layer():
    block = bp.serial(Dense(4, "tanh"), Dense(2))
    assert isinstance(block, Sequential) and not block.needs_key
    params, out_shape = block.init(jax.random.key(0), (3,))
    assert out_shape == (2,)
    y, cache = block.forward(params, jnp.ones((5, 3)))
    grads, dx = block.backward(params, cache, jnp.ones((5, 2)))
    assert y.shape == (5, 2) and dx.shape == (5, 3) and len(grads) == 2
    assert bp.serial(Dropout(0.5), Dense(2)).needs_key
    with pytest.raises(ValueError, match="loss: a network needs a loss"):
        bp.serial(Dense(2), input_shape=(3,))
    with pytest.raises(ValueError, match="input_shape: a network needs"):
        bp.serial(Dense(2), loss="squared_error")
    with pytest.raises(
        ValueError, match=r"params: expected one pytree per layer of the Sequential"
    ):
        block.forward(params[:1], jnp.ones((5, 3)))


def _weighted_case(kind):
    if kind == "sequence":  # outputs (batch, positions, n): C_n is the mean over positions
        net = bp.serial(
            Dense(4, "tanh"), Dense(3, "softmax"), loss="cross_entropy", input_shape=(5, 2)
        )
        x = jax.random.normal(jax.random.key(1), (6, 5, 2), jnp.float64)
        return net, x, jax.random.randint(jax.random.key(2), (6, 5), 0, 3)
    fuse = kind == "fused"
    net = bp.MLP((2, 5, 3), ("tanh", "softmax"), "cross_entropy", fuse_output=fuse)
    x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    return net, x, jax.random.randint(jax.random.key(2), (6,), 0, 3)


@pytest.mark.parametrize("kind", ["fused", "generic", "sequence"])
def test_output_error_weights_give_the_weighted_gradient(x64, maybe_jit, kind):
    """``backprop`` from ``output_error(weights=w)`` is ``Σ_n w_n ∇_θ C_n``, any net and loss."""
    net, x, y = _weighted_case(kind)
    params = net.init(jax.random.key(0), jnp.float64)
    w = jnp.linspace(0.1, 2.0, x.shape[0], dtype=jnp.float64)

    def manual(p, x, y, w):
        out, cache = net.forward(p, x)
        targets = net.check_targets(y, out)
        grads, _, _ = net.backprop(p, cache, net.output_error(cache, targets, weights=w))
        return jnp.sum(w * net.example_losses(cache, targets)), grads

    def weighted(p):
        return jnp.sum(w * net.per_example_loss(p, x, y))

    value, grads = maybe_jit(manual)(params, x, y, w)
    _close(value, weighted(params))
    _close(grads, jax.grad(weighted)(params))
    # no weights: the batch mean, what value_and_grad returns
    out, cache = net.forward(params, x)
    start = net.output_error(cache, net.check_targets(y, out))
    _close(net.backprop(params, cache, start)[0], net.value_and_grad(params, x, y)[1])


def test_params_checks_speak_for_any_network():
    net = bp.serial(
        Dense(4, "tanh"), LayerNorm(), Dense(2, "softmax"), loss="cross_entropy", input_shape=(3,)
    )
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match=r"params: do not match serial\(Dense") as info:
        net.loss([{"W": params[0]["W"]}, params[1], params[2]], x, y)
    assert "params[0]: expected a dict with keys 'W' and 'b', got ['W']." in str(info.value)
    with pytest.raises(ValueError, match=r"expected 3 layers \(one per layer\), got 2\."):
        net.loss(params[:2], x, y)
    with pytest.raises(ValueError, match=r"params\[1\]\['scale'\]: expected shape \(4,\), got"):
        net.loss([params[0], {**params[1], "scale": jnp.ones(5)}, params[2]], x, y)
    with pytest.raises(ValueError, match=r"x: the batch is empty \(shape \(0, 3\)\)"):
        net.loss(params, jnp.ones((0, 3)), jnp.zeros((0,), int))


# -- training any network ------------------------------------------------------------------------


def _images(n, seed=0):
    """A separable toy image task: is the bright 2×2 blob in the left or the right half?"""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.2, (n, 6, 6, 1))
    for i, label in enumerate(labels):
        r, c = rng.integers(0, 5), rng.integers(0, 2) + 3 * label
        x[i, r : r + 2, c : c + 2, 0] += 1.0
    return Dataset(x.reshape(n, -1).astype(np.float32), labels.astype(np.int32), 2, "blobs")


CNN = bp.serial(
    Conv2D(4, 3, padding="SAME", activation="relu"),
    MaxPool2D(2),
    Flatten(),
    Dense(2, "softmax"),
    loss="cross_entropy",
    input_shape=(6, 6, 1),
)


def test_fit_trains_a_cnn_from_flat_rows(x64):
    """``fit`` reshapes a data set's flat rows to the CNN's input shape; the manual and the
    autodiff runs see the same batches, so in float64 their histories agree to roundoff."""
    data = _images(64)
    params = CNN.init(jax.random.key(0), jnp.float64)
    runs = {
        grad: bp.fit(
            CNN, params, data, optimizer=optax.sgd(0.5), epochs=4, batch_size=16, grad=grad
        )
        for grad in ("manual", "autodiff")
    }
    manual, autodiff = runs["manual"].history, runs["autodiff"].history
    # 16 steps of SGD from the same params: the loss is a smooth map of the params, and two
    # gradients equal to ~1e-15 relative give losses equal to well within RTOL64
    np.testing.assert_allclose(manual.step_loss, autodiff.step_loss, rtol=RTOL64)
    assert manual.evals[-1].train_loss < 0.5 * manual.step_loss[0]


def test_fit_hands_a_fresh_key_to_dropout_each_step(x64):
    net = bp.serial(
        Dense(8, "tanh"), Dropout(0.5), Dense(2, "softmax"), loss="cross_entropy", input_shape=(36,)
    )
    assert net.needs_key
    data = _images(32)
    params = net.init(jax.random.key(0), jnp.float64)
    runs = [
        bp.fit(
            net, params, data, optimizer=optax.sgd(0.1), epochs=2, batch_size=8, grad=grad, seed=3
        ).history.step_loss
        for grad in ("manual", "autodiff")
    ]
    # the same masks in both runs (fold_in(key(seed), step)), so the same losses
    np.testing.assert_allclose(runs[0], runs[1], rtol=RTOL64)
    # and the masks differ from step to step: a step on the same batch and params gives another
    # loss with another key
    step = jax.jit(bp.make_train_step(bp.gradient_fn(net), optax.sgd(0.0)))
    state = bp.TrainState.create(params, optax.sgd(0.0))
    x, y = jnp.asarray(data.x[:8], jnp.float64), jnp.asarray(data.y[:8])
    losses = {float(step(state, x, y, jax.random.key(k))[1]) for k in range(3)}
    assert len(losses) == 3


def test_fit_rejects_data_that_do_not_fit_the_network():
    data = _images(8)
    bad_cnn = bp.serial(
        Conv2D(2, 3), Flatten(), Dense(2, "softmax"), loss="cross_entropy", input_shape=(5, 5, 1)
    )
    with pytest.raises(ValueError, match=r"train: the network takes inputs of shape \(5, 5, 1\)"):
        bp.fit(
            bad_cnn,
            bad_cnn.init(jax.random.key(0)),
            data,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=4,
        )
    words = bp.serial(
        Embedding(10, 4), Flatten(), Dense(2, "softmax"), loss="cross_entropy", input_shape=(36,)
    )
    with pytest.raises(ValueError, match="takes integer indices"):
        bp.fit(
            words,
            words.init(jax.random.key(0)),
            data,
            optimizer=optax.sgd(0.1),
            epochs=1,
            batch_size=4,
        )
    with pytest.raises(ValueError, match=r"x: expected flat rows \(n, 36\)"):
        bp.train.network_inputs(CNN, np.ones((3, 35)))
