"""Losses: values against their formulas, hand-written gradients against autodiff, the fused pairs.

The stability tests drive the output logits to ±1e4 in float32 and compare with optax's losses,
which are computed from the logits and whose ``jax.grad`` is finite there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp

LOSS_NAMES = ("squared_error", "cross_entropy", "binary_cross_entropy")
CANONICAL = (
    ("softmax", "cross_entropy"),
    ("sigmoid", "binary_cross_entropy"),
    ("identity", "squared_error"),
)
B, N = 6, 4


def _norm_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _case(loss: str, target: str):
    """Logits z, the output a = f(z) the loss is defined on, and targets y, in float64."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(2 * rng.normal(size=(B, N)))
    if loss == "squared_error":
        return z, jnp.tanh(z), jnp.asarray(rng.normal(size=(B, N)))
    if loss == "cross_entropy":
        a = jax.nn.softmax(z)
        if target == "labels":
            return z, a, jnp.asarray(rng.integers(0, N, size=B), jnp.int32)
        y = rng.dirichlet(np.ones(N), size=B)
        y[0, 1:] = 0.0  # exact zeros: 0 log a = 0
        y[0, 0] = 1.0
        return z, a, jnp.asarray(y)
    y = rng.uniform(size=(B, N))
    y[0] = [0.0, 1.0, 0.0, 1.0]  # hard labels too
    return z, jax.nn.sigmoid(z), jnp.asarray(y)


def _formula(loss: str, a, y):
    """C_n written out in numpy."""
    a, y = np.asarray(a, np.float64), np.asarray(y)
    if loss == "squared_error":
        return 0.5 * np.sum((y - a) ** 2, axis=-1)
    if loss == "cross_entropy":
        if y.ndim == 1:
            return -np.log(a[np.arange(len(y)), y])
        return -np.sum(np.where(y > 0, y * np.log(a), 0.0), axis=-1)
    return -np.sum(y * np.log(a) + (1 - y) * np.log1p(-a), axis=-1)


CASES = [
    ("squared_error", "real"),
    ("cross_entropy", "labels"),
    ("cross_entropy", "probabilities"),
    ("binary_cross_entropy", "probabilities"),
]


def test_registry():
    assert tuple(bp.LOSSES) == LOSS_NAMES
    for name, loss in bp.LOSSES.items():
        assert isinstance(loss, bp.Loss) and loss.name == name
    assert bp.LOSSES["squared_error"].accepts is None
    assert bp.LOSSES["cross_entropy"].accepts == {"simplex"}
    assert bp.LOSSES["binary_cross_entropy"].accepts == {"unit_interval", "simplex"}


@pytest.mark.parametrize("loss,target", CASES)
def test_value_is_the_formula(loss, target, x64):
    z, a, y = _case(loss, target)
    got = bp.LOSSES[loss].value(z, a, y)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, _formula(loss, a, y), rtol=1e-13)


@pytest.mark.parametrize("loss,target", CASES)
def test_grad_is_autodiff_of_value(loss, target, x64):
    """∂C_n/∂a_n by hand against jax.grad of Σ_n C_n with respect to a (float64)."""
    z, a, y = _case(loss, target)
    obj = bp.LOSSES[loss]
    got = obj.grad(z, a, y)
    want = jax.grad(lambda a: jnp.sum(obj.value(z, a, y)))(a)
    assert got.shape == a.shape
    assert _norm_rel(got, want) <= 1e-13


def test_cross_entropy_labels_equal_one_hot_probabilities(x64):
    z, a, labels = _case("cross_entropy", "labels")
    one_hot = jax.nn.one_hot(labels, N, dtype=jnp.float64)
    ce = bp.LOSSES["cross_entropy"]
    np.testing.assert_allclose(ce.value(z, a, labels), ce.value(z, a, one_hot), rtol=1e-15)
    np.testing.assert_allclose(ce.grad(z, a, labels), ce.grad(z, a, one_hot), rtol=1e-15)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "generic"])
def test_cross_entropy_labels_equal_one_hot_in_an_mlp(fuse, x64):
    net = bp.MLP((3, 5, N), ("tanh", "softmax"), "cross_entropy", fuse_output=fuse)
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (B, 3), jnp.float64)
    labels = jnp.asarray([0, 3, 1, 2, 2, 0])
    loss_l, grads_l = net.value_and_grad(params, x, labels)
    loss_p, grads_p = net.value_and_grad(params, x, jax.nn.one_hot(labels, N, dtype=jnp.float64))
    np.testing.assert_allclose(loss_l, loss_p, rtol=1e-14)
    for g, h in zip(jax.tree.leaves(grads_l), jax.tree.leaves(grads_p), strict=True):
        assert _norm_rel(g, h) <= 1e-13


# -- the fused canonical pairs --------------------------------------------------------------------


def test_fused_output_finds_exactly_the_canonical_pairs():
    for act_name, act in bp.ACTIVATIONS.items():
        for loss_name, loss in bp.LOSSES.items():
            fused = bp.fused_output(act, loss)
            if (act_name, loss_name) in CANONICAL:
                assert isinstance(fused, bp.FusedOutput), (act_name, loss_name)
            else:
                assert fused is None, (act_name, loss_name)
    net = bp.MLP((2, 3), ("softmax",), "cross_entropy")
    assert net.fused is not None
    assert bp.MLP((2, 3), ("softmax",), "cross_entropy", fuse_output=False).fused is None
    assert bp.MLP((2, 3), ("softmax",), "binary_cross_entropy").fused is None


_TARGETS = {
    "cross_entropy": ["labels", "probabilities", "non-negative"],
    "binary_cross_entropy": ["probabilities"],
    "squared_error": ["real"],
}
FUSED_CASES = [(act, loss, t) for act, loss in CANONICAL for t in _TARGETS[loss]]


def _targets(loss: str, target: str, n_out: int, rng):
    if target == "labels":
        return jnp.asarray(rng.integers(0, n_out, size=B), jnp.int32)
    if target == "probabilities" and loss == "cross_entropy":
        return jnp.asarray(rng.dirichlet(np.ones(n_out), size=B))
    if target in ("probabilities", "non-negative"):
        return jnp.asarray(rng.uniform(0, 1 if target == "probabilities" else 3, (B, n_out)))
    return jnp.asarray(rng.normal(size=(B, n_out)))


@pytest.mark.parametrize("act,loss,target", FUSED_CASES)
def test_fused_value_and_delta_equal_the_generic_formulas(act, loss, target, x64):
    rng = np.random.default_rng(1)
    z = jnp.asarray(2 * rng.normal(size=(B, N)))
    y = _targets(loss, target, N, rng)
    f, obj = bp.ACTIVATIONS[act], bp.LOSSES[loss]
    fused = bp.fused_output(f, obj)
    a = f.forward(z)
    np.testing.assert_allclose(fused.value(z, y), obj.value(z, a, y), rtol=1e-13)
    generic = f.backward(z, a, obj.grad(z, a, y))
    assert _norm_rel(fused.delta(z, a, y), generic) <= 1e-13
    # and δ^L = ∂C_n/∂z^L_n by autodiff of the fused value
    want = jax.grad(lambda z: jnp.sum(fused.value(z, y)))(z)
    assert _norm_rel(fused.delta(z, a, y), want) <= 1e-13


@pytest.mark.parametrize("act,loss,target", FUSED_CASES)
def test_fused_mlp_equals_generic_mlp(act, loss, target, x64):
    """fuse_output=True and False give the same loss, grads, deltas and input_grad (float64)."""
    sizes = (3, 5, N)
    fused = bp.MLP(sizes, ("elu", act), loss)
    generic = bp.MLP(sizes, ("elu", act), loss, fuse_output=False)
    assert fused.fused is not None and generic.fused is None
    params = fused.init(jax.random.key(0), jnp.float64)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(B, 3)))
    y = _targets(loss, target, N, rng)
    results = []
    for net in (fused, generic):
        loss_value, grads = net.value_and_grad(params, x, y)
        _, cache = net.forward(params, x)
        bw = net.backward(params, cache, y)
        results.append((loss_value, grads, bw))
    (lf, gf, bf), (lg, gg, bg) = results
    np.testing.assert_allclose(lf, lg, rtol=1e-12)
    np.testing.assert_allclose(fused.loss(params, x, y), generic.loss(params, x, y), rtol=1e-12)
    for got, want in zip(jax.tree.leaves((gf, bf)), jax.tree.leaves((gg, bg)), strict=True):
        assert _norm_rel(got, want) <= 1e-10


# -- stability: logits up to ±1e4 in float32 ------------------------------------------------------


def _optax_reference(act: str, loss: str, z, y):
    """Per-example loss from the logits by optax: stable, and its jax.grad is finite."""
    if loss == "cross_entropy":
        if y.ndim == 1:
            return optax.softmax_cross_entropy_with_integer_labels(z, y)
        return optax.softmax_cross_entropy(z, y)
    if loss == "binary_cross_entropy":
        return jnp.sum(optax.sigmoid_binary_cross_entropy(z, y), axis=-1)
    return jnp.sum(optax.l2_loss(z, y), axis=-1)


def _naive(loss: str, z, y):
    """The same loss through the probabilities: log 0 = −∞ once they round to 0 or 1."""
    if loss == "cross_entropy":
        a = jax.nn.softmax(z)
        if y.ndim == 1:
            return -jnp.log(jnp.take_along_axis(a, y[:, None], axis=-1)[:, 0])
        return -jnp.sum(y * jnp.log(a), axis=-1)
    a = jax.nn.sigmoid(z)
    return -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log(1 - a), axis=-1)


STABILITY = [
    ("softmax", "cross_entropy", "labels"),
    ("softmax", "cross_entropy", "probabilities"),
    ("sigmoid", "binary_cross_entropy", "probabilities"),
    ("identity", "squared_error", "real"),
]


def _huge_logit_net(act: str, loss: str, target: str, scale: float):
    """A tanh hidden layer (|a¹| < 1) then output weights and biases that put |z^L| near scale."""
    n_hidden = 6
    net = bp.MLP((3, n_hidden, N), ("tanh", act), loss)
    rng = np.random.default_rng(3)
    params = [
        {
            "W": jnp.asarray(rng.normal(size=(n_hidden, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(n_hidden,)), jnp.float32),
        },
        {
            "W": jnp.asarray(
                0.5 * scale / n_hidden * rng.choice([-1, 1], (N, n_hidden)), jnp.float32
            ),
            "b": jnp.asarray(0.5 * scale * rng.uniform(-1, 1, N), jnp.float32),
        },
    ]
    x = jnp.asarray(3 * rng.normal(size=(B, 3)), jnp.float32)
    y = _targets(loss, target, N, rng)
    return net, params, x, (y.astype(jnp.float32) if y.dtype == jnp.float64 else y)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1e1, 1e3, 1e4], ids=["1e1", "1e3", "1e4"])
@pytest.mark.parametrize("act,loss,target", STABILITY)
def test_canonical_pairs_are_stable_for_huge_logits_in_float32(act, loss, target, scale):
    net, params, x, y = _huge_logit_net(act, loss, target, scale)
    _, cache = net.forward(params, x)
    z = cache.z[-1]
    assert z.dtype == jnp.float32
    assert 0.3 * scale <= float(jnp.max(jnp.abs(z))) <= scale

    def stable_reference(p, x):
        a = jnp.tanh(x @ p[0]["W"].T + p[0]["b"])
        return jnp.mean(_optax_reference(act, loss, a @ p[1]["W"].T + p[1]["b"], y))

    ref_loss, (ref_grads, ref_input) = jax.value_and_grad(stable_reference, argnums=(0, 1))(
        params, x
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((ref_loss, ref_grads, ref_input)))

    loss_value, grads = jax.jit(net.value_and_grad)(params, x, y)
    bw = net.backward(params, cache, y)
    for name, tree in [
        ("loss", loss_value),
        ("net.loss", net.loss(params, x, y)),
        ("grads", grads),
        ("backward", bw),
    ]:
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(tree)), name
    np.testing.assert_allclose(loss_value, ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert _norm_rel(got, want) <= 1e-5
    for got, want in zip(jax.tree.leaves(bw.grads), jax.tree.leaves(ref_grads), strict=True):
        assert _norm_rel(got, want) <= 1e-5
    assert _norm_rel(bw.input_grad, ref_input) <= 1e-5

    if scale == 1e4 and loss != "squared_error":
        # the regime is real: computed through the probabilities, the loss is not finite
        assert not np.all(np.isfinite(_naive(loss, z, y)))


def test_targets_are_cast_to_the_params_dtype():
    """float64 targets into a float32 network: cast, not promoted (strict promotion is on)."""
    net = bp.MLP((2, 3), ("identity",), "squared_error")
    params = net.init(jax.random.key(0))
    x = np.ones((4, 2), np.float32)
    y = np.full((4, 3), 0.5, np.float64)
    loss, grads = net.value_and_grad(params, x, y)
    assert loss.dtype == jnp.float32
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


# -- the registry -----------------------------------------------------------------------------


def test_get_loss_by_name_and_object():
    assert bp.get_loss("cross_entropy") is bp.LOSSES["cross_entropy"]
    mine = bp.Loss("mine", lambda z, a, y: jnp.sum(a, -1), lambda z, a, y: jnp.ones_like(a))
    assert bp.get_loss(mine) is mine


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"^loss: unknown loss 'mse'; expected one of "
        r"binary_cross_entropy, cross_entropy, squared_error",
    ):
        bp.get_loss("mse")


def test_get_loss_wrong_type():
    with pytest.raises(TypeError, match=r"loss: expected a loss name \(str\) or a bpjax.Loss"):
        bp.get_loss(optax.l2_loss)


def test_user_loss_in_an_mlp(x64):
    """A user's own Loss (here ∑|y − a|² / 4 with its gradient) goes through the generic path."""
    quarter = bp.Loss(
        "quarter",
        lambda z, a, y: 0.25 * jnp.sum((y - a) ** 2, axis=-1),
        lambda z, a, y: 0.5 * (a - y),
    )
    net = bp.MLP((3, 4, 2), ("tanh", "identity"), quarter)
    assert net.fused is None
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    _, grads = net.value_and_grad(params, x, y)
    want = jax.grad(net.loss)(params, x, y)
    for got, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert _norm_rel(got, w) <= 1e-12


# -- saturated outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["softmax", "sigmoid"])
def test_generic_binary_cross_entropy_gradient_finite_at_saturated_hard_labels(out):
    """A confident, correct prediction: a = (1, ≈0) in float32 under y = (1, 0)."""
    net = bp.MLP((1, 2), (out,), "binary_cross_entropy", fuse_output=False)
    params = [{"W": jnp.array([[20.0], [-20.0]]), "b": jnp.zeros(2)}]
    x, y = jnp.ones((1, 1)), jnp.array([[1.0, 0.0]])
    assert float(net(params, x)[0, 0]) == 1.0  # saturated: 1 − a is 0
    loss, grads = net.value_and_grad(params, x, y)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), grads
