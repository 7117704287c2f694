"""One test per observed hole in the gradient-checking harness, each asserting the right behaviour.

Written against the public API only (``bp.check_grads``, ``bp.check_mlp``, ``bp.check_network``,
``bpjax.testing.check_backward``), so they hold the harness to the same standard whatever its
tolerance engine looks like inside. Three families:

- misses: a real bug (well above the computation's own roundoff, measured in each test) that a
  check must fail, naming the bugged leaf;
- false alarms: right code that a check must pass;
- crashes and reports: malformed input must give a failing row or a short ``TypeError`` naming the
  argument, and the report must be readable.

Every precondition a test relies on (a leaf's roundoff, its size next to the others, which of two
gradients is nearer the truth) is measured and asserted in the test, with the margin beside it.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpjax as bp
from bpjax.layers import Dense
from bpjax.testing import check_backward
from tests.test_check import _scale_layer  # the user layer y = x ∘ s, broken by factors

# -- helpers ----------------------------------------------------------------------------------


def _f64(tree):
    """A float64 copy of every floating leaf (call inside ``jax.enable_x64(True)``)."""
    return jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        tree,
    )


def _leaf_roundoff(loss, params, *args):
    """Per leaf: ``‖g_dtype − g64‖ / ‖g64‖`` of ``jax.grad(loss)`` in the params' dtype vs float64,
    and the float64 gradient's leaves (host float64 arrays)."""
    low = [np.asarray(g, np.float64) for g in jax.tree.leaves(jax.grad(loss)(params, *args))]
    with jax.enable_x64(True):
        g64 = jax.grad(loss)(_f64(params), *_f64(args))
        high = [np.asarray(g, np.float64) for g in jax.tree.leaves(g64)]
    ratios = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(low, high, strict=True)]
    return [float(r) for r in ratios], high


def _scaled_leaf(grads, layer, name, factor):
    """A copy of an MLP's grads with ``grads[layer][name]`` multiplied by ``factor``."""
    out = [dict(g) for g in grads]
    leaf = out[layer][name]
    out[layer][name] = (leaf.astype(jnp.float32) * factor).astype(leaf.dtype)
    return out


# == misses ==================================================================================


@pytest.mark.slow
def test_zeroed_first_layer_weight_gradient_with_tiny_inputs_is_caught():
    """Hole 1 (miss): inputs ~1e-6 make ∇W¹ ~1e-7, below ``rtol × max|∇f|`` of the whole tree, so
    a backward returning zeros for ∇W¹ passed. A zeroed leaf is a 100% error: it must fail, named.
    """
    net = bp.MLP((4, 8, 3), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 4)) * 1e-6
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)

    roundoff, g64 = _leaf_roundoff(net.loss, params, x, y)
    assert np.any(g64[0] != 0)  # there is a gradient to lose
    assert roundoff[0] < 1e-2  # float32 resolves ∇W¹ (the bug is 100%: margin > 100×)

    def manual(p, xs, ys):
        value, grads = net.value_and_grad(p, xs, ys)
        grads = [dict(g) for g in grads]
        grads[0]["W"] = jnp.zeros_like(grads[0]["W"])
        return value, grads

    def backward(p, cache, ys):
        bw = net.backward(p, cache, ys)
        grads = [dict(g) for g in bw.grads]
        grads[0]["W"] = jnp.zeros_like(grads[0]["W"])
        return bw._replace(grads=grads)

    report = bp.check_grads(manual, net.loss, params, x, y)
    assert not report.ok and "[0]['W']" in report.failing_paths, str(report)
    report = bp.check_mlp(net, params, x, y, backward=backward)
    assert not report.ok and "[0]['W']" in report.failing_paths, str(report)


def test_scaled_small_leaf_is_caught():
    """Hole 2 (miss): a leaf whose gradient is small next to the tree's largest is judged against
    ``atol = rtol × max|∇f|`` of the whole tree, so scaling it by ``1 + 1e-3`` passed.

    One softmax layer, weights ~1e-3 and inputs ~100: ∇W = (1/B) δᵀx carries the inputs' scale,
    ∇b = (1/B) Σ_n δ_n does not.
    """
    net = bp.MLP((4, 3), ("softmax",), "cross_entropy")
    rng = np.random.default_rng(0)
    params = [
        {
            "W": jnp.asarray(1e-3 * rng.standard_normal((3, 4)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.standard_normal(3), jnp.float32),
        }
    ]
    x = jnp.asarray(100 * rng.standard_normal((16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)

    roundoff, g64 = _leaf_roundoff(net.loss, params, x, y)
    leaf_max, tree_max = np.max(np.abs(g64[1])), max(np.max(np.abs(g)) for g in g64)
    assert leaf_max < 0.1 * tree_max  # the precondition of the hole (leaves: [0]['W'], [0]['b'])
    assert roundoff[1] < 1e-5  # ∇b's own float32 roundoff: the 1e-3 bug is > 100× above it

    def manual(p, xs, ys):
        value, grads = net.value_and_grad(p, xs, ys)
        return value, _scaled_leaf(grads, 0, "b", 1 + 1e-3)

    report = bp.check_grads(manual, net.loss, params, x, y)
    assert not report.ok and "[0]['b']" in report.failing_paths, str(report)


@pytest.mark.slow
def test_bfloat16_scaled_weight_gradient_is_caught_by_both_checkers():
    """Hole 3 (miss): bfloat16's default ``rtol = 1e-1`` let ∇W¹ × 1.05 pass ``check_mlp``, though
    the leaf's own bfloat16 roundoff is far below 5%; ``check_backward`` on the same computation
    (the loss's VJP with respect to the params) must agree: both fail.
    """
    net = bp.MLP((4, 8, 3), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (16, 4), jnp.bfloat16)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)

    roundoff, _ = _leaf_roundoff(net.loss, params, x, y)
    assert roundoff[0] < 0.0125  # bfloat16's own error on ∇W¹ is under a quarter of the 5% bug

    def backward(p, cache, ys):
        bw = net.backward(p, cache, ys)
        return bw._replace(grads=_scaled_leaf(bw.grads, 0, "W", 1.05))

    report = bp.check_mlp(net, params, x, y, backward=backward)
    assert not report.ok and "[0]['W']" in report.failing_paths, str(report)

    def fwd(p, xs, ys):
        return net.loss(p, xs, ys), (p, xs, ys)

    def bwd(res, c):
        p, xs, ys = res
        _, cache = net.forward(p, xs)
        grads = backward(p, cache, ys).grads
        return jax.tree.map(lambda g: g * c, grads), None, None

    report = check_backward(fwd, bwd, params, x, y, argnums=0)
    assert not report.ok, str(report)
    assert any("[0]['W']" in path for path in report.failing_paths), str(report)


@pytest.mark.slow
def test_check_network_blames_the_custom_layer_whose_backward_is_wrong():
    """Hole 4 (blame): a custom layer (layer 2) whose backward gets both its params gradient and its
    dx wrong was reported as "First bad layer in backprop order: 1 (Dense)", because a failing δ^1
    outranked the failing ∇s of the layer above it. Layer 2 is where backprop first goes wrong.
    """
    net = bp.serial(
        Dense(6, "tanh"), _scale_layer(1.01, 1.01), Dense(3, "softmax"), loss="cross_entropy",
        input_shape=(4,),
    )  # fmt: skip
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)

    report = bp.check_network(net, params, x, y)
    summary = report.summary()
    assert not report.ok
    assert "[1]['s']" in report.failing_paths, str(report)  # its params gradient (1% off)
    assert report.first_bad_layer == 2, summary
    assert "2 (Layer" in summary, summary
    assert not re.search(r"first bad layer[^.;]*: 1 \(Dense\)", summary, re.IGNORECASE), summary


# == false alarms ============================================================================


def _newton_lambert_w(x):
    """w with w eʷ = x by Newton's method in a ``lax.while_loop`` (x > 0)."""

    def cond(state):
        w, i, step = state
        return (i < 100) & (jnp.abs(step) > 1e-7 * jnp.maximum(1.0, jnp.abs(w)))

    def body(state):
        w, i, _ = state
        ew = jnp.exp(w)
        step = (w * ew - x) / (ew * (1 + w))
        return w - step, i + 1, step

    return lax.while_loop(cond, body, (jnp.log1p(x), 0, jnp.ones_like(x)))[0]


@jax.custom_vjp
def lambert_w(x):
    return _newton_lambert_w(x)


def _lambert_fwd(x):
    w = _newton_lambert_w(x)
    return w, (x, w)


def _lambert_bwd(res, g):
    x, w = res
    return (g * w / (x * (1 + w)),)  # W'(x) = W / (x (1 + W))


lambert_w.defvjp(_lambert_fwd, _lambert_bwd)


def _lambert_reference(x):
    """Differentiable plain JAX: one Newton step from the stopped solution w₀ has derivative
    ``1 / (e^{w₀} (1 + w₀)) = W'(x)`` at w₀ = W(x) (reverse mode cannot go through the loop)."""
    w = lax.stop_gradient(_newton_lambert_w(x))
    ew = jnp.exp(w)
    return w - (w * ew - x) / (ew * (1 + w))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("x", [0.5, 3.0])
def test_lambert_w_with_a_while_loop_forward_passes(x, jit):
    """Hole 5 (false alarm): the ``no_retrace`` contract counted the traces an eager
    ``lax.while_loop`` makes of its body on every call ("called as it is: 1 new traces") as a
    backward that rebuilds its jit; the VJP is right and traced once under jit.

    ``reference=`` is the differentiable form: ``check_backward(lambert_w, None, x)`` with the
    default reference ``lambert_w.fun`` raises JAX's "Reverse-mode differentiation does not work
    for lax.while_loop" today (reported separately).
    """
    report = check_backward(lambert_w, None, jnp.float32(x), reference=_lambert_reference, jit=jit)
    assert report.ok, str(report)


def _lse_rows(x):
    """Plain-JAX log Σ exp over rows: autodiff gives 0/0 = NaN on a row of all −inf."""
    return jnp.log(jnp.sum(jnp.exp(x), axis=1))


def _lse_fwd(x):
    m = jnp.max(x, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    out = jnp.log(jnp.sum(jnp.exp(x - m), axis=1)) + m[:, 0]
    return out, (x, out)


def _lse_bwd_guarded(res, g):
    """softmax(x) g, and 0 on a row whose log-sum-exp is −inf (no mass: nothing to move)."""
    x, out = res
    finite = jnp.isfinite(out)[:, None]
    p = jnp.exp(x - jnp.where(finite, out[:, None], jnp.zeros_like(out[:, None])))
    return (g[:, None] * jnp.where(finite, p, jnp.zeros_like(p)),)


def _lse_bwd_nan(res, g):
    """The textbook rule: NaN on the −inf row, exactly where plain autodiff is NaN too."""
    x, out = res
    return (g[:, None] * jnp.exp(x - out[:, None]),)


@pytest.mark.parametrize("backward", [_lse_bwd_guarded, _lse_bwd_nan], ids=["guarded", "nan"])
@pytest.mark.parametrize("reference", ["jax.vjp", "jvp", "finite_diff", "taylor"])
def test_nan_guarded_logsumexp_passes_every_row_type(reference, backward):
    """Hole 6 (false alarm): on a row of all −inf the reference's cotangent is 0/0 (undefined).
    The jax.vjp rows left those elements out, but the jvp, finite_diff and taylor rows failed on
    ``⟨c, f⟩ = ±inf`` and NaN directional derivatives. Undefined reference elements are reported,
    not judged, in every row type; a manual NaN at the same elements is no failure either.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32).at[1].set(-jnp.inf)
    _, pullback = jax.vjp(_lse_rows, x)
    plain = np.asarray(pullback(jnp.ones(3, jnp.float32))[0])
    assert np.all(np.isnan(plain[1])) and np.all(np.isfinite(plain[[0, 2]]))  # the premise

    report = check_backward(_lse_fwd, backward, x, reference=_lse_rows, references=(reference,))
    assert report.ok, str(report)
    if reference == "jax.vjp" and backward is _lse_bwd_guarded:
        # reported: the note names the first undefined element
        assert any("(1, 0)" in row.note for row in report.rows), str(report)


def _zero_path(w, x, a):
    """Mathematically 0 for every w: ``Σ a ∘ ((x ∘ w) ∘ x − w ∘ (x ∘ x))``; its gradient in w is
    ``(a x) x − a (x x)``, which float32 rounds to about ``u |a| x²`` instead of 0."""
    return jnp.sum(a * ((x * w) * x - w * (x * x)))


def _zero_path_manual(w, x, a):
    """The same gradient summed in the other order: roundoff of the same size, other sign."""
    return _zero_path(w, x, a), a * (x * x) - (a * x) * x


def test_identically_zero_cotangent_computed_with_roundoff_passes():
    """Hole 7 (false alarm): where the true gradient is identically 0, the allowance was
    ``rtol × max|g_ref| = 0``-like, so a backward whose cancelling sums leave float32 roundoff
    failed. The allowance must come from the computation's roundoff: here autodiff's own error.
    """
    rng = np.random.default_rng(0)
    w, x, a = (jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(3))
    _, manual = _zero_path_manual(w, x, a)
    autodiff = jax.grad(_zero_path)(w, x, a)
    u = float(jnp.finfo(jnp.float32).eps) / 2
    bound = 4 * u * float(jnp.max(jnp.abs(a) * x * x))  # a few roundings of the largest term
    assert 0 < float(jnp.max(jnp.abs(manual))) <= bound  # the manual's error: roundoff alone
    assert float(jnp.max(jnp.abs(autodiff))) <= bound  # and autodiff's, no smaller in kind

    report = bp.check_grads(_zero_path_manual, _zero_path, w, x, a)
    assert report.ok, str(report)

    def fwd(w, x, a):
        return _zero_path(w, x, a), (w, x, a)

    def bwd(res, c):
        return c * _zero_path_manual(*res)[1], None, None

    report = check_backward(fwd, bwd, w, x, a, argnums=0)
    assert report.ok, str(report)


def _softmax_fwd(z):
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True), e


def _softmax_bwd_eps(e, g):
    """softmax's VJP with the normalisation ``Σe (1 + 2e-10)``: 2e-10 relative off the true
    derivative, which float32 (u = 6e-8) rounds away and float64 does not."""
    total = jnp.sum(e, axis=-1, keepdims=True)
    s = e / (total + 2e-10 * total)
    return (s * (g - jnp.sum(g * s, axis=-1, keepdims=True)),)


@pytest.mark.slow
def test_float32_check_judges_at_float32_precision():
    """Hole 8 (false alarm): the float64 shadow of the backward was held to float64's precision,
    so a rule 2e-10 relative off the true derivative (an epsilon in a normalisation) failed a
    float32 check. 2e-10 is 300× below float32's unit roundoff: a float32 check must pass it.
    """
    z = jax.random.normal(jax.random.key(0), (4, 5))
    g = jax.random.normal(jax.random.key(1), (4, 5))
    with jax.enable_x64(True):  # the premise: in float64 the rule is 2e-10 relative off
        z64, g64 = _f64((z, g))
        _, pullback = jax.vjp(lambda z: _softmax_fwd(z)[0], z64)
        exact, off = pullback(g64)[0], _softmax_bwd_eps(_softmax_fwd(z64)[1], g64)[0]
        rel = float(jnp.linalg.norm(off - exact) / jnp.linalg.norm(exact))
    assert 1e-10 < rel < 1e-9  # 2e-10 up to the float64 roundoff of the two formulas
    report = check_backward(_softmax_fwd, _softmax_bwd_eps, z, cotangent=g)
    assert report.ok, str(report)


def _bce_naive(w, x, y):
    """Binary cross-entropy from ``log σ(z)`` and ``log σ(−z) = log(1 − σ(z))``, as written from
    the maths: finite, but its autodiff goes through ``σ' = σ (1 − σ)``."""
    z = x @ w
    return -jnp.mean(y * jnp.log(jax.nn.sigmoid(z)) + (1 - y) * jnp.log(jax.nn.sigmoid(-z)))


def _bce_stable(w, x, y):
    """The same loss as softplus terms: ``y softplus(−z) + (1 − y) softplus(z)``."""
    z = x @ w
    return jnp.mean(y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z))


def _bce_manual(w, x, y):
    """``δ = σ(z) − y``, written ``−σ(−z)`` where y = 1 so it keeps its digits when σ(z) ≈ 1."""
    z = x @ w
    delta = jnp.where(y > 0.5, -jax.nn.sigmoid(-z), jax.nn.sigmoid(z))
    return _bce_stable(w, x, y), x.T @ delta / z.shape[0]


def test_saturated_sigmoid_bce_manual_more_accurate_than_float32_autodiff_passes():
    """Hole 9 (false alarm): with confident right labels and logits of ±(17.5–20), float32 rounds
    σ(|z|) to 1 and ``jax.grad`` of the naive loss loses every term (σ'(|z|) = σ (1 − σ) = 0);
    a manual gradient that keeps them is nearer the truth, and was failed against float32
    autodiff. Logits stay ≤ 20 so that the float64 shadow of the naive loss is itself accurate
    (its 1 − σ(z) has relative error ≤ ε₆₄ e^{20} ≈ 5e-8).
    """
    rng = np.random.default_rng(0)
    n = 12
    mags = rng.uniform(17.5, 20.0, n)
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    x = np.eye(n)[:, :n] * (mags * signs)[:, None]  # z = x w = ± magnitudes for w = 1
    w = jnp.ones(n, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(signs > 0, jnp.float32)  # confident and right

    autodiff = np.asarray(jax.grad(_bce_naive)(w, x, y), np.float64)
    manual = np.asarray(_bce_manual(w, x, y)[1], np.float64)
    with jax.enable_x64(True):
        truth = np.asarray(jax.grad(_bce_stable)(*_f64((w, x, y))))
    err_manual = np.linalg.norm(manual - truth) / np.linalg.norm(truth)
    err_autodiff = np.linalg.norm(autodiff - truth) / np.linalg.norm(truth)
    assert err_manual < 1e-5 and err_autodiff > 0.1  # the premise, by far more than roundoff

    report = bp.check_grads(_bce_manual, _bce_naive, w, x, y)
    assert report.ok, str(report)


def _shown_allowance(row):
    """What a row shows as its largest passing error: ``allowed``, else the note's allowance."""
    if row.allowed is not None:
        return row.allowed
    match = re.search(r"allowance\s*([-+0-9.eE]+)", row.note)
    assert match, f"a finite_diff row must show its allowance: {row}"
    return float(match.group(1))


def _fd_function(p, x, t):
    """A smooth scalar with some curvature in every direction."""
    return jnp.sum(jnp.sin(p * x)) + 0.5 * jnp.sum(p**3) * x[0]


def _fd_manual(p, x, t):
    """The right gradient scaled by ``1 + t`` (t = 0: right)."""
    g = x * jnp.cos(p * x) + 1.5 * p**2 * x[0]
    return _fd_function(p, x, t), g * (1 + t)


@pytest.mark.slow
def test_finite_diff_rows_fail_exactly_above_their_shown_allowance(x64):
    """Hole 10 (report): a finite_diff row passed or failed against a per-direction allowance but
    showed the largest over its directions (and left out the ``rtol``/``atol`` part), so a row
    could fail with an error below the allowance it showed, or pass above it. For every
    finite_diff row, over bugs sweeping the boundary: failed iff ``max |Δ|`` > its shown allowance.
    """
    rng = np.random.default_rng(0)
    inconsistent = []
    for k in range(3):
        p = jnp.asarray(rng.uniform(-2, 2, 6))
        x = jnp.asarray(rng.uniform(0.5, 3, 6))
        for t in [0.0, *np.geomspace(1e-12, 1e-7, 16)]:
            report = bp.check_grads(
                _fd_manual, _fd_function, p, x, jnp.float64(t), references=("finite_diff",)
            )
            for row in report.rows:
                if row.reference != "finite_diff":
                    continue
                shown = _shown_allowance(row)
                if row.passed != (row.max_abs_err <= shown):
                    inconsistent.append((k, f"{t:.1e}", row.passed, row.max_abs_err, shown))
    assert not inconsistent, inconsistent


# == crashes =================================================================================


def _dense_net():
    net = bp.MLP((3, 5, 2), ("tanh", "softmax"), "cross_entropy")  # W¹ is 5 × 3: not square
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jnp.array([0, 1, 1, 0])
    return net, params, x, y


@pytest.mark.slow
def test_gradient_leaf_of_the_wrong_shape_is_a_failing_row():
    """Hole 11 (crash): a leaf of the wrong shape (Wᵀ for W) crashed the directional rows with
    NumPy's "shape-mismatch for sum"; it must be a failing row whose note gives both shapes."""
    net, params, x, y = _dense_net()

    def manual(p, xs, ys):
        value, grads = net.value_and_grad(p, xs, ys)
        grads = [dict(g) for g in grads]
        grads[0]["W"] = grads[0]["W"].T
        return value, grads

    report = bp.check_grads(manual, net.loss, params, x, y)
    assert not report.ok and "[0]['W']" in report.failing_paths, str(report)
    notes = " ".join(row.note for row in report.failures)
    assert "(3, 5)" in notes and "(5, 3)" in notes, str(report)

    def fwd(x, w):
        return jnp.tanh(x @ w.T), (x, w)

    def bwd(res, g):
        x, w = res
        dz = g * (1 - jnp.tanh(x @ w.T) ** 2)
        return dz @ w, (dz.T @ x).T  # the weight cotangent transposed: (3, 5) for (5, 3)

    report = check_backward(fwd, bwd, x, params[0]["W"])
    assert not report.ok, str(report)
    notes = " ".join(row.note for row in report.failures)
    assert "(3, 5)" in notes and "(5, 3)" in notes, str(report)


@pytest.mark.parametrize("returns", ["grads only", "(grads, value)"])
def test_manual_returning_the_wrong_pair_is_a_type_error_naming_manual(returns):
    """Hole 12 (crash): ``manual`` returning only the grads (a dict unpacks into its keys) or
    ``(grads, value)`` ended in an unpacking or tree error far from the cause; it must be a short
    ``TypeError`` naming ``manual``."""
    p = {"v": jnp.array([0.5, -1.0]), "w": jnp.array([0.3, -0.7])}
    x = jnp.array([1.0, 2.0])

    def f(p, x):
        return jnp.sum(jnp.sin(p["w"] * x)) + jnp.sum(p["v"] ** 2)

    def grads(p, x):
        return {"v": 2 * p["v"], "w": x * jnp.cos(p["w"] * x)}

    def manual(p, x):
        return grads(p, x) if returns == "grads only" else (grads(p, x), f(p, x))

    with pytest.raises(TypeError, match=r"\bmanual\b") as info:
        bp.check_grads(manual, f, p, x)
    assert len(str(info.value)) < 500  # a sentence, not a dump of trees


def test_integer_params_leaf_is_a_type_error_naming_params_and_the_leaf():
    """Hole 13 (crash): an integer params leaf went into ``jax.grad`` and failed there; it must be
    a ``TypeError`` naming ``params`` and the leaf's path."""
    p = {"n": jnp.array([1, 2], jnp.int32), "w": jnp.array([0.3, -0.7])}
    x = jnp.array([1.0, 2.0])

    def f(p, x):
        return jnp.sum(jnp.sin(p["w"] * x))

    def manual(p, x):
        return f(p, x), {"n": jnp.zeros(2, jnp.int32), "w": x * jnp.cos(p["w"] * x)}

    with pytest.raises(TypeError, match=r"\bparams\b") as info:
        bp.check_grads(manual, f, p, x)
    assert "['n']" in str(info.value) and len(str(info.value)) < 500


@pytest.mark.slow
def test_wrong_tree_structure_note_names_the_first_differing_path():
    """Hole 14 (crash/report): a grads tree of another structure was reported with both whole
    treedefs in the note (hundreds of characters here, thousands for a real model); the note must
    name the first path where they differ, in under ~300 characters."""
    keys = [f"encoder_block_{i:02d}_attention_weight" for i in range(8)]
    p = {k: jnp.full((2,), 0.1 * i) for i, k in enumerate(keys)}
    x = jnp.array([1.0, 2.0])

    def f(p, x):
        return sum(jnp.sum(jnp.sin(v * x)) for v in p.values())

    def manual(p, x):
        grads = {k: x * jnp.cos(v * x) for k, v in p.items()}
        grads["encoder_block_05_attention_weights"] = grads.pop("encoder_block_05_attention_weight")
        return f(p, x), grads

    report = bp.check_grads(manual, f, p, x)
    assert not report.ok
    notes = [row.note for row in report.failures if row.note]
    assert notes, str(report)
    assert any("encoder_block_05" in note and len(note) < 300 for note in notes), notes


# == reports =================================================================================


def _sin_cube(p, x):
    return jnp.sum(jnp.sin(p["w"] * x)) + 0.5 * jnp.sum(p["v"] ** 3)


def _sin_cube_wrong_v(p, x):
    """∇v off by 10%."""
    return _sin_cube(p, x), {"w": x * jnp.cos(p["w"] * x), "v": 1.1 * 1.5 * p["v"] ** 2}


def _numbers(text):
    return [float(m) for m in re.findall(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", text)]


def test_report_puts_failures_first_shows_taylor_orders_and_the_worst_values():
    """Hole 15 (report): failing rows were buried in report order, the Taylor rows showed ``nan``
    in their rel-err cell, and a failing row gave the worst index but not the two values there.
    """
    p = {"w": jnp.array([0.3, -0.7, 1.2]), "v": jnp.array([[0.5, -1.0], [2.0, 0.1]])}
    x = jnp.array([1.0, 2.0, -0.5])
    report = bp.check_grads(_sin_cube_wrong_v, _sin_cube, p, x)
    assert not report.ok

    lines = str(report).splitlines()[2 : 2 + len(report.rows)]  # header, rule, then the rows
    status = ["FAIL" in line for line in lines]
    assert status == sorted(status, reverse=True), "\n".join(lines)  # every FAIL before any ok

    for row in report.rows:
        if row.reference == "taylor":
            line = next(ln for ln in lines if ln.startswith(row.path) and "taylor" in ln)
            assert row.order is not None and math.isfinite(row.order), str(report)
            assert "nan" not in line, line

    grad_row = next(r for r in report.failures if r.reference == "jax.grad")
    assert grad_row.path == "['v']" and grad_row.worst_index is not None
    v = np.asarray(p["v"], np.float64)[grad_row.worst_index]
    reference, manual = 1.5 * v**2, 1.1 * 1.5 * v**2  # 10% apart: told apart at 1%
    line = next(ln for ln in lines if ln.startswith("['v']") and "jax.grad" in ln)
    shown = _numbers(line) + [
        float(value)
        for value in grad_row._asdict().values()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    assert any(math.isclose(s, manual, rel_tol=1e-2) for s in shown), line
    assert any(math.isclose(s, reference, rel_tol=1e-2) for s in shown), line
