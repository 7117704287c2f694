"""bpjax.extend against independent JAX references, in float64 to 1e-10 (norm-relative per leaf).

The references use only the forward maths (``z = a Wᵀ + b``, ``a = f(z)`` with ``jax.nn``'s
functions, the loss value) and autodiff: per-example quantities from ``vmap(grad)`` of the loss of
one example; curvature from explicit matrices, ``jax.hessian`` of the loss in the flattened params
and ``(1/B) Σ_n J_nᵀ H_n J_n`` with ``J_n`` by ``jax.jacobian`` of ``z^L`` and ``H_n`` by
``jax.hessian`` of the per-example loss in ``z^L_n``.

Compilation dominates the cost, so each architecture compiles one function that computes every
bpjax quantity and one that computes every reference, and the hypothesis sample is small.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import bpjax as bp
from bpjax import extend as bx
from tests.reference import JAX_NN_FORWARD

RTOL = 1e-10
ACTIVATION_NAMES = tuple(bp.ACTIVATIONS)
CANONICAL_OUTPUT = {
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
    "squared_error": "identity",
}
MAX_NORM = 0.3
DAMPING = 0.1

# -- the reference: plain JAX from the forward maths ---------------------------------------------


def ref_logits(acts: tuple[str, ...], params: Any, x: jax.Array) -> jax.Array:
    """``z^L``, shape (batch, n_L)."""
    a = x
    for layer, act in zip(params, acts, strict=True):
        z = a @ layer["W"].T + layer["b"]
        a = JAX_NN_FORWARD[act](z)
    return z


def ref_loss_of_z(acts: tuple[str, ...], loss: str, z: jax.Array, y: jax.Array) -> jax.Array:
    """``C_n`` of shape (batch,) from ``z^L`` (from the logits for the canonical pairs)."""
    out = acts[-1]
    if loss == "squared_error":
        return 0.5 * jnp.sum((y - JAX_NN_FORWARD[out](z)) ** 2, axis=-1)
    if loss == "cross_entropy":
        log_a = jax.nn.log_softmax(z, axis=-1)
        if y.ndim == 1:
            return -jnp.take_along_axis(log_a, y[:, None], axis=-1)[:, 0]
        return -jnp.sum(y * log_a, axis=-1)
    if out == "sigmoid":
        return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)
    a = JAX_NN_FORWARD[out](z)
    return -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log1p(-a), axis=-1)


def ref_loss(acts, loss, params, x, y):
    return jnp.mean(ref_loss_of_z(acts, loss, ref_logits(acts, params, x), y))


def reference(acts, loss, params, x, y, v) -> dict[str, Any]:
    """Every quantity by vmap(grad), jax.hessian and jax.jacobian."""
    batch = x.shape[0]
    one = functools.partial(ref_loss, acts, loss)
    per_ex = jax.vmap(lambda xn, yn: jax.grad(one)(params, xn[None], yn[None]))(x, y)
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_ex)
    sq_norms = jax.tree.map(lambda g: jnp.sum(g.reshape(batch, -1) ** 2, axis=1), per_ex)
    total = jnp.sqrt(sum(jax.tree.leaves(sq_norms)))
    scale = jnp.minimum(1.0, MAX_NORM / total)
    flat, unravel = ravel_pytree(params)

    def loss_flat(theta):
        return ref_loss(acts, loss, unravel(theta), x, y)

    grad = jax.grad(loss_flat)(flat)
    hessian = jax.hessian(loss_flat)(flat)
    jac = jax.jacobian(lambda t: ref_logits(acts, unravel(t), x))(flat)  # (batch, n_L, P)
    z = ref_logits(acts, params, x)
    h_z = jax.vmap(jax.hessian(lambda zn, yn: ref_loss_of_z(acts, loss, zn[None], yn[None])[0]))(
        z, y
    )
    ggn = jnp.einsum("bkp,bkl,blq->pq", jac, h_z, jac) / batch
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    return {
        "batch_grad": per_ex,
        "batch_l2_grad": sq_norms,
        "sum_grad_squared": jax.tree.map(lambda g: jnp.sum(g**2, axis=0), per_ex),
        "variance": jax.tree.map(lambda g, m: jnp.mean(g**2, axis=0) - m**2, per_ex, mean),
        "clipped_grad": jax.tree.map(
            lambda g: jnp.mean(g * scale.reshape((batch,) + (1,) * (g.ndim - 1)), axis=0), per_ex
        ),
        "hvp": unravel(hessian @ ravel_pytree(v)[0]),
        "diag_ggn": unravel(jnp.diagonal(ggn)),
        "ggn": ggn,
        "lm_step": unravel(flat + jnp.linalg.solve(ggn + DAMPING * eye, -grad)),
    }


def manual(net, params, x, y, v) -> dict[str, Any]:
    """Every quantity by bpjax.extend."""
    return {
        "batch_grad": bx.batch_grad(net, params, x, y),
        "batch_l2_grad": bx.batch_l2_grad(net, params, x, y),
        "sum_grad_squared": bx.sum_grad_squared(net, params, x, y),
        "variance": bx.variance(net, params, x, y),
        "clipped_grad": bx.clipped_grad(net, params, x, y, MAX_NORM),
        "hvp": bx.hvp(net, params, x, y, v),
        "diag_ggn": bx.diag_ggn(net, params, x, y),
        "kfac": bx.kfac_factors(net, params, x, y),
        "lm_step": bx.levenberg_marquardt_step(net, params, x, y, DAMPING),
    }


def assert_close(got: Any, want: Any, name: str, rtol: float = RTOL, floor: Any = None) -> None:
    """Norm-relative per leaf, ``‖g − r‖ ≤ rtol max(‖r‖, ‖floor‖)``; lists every failing leaf.

    ``floor`` (a tree like ``want``) is the scale of the terms a cancelling difference is made of:
    the variance ``mean g² − (mean g)²`` is judged against ``mean g²``.
    """
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    floors = jax.tree.leaves(floor) if floor is not None else [None] * len(jax.tree.leaves(want))
    failures = []
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, g), r, f in zip(flat, jax.tree.leaves(want), floors, strict=True):
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        where = name + jax.tree_util.keystr(path)
        if g64.shape != r64.shape:
            failures.append(f"{where}: shape {g64.shape}, expected {r64.shape}")
            continue
        ref = float(np.linalg.norm(r64))
        if f is not None:
            ref = max(ref, float(np.linalg.norm(np.asarray(f, np.float64))))
        err = float(np.linalg.norm(g64 - r64))
        if not err <= rtol * ref:
            failures.append(f"{where}: ‖Δ‖ = {err:.3e}, ‖ref‖ = {ref:.3e}")
    assert not failures, "bpjax.extend and the reference disagree:\n  " + "\n  ".join(failures)


def kfac_block(factors: bx.KFACFactors) -> np.ndarray:
    """``G ⊗ A``: the GGN block of ``W̄ = [W | b]`` flattened row-major."""
    return np.kron(np.asarray(factors.G), np.asarray(factors.A))


def ggn_block_of_layer(ggn: np.ndarray, params: Any, l: int) -> np.ndarray:
    """Layer ``l``'s block of the reference GGN, reordered to ``W̄ = [W | b]`` row-major."""
    offset = sum(int(np.size(p["W"]) + np.size(p["b"])) for p in params[:l])
    n_out, n_in = params[l]["W"].shape
    index = np.empty((n_out, n_in + 1), int)
    index[:, :n_in] = offset + np.arange(n_out * n_in).reshape(n_out, n_in)
    index[:, n_in] = offset + n_out * n_in + np.arange(n_out)
    index = index.ravel()
    return np.asarray(ggn)[np.ix_(index, index)]


# -- problems ------------------------------------------------------------------------------------


def make_targets(key, loss: str, batch: int, n_out: int, labels: bool = True):
    if loss == "cross_entropy" and labels:
        return jax.random.randint(key, (batch,), 0, n_out)
    if loss == "cross_entropy":
        return jax.nn.softmax(jax.random.normal(key, (batch, n_out), jnp.float64))
    if loss == "binary_cross_entropy":
        return jax.random.uniform(key, (batch, n_out), jnp.float64)
    return jax.random.normal(key, (batch, n_out), jnp.float64)


def make_problem(net: bp.MLP, batch: int, seed: int, labels: bool = True):
    k_p, k_x, k_y, k_v = jax.random.split(jax.random.key(seed), 4)
    params = net.init(k_p, jnp.float64)
    # perturb the zero biases, so that every bias leaf is exercised
    params = [
        {"W": p["W"], "b": 0.3 * jax.random.normal(k, p["b"].shape, jnp.float64)}
        for p, k in zip(params, jax.random.split(k_p, len(params)), strict=True)
    ]
    x = jax.random.normal(k_x, (batch, net.sizes[0]), jnp.float64)
    y = make_targets(k_y, net.objective.name, batch, net.sizes[-1], labels)
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(k_v, flat.shape, jnp.float64))
    return params, x, y, v


@functools.cache
def compiled(acts: tuple[str, ...], loss: str, sizes: tuple[int, ...], jit: bool, lm: bool):
    """One function computing both sides (a single compilation per architecture)."""
    net = bp.MLP(sizes, acts, loss)

    def both(params, x, y, v):
        got, want = manual(net, params, x, y, v), reference(acts, loss, params, x, y, v)
        if not lm:
            del got["lm_step"], want["lm_step"]
        return got, want

    return net, (jax.jit(both) if jit else both)


def check_all(acts, loss, sizes, batch, seed, *, jit=True, labels=True, lm=False) -> None:
    with jax.enable_x64(True):
        net, run = compiled(tuple(acts), loss, tuple(sizes), jit, lm)
        params, x, y, v = make_problem(net, batch, seed, labels)
        got, want = run(params, x, y, v)
        for name in ("batch_grad", "batch_l2_grad", "sum_grad_squared", "clipped_grad", "hvp"):
            assert_close(got[name], want[name], name)
        assert_close(got["variance"], want["variance"], "variance", floor=got["sum_grad_squared"])
        assert_close(got["diag_ggn"], want["diag_ggn"], "diag_ggn")
        if lm:
            assert_close(got["lm_step"], want["lm_step"], "lm_step")
        if batch == 1:  # KFAC is exact for one example, at every depth
            for l, factors in enumerate(got["kfac"]):
                block = ggn_block_of_layer(want["ggn"], params, l)
                assert_close(kfac_block(factors), block, f"kfac[{l}]")


# -- every activation, every output pair ---------------------------------------------------------

# the canonical pairs (closed-form H_n), then every other pair a loss accepts (the general route:
# H_n by jax.hessian and eigh, possibly indefinite); the hidden activation runs through all
OUTPUT_PAIRS = (
    *((loss, out) for loss, out in CANONICAL_OUTPUT.items()),
    *(("squared_error", name) for name in ACTIVATION_NAMES if name != "identity"),
    ("binary_cross_entropy", "softmax"),
)
CASES = [
    (ACTIVATION_NAMES[i % len(ACTIVATION_NAMES)], loss, out)
    for i, (loss, out) in enumerate(OUTPUT_PAIRS)
]


@pytest.mark.slow
@pytest.mark.parametrize(("hidden", "loss", "output"), CASES)
def test_every_activation_and_output_pair(hidden, loss, output):
    check_all((hidden, output), loss, (3, 4, 3), 4, seed=1)


@pytest.mark.slow
def test_eager_and_jitted(maybe_jit):
    """Eagerly and under jit, each function against the (jitted) reference."""
    hidden, loss, output = CASES[0]
    with jax.enable_x64(True):
        net, run = compiled((hidden, output), loss, (3, 4, 3), True, False)
        params, x, y, v = make_problem(net, 4, 3)
        _, want = run(params, x, y, v)
        for name in ("batch_grad", "batch_l2_grad", "sum_grad_squared", "clipped_grad", "diag_ggn"):
            fn = getattr(bx, name)
            extra = (MAX_NORM,) if name == "clipped_grad" else ()
            got = maybe_jit(lambda p, x, y, fn=fn, extra=extra: fn(net, p, x, y, *extra))(
                params, x, y
            )
            assert_close(got, want[name], name)
        assert_close(maybe_jit(functools.partial(bx.hvp, net))(params, x, y, v), want["hvp"], "hvp")


@pytest.mark.slow
def test_kfac_is_exact_for_one_example_at_every_depth():
    """Three layers, cross-entropy with a probability target (the Hessian scales by Σ_j y_j)."""
    check_all(("tanh", "relu", "softmax"), "cross_entropy", (3, 4, 3, 3), 1, seed=5, labels=False)


@pytest.mark.slow
def test_levenberg_marquardt_step_solves_the_damped_ggn_system():
    check_all(("elu", "softmax"), "cross_entropy", (3, 4, 3), 5, seed=6, lm=True)


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 4))
    loss = draw(st.sampled_from(sorted(CANONICAL_OUTPUT)))
    hidden = tuple(draw(st.sampled_from(ACTIVATION_NAMES)) for _ in range(depth - 1))
    if loss == "squared_error":
        output = draw(st.sampled_from(ACTIVATION_NAMES))
    else:
        output = CANONICAL_OUTPUT[loss]
    sizes = tuple(draw(st.integers(1, 4)) for _ in range(depth + 1))
    if loss == "cross_entropy":
        sizes = (*sizes[:-1], max(sizes[-1], 2))
    return (*hidden, output), loss, sizes, draw(st.integers(1, 9)), draw(st.integers(0, 2**16))


@pytest.mark.slow
@settings(max_examples=4)
@given(architectures())
def test_random_architectures(arch):
    acts, loss, sizes, batch, seed = arch
    check_all(acts, loss, sizes, batch, seed)


# -- the other promises --------------------------------------------------------------------------


@pytest.mark.slow
def test_serial_networks_of_dense_layers_agree_with_the_mlp(x64, key):
    mlp = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    net = bp.serial(
        bp.Dense(4, "tanh"), bp.Dense(2, "softmax"), loss="cross_entropy", input_shape=(3,)
    )
    params, x, y, v = make_problem(mlp, 5, 0)
    for fn in (bx.batch_l2_grad, bx.kfac_factors):
        assert_close(fn(net, params, x, y), fn(mlp, params, x, y), fn.__name__, rtol=0.0)
    assert_close(bx.hvp(net, params, x, y, v), bx.hvp(mlp, params, x, y, v), "hvp", rtol=1e-14)


def test_vmap_over_batches_and_jit_with_static_net(x64):
    net = bp.MLP((3, 4, 2), ("relu", "identity"), "squared_error")
    params = net.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (2, 5, 2), jnp.float64)
    fn = jax.jit(bx.batch_l2_grad, static_argnums=0)
    stacked = jax.vmap(lambda x, y: fn(net, params, x, y))(xs, ys)
    for i in range(2):
        assert_close(
            jax.tree.map(lambda s, i=i: s[i], stacked), fn(net, params, xs[i], ys[i]), "l2"
        )


def test_clipped_grad_clips_each_example_to_max_norm(x64):
    net = bp.MLP((3, 4, 2), ("tanh", "identity"), "squared_error")
    params, x, y, _ = make_problem(net, 6, 0)
    per_ex = bx.batch_grad(net, params, x, y)
    norms = np.sqrt(
        sum(np.asarray(v) for v in jax.tree.leaves(bx.batch_l2_grad(net, params, x, y)))
    )
    assert norms.min() < 2.5 < norms.max()  # some are clipped and some are not
    clipped = bx.clipped_grad(net, params, x, y, jnp.asarray(2.5))
    scale = np.minimum(1.0, 2.5 / norms)
    want = jax.tree.map(lambda g: np.einsum("n,n...->...", scale, np.asarray(g)) / 6, per_ex)
    assert_close(clipped, want, "clipped_grad")
    # a max_norm above every norm leaves the plain gradient
    assert_close(bx.clipped_grad(net, params, x, y, 1e9), net.value_and_grad(params, x, y)[1], "g")


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(CANONICAL_OUTPUT))
def test_diag_ggn_mc_is_an_unbiased_estimate(x64, loss):
    net = bp.MLP((3, 4, 3), ("tanh", CANONICAL_OUTPUT[loss]), loss)
    params, x, y, _ = make_problem(net, 4, 0)
    exact = bx.diag_ggn(net, params, x, y)
    fn = jax.jit(bx.diag_ggn_mc, static_argnums=0, static_argnames="mc_samples")
    estimate = fn(net, params, x, y, jax.random.key(7), mc_samples=20_000)
    assert_close(estimate, exact, "diag_ggn_mc", rtol=0.05)
    again = fn(net, params, x, y, jax.random.key(7), mc_samples=20_000)
    assert_close(again, estimate, "same key", rtol=0.0)


def test_kfac_precondition_inverts_the_damped_kronecker_product(x64):
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params, x, y, _ = make_problem(net, 5, 0)
    factors = bx.kfac_factors(net, params, x, y)
    _, grads = net.value_and_grad(params, x, y)
    got = bx.kfac_precondition(grads, factors, damping=1e-3)
    opt = optax.chain(bx.kfac_preconditioner(damping=1e-3), optax.scale(-1.0))
    state = opt.init(params)
    updates, _ = opt.update(grads, state, params, kfac_factors=factors)
    for l, (g, f) in enumerate(zip(grads, factors, strict=True)):
        w_bar = np.concatenate([g["W"], g["b"][:, None]], axis=1)
        n_out, n_in1 = w_bar.shape
        damped = np.kron(f.G + 1e-3 * np.eye(n_out), f.A + 1e-3 * np.eye(n_in1))
        want = np.linalg.solve(damped, w_bar.ravel()).reshape(n_out, n_in1)
        assert_close(got[l], {"W": want[:, :-1], "b": want[:, -1]}, f"kfac[{l}]", rtol=1e-9)
        assert_close(updates[l], jax.tree.map(lambda t: -t, got[l]), "optax", rtol=1e-14)


@pytest.mark.slow
def test_levenberg_marquardt_beats_sgd_on_a_small_regression():
    """Same steps, same start: damped Gauss-Newton reaches a far lower loss than SGD."""
    with jax.enable_x64(True):
        net = bp.MLP((2, 8, 1), ("tanh", "identity"), "squared_error")
        x = jax.random.uniform(jax.random.key(1), (64, 2), jnp.float64, -2.0, 2.0)
        y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])
        start = net.init(jax.random.key(0), jnp.float64)
        lm = jax.jit(bx.levenberg_marquardt_step, static_argnums=0)
        sgd = jax.jit(
            lambda p: jax.tree.map(lambda w, g: w - 0.5 * g, p, net.value_and_grad(p, x, y)[1])
        )
        p_lm, p_sgd = start, start
        for _ in range(20):
            p_lm, p_sgd = lm(net, p_lm, x, y, 1e-2), sgd(p_sgd)
        loss_lm, loss_sgd = float(net.loss(p_lm, x, y)), float(net.loss(p_sgd, x, y))
        assert loss_lm < 0.1 * loss_sgd, (loss_lm, loss_sgd)


def test_check_curvature_reports_every_leaf(x64):
    net = bp.MLP((3, 4, 2), ("gelu", "sigmoid"), "binary_cross_entropy")
    params, x, y, v = make_problem(net, 5, 0)
    report = bx.check_curvature(net, params, x, y, v=v)
    assert report.ok, str(report)
    assert {row.reference for row in report.rows} == {
        "jax.hessian (hvp)",
        "jax.jacobian GGN (diag_ggn)",
        "jax.hessian diagonal (diag_hessian)",
    }
    assert len(report.rows) == 3 * 4
    assert report.dtype == "float64" and report.first_bad_layer is None


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def small():
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    return net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_bad_max_norm(small, max_norm):
    with pytest.raises(ValueError, match="max_norm: expected a positive number"):
        bx.clipped_grad(*small, max_norm)


def test_bad_v(small):
    net, params, x, y = small
    with pytest.raises(ValueError, match="v: expected the params' tree"):
        bx.hvp(net, params, x, y, params[:1])
    wrong = [dict(p) for p in params]
    wrong[1] = {"W": jnp.ones((3, 4)), "b": params[1]["b"]}
    with pytest.raises(ValueError, match=r"v\[1\]\['W'\]: expected shape \(2, 4\), got \(3, 4\)"):
        jax.jit(bx.hvp, static_argnums=0)(net, params, x, y, wrong)


def test_bad_net(small):
    _, params, x, y = small
    with pytest.raises(TypeError, match=r"net: expected a bpjax\.MLP"):
        bx.diag_ggn(object(), params, x, y)
    with pytest.raises(TypeError, match=r"net: expected a bpjax\.MLP"):
        bx.batch_grad(bp.serial(bp.Dense(2)), params, x, y)  # a block without a loss


def test_params_of_another_network_are_named(small):
    _, params, x, y = small

    class Identity:  # a layer with the contract and no params
        def init(self, key, in_shape, dtype=jnp.float32):
            return {}, in_shape

        def forward(self, params, x):
            return x, None

        def backward(self, params, cache, dy):
            return {}, dy

    net = bp.serial(Identity(), bp.Dense(2, "softmax"), loss="cross_entropy", input_shape=(3,))
    with pytest.raises(ValueError, match=r"params\[0\]: expected a dict with no keys, got \['W'"):
        bx.batch_grad(net, params, x, y)


def test_bad_params_and_x_are_reported_by_the_network(small):
    net, params, x, y = small
    with pytest.raises(ValueError, match="params: do not match"):
        bx.batch_l2_grad(net, params[:1], x, y)
    with pytest.raises(ValueError, match="x: expected shape"):
        bx.sum_grad_squared(net, params, x[:, :2], y)


def test_diag_ggn_mc_needs_a_canonical_pair(small):
    _, _, x, _ = small
    net = bp.MLP((3, 4, 2), ("tanh", "tanh"), "squared_error")
    params = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"'tanh' \+ 'squared_error'\. Use diag_ggn"):
        bx.diag_ggn_mc(net, params, x, jnp.ones((5, 2)), jax.random.key(0))
    with pytest.raises(ValueError, match="mc_samples: expected a positive integer"):
        bx.diag_ggn_mc(net, params, x, jnp.ones((5, 2)), jax.random.key(0), mc_samples=0)


def test_bad_damping_and_quantities(small):
    net, params, x, y = small
    with pytest.raises(ValueError, match="damping: expected a positive number"):
        bx.levenberg_marquardt_step(net, params, x, y, 0.0)
    with pytest.raises(ValueError, match="damping: expected a positive number"):
        bx.kfac_preconditioner(damping=-1.0)
    with pytest.raises(ValueError, match="quantities: unknown"):
        bx.check_curvature(net, params, x, y, quantities=("hessian",))
    with pytest.raises(ValueError, match="kfac_factors: kfac_preconditioner's update needs"):
        opt = bx.kfac_preconditioner(damping=1.0)
        opt.update(params, opt.init(params), params)


@pytest.mark.parametrize("targets", ["labels", "probabilities", "counts", "positions"])
@pytest.mark.parametrize("maybe_jit", [jax.jit, lambda f: f], ids=["jit", "nojit"])
def test_minimal_softmax_factor_has_one_column_fewer_and_the_same_hessian(x64, targets, maybe_jit):
    # H_n by jax.hessian of the per-position cross-entropy; S Sᵀ against it at RTOL: both
    # factors are a few float64 products per entry (~1e-16 relative)
    n, batch = 5, 4
    rng = np.random.default_rng(0)
    positions = (3,) if targets == "positions" else ()
    z = jnp.asarray(rng.normal(size=(batch, *positions, n)) * 3)
    if targets == "probabilities":
        y = jnp.asarray(rng.dirichlet(np.ones(n), size=batch))
    elif targets == "counts":  # σ = Σ_j y_j ≠ 1 scales H
        y = jnp.asarray(rng.uniform(0, 2, size=(batch, n)))
    else:
        y = jnp.asarray(rng.integers(0, n, size=(batch, *positions)))
    net = bp.serial(
        *([bp.layers.Dense(n, "softmax")]), loss="cross_entropy",
        input_shape=(*positions, 2),
    )  # fmt: skip
    rows_y = y.reshape(-1, *y.shape[1 + len(positions) :])  # as net.check_targets gives them

    def row_loss(z_r, y_r):
        log_p = jax.nn.log_softmax(z_r)
        return -log_p[y_r] if y_r.ndim == 0 else -jnp.sum(y_r * log_p)

    rows = jax.vmap(jax.hessian(row_loss))(z.reshape(-1, n), rows_y)
    p_count = int(np.prod(positions, dtype=int))
    hess = np.zeros((batch, p_count * n, p_count * n))  # block diagonal over positions, / P
    for b in range(batch):
        for q in range(p_count):
            hess[b, q * n : (q + 1) * n, q * n : (q + 1) * n] = rows[b * p_count + q] / p_count
    for minimal, k in ((False, n), (True, n - 1)):
        factor = maybe_jit(lambda z, y, m=minimal: bx.loss_hessian_factor(net, z, y, minimal=m)[0])(
            z, rows_y
        )
        assert factor.shape == (batch, *positions, n, p_count * k)
        s = np.asarray(factor).reshape(batch, p_count * n, p_count * k)
        np.testing.assert_allclose(s @ s.transpose(0, 2, 1), hess, rtol=0, atol=RTOL)


def test_minimal_softmax_factor_keeps_the_poison_and_one_class(x64):
    net = bp.serial(bp.layers.Dense(3, "softmax"), loss="cross_entropy", input_shape=(2,))
    z = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    labels = jnp.asarray([0, 7, 2])
    with pytest.raises(ValueError, match=r"y: .*7"):  # concrete: refused, as net.loss refuses it
        bx.loss_hessian_factor(net, z, labels, minimal=True)
    factor = jax.jit(lambda z, y: bx.loss_hessian_factor(net, z, y, minimal=True)[0])(z, labels)
    assert factor.shape == (3, 3, 2)  # traced: the example's rows are NaN
    np.testing.assert_array_equal(np.isnan(factor).all(axis=(1, 2)), [False, True, False])
    # one class: H = 0 has rank 0, and the factor keeps its one (zero) column
    net1 = bp.serial(bp.layers.Dense(1, "softmax"), loss="cross_entropy", input_shape=(2,))
    one = bx.loss_hessian_factor(net1, z[:, :1], jnp.zeros(3, int), minimal=True)[0]
    assert one.shape == (3, 1, 1)
    np.testing.assert_array_equal(one, 0.0)


@pytest.mark.parametrize(
    ("z_shape", "y", "error", "match"),
    [
        ((5, 3), np.zeros(5, int), ValueError, r"^z: expected .*\(batch, \.\.\., 4\)"),
        ((4,), np.zeros(1, int), ValueError, "^z: expected"),
        ((5, 4), np.zeros(3, int), ValueError, r"^y: .*\(5,\)"),
        ((5, 4), np.full((5, 3), 0.25), ValueError, r"^y: .*\(5, 4\)"),
        ((5, 4), np.zeros(5), TypeError, "^y: cross_entropy takes integer class labels"),
        ((2, 3, 4), np.zeros((2, 3), int), ValueError, r"^y: .*\(6,\)"),  # rows, not (B, T)
    ],
)
@pytest.mark.parametrize("maybe_jit", [jax.jit, lambda f: f], ids=["jit", "nojit"])
def test_loss_hessian_factor_names_z_and_y_that_do_not_fit(z_shape, y, error, match, maybe_jit):
    seq = len(z_shape) == 3
    net = bp.serial(
        bp.layers.Dense(4, "softmax"), loss="cross_entropy", input_shape=(3, 2) if seq else (2,)
    )
    with pytest.raises(error, match=match):
        maybe_jit(lambda z, y: bx.loss_hessian_factor(net, z, y))(jnp.ones(z_shape), y)
