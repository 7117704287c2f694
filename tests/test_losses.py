"""Losses: values against their formulas, hand-written gradients against autodiff, the fused pairs.

The stability tests drive the output logits to ±1e4 in float32 and compare with optax's losses,
which are computed from the logits and whose ``jax.grad`` is finite there.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax.layers import Dense

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


# -- class labels out of range --------------------------------------------------------------------
# Traced labels cannot be range-checked while tracing; every use of them is poisoned instead, so an
# out-of-range label gives NaN in the loss and in every gradient, never a finite wrong number.

BAD_LABELS = ([0, 2, 1, 0, 1], [0, -1, 1, 0, 1], [0, 1, 1, 0, 2**31 - 1])
BAD_IDS = ("n_L", "negative", "huge")


def _all_nan(tree) -> bool:
    return all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(tree))


def test_label_poison_is_exactly_one_or_nan(x64):
    labels = jnp.asarray([0, 3, -1, 4, 2])
    poison = bp.losses.label_poison(labels, 4, jnp.float64)
    assert poison.dtype == jnp.float64
    # 1 exactly, so a valid example's loss and gradient are unchanged bit for bit (x · 1 = x)
    assert np.array_equal(np.isnan(poison), [False, False, True, True, False])
    assert np.all(np.asarray(poison)[[0, 1, 4]] == 1.0)
    rows = np.asarray(
        jax.jit(bp.losses.one_hot_labels, static_argnums=(1, 2))(labels, 4, jnp.float32)
    )
    np.testing.assert_array_equal(rows[[0, 1, 4]], np.eye(4)[[0, 3, 2]])
    assert np.all(np.isnan(rows[2:4]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("labels", BAD_LABELS, ids=BAD_IDS)
def test_traced_bad_labels_poison_loss_and_every_gradient(labels, fuse, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy", fuse_output=fuse)
        params = net.init(jax.random.key(0), dtype)
        x = jax.random.normal(jax.random.key(1), (5, 3), dtype)
        y = jnp.asarray(labels, jnp.int32)
        loss, grads = jax.jit(net.value_and_grad)(params, x, y)
        assert bool(jnp.isnan(loss)) and _all_nan(grads)
        # jax.grad of the plain-JAX loss, the harness's reference, is poisoned the same way
        assert _all_nan(jax.jit(jax.grad(net.loss))(params, x, y))
        per_example = jax.jit(net.per_example_loss)(params, x, y)
        bad = (np.asarray(labels) < 0) | (np.asarray(labels) >= 2)
        np.testing.assert_array_equal(np.isnan(per_example), bad)  # only that example's C_n
        _, cache = net.forward(params, x)
        backward = jax.jit(net.backward)(params, cache, y)
        assert _all_nan(backward.grads)
        # per example: the bad example's errors and input gradient are NaN, the others' finite
        for rows in (*backward.deltas, backward.input_grad):
            np.testing.assert_array_equal(np.isnan(rows).any(axis=1), bad)
            np.testing.assert_array_equal(np.isnan(rows).all(axis=1), bad)


def test_traced_bad_labels_poison_a_sequence_model():
    """Labels per time step, ``(batch, T)``: a bad one poisons the whole batch's gradient."""
    net = bp.serial(
        bp.layers.Embedding(7, 4), Dense(3, "softmax"), loss="cross_entropy", input_shape=(5,)
    )
    params = net.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
    labels = jnp.zeros((2, 5), jnp.int32).at[1, 3].set(3)
    loss, grads = jax.jit(net.value_and_grad)(params, tokens, labels)
    assert bool(jnp.isnan(loss)) and _all_nan(grads[1])
    # no recurrence: the error is NaN at position (1, 3) alone, so the embedding row of the token
    # there is NaN and the other rows keep what the other positions give them
    poisoned = np.arange(7) == int(tokens[1, 3])
    np.testing.assert_array_equal(np.isnan(grads[0]["W"]).all(axis=1), poisoned)
    np.testing.assert_array_equal(np.isnan(grads[0]["W"]).any(axis=1), poisoned)
    per_example = jax.jit(net.per_example_loss)(params, tokens, labels)
    np.testing.assert_array_equal(np.isnan(per_example), [False, True])
    with pytest.raises(ValueError, match=re.escape("The first out of range: y.ravel()[8] = 3.")):
        net.value_and_grad(params, tokens, labels)


@pytest.mark.parametrize("loss", ["squared_error", "binary_cross_entropy"])
def test_loss_targets_one_hot_rows_for_bad_labels(loss):
    act = "identity" if loss == "squared_error" else "sigmoid"
    net = bp.MLP((3, 2), (act,), loss)
    message = f"y: {loss} labels must lie in [0, n_L) = [0, 2)"
    with pytest.raises(ValueError, match=re.escape(message)):
        bp.train.loss_targets(net, jnp.array([0, 5]))
    rows = jax.jit(lambda y: bp.train.loss_targets(net, y))(jnp.array([1, 5]))
    np.testing.assert_array_equal(rows[0], [0.0, 1.0])
    assert bool(jnp.all(jnp.isnan(rows[1])))


EXTEND_QUANTITIES = (
    "batch_grad", "batch_l2_grad", "sum_grad_squared", "variance", "diag_ggn", "kfac_factors",
    "clipped_grad", "diag_ggn_mc", "hvp",
)  # fmt: skip


def _extend_call(name: str):
    f = getattr(bp.extend, name)
    if name == "clipped_grad":
        return lambda net, p, x, y: f(net, p, x, y, 1.0)
    if name == "diag_ggn_mc":
        return lambda net, p, x, y: f(net, p, x, y, jax.random.key(2))
    if name == "hvp":
        return lambda net, p, x, y: f(net, p, x, y, p)
    return f


@pytest.mark.parametrize("name", EXTEND_QUANTITIES)
def test_extend_checks_concrete_labels_and_poisons_traced_ones(name):
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params, x = net.init(jax.random.key(0)), jax.random.normal(jax.random.key(1), (5, 3))
    y = jnp.asarray([0, 1, 2, 0, 1])
    run = _extend_call(name)
    # the functions jit inside: the labels are judged before that, while concrete
    with pytest.raises(ValueError, match=re.escape("y.ravel()[2] = 2")):
        run(net, params, x, y)
    out = jax.jit(lambda p, x, y: run(net, p, x, y))(params, x, y)
    if name in ("batch_grad", "batch_l2_grad"):  # per example: example 2's rows alone are NaN
        for leaf in jax.tree.leaves(out):
            rows = np.isnan(np.asarray(leaf).reshape(5, -1))
            np.testing.assert_array_equal(rows.all(axis=1), [0, 0, 1, 0, 0])
            np.testing.assert_array_equal(rows.any(axis=1), [0, 0, 1, 0, 0])
    elif name == "kfac_factors":  # A = (1/B) Σ ā ā ᵀ holds activations alone, no loss
        assert _all_nan([f.G for f in out])
        assert all(bool(jnp.all(jnp.isfinite(f.A))) for f in out)
    else:
        assert _all_nan(out)


@pytest.mark.parametrize("kind", ["data", "tensor", "extend"])
def test_parallel_checks_concrete_labels_and_poisons_traced_ones(kind):
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params, x = net.init(jax.random.key(0)), jax.random.normal(jax.random.key(1), (5, 3))
    if kind == "data":
        step = bp.parallel.data_parallel(net, bp.parallel.device_mesh())
    elif kind == "tensor":
        step = bp.parallel.tensor_parallel(net, bp.parallel.device_mesh(1, 1))
    else:
        step = bp.parallel.data_parallel_extend(net, bp.parallel.device_mesh(), "variance")
    y = jnp.asarray([0, 1, 1, -1, 1])
    with pytest.raises(ValueError, match=re.escape("y.ravel()[3] = -1")):
        step(params, x, y)
    assert _all_nan(jax.jit(step)(params, x, y))
    assert step.lower(params, x, jnp.zeros(5, jnp.int32)).compile() is not None  # still jit's


def test_int64_labels_are_judged_before_any_cast():
    """With x64 off, jnp.asarray wraps an int64 2**32 + 1 to the valid int32 label 1."""
    net = bp.MLP((3, 4, 3), ("tanh", "softmax"), "cross_entropy")
    params, x = net.init(jax.random.key(0)), jnp.ones((2, 3))
    bad = np.array([0, 2**32 + 1], np.int64)
    for run in (net.loss, net.value_and_grad, net.per_example_loss):
        with pytest.raises(ValueError, match=re.escape("y.ravel()[1] = 4294967297")):
            run(params, x, bad)


def test_fit_and_the_checkers_judge_concrete_labels_before_they_jit():
    """fit and the harness jit inside: traced bad labels would be NaN, which judges nothing."""
    net = bp.MLP((2, 4, 3), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    bad = np.array([0, 1, 2, 5, 0, 1, 2, 0], np.int32)
    data = bp.Dataset(x, bad, 3, "bad")
    with pytest.raises(ValueError, match=re.escape("train.y: cross_entropy labels must lie in")):
        bp.fit(net, params, data, optimizer=bp.get_optimizer("sgd", 0.1), epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=re.escape("test.y: cross_entropy labels must lie in")):
        ok = bp.Dataset(x, bad % 3, 3, "ok")
        bp.fit(
            net,
            params,
            ok,
            test=data,
            optimizer=bp.get_optimizer("sgd", 0.1),
            epochs=1,
            batch_size=4,
        )
    for check in (bp.check_network, bp.check_mlp, bp.extend.check_curvature):
        with pytest.raises(ValueError, match=re.escape("y.ravel()[3] = 5")):
            check(net, params, jnp.asarray(x), jnp.asarray(bad))


def test_a_dataset_of_labels_without_a_class_count_is_named():
    net = bp.MLP((2, 4, 3), ("tanh", "softmax"), "cross_entropy")
    x, y = np.zeros((8, 2), np.float32), np.arange(8, dtype=np.int32) % 3
    with pytest.raises(ValueError, match=re.escape("train: y of shape (8,) with num_classes=None")):
        bp.fit(net, net.init(jax.random.key(0)), bp.Dataset(x, y, None, "d"),
               optimizer=bp.get_optimizer("sgd", 0.1), epochs=1, batch_size=4)  # fmt: skip


def test_labels_as_a_python_list_work_wherever_net_loss_takes_them():
    net = bp.MLP((3, 4, 3), ("tanh", "softmax"), "cross_entropy")
    params, x = net.init(jax.random.key(0)), jax.random.normal(jax.random.key(1), (5, 3))
    y = [0, 1, 2, 2, 0]
    want = bp.extend.batch_grad(net, params, x, jnp.asarray(y))
    for labels in (y, tuple(y)):
        got = bp.extend.batch_grad(net, params, x, labels)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, w)  # the same program on the same int32 labels
    step = bp.parallel.data_parallel(net, bp.parallel.device_mesh())
    assert bool(jnp.isfinite(step(params, x, y)[0]))
    with pytest.raises(ValueError, match=re.escape("y.ravel()[2] = 3")):
        bp.extend.batch_grad(net, params, x, [0, 1, 3, 2, 0])
