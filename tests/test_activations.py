"""Each activation's hand-written backward against ``jax.vjp`` of its forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from tests.reference import JAX_NN_FORWARD

NAMES = (
    "identity",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "softplus",
    "gelu",
    "silu",
    "mish",
    "softmax",
)
# The forwards are jax.nn's own functions (the same ops, so equal in fact). A backward element is
# f'(z) g by at most ~8 roundings or few-ulp library calls, and so is autodiff's pullback: away
# from cancellation the two differ by ≲ 16 u relative per element, hence norm-relative too:
# 9.5e-7 in float32 (u = 6e-8), 1.8e-15 in float64. Where f'(z) g is a difference that cancels
# (mish's zero, softmax's g − ⟨g, a⟩), the elementwise check below falls back to atol.
RTOL = {"float64": 1e-13, "float32": 1e-6}


def _inputs(dtype, scale=3.0):
    """z of shape (7, 9) with the kink 0 and both signs in it, and a cotangent g."""
    rng = np.random.default_rng(0)
    z = scale * rng.normal(size=(7, 9))
    z[0, :5] = [0.0, -0.0, 1e-3, -1e-3, 0.5]
    g = rng.normal(size=(7, 9))
    return jnp.asarray(z, dtype), jnp.asarray(g, dtype)


def _norm_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_registry_has_every_activation():
    assert tuple(bp.ACTIVATIONS) == NAMES
    for name, act in bp.ACTIVATIONS.items():
        assert isinstance(act, bp.Activation) and act.name == name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_is_jax_nn(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        z, _ = _inputs(jnp.dtype(dtype))
        a = bp.ACTIVATIONS[name].forward(z)
        assert a.dtype == z.dtype and a.shape == z.shape
        np.testing.assert_allclose(a, JAX_NN_FORWARD[name](z), rtol=RTOL[dtype], atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_backward_is_vjp_of_forward(name, dtype):
    """δ = J_f(z)ᵀ g, against jax.vjp of the jax.nn forward, norm-relative."""
    with jax.enable_x64(dtype == "float64"):
        z, g = _inputs(jnp.dtype(dtype))
        act = bp.ACTIVATIONS[name]
        got = act.backward(z, act.forward(z), g)
        _, pullback = jax.vjp(JAX_NN_FORWARD[name], z)
        (want,) = pullback(g)
        assert got.dtype == z.dtype and got.shape == z.shape
        assert _norm_rel(got, want) <= RTOL[dtype]
        # elementwise too, where the derivative is not tiny
        np.testing.assert_allclose(got, want, rtol=100 * RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("name", NAMES)
def test_backward_finite_for_large_inputs_in_float32(name):
    """|z| up to 1e4: no NaN or Inf where autodiff of the forward is finite."""
    z = jnp.asarray([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]], jnp.float32)
    g = jnp.ones_like(z)
    act = bp.ACTIVATIONS[name]
    a = act.forward(z)
    got = act.backward(z, a, g)
    (want,) = jax.vjp(JAX_NN_FORWARD[name], z)[1](g)
    assert np.all(np.isfinite(a))
    finite = np.isfinite(np.asarray(want))
    assert np.all(np.isfinite(np.asarray(got))[finite])
    np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], atol=1e-6)


def test_softmax_backward_is_jacobian_transpose_product(x64):
    z, g = _inputs(jnp.float64)
    act = bp.ACTIVATIONS["softmax"]
    a = act.forward(z)
    got = act.backward(z, a, g)
    # the explicit Jacobian per row, J = diag(a) − a aᵀ, only in the test
    jac = jax.vmap(jax.jacobian(JAX_NN_FORWARD["softmax"]))(z)  # (batch, n, n)
    want = jnp.einsum("bij,bi->bj", jac, g)
    assert _norm_rel(got, want) <= 1e-13
    explicit = jax.vmap(lambda a: jnp.diag(a) - jnp.outer(a, a))(a)
    np.testing.assert_allclose(jac, explicit, atol=1e-15)
    # Jᵀ 1 = 0: softmax outputs sum to one whatever z is
    np.testing.assert_allclose(act.backward(z, a, jnp.ones_like(g)), 0.0, atol=1e-15)


def test_softmax_backward_never_forms_the_jacobian():
    """No intermediate of the backward has n² elements per example."""
    batch, n = 4, 64
    z = jnp.zeros((batch, n))
    act = bp.ACTIVATIONS["softmax"]
    jaxpr = jax.make_jaxpr(act.backward)(z, act.forward(z), z)
    sizes = [
        int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars if var.aval.shape
    ]
    assert sizes and max(sizes) <= batch * n


def test_leaky_relu_slope_is_0_01_as_jax_nn(x64):
    act = bp.ACTIVATIONS["leaky_relu"]
    z = jnp.asarray([[-3.0, -1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(act.forward(z), jax.nn.leaky_relu(z))  # jax's default slope
    np.testing.assert_allclose(act.forward(z), [[-0.03, -0.01, 0.0, 2.0]], rtol=1e-15)
    g = jnp.ones_like(z)
    np.testing.assert_allclose(act.backward(z, act.forward(z), g), [[0.01, 0.01, 1.0, 1.0]])


def test_elu_alpha_is_1_as_jax_nn(x64):
    act = bp.ACTIVATIONS["elu"]
    z = jnp.asarray([[-3.0, -1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(act.forward(z), jax.nn.elu(z))  # jax's default α = 1
    np.testing.assert_allclose(act.forward(z), np.expm1(np.minimum(z, 0)) + np.maximum(z, 0))
    g = jnp.ones_like(z)
    np.testing.assert_allclose(
        act.backward(z, act.forward(z), g), [[np.exp(-3.0), np.exp(-1.0), 1.0, 1.0]], rtol=1e-15
    )


def test_gelu_is_exact_not_tanh_approximation(x64):
    z = jnp.asarray([[-2.0, -0.5, 0.7, 3.0]])
    exact = jax.nn.gelu(z, approximate=False)
    np.testing.assert_allclose(bp.ACTIVATIONS["gelu"].forward(z), exact, rtol=1e-15)
    assert not np.allclose(exact, jax.nn.gelu(z, approximate=True), rtol=1e-6)


def test_init_and_output_kinds():
    he = {"relu", "leaky_relu", "elu", "gelu", "silu", "mish"}
    for name, act in bp.ACTIVATIONS.items():
        assert act.init == ("he" if name in he else "glorot"), name
    assert bp.ACTIVATIONS["softmax"].output == "simplex"
    assert bp.ACTIVATIONS["sigmoid"].output == "unit_interval"


# -- a user's own activation ----------------------------------------------------------------------

SIN = bp.Activation(
    "sin",
    lambda z: jnp.sin(z),
    lambda z, a, g: g * jnp.cos(z),
)


@pytest.mark.slow
def test_user_activation_in_an_mlp(x64, maybe_jit):
    net = bp.MLP((3, 4, 4, 2), (SIN, "tanh", "identity"), "squared_error")
    assert net.activations[0] is SIN
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    loss, grads = maybe_jit(net.value_and_grad)(params, x, y)

    def ref(p):
        a = jnp.sin(x @ p[0]["W"].T + p[0]["b"])
        a = jnp.tanh(a @ p[1]["W"].T + p[1]["b"])
        z = a @ p[2]["W"].T + p[2]["b"]
        return jnp.mean(0.5 * jnp.sum((y - z) ** 2, axis=-1))

    want_loss, want = jax.value_and_grad(ref)(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-13)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert _norm_rel(g, w) <= 1e-10


def test_user_softmax_lookalike_takes_the_generic_path(x64):
    """A user's own probability output pairs with cross_entropy but is never fused."""
    mine = bp.Activation(
        "softmax",
        lambda z: jax.nn.softmax(z, axis=-1),
        lambda z, a, g: a * (g - jnp.sum(g * a, axis=-1, keepdims=True)),
        output="simplex",
    )
    net = bp.MLP((3, 4), (mine,), "cross_entropy")
    assert net.fused is None
    assert bp.MLP((3, 4), ("softmax",), "cross_entropy").fused is not None
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    y = jnp.asarray([0, 1, 2, 3, 0, 1])
    _, grads = net.value_and_grad(params, x, y)
    want = jax.grad(
        lambda p: jnp.mean(
            -jnp.take_along_axis(
                jax.nn.log_softmax(x @ p[0]["W"].T + p[0]["b"]), y[:, None], axis=-1
            )
        )
    )(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert _norm_rel(g, w) <= 1e-10


def test_user_activation_needs_a_known_init():
    odd = bp.Activation("odd", jnp.sin, lambda z, a, g: g * jnp.cos(z), init="lecun")
    with pytest.raises(ValueError, match=r"activations\[0\].*'lecun'.*glorot, he"):
        bp.MLP((2, 2), (odd,), "squared_error")


# -- the registry -----------------------------------------------------------------------------


def test_get_activation_by_name_and_object():
    assert bp.get_activation("tanh") is bp.ACTIVATIONS["tanh"]
    assert bp.get_activation(SIN) is SIN


def test_get_activation_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"activation: unknown activation 'swish'") as info:
        bp.get_activation("swish")
    for name in NAMES:
        assert name in str(info.value)


def test_get_activation_argname_in_message():
    with pytest.raises(ValueError, match=r"^activations\[2\]: unknown activation 'Tanh'"):
        bp.get_activation("Tanh", argname="activations[2]")


@pytest.mark.parametrize("bad", [None, 3, jnp.tanh])
def test_get_activation_wrong_type(bad):
    with pytest.raises(TypeError, match=r"activation: expected an activation name \(str\) or"):
        bp.get_activation(bad)
