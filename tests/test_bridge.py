"""bpjax.custom_vjp: JAX autodiff through a network runs its hand-written backward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax.layers import Dense, Layer

# The bridge runs the network's own forward and backward code, so next to `net` or
# `net.value_and_grad` it differs only where one side is jitted and the other is not (eagerly they
# are the same ops): XLA may fuse, reassociate a reduction or contract a multiply-add, and a sum of
# K terms then rounds differently by ≤ 2γ_K Σ|terms|, γ_K = K·1.1e-16 in float64 (K ≤ 30 here:
# widths ≤ 7, batches ≤ 6, 30 token positions): ≤ 6.6e-15, and through three layers a few
# 1e-14 of the terms' magnitudes; 1e-12 leaves a factor of 30 for cancellation, and a wrong
# backward is off by O(1).
SAME_CODE_RTOL = 1e-12


def _assert_trees_close(actual, expected, rtol=1e-10):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e, strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(e))))


def _tree_norm(tree):
    return float(
        np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(tree)))
    )


def _mlp_case(dtype=jnp.float64):
    net = bp.MLP((4, 7, 5, 3), ("tanh", "relu", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0), dtype)
    x = jax.random.normal(jax.random.key(1), (6, 4), dtype)
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)
    return net, params, x, y


def _serial_net():
    return bp.serial(
        Dense(6, "gelu"), Dense(5, "sigmoid"), Dense(2, "identity"), loss="squared_error",
        input_shape=(4,),
    )  # fmt: skip


@pytest.mark.slow
def test_output_vjp_equals_autodiff_of_the_forward(x64, maybe_jit):
    net, params, x, _ = _mlp_case()
    apply = bp.custom_vjp(net)
    out, pullback = jax.vjp(maybe_jit(apply), params, x)
    ref_out, ref_pullback = jax.vjp(net, params, x)
    np.testing.assert_allclose(out, ref_out, rtol=SAME_CODE_RTOL)
    cotangent = jax.random.normal(jax.random.key(3), out.shape, out.dtype)
    _assert_trees_close(pullback(cotangent), ref_pullback(cotangent))


@pytest.mark.slow
@pytest.mark.parametrize("make", [_mlp_case, "serial"], ids=["mlp", "serial"])
def test_loss_grad_is_the_manual_gradient(x64, maybe_jit, make):
    if make == "serial":
        net = _serial_net()
        params = net.init(jax.random.key(0), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
        y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    else:
        net, params, x, y = make()
    loss_fn = bp.custom_vjp(net, loss=True)
    value, (grads, input_grad) = maybe_jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        params, x, y
    )
    ref_value, ref_grads = net.value_and_grad(params, x, y)
    np.testing.assert_allclose(value, ref_value, rtol=SAME_CODE_RTOL)
    _assert_trees_close(grads, ref_grads, rtol=SAME_CODE_RTOL)
    _assert_trees_close(input_grad, jax.grad(net.loss, argnums=1)(params, x, y))


def test_inside_the_gradient_of_a_larger_function(x64, maybe_jit):
    """The network as one block of a larger model: chain rule on both sides of the bridge."""
    net, params, x, y = _mlp_case()
    encoder = {"A": jax.random.normal(jax.random.key(4), (4, 4), jnp.float64)}
    apply, loss_fn = bp.custom_vjp(net), bp.custom_vjp(net, loss=True)

    def model(block, enc, ours):
        h = jnp.sin(x @ enc["A"])  # a plain-JAX block before the network
        if ours:
            out, c = apply(block, h), loss_fn(block, h, y)
        else:
            out, c = net(block, h), net.loss(block, h, y)
        decay = sum(jnp.sum(w**2) for w in jax.tree.leaves(block))
        return jnp.sum(jnp.cos(out)) + 3.0 * c + 1e-2 * decay  # and a plain-JAX head

    grads = maybe_jit(jax.grad(functools.partial(model, ours=True), argnums=(0, 1)))(
        params, encoder
    )
    expected = jax.grad(model, argnums=(0, 1))(params, encoder, False)
    _assert_trees_close(grads, expected)


def test_the_reverse_pass_is_the_hand_written_one(x64):
    """A planted bug in a layer's backward shows through the bridge: it is not autodiff."""

    def forward(params, x):
        return x * params["s"], x

    def wrong_backward(params, x, dy):
        return {"s": 2.0 * jnp.sum(dy * x, axis=0)}, dy * params["s"]  # ∇s doubled

    scale = Layer(lambda key, shape, dtype: ({"s": jnp.full(shape, 1.5, dtype)}, shape), forward,
                  wrong_backward)  # fmt: skip
    net = bp.serial(scale, Dense(2, "identity"), loss="squared_error", input_shape=(3,))
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    y = jnp.zeros((4, 2), jnp.float64)
    bridged = jax.grad(bp.custom_vjp(net, loss=True))(params, x, y)
    autodiff = jax.grad(net.loss)(params, x, y)
    np.testing.assert_allclose(bridged[0]["s"], 2.0 * autodiff[0]["s"], rtol=1e-12)
    np.testing.assert_allclose(bridged[1]["W"], autodiff[1]["W"], rtol=1e-12)


@pytest.mark.slow
def test_vmap_over_an_ensemble_and_over_examples(x64):
    net, _, x, y = _mlp_case()
    loss_fn = bp.custom_vjp(net, loss=True)
    ensemble = jax.vmap(lambda k: net.init(k, jnp.float64))(jax.random.split(jax.random.key(5), 3))
    grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(0, None, None)))(ensemble, x, y)
    _assert_trees_close(
        grads, jax.vmap(jax.grad(net.loss), in_axes=(0, None, None))(ensemble, x, y)
    )
    params = jax.tree.map(lambda p: p[0], ensemble)
    per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    expected = jax.vmap(jax.grad(net.loss), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    _assert_trees_close(per_example, expected)


@pytest.mark.slow
def test_an_optax_training_loop_matches_manual_training():
    """float32, 20 Adam steps: the bridge's loss under jax.grad trains as value_and_grad does.

    At every step of the run, at the same params, jax.value_and_grad of the bridge gives the loss
    and gradient of net.value_and_grad, so the optimiser takes the same step. The two runs are not
    compared as whole trajectories: in float32 they agree only as far as the CPU's rounding lets
    them (Adam's first update is ±lr whatever a gradient's size, so an element that rounds to the
    other sign moves by 2 lr), not by a margin any derivation gives.
    """
    net, params, x, y = _mlp_case(jnp.float32)
    loss_fn = bp.custom_vjp(net, loss=True)
    optimizer = optax.adam(1e-2)
    bridged = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def step(params, state):
        loss, grads = net.value_and_grad(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    # One float32 evaluation at the same params: the same code, a few roundings of ≤ 7-term sums
    # apart, held to the harness's float32 tolerance (1e-5 ≈ 170 u, derived in bpjax/check.py),
    # the gradient norm-relative over the whole tree as the harness's atol scales it.
    rtol = bp.DEFAULT_RTOL["float32"]
    state = optimizer.init(params)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        for _ in range(20):
            b_loss, b_grads = bridged(params, x, y)
            params, state, loss, grads = step(params, state)
            np.testing.assert_allclose(b_loss, loss, rtol=rtol)
            diff = jax.tree.map(lambda b, g: b - g, b_grads, grads)
            assert _tree_norm(diff) <= rtol * _tree_norm(grads)
            losses.append(float(loss))
    assert losses[-1] < losses[0]  # and it trains (1.28 to 0.57: no rounding closes that gap)


@pytest.mark.slow
def test_a_key_reaches_stochastic_layers(x64):
    def noisy(params, x, *, key=None):
        del params
        scale = jnp.ones_like(x) if key is None else 1 + jax.random.normal(key, x.shape, x.dtype)
        return x * scale, scale

    noise = Layer(lambda key, shape, dtype: ({}, shape), noisy,
                  lambda params, scale, dy: ({}, dy * scale), needs_key=True)  # fmt: skip
    net = bp.serial(Dense(5, "tanh"), noise, Dense(2, "softmax"), loss="cross_entropy",
                    input_shape=(3,))  # fmt: skip
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    y = jnp.array([0, 1, 1, 0])
    k = jax.random.key(9)
    grads = jax.grad(bp.custom_vjp(net, loss=True))(params, x, y, k)
    _assert_trees_close(grads, jax.grad(net.loss)(params, x, y, key=k))
    out_grads = jax.grad(lambda p: jnp.sum(bp.custom_vjp(net)(p, x, key=k) ** 2))(params)
    _assert_trees_close(out_grads, jax.grad(lambda p: jnp.sum(net(p, x, key=k) ** 2))(params))


def test_mixed_dtypes_give_cotangents_in_the_inputs_dtype(x64):
    net, params, x, y = _mlp_case()  # float64 params
    x32 = x.astype(jnp.float32)
    input_grad = jax.grad(bp.custom_vjp(net, loss=True), argnums=1)(params, x32, y)
    assert input_grad.dtype == jnp.float32
    np.testing.assert_allclose(
        input_grad, jax.grad(net.loss, argnums=1)(params, x32, y), rtol=1e-6, atol=1e-9
    )


def test_same_network_same_function():
    net = _serial_net()
    assert bp.custom_vjp(net) is bp.custom_vjp(net)
    assert bp.custom_vjp(net, loss=True) is not bp.custom_vjp(net)


def test_bad_input():
    with pytest.raises(TypeError, match="net: expected a bpjax network"):
        bp.custom_vjp(lambda params, x: x)
    net, params, x, _ = _mlp_case(jnp.float32)
    probabilities = jax.nn.softmax(jnp.ones((6, 3)))
    with pytest.raises(ValueError, match=r"y: bpjax\.custom_vjp.*does not differentiate"):
        jax.grad(bp.custom_vjp(net, loss=True), argnums=2)(params, x, probabilities)
    # the MLP's own message: an MLP is checked by the network's one input check
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, n_0\) = \(batch, 4\)"):
        jax.grad(lambda p: jnp.sum(bp.custom_vjp(net)(p, x[:, :3])))(params)


@pytest.mark.slow
def test_integer_inputs_get_no_cotangent(x64):
    """An Embedding network: the bridge differentiates the params only."""
    net = bp.serial(
        bp.layers.Embedding(11, 4), Dense(3, "softmax"), loss="cross_entropy", input_shape=(5,)
    )
    params = net.init(jax.random.key(0), jnp.float64)
    tokens = jax.random.randint(jax.random.key(1), (6, 5), 0, 11)
    labels = jax.random.randint(jax.random.key(2), (6, 5), 0, 3)
    grads = jax.jit(jax.grad(bp.custom_vjp(net, loss=True)))(params, tokens, labels)
    _assert_trees_close(grads, net.value_and_grad(params, tokens, labels)[1], rtol=SAME_CODE_RTOL)
    out_grads = jax.grad(lambda p: jnp.sum(bp.custom_vjp(net)(p, tokens) ** 2))(params)
    _assert_trees_close(out_grads, jax.grad(lambda p: jnp.sum(net(p, tokens) ** 2))(params))
