"""bpjax.extend.diag_hessian against the diagonal of jax.hessian of the loss, in float64.

The reference is ``diag(jax.hessian(net.loss))`` over the raveled params: it never touches the
hand-written backward or the second-derivative recursion. Float64 on well-scaled data: a relative
``1e-10`` (each entry is a sum of at most a few thousand products of rounded factors, each rounded
at 2⁻⁵³ ≈ 1.1e-16, so roundoff stays below ~1e-12 of the largest entry; a wrong or missing term is
of the order of the entries themselves). The networks cover every layer the recursion takes, the
activations by both routes (forward mode for the built-in elementwise ones, ``jax.hessian`` per row
for softmax and a user's), canonical and non-canonical output pairs, fused and unfused outputs,
outputs with positions, and a network whose curvature is taken after its last layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import bpjax as bp
from bpjax import extend as bx
from bpjax.layers import Layer

L = bp.layers
RTOL = 1e-10

_softsign = bp.Activation(
    "softsign", lambda z: z / (1 + jnp.abs(z)), lambda z, a, g: g / (1 + jnp.abs(z)) ** 2
)

NETS = {
    "mlp": lambda: bp.MLP((3, 5, 4, 3), ("tanh", "softplus", "softmax"), "cross_entropy"),
    "mlp_unfused": lambda: bp.MLP(
        (3, 4, 2), ("sigmoid", "softmax"), "cross_entropy", fuse_output=False
    ),
    "mlp_tanh_out": lambda: bp.MLP((2, 4, 2), ("elu", "tanh"), "squared_error"),
    "softmax_hidden": lambda: bp.MLP(
        (3, 4, 3, 2), ("softmax", _softsign, "sigmoid"), "binary_cross_entropy"
    ),
    "cnn": lambda: bp.serial(
        L.Conv2D(3, 3, padding="SAME", activation="tanh"),
        L.MaxPool2D(2),
        L.Conv2D(2, 2, strides=2, padding="VALID", activation="gelu"),
        L.AvgPool2D(1),
        L.Dropout(0.5),
        L.Flatten(),
        L.Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(6, 6, 2),
    ),
    "conv_output": lambda: bp.serial(
        L.Conv2D(2, 3, activation="silu"),
        L.Conv2D(2, 2, activation="tanh"),
        L.Flatten(),
        loss="squared_error",
        input_shape=(4, 4, 1),
    ),  # the curvature is taken after Flatten, at the output: the last conv's f'' is a residual
    "embedding_seq": lambda: bp.serial(
        L.Embedding(6, 3),
        L.Dense(4, "mish"),
        L.Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(3,),
    ),
}


def _data(net, name: str, batch: int = 4):
    params = net.init(jax.random.key(1), dtype=jnp.float64)
    kx, ky = jax.random.split(jax.random.key(2))
    if name == "embedding_seq":
        x = jax.random.randint(kx, (batch, 3), 0, 6)
    else:
        x = jax.random.normal(kx, (batch, *net.input_shape), jnp.float64)
    out = jax.eval_shape(lambda p, xs: net.forward(p, xs)[0], params, x)
    if net.objective.name == "cross_entropy":
        y = jax.random.randint(ky, out.shape[:-1], 0, out.shape[-1])
    elif net.objective.name == "binary_cross_entropy":
        y = jax.random.bernoulli(ky, 0.5, out.shape).astype(jnp.float64)
    else:
        y = jax.random.normal(ky, out.shape, jnp.float64)
    return params, x, y


@functools.partial(jax.jit, static_argnums=0)
def _reference(net, params, x, y):
    flat, unravel = ravel_pytree(params)
    return unravel(jnp.diag(jax.hessian(lambda f: net.loss(unravel(f), x, y))(flat)))


def _assert_close(got, want, rtol=RTOL):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * max(scale, 1e-300))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", sorted(NETS))
def test_diag_hessian_equals_the_diagonal_of_jax_hessian(x64, name, jit):
    net = NETS[name]()
    params, x, y = _data(net, name)
    f = jax.jit(bx.diag_hessian, static_argnums=0) if jit else bx.diag_hessian
    _assert_close(f(net, params, x, y), _reference(net, params, x, y))


@pytest.mark.parametrize("name", ["cnn", "softmax_hidden"])
def test_batch_diag_hessian_is_each_examples_hessian_over_b(x64, name):
    net = NETS[name]()
    params, x, y = _data(net, name, batch=3)
    per_example = bx.batch_diag_hessian(net, params, x, y)
    for n in range(3):  # C = (1/B) Σ_n C_n: example n's share is diag ∇²C_n / B
        want = jax.tree.map(lambda d: d / 3, _reference(net, params, x[n : n + 1], y[n : n + 1]))
        _assert_close(jax.tree.map(lambda d, n=n: d[n], per_example), want)


def test_piecewise_linear_hidden_activations_give_the_ggn(x64):
    # relu'' = 0 away from the kinks (a.s. for Gaussian data), so no residual term: H = GGN.
    net = bp.MLP((3, 6, 5, 2), ("relu", "leaky_relu", "identity"), "squared_error")
    params, x, y = _data(net, "relu")
    _assert_close(bx.diag_hessian(net, params, x, y), bx.diag_ggn(net, params, x, y))


@settings(max_examples=6, deadline=None)
@given(
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    hidden=st.lists(st.sampled_from(["tanh", "sigmoid", "softplus", "gelu", "elu"]), min_size=3),
    batch=st.integers(1, 3),
)
def test_random_mlps(widths, hidden, batch):
    sizes = (2, *widths, 3)
    net = bp.MLP(sizes, (*hidden[: len(widths)], "softmax"), "cross_entropy")
    with jax.enable_x64(True):  # not the x64 fixture: hypothesis reruns the body, not fixtures
        params, x, y = _data(net, "mlp", batch=batch)
        _assert_close(bx.diag_hessian(net, params, x, y), _reference(net, params, x, y))


def test_vmap_over_batches_matches_one_call_each(x64):
    net = NETS["mlp"]()
    params, x, y = _data(net, "mlp", batch=4)
    xs, ys = x.reshape(2, 2, 3), y.reshape(2, 2)
    got = jax.vmap(bx.diag_hessian, in_axes=(None, None, 0, 0))(net, params, xs, ys)
    for i in range(2):
        _assert_close(jax.tree.map(lambda d, i=i: d[i], got), _reference(net, params, xs[i], ys[i]))


_user = Layer(
    init=lambda key, shape, dtype: ({"s": jnp.ones(shape, dtype)}, shape),
    forward=lambda params, x: (x * params["s"], x),
    backward=lambda params, x, dy: ({"s": jnp.sum(dy * x, axis=0)}, dy * params["s"]),
)


@pytest.mark.parametrize(
    ("layers", "named"),
    [
        ((L.Dense(4, "tanh"), L.LayerNorm(), L.Dense(2)), "layer 1 is LayerNorm"),
        ((L.Dense(4, "tanh"), _user, L.Dense(2)), "layer 1 is Layer"),
        ((L.Dense(4, "tanh"), L.Residual(L.Dense(4, "tanh")), L.Dense(2)), "layer 1 is Residual"),
    ],
)
def test_a_layer_without_second_derivative_rules_is_named(layers, named):
    net = bp.serial(*layers, loss="squared_error", input_shape=(3,))
    params = net.init(jax.random.key(0))
    with pytest.raises(TypeError, match=named):
        bx.diag_hessian(net, params, jnp.ones((2, 3)), jnp.zeros((2, 2)))
    rnn = bp.serial(
        L.Embedding(5, 3), L.LSTM(4), L.Dense(5, "softmax"), loss="cross_entropy", input_shape=(4,)
    )
    with pytest.raises(TypeError, match="layer 1 is LSTM"):
        bx.batch_diag_hessian(
            rnn, rnn.init(jax.random.key(0)), jnp.zeros((2, 4), int), jnp.zeros((2, 4), int)
        )


@pytest.mark.parametrize("jit", [False, True])
def test_bad_values_poison_instead_of_a_finite_hessian(x64, jit):
    net = NETS["mlp"]()
    params, x, y = _data(net, "mlp")
    f = jax.jit(bx.diag_hessian, static_argnums=0) if jit else bx.diag_hessian
    nan_x = f(net, params, x.at[0, 0].set(jnp.nan), y)
    assert all(bool(jnp.isnan(leaf).any()) for leaf in jax.tree.leaves(nan_x))
    if jit:  # a traced label out of range cannot be checked: every entry is NaN
        bad = jax.jit(bx.diag_hessian, static_argnums=0)(net, params, x, y.at[1].set(7))
        assert all(bool(jnp.isnan(leaf).all()) for leaf in jax.tree.leaves(bad))
    else:
        with pytest.raises(ValueError, match="y: cross_entropy labels must lie in"):
            f(net, params, x, y.at[1].set(7))
