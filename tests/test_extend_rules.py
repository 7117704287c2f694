"""bpjax.extend on every kind of network: the layers' extension rules against independent truths.

Each quantity on a CNN (Conv2D SAME and strided VALID, both pools, LayerNorm, Residual), an
Embedding + LSTM and an Embedding + Elman sequence model, and a network with a user's own
``Layer``, in float64, against references that never touch the hand-written backward:
``vmap(grad)`` of one example's loss for the per-example quantities, and for the curvature the
explicit ``(1/B) Σ_n J_nᵀ H_n J_n`` (``jax.jacobian`` of the output variable, ``jax.hessian`` of
the per-example loss) and ``jax.hessian`` of the loss for ``hvp``. Float64 and well-scaled data:
every comparison is a relative ``1e-10`` (the quantities are sums of a few hundred products, each
rounded at 2⁻⁵³ ≈ 1.1e-16; 1e-10 leaves five orders of magnitude and catches any wrong term).

Then each closed-form rule against the generic rule (the same layer with its rules hidden, so the
rules module runs its backward under ``vmap``), and the Gram/materialised crossover of the norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import extend as bx
from bpjax.extend import rules
from bpjax.extend.passes import forward, loss_from_output, output_variable
from bpjax.layers import Layer

L = bp.layers
RTOL = 1e-10


def _scale_layer() -> Layer:
    """A user's elementwise scale ``y = x ∘ s`` from plain functions, no rules of its own."""
    return Layer(
        init=lambda key, shape, dtype: (
            {"s": 1 + 0.3 * jax.random.normal(key, shape, dtype)},
            shape,
        ),
        forward=lambda params, x: (x * params["s"], x),
        backward=lambda params, x, dy: ({"s": jnp.sum(dy * x, axis=0)}, dy * params["s"]),
        name="scale",
    )


NETS = {
    "cnn": lambda: bp.serial(
        L.Conv2D(3, 3, padding="SAME", activation="tanh"),
        L.MaxPool2D(2),
        L.Conv2D(4, 2, strides=2, padding="VALID", activation="relu"),
        L.Residual(L.Conv2D(4, 1, activation="tanh")),
        L.AvgPool2D(2, strides=1),
        L.LayerNorm(),
        L.Flatten(),
        L.Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(8, 8, 2),
    ),
    "lstm": lambda: bp.serial(
        L.Embedding(5, 3),
        L.LSTM(4),
        L.Dense(5, "softmax"),
        loss="cross_entropy",
        input_shape=(4,),
    ),
    "elman": lambda: bp.serial(
        L.Embedding(5, 3),
        L.Elman(4),
        L.LastStep(),
        L.Dense(2, "identity"),
        loss="squared_error",
        input_shape=(4,),
    ),
    "user": lambda: bp.serial(
        L.Dense(4, "tanh"),
        _scale_layer(),
        L.Dense(2, "tanh"),
        loss="squared_error",
        input_shape=(3,),
    ),  # a non-canonical output pair: signed GGN factors
}


def _data(name: str, batch: int = 3):
    net = NETS[name]()
    rng = np.random.default_rng(7)
    params = net.init(jax.random.key(0), jnp.float64)
    # non-zero biases and offsets: every term of every rule is exercised
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    if name == "cnn":
        x, y = rng.normal(size=(batch, 8, 8, 2)), rng.integers(0, 3, size=batch)
    elif name == "lstm":
        x, y = rng.integers(-5, 5, size=(batch, 4)), rng.integers(0, 5, size=(batch, 4))
    elif name == "elman":
        x, y = rng.integers(0, 5, size=(batch, 4)), rng.normal(size=(batch, 2))
    else:
        x, y = rng.normal(size=(batch, 3)), rng.normal(size=(batch, 2))
    return net, params, jnp.asarray(x), jnp.asarray(y)


def _per_example_grads(net, params, x, y):
    def one(p, xn, yn):
        return net.loss(p, xn[None], yn[None])

    return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, x, y)


def _ggn_rows(net, params, x, y):
    """Per example ``J_nᵀ H_n J_n`` as a ``(batch, P, P)`` array, from autodiff of the forward."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    fwd = forward(net, params, x, y)
    batch, n = x.shape[0], output_variable(net, fwd.cache).shape[-1]
    y_rows = fwd.y.reshape(batch, -1, *fwd.y.shape[1:])

    def outputs(theta):
        return output_variable(net, net.forward(unravel(theta), x)[1]).reshape(batch, -1)

    def per_example(v_n, y_n):
        return jnp.mean(loss_from_output(net, v_n.reshape(-1, n), y_n))

    @jax.jit
    def rows(theta, y_rows):
        jac = jax.jacobian(outputs)(theta)
        hess = jax.vmap(jax.hessian(per_example))(outputs(theta), y_rows)
        return jnp.einsum("bkp,bkl,blq->bpq", jac, hess, jac)

    return rows(flat, y_rows), unravel


def _close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape, what
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= RTOL * max(scale, 1e-30), f"{what}: {err:.2e} vs scale {scale:.2e}"


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_first_order_quantities_equal_vmap_grad(x64, name, jit):
    net, params, x, y = _data(name)
    wrap = jax.jit if jit else (lambda f: f)
    per = _per_example_grads(net, params, x, y)
    got = wrap(
        lambda p, x, y: {
            "batch_grad": bx.batch_grad(net, p, x, y),
            "batch_l2_grad": bx.batch_l2_grad(net, p, x, y),
            "sum_grad_squared": bx.sum_grad_squared(net, p, x, y),
            "variance": bx.variance(net, p, x, y),
            "clipped_grad": bx.clipped_grad(net, p, x, y, 0.05),
        }
    )(params, x, y)
    _close(got["batch_grad"], per, "batch_grad")
    l2 = jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), per)
    _close(got["batch_l2_grad"], l2, "batch_l2_grad")
    _close(got["sum_grad_squared"], jax.tree.map(lambda g: jnp.sum(g * g, 0), per), "sgs")
    _close(got["variance"], jax.tree.map(lambda g: jnp.var(g, 0), per), "variance")
    norms = jnp.sqrt(sum(jax.tree.leaves(l2)))
    scale = jnp.minimum(1, 0.05 / norms)
    clipped = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / x.shape[0], per)
    assert float(jnp.min(scale)) < 1  # the clipping is active on some example
    _close(got["clipped_grad"], clipped, "clipped_grad")


@pytest.mark.parametrize("name", sorted(NETS))
def test_curvature_equals_explicit_jacobian_hessian_products(x64, name):
    net, params, x, y = _data(name)
    rows, unravel = _ggn_rows(net, params, x, y)
    batch = x.shape[0]
    want_diag = unravel(jnp.einsum("bpp->p", rows) / batch)
    want_batch = [unravel(jnp.diagonal(r) / batch) for r in rows]
    want_batch = jax.tree.map(lambda *leaves: jnp.stack(leaves), *want_batch)
    _close(bx.diag_ggn(net, params, x, y), want_diag, "diag_ggn")
    _close(bx.batch_diag_ggn(net, params, x, y), want_batch, "batch_diag_ggn")
    flat, _ = jax.flatten_util.ravel_pytree(params)
    v = unravel(jnp.asarray(np.random.default_rng(1).normal(size=flat.shape)))
    hess = jax.jit(jax.hessian(lambda t: net.loss(unravel(t), x, y)))(flat)
    _close(bx.hvp(net, params, x, y, v), unravel(hess @ jax.flatten_util.ravel_pytree(v)[0]), "hvp")
    # one damped Gauss-Newton step: solve with the explicit GGN
    ggn = jnp.einsum("bpq->pq", rows) / batch
    v_flat = jax.flatten_util.ravel_pytree(v)[0]
    _close(bx.ggn_vp(net, params, x, y, v), unravel(ggn @ v_flat), "ggn_vp")
    sqrt = bx.sqrt_ggn(net, params, x, y)
    columns = jax.vmap(jax.vmap(lambda f: jax.flatten_util.ravel_pytree(f)[0]))(
        sqrt.factor
    )  # (k, batch, P)
    signs = jnp.ones(columns.shape[:2]) if sqrt.signs is None else sqrt.signs.T
    _close(jnp.einsum("cb,cbp,cbq->pq", signs, columns, columns), ggn, "sqrt_ggn")
    grad = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(net.loss))(params, x, y))[0]
    step = jnp.linalg.solve(ggn + 0.5 * jnp.eye(flat.size), -grad)
    _close(bx.levenberg_marquardt_step(net, params, x, y, 0.5), unravel(flat + step), "LM")


def test_diag_ggn_mc_is_unbiased_on_a_cnn(x64):
    """The MC estimate's mean over many samples → diag_ggn (at 1/√M; 4000 samples: ~2%)."""
    net, params, x, y = _data("cnn")
    exact = bx.diag_ggn(net, params, x, y)
    mc = bx.diag_ggn_mc(net, params, x, y, jax.random.key(3), mc_samples=4000)
    for e, m in zip(jax.tree.leaves(exact), jax.tree.leaves(mc), strict=True):
        assert float(jnp.linalg.norm(m - e)) <= 0.1 * float(jnp.linalg.norm(e))
    # the sampled factor's squares are the same estimate: with the same key, the same numbers
    sqrt = bx.sqrt_ggn_mc(net, params, x, y, jax.random.key(3), mc_samples=4000)
    assert sqrt.signs is None
    squares = jax.tree.map(lambda f: jnp.sum(f * f, axis=(0, 1)), sqrt.factor)
    _close(squares, mc, "sqrt_ggn_mc")


def test_variance_is_non_negative_and_exactly_zero_for_one_example(x64):
    net, params, x, y = _data("cnn", batch=1)
    for leaf in jax.tree.leaves(bx.variance(net, params, x, y)):
        assert float(jnp.max(jnp.abs(leaf))) == 0.0
    # identical examples: the true variance is 0. Σg²/B and (Σg/B)² are sums of at most
    # m = 2·64 products (two examples, 8×8 positions), each within γ_m ≈ m·u ≈ 1.4e-14 of its
    # value, so their difference is at most 2γ_m·max Σg²/B < 1e-12·max Σg²/B: roundoff, ≥ 0
    net, params, x, y = _data("cnn", batch=2)
    x, y = jnp.stack([x[0], x[0]]), jnp.stack([y[0], y[0]])
    variance = bx.variance(net, params, x, y)
    second_moment = bx.sum_grad_squared(net, params, x, y)
    for v, s in zip(jax.tree.leaves(variance), jax.tree.leaves(second_moment), strict=True):
        assert float(jnp.min(v)) >= 0.0
        assert float(jnp.max(v)) <= 1e-12 * float(jnp.max(s)) / 2


# -- each closed form against the generic rule -----------------------------------------------


class _Plain:
    """The same layer with its closed-form rules hidden: the rules module's generic path."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        if name in rules.RULES:
            raise AttributeError(name)
        return getattr(self._layer, name)


@pytest.mark.parametrize("name", sorted(NETS))
def test_closed_forms_agree_with_the_generic_rule(x64, name):
    net, params, x, y = _data(name)
    fwd = forward(net, params, x, y)
    records = rules.records(net, params, fwd.cache)
    errors = bx.first_order.example_deltas(net, params, fwd)
    rng = np.random.default_rng(2)
    checked = []
    for record, error in zip(records, errors, strict=True):
        if not any(rules.has_rule(record.layer, r) for r in rules.RULES):
            continue
        checked.append(type(record.layer).__name__)
        plain = record._replace(layer=_Plain(record.layer))
        columns = jnp.asarray(rng.normal(size=(3, *error.shape)))  # k = 3 error columns
        weights = jnp.asarray(rng.normal(size=(3, error.shape[0])))  # signed, as D_n / B
        for rule, args in (
            (rules.example_grads, (error,)),
            (rules.example_sq_norms, (error,)),
            (rules.square_sum, (columns, weights)),
            (rules.example_square_sums, (columns, weights)),
        ):
            fast, generic = (
                jax.jit(lambda *a, r=r, rule=rule: rule(r, *a)) for r in (record, plain)
            )
            _close(fast(*args), generic(*args), f"{checked[-1]} {rule.__name__}")
    assert checked  # every network here has layers with closed forms


@pytest.mark.parametrize("positions", [1, 2, 9, 40])
def test_gram_and_materialised_norms_agree(x64, positions):
    """Both sides of the crossover ``P·(m + n) < m·n`` (m = 6, n = 8: Gram below P = 3.4)."""
    from bpjax.layers._outer import example_outer_sq_norms, use_gram

    rng = np.random.default_rng(positions)
    delta = jnp.asarray(rng.normal(size=(2, positions, 6)))
    a = jnp.asarray(rng.normal(size=(2, positions, 8)))
    want = jnp.sum(jnp.einsum("bpm,bpn->bmn", delta, a) ** 2, axis=(1, 2))
    assert use_gram(positions, 6, 8) == (1 < positions < 48 / 14)
    _close(example_outer_sq_norms(delta, a), want, "norm")


def test_embedding_rules_with_repeated_and_wrapped_tokens(x64):
    """Tokens repeated within an example, negative and out-of-range ones (the rows read)."""
    layer = L.Embedding(4, 2)
    params, _ = layer.init(jax.random.key(0), (5,), jnp.float64)
    x = jnp.array([[1, 1, -1, 3, 9], [0, 0, 0, 0, 0]])
    _, cache = layer.forward(params, x)
    dy = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 2)))
    want = jnp.stack(
        [
            layer.backward(params, cache._replace(x=x[n : n + 1]), dy[n : n + 1])[0]["W"]
            for n in range(2)
        ]
    )
    got = layer.example_grads(params, cache, dy)["W"]
    _close(got, want, "example_grads")
    _close(layer.example_sq_norms(params, cache, dy)["W"], jnp.sum(want**2, axis=(1, 2)), "norm")


def test_a_cache_leaf_without_a_batch_axis_of_its_own_is_refused(x64):
    """A user's layer caching ``(B·T, n)`` rows: the generic rule cannot slice it."""
    flat = Layer(
        init=lambda key, shape, dtype: ({"s": jnp.ones(shape[-1:], dtype)}, shape),
        forward=lambda p, x: (x * p["s"], x.reshape(-1, x.shape[-1])),
        backward=lambda p, c, dy: (
            {"s": jnp.sum(dy.reshape(c.shape) * c, 0)},
            dy * p["s"],
        ),
    )
    net = bp.serial(flat, L.Dense(2), loss="squared_error", input_shape=(3, 2))
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = jnp.ones((2, 3, 2)), jnp.zeros((2, 3, 2))
    with pytest.raises(TypeError, match=r"layer 0 .* batch axis cannot be found"):
        bx.batch_grad(net, params, x, y)
    assert jnp.isfinite(net.loss(params, x, y))  # the network itself is fine


def test_kfc_factors_are_exact_for_one_example_at_one_position(x64):
    """A conv whose one window covers the image: for B = 1 the GGN block of W̄ is G ⊗ A exactly
    (row-major W̄[o, (c, i, j)] = W[i, j, c, o], then b), as for the Dense layer after it."""
    net = bp.serial(
        L.Conv2D(2, 3, activation="tanh"), L.Flatten(), L.Dense(3, "softmax"),
        loss="cross_entropy", input_shape=(3, 3, 2),
    )  # fmt: skip
    rng = np.random.default_rng(4)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.normal(size=p.shape), net.init(jax.random.key(1), jnp.float64)
    )
    x, y = jnp.asarray(rng.normal(size=(1, 3, 3, 2))), jnp.array([2])
    rows, unravel = _ggn_rows(net, params, x, y)
    index = unravel(jnp.arange(rows.shape[1], dtype=jnp.float64))
    conv_w = jnp.transpose(index[0]["W"], (3, 2, 0, 1)).reshape(2, -1)
    layouts = [
        jnp.concatenate([conv_w, index[0]["b"][:, None]], axis=1),
        jnp.concatenate([index[2]["W"], index[2]["b"][:, None]], axis=1),
    ]
    factors = bx.kfac_factors(net, params, x, y)
    assert factors[1] is None  # Flatten has no params
    for layout, f in zip(layouts, (factors[0], factors[2]), strict=True):
        perm = layout.ravel().astype(int)
        _close(jnp.kron(f.G, f.A), rows[0][perm][:, perm], "G ⊗ A")
    # the preconditioner reads and writes the HWIO kernel in the same layout
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    got = bx.kfac_precondition(grads, factors, damping=0.3)
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    flat_got = jax.flatten_util.ravel_pytree(got)[0]
    for layout, f in zip(layouts, (factors[0], factors[2]), strict=True):
        perm = layout.ravel().astype(int)
        damped = jnp.kron(f.G + 0.3 * jnp.eye(len(f.G)), f.A + 0.3 * jnp.eye(len(f.A)))
        _close(flat_got[perm], jnp.linalg.solve(damped, flat_grads[perm]), "precondition")
    _close(got[1], grads[1], "no params")


@pytest.mark.parametrize("name", ["cnn", "lstm", "user"])
def test_kfac_gives_the_ggn_diagonal_where_a_layer_has_no_kronecker_factors(x64, name):
    net, params, x, y = _data(name)
    factors = bx.kfac_factors(net, params, x, y)
    diag = bx.diag_ggn(net, params, x, y)
    grads = net.value_and_grad(params, x, y)[1]
    got = bx.kfac_precondition(grads, factors, damping=0.3)
    for layer, f, d, g, p in zip(net.layers, factors, diag, grads, got, strict=True):
        if not jax.tree.leaves(d):
            assert f is None
        elif hasattr(layer, "kfac_factors"):
            assert isinstance(f, bx.KFACFactors)
        else:  # the exact GGN diagonal, and the damped diagonal solve
            assert isinstance(f, bx.KFACDiagonal)
            _close(f.diag, d, f"diagonal of {type(layer).__name__}")
            _close(p, jax.tree.map(lambda gl, dl: gl / (dl + 0.3), g, d), "diagonal solve")


def test_kfac_precondition_names_a_diagonal_that_does_not_fit(x64):
    net, params, x, y = _data("user")
    factors = bx.kfac_factors(net, params, x, y)
    grads = net.value_and_grad(params, x, y)[1]
    wrong = [*factors[:1], bx.KFACDiagonal({"s": jnp.ones(2)}), *factors[2:]]
    with pytest.raises(ValueError, match=r"factors\[1\]: a KFACDiagonal shaped"):
        bx.kfac_precondition(grads, wrong, damping=0.1)
    negative = [*factors[:1], bx.KFACDiagonal({"s": -jnp.ones(4)}), *factors[2:]]
    out = bx.kfac_precondition(grads, negative, damping=0.1)  # D + λ < 0: no PD block, NaN
    assert bool(jnp.isnan(out[1]["s"]).all())


@pytest.mark.parametrize("bad", [-0.01, 0.0, float("nan")])
def test_a_traced_bad_scalar_poisons_the_result(x64, bad):
    """A clipping norm or damping the concrete check cannot see is NaN out, never a finite
    wrong number (a negative norm would flip the gradient's sign)."""
    net, params, x, y = _data("user")
    clipped = jax.jit(lambda c: bx.clipped_grad(net, params, x, y, c))(bad)
    step = jax.jit(lambda lam: bx.levenberg_marquardt_step(net, params, x, y, lam))(bad)
    for leaf in jax.tree.leaves([clipped, step]):
        assert bool(jnp.all(jnp.isnan(leaf)))
    good = jax.jit(lambda c: bx.clipped_grad(net, params, x, y, c))(0.05)
    _close(good, bx.clipped_grad(net, params, x, y, 0.05), "traced good norm")


def test_levenberg_marquardt_in_half_precision_solves_in_float32():
    net = bp.MLP((2, 3, 1), ("tanh", "identity"), "squared_error")
    params = net.init(jax.random.key(0), jnp.bfloat16)
    x, y = jnp.ones((4, 2), jnp.bfloat16), jnp.zeros((4, 1), jnp.bfloat16)
    step = bx.levenberg_marquardt_step(net, params, x, y, 0.1)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(step))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(step))


def test_kfac_precondition_names_a_factor_that_does_not_fit(x64):
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
    factors = bx.kfac_factors(net, params, x, y)
    with pytest.raises(ValueError, match=r"factors\[0\]: expected A \(4, 4\) and G \(4, 4\)"):
        bx.kfac_precondition(params, factors[::-1], damping=0.1)
    with pytest.raises(ValueError, match=r"factors\[1\]: None, but layer 1 has params"):
        bx.kfac_precondition(params, [factors[0], None], damping=0.1)
    with pytest.raises(ValueError, match=r"factors: expected one KFACFactors per layer"):
        bx.kfac_precondition(params, factors[0], damping=0.1)
