"""The MLP against JAX autodiff: property tests over random architectures, and the spec's promises.

The reference here is written from the forward maths alone (``z = a Wᵀ + b``, ``a = f(z)`` with
``jax.nn``'s functions, the loss from the logits), never from bpjax's code. Every layer's δ is the
pullback of a cotangent of ones through ``e ↦ (C_n)_n``, where ``e^l`` is added to ``z^l``: that is
``jax.vjp`` of the sub-network above ``z^l``, and ``∂C_n/∂z^l_n`` row by row.

Tolerances: norm-relative per leaf, 1e-10 in float64 and 1e-5 in float32, with two exceptions
that are properties of the example, not of the code: a float32 leaf that is ill-conditioned in its
own right passes when it is as accurate as float32 autodiff against the float64 reference, and the
generic binary cross-entropy, whose gradient has condition number ``1/min(a, 1 − a)``, is held to
``max(rtol, 8 ε κ)`` (see ``assert_trees_close`` and ``check``).

Compilation dominates the cost of these tests (about a second per architecture and dtype under
``jit``, and tens of milliseconds per new primitive shape eagerly), so the bulk of the examples
(200 in the ci profile) draws its architecture from a fixed pool of random ones and varies the
data; a smaller sample (20) draws architectures freely over the whole range, and the eager sample
(20) keeps its widths in {2, 3} so eager primitives compile once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, currently_in_test_context, given, settings
from hypothesis import strategies as st

import bpjax as bp
from tests.reference import JAX_NN_FORWARD

# -- the reference: plain JAX from the forward maths --------------------------------------------

ACTIVATION_NAMES = tuple(JAX_NN_FORWARD)
# (loss, output activation) pairs a loss accepts; squared_error takes any output
OUTPUTS = (
    *(("squared_error", name) for name in ACTIVATION_NAMES),
    ("cross_entropy", "softmax"),
    ("binary_cross_entropy", "sigmoid"),
    ("binary_cross_entropy", "softmax"),
)
RTOL = {"float64": 1e-10, "float32": 1e-5}


CANONICAL = {("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy")}


def ref_output_loss(loss: str, out: str, from_logits: bool, z: jax.Array, y: jax.Array):
    """``C_n``, shape (batch,), from the output's ``z^L`` (batch, n_L).

    ``from_logits`` (the fused canonical pairs) computes it from ``z`` as the stable formulas do;
    otherwise through the probabilities ``a = f(z)``, as the generic path does. The two are the
    same function; the choice only decides which roundoff the reference shares: where ``1 − a``
    cancels (a saturated output under binary cross-entropy) both formulations lose digits alike.
    """
    a = JAX_NN_FORWARD[out](z)
    if loss == "squared_error":
        return 0.5 * jnp.sum((y - a) ** 2, axis=-1)
    if from_logits and loss == "cross_entropy":
        log_a = jax.nn.log_softmax(z, axis=-1)
    elif from_logits:  # sigmoid: −[y log σ(z) + (1 − y) log(1 − σ(z))] = softplus(z) − y z
        return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)
    else:
        log_a = jnp.log(a)
    if loss == "cross_entropy" and y.ndim == 1:
        return -jnp.take_along_axis(log_a, y[:, None], axis=-1)[:, 0]
    if loss == "cross_entropy":
        return -jnp.sum(y * log_a, axis=-1)
    return -jnp.sum(y * log_a + (1 - y) * jnp.log1p(-a), axis=-1)


def ref_per_example(acts, loss, from_logits, params, x, y, eps):
    """``(C_n)_n`` with ``e^l = eps[l]`` added to every weighted input ``z^l``."""
    a = x
    for layer, act, e in zip(params, acts, eps, strict=True):
        z = a @ layer["W"].T + layer["b"] + e
        a = JAX_NN_FORWARD[act](z)
    return ref_output_loss(loss, acts[-1], from_logits, z, y)


def reference(acts, loss, from_logits, params, x, y) -> dict[str, Any]:
    """Loss, ∇θ C and ∂C/∂x by ``jax.value_and_grad``; every δ^l by ``jax.vjp``."""
    zeros = [jnp.zeros((x.shape[0], layer["b"].shape[0]), x.dtype) for layer in params]
    f = functools.partial(ref_per_example, acts, loss, from_logits)
    value, (grads, input_grad) = jax.value_and_grad(
        lambda p, xs: jnp.mean(f(p, xs, y, zeros)), argnums=(0, 1)
    )(params, x)
    per_example, pullback = jax.vjp(lambda e: f(params, x, y, e), zeros)
    (deltas,) = pullback(jnp.ones_like(per_example))
    out = x
    for layer, act in zip(params, acts, strict=True):
        out = JAX_NN_FORWARD[act](out @ layer["W"].T + layer["b"])
    return {
        "output": out,
        "loss": value,
        "net.loss": value,
        "grads": grads,
        "backward.grads": grads,
        "deltas": deltas,
        "input_grad": input_grad,
    }


def manual(net: bp.MLP, params, x, y) -> dict[str, Any]:
    """Everything bpjax computes: value_and_grad, backward (grads, deltas, input_grad), loss."""
    out, cache = net.forward(params, x)
    bw = net.backward(params, cache, y)
    loss, grads = net.value_and_grad(params, x, y)
    return {
        "output": out,
        "loss": loss,
        "net.loss": net.loss(params, x, y),
        "grads": grads,
        "backward.grads": bw.grads,
        "deltas": bw.deltas,
        "input_grad": bw.input_grad,
    }


def assert_trees_close(
    got: Any, want: Any, rtol: float, truth: Callable[[], Any] | None = None
) -> None:
    """Norm-relative per leaf, ``‖g − r‖ ≤ rtol ‖r‖``, in float64; lists every failing leaf.

    A leaf can be ill-conditioned in its own right: ``∂C/∂x`` of a one-input network is a sum over
    the hidden units whose terms can nearly cancel, and float32 autodiff is then itself wrong in
    the fifth digit. ``truth`` (the float64 reference at the same inputs, up-cast exactly, computed
    only when a leaf fails) lets such a leaf pass when the manual value is as accurate as
    autodiff's: ``‖g − t‖ ≤ 4 ‖r − t‖ + rtol ‖t‖``.
    """
    chex.assert_trees_all_equal_structs(got, want)
    failures = []
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    for i, ((path, g), r) in enumerate(zip(flat, jax.tree.leaves(want), strict=True)):
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        where = jax.tree_util.keystr(path)
        if g64.shape != r64.shape:
            failures.append((i, f"{where}: shape {g64.shape}, expected {r64.shape}"))
        elif not np.all(np.isfinite(g64)):
            failures.append((i, f"{where}: not finite: {g64}"))
        else:
            err, ref = float(np.linalg.norm(g64 - r64)), float(np.linalg.norm(r64))
            if not err <= rtol * ref:
                rel = err / max(ref, 1e-300)
                failures.append((i, f"{where}: ‖Δ‖ = {err:.3e}, ‖ref‖ = {ref:.3e}, rel {rel:.3e}"))
    if failures and truth is not None:
        t_leaves = jax.tree.leaves(truth())
        r_leaves = jax.tree.leaves(want)
        kept = []
        for i, message in failures:
            g64 = np.asarray(flat[i][1], np.float64)
            r64, t64 = np.asarray(r_leaves[i], np.float64), np.asarray(t_leaves[i], np.float64)
            manual_err = float(np.linalg.norm(g64 - t64))
            autodiff_err = float(np.linalg.norm(r64 - t64))
            if not manual_err <= 4 * autodiff_err + rtol * float(np.linalg.norm(t64)):
                kept.append(
                    (i, f"{message}; against float64: manual {manual_err:.3e}, "
                    f"autodiff {autodiff_err:.3e}")
                )  # fmt: skip
        failures = kept
    assert not failures, f"manual and autodiff disagree (rtol {rtol:.0e}):\n  " + "\n  ".join(
        message for _, message in failures
    )


# -- architectures and data ---------------------------------------------------------------------


class Arch(NamedTuple):
    """A hashable architecture: static under jit."""

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    loss: str
    fuse: bool
    batch: int
    labels: bool = False  # cross_entropy: integer labels (batch,) rather than (batch, n_L) targets

    def net(self) -> bp.MLP:
        return bp.MLP(self.sizes, self.activations, self.loss, fuse_output=self.fuse)

    @property
    def from_logits(self) -> bool:
        """Whether the fused output pair is in use (identity + squared_error needs no choice)."""
        return self.fuse and (self.activations[-1], self.loss) in CANONICAL


# Random architectures over the whole range (depth 1–5, widths 1–33, batch 1–17), chosen so that
# every depth, every activation as a hidden layer, every loss with each output it accepts but
# squared_error (which takes any: test_every_output_pair_eager has them all), every canonical pair
# fused and generic, integer labels and target vectors, and the extreme widths and batches appear.
POOL = (
    Arch((33, 1), ("identity",), "squared_error", True, 17),
    Arch((1, 33, 5), ("tanh", "softmax"), "cross_entropy", True, 1, labels=True),
    Arch((7, 12, 9, 4), ("relu", "leaky_relu", "softmax"), "cross_entropy", False, 17),
    Arch((5, 8, 8, 8, 3), ("elu", "softplus", "gelu", "sigmoid"), "binary_cross_entropy", True, 9),
    Arch(
        (20, 16, 11, 7, 5, 2),
        ("silu", "mish", "sigmoid", "softmax", "softmax"),
        "binary_cross_entropy",
        True,
        6,
    ),
    Arch((3, 1, 4), ("mish", "identity"), "squared_error", False, 13),
    Arch(
        (17, 33, 33, 33, 33, 1),
        ("tanh", "tanh", "tanh", "tanh", "sigmoid"),
        "binary_cross_entropy",
        False,
        4,
    ),
    Arch((9, 6, 2), ("gelu", "relu"), "squared_error", True, 2),
    Arch((12, 10, 10, 10), ("leaky_relu", "elu", "tanh"), "squared_error", True, 11),
    Arch((4, 25, 3), ("softplus", "softmax"), "cross_entropy", False, 8, labels=True),
    Arch((2, 5, 5, 5, 5), ("identity", "sigmoid", "silu", "mish"), "squared_error", True, 16),
    Arch((31, 3, 29), ("softmax", "softplus"), "squared_error", True, 5),
    Arch((6, 14, 1), ("relu", "softmax"), "cross_entropy", True, 3, labels=True),
    Arch((8, 4, 7), ("silu", "softmax"), "cross_entropy", True, 10),
    Arch(
        (10, 2, 3, 4, 5, 6),
        ("sigmoid", "gelu", "elu", "leaky_relu", "silu"),
        "squared_error",
        False,
        7,
    ),
)


def make_data(arch: Arch, dtype: Any, seed: int, gain: float, target: str):
    """Params, inputs and targets: weights of variance gain²/n_in, biases N(0, ¼), x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    params = [
        {
            "W": jnp.asarray(gain * rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), dtype),
            "b": jnp.asarray(0.5 * rng.normal(size=(n_out,)), dtype),
        }
        for n_in, n_out in zip(arch.sizes[:-1], arch.sizes[1:], strict=True)
    ]
    batch, n_out = arch.batch, arch.sizes[-1]
    x = jnp.asarray(rng.normal(size=(batch, arch.sizes[0])), dtype)
    if arch.loss == "squared_error":
        y = rng.normal(size=(batch, n_out))
    elif arch.loss == "cross_entropy" and arch.labels:
        return params, x, jnp.asarray(rng.integers(0, n_out, size=batch), jnp.int32)
    elif arch.loss == "cross_entropy":
        # probabilities, or any non-negative targets (the fused δ is a Σ_j y_j − y)
        y = rng.dirichlet(np.ones(n_out), size=batch)
        if target == "other":
            y = rng.uniform(0, 2, size=(batch, n_out))
    else:
        y = rng.uniform(size=(batch, n_out))
        if target == "other":  # hard 0/1 labels
            y = np.round(y)
    return params, x, jnp.asarray(y, dtype)


def check(arch: Arch, dtype_name: str, seed: int, gain: float, target: str, *, jit: bool) -> None:
    dtype = jnp.dtype(dtype_name)
    with jax.enable_x64(dtype_name == "float64"):
        params, x, y = make_data(arch, dtype, seed, gain, target)
        if jit:
            got, want = _jit_both(arch, params, x, y)
        else:
            got, want = _both(arch, params, x, y)
        for name in ("loss", "grads", "deltas", "input_grad"):
            assert jnp.result_type(*jax.tree.leaves(got[name])) == dtype, name
    rtol = RTOL[dtype_name]
    if arch.loss == "binary_cross_entropy" and not arch.from_logits:
        # ∂C/∂a = (1 − y)/(1 − a) − y/a: relative roundoff grows as κ = 1/min(a, 1 − a) where an
        # output saturates, for autodiff as for the manual path; an output rounded to exactly 0
        # or 1 makes the loss infinite (or, for a hard label, the generic gradient 0/0: see
        # test_losses.py), so such an example is not one to compare on.
        a = np.asarray(want["output"], np.float64)
        interior = bool(np.all((a > 0) & (a < 1)))
        if currently_in_test_context():
            assume(interior)
        assert interior, "an output rounded to 0 or 1"
        kappa = float(np.max(1 / np.minimum(a, 1 - a)))
        rtol = max(rtol, 8 * float(jnp.finfo(dtype).eps) * kappa)

    def truth():
        with jax.enable_x64(True):
            up = jax.tree.map(
                lambda v: v.astype(jnp.float64) if v.dtype == dtype else v, (params, x, y)
            )
            ref = _jit_reference if jit else reference
            return ref(arch.activations, arch.loss, arch.from_logits, *up)

    assert_trees_close(got, want, rtol, truth if dtype_name == "float32" else None)


def _both(arch: Arch, params, x, y):
    want = reference(arch.activations, arch.loss, arch.from_logits, params, x, y)
    return manual(arch.net(), params, x, y), want


_jit_both = jax.jit(_both, static_argnums=0)
_jit_reference = jax.jit(reference, static_argnums=(0, 1, 2))

DTYPES = st.sampled_from(("float64", "float32"))
SEEDS = st.integers(0, 2**32 - 1)
GAINS = st.sampled_from((0.5, 1.0, 2.0))
TARGETS = st.sampled_from(("standard", "other"))
# the smaller samples scale with the profile: 20 of ci's 200, 3 of dev's 30
FEW = max(3, settings.default.max_examples // 10)


@pytest.mark.slow
@given(arch=st.sampled_from(POOL), dtype=DTYPES, seed=SEEDS, gain=GAINS, target=TARGETS)
def test_pooled_architectures_jitted_match_autodiff(arch, dtype, seed, gain, target):
    """The bulk: ≥ 200 examples, architectures from POOL (each compiles once per dtype)."""
    check(arch, dtype, seed, gain, target, jit=True)


FULL_WIDTHS, FULL_BATCHES = st.integers(1, 33), st.integers(1, 17)


@st.composite
def architectures(draw, widths=FULL_WIDTHS, batches=FULL_BATCHES):
    """Depth 1–5, any hidden activations, a loss and an output activation it accepts."""
    depth = draw(st.integers(1, 5))
    hidden = draw(
        st.lists(st.sampled_from(ACTIVATION_NAMES), min_size=depth - 1, max_size=depth - 1)
    )
    loss, out = draw(st.sampled_from(OUTPUTS))
    sizes = draw(st.lists(widths, min_size=depth + 1, max_size=depth + 1))
    if loss == "binary_cross_entropy" and out == "softmax" and sizes[-1] == 1:
        sizes[-1] = 2  # a one-unit softmax is 1 everywhere, and log(1 − a) = −∞
    labels = loss == "cross_entropy" and draw(st.booleans())
    fuse = draw(st.booleans())
    return Arch(tuple(sizes), (*hidden, out), loss, fuse, draw(batches), labels)


@pytest.mark.slow
@settings(max_examples=FEW)
@given(arch=architectures(), dtype=DTYPES, seed=SEEDS, gain=GAINS, target=TARGETS)
def test_random_architectures_jitted_match_autodiff(arch, dtype, seed, gain, target):
    """Architectures drawn freely over the whole range: one compile each, so fewer examples."""
    check(arch, dtype, seed, gain, target, jit=True)


@pytest.mark.slow
@settings(max_examples=FEW)
@given(
    arch=architectures(widths=st.sampled_from((2, 3)), batches=st.just(3)),
    dtype=DTYPES,
    seed=SEEDS,
    gain=GAINS,
    target=TARGETS,
)
def test_random_architectures_eager_match_autodiff(arch, dtype, seed, gain, target):
    """Not jitted: every op runs eagerly. Widths from {2, 3} so eager primitives compile once."""
    check(arch, dtype, seed, gain, target, jit=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss,out", OUTPUTS, ids=[f"{loss}-{out}" for loss, out in OUTPUTS])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "generic"])
def test_every_output_pair_eager(loss, out, fuse, x64):
    """Every (loss, output activation) pair, fused and generic, every activation hidden too."""
    start = 4 * OUTPUTS.index((loss, out))
    hidden = tuple(ACTIVATION_NAMES[(start + i) % len(ACTIVATION_NAMES)] for i in range(4))
    labels = loss == "cross_entropy" and fuse  # the generic path gets probability targets
    arch = Arch((3, 2, 3, 2, 3, 3), (*hidden, out), loss, fuse, 3, labels=labels)
    check(arch, "float64", 0, 1.0, "standard", jit=False)


# -- init ---------------------------------------------------------------------------------------

SIZES = (5, 7, 3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_init_shapes_and_dtypes(dtype, key):
    net = bp.MLP(SIZES, ("tanh", "relu", "softmax"), "cross_entropy")
    with jax.enable_x64(dtype == "float64"):
        params = net.init(key, dtype=jnp.dtype(dtype))
        assert isinstance(params, list) and len(params) == 3
        for layer, n_in, n_out in zip(params, SIZES[:-1], SIZES[1:], strict=True):
            assert set(layer) == {"W", "b"}
            assert layer["W"].shape == (n_out, n_in) and layer["b"].shape == (n_out,)
            assert layer["W"].dtype == jnp.dtype(dtype) and layer["b"].dtype == jnp.dtype(dtype)
            assert not np.any(np.asarray(layer["b"], np.float32))
            assert np.all(np.isfinite(np.asarray(layer["W"], np.float32)))
            assert np.std(np.asarray(layer["W"], np.float32)) > 0


def test_init_default_dtype_is_float32_and_keys_differ(key):
    net = bp.MLP((4, 4, 4), ("tanh", "tanh"), "squared_error")
    params = net.init(key)
    assert params[0]["W"].dtype == jnp.float32
    assert not np.allclose(params[0]["W"], params[1]["W"])  # each layer its own key
    chex.assert_trees_all_equal(params, net.init(key))  # deterministic in the key
    assert not np.allclose(params[0]["W"], net.init(jax.random.key(1))[0]["W"])


HE = {"relu", "leaky_relu", "elu", "gelu", "silu", "mish"}


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_init_variance_glorot_or_he(name, key):
    """He (variance 2/n_in) for the ReLU family, Glorot (2/(n_in + n_out)) for the rest."""
    assert bp.ACTIVATIONS[name].init == ("he" if name in HE else "glorot")
    n_in, n_out = 256, 128
    net = bp.MLP((n_in, n_out), (name,), "squared_error")
    w = np.asarray(net.init(key)[0]["W"], np.float64)
    want = 2 / n_in if name in HE else 2 / (n_in + n_out)
    # 32768 samples: the variance estimate's relative standard deviation is √(2/N) ≈ 0.8%
    assert np.var(w) == pytest.approx(want, rel=0.05)
    assert abs(np.mean(w)) < 0.05 * np.sqrt(want)


# -- jit, vmap, grad: it is plain JAX -----------------------------------------------------------


def _small(key, dtype=jnp.float32, loss="cross_entropy", out="softmax"):
    """A (3, 3, 2) net and a batch of 3: the eager property test's shapes, so already compiled."""
    net = bp.MLP((3, 3, 2), ("tanh", out), loss)
    params = net.init(key, dtype)
    kx, ky = jax.random.split(jax.random.fold_in(key, 1))
    x = jax.random.normal(kx, (3, 3), dtype)
    if loss == "cross_entropy":
        return net, params, x, jax.random.randint(ky, (3,), 0, 2)
    return net, params, x, jax.random.uniform(ky, (3, 2), dtype)


def test_mlp_is_frozen_and_hashable():
    net = bp.MLP((4, 5, 3), ("tanh", "softmax"), "cross_entropy")
    same = bp.MLP([4, 5, 3], [bp.ACTIVATIONS["tanh"], "softmax"], bp.LOSSES["cross_entropy"])
    assert net == same and hash(net) == hash(same)
    assert net != bp.MLP((4, 5, 3), ("tanh", "softmax"), "cross_entropy", fuse_output=False)
    assert {net: 1}[same] == 1
    with pytest.raises(AttributeError):
        net.sizes = (1, 2)  # type: ignore[misc]


def test_jit_needs_no_static_args_and_does_not_retrace(key):
    net, params, x, y = _small(key)
    chex.clear_trace_counter()
    vag = jax.jit(chex.assert_max_traces(net.value_and_grad, n=1))
    loss1, _ = vag(params, x, y)
    params2 = jax.tree.map(lambda p: p * 0.5, params)
    loss2, grads2 = vag(params2, x + 1.0, 1 - y)  # new values, same shapes: no retrace
    assert loss1 != loss2
    eager = net.value_and_grad(params2, x + 1.0, 1 - y)[1]
    assert_trees_close(grads2, eager, bp.DEFAULT_RTOL["float32"])

    # the spec is a valid static argument: an equal spec built anew hits the same trace
    traces = []

    def value_and_grad(net, params, x, y):
        traces.append(net)
        return net.value_and_grad(params, x, y)

    static = jax.jit(value_and_grad, static_argnums=0)
    static(net, params, x, y)
    static(bp.MLP((3, 3, 2), ("tanh", "softmax"), "cross_entropy"), params2, x, y)
    assert len(traces) == 1


@pytest.mark.slow
def test_vmap_over_independent_batches_equals_a_loop(key, x64, maybe_jit):
    net, params, _, _ = _small(key, jnp.float64)
    kx, ky = jax.random.split(key)
    xs = jax.random.normal(kx, (4, 3, 3), jnp.float64)
    ys = jax.random.randint(ky, (4, 3), 0, 2)

    def per_batch(x, y):
        loss, grads = net.value_and_grad(params, x, y)
        _, cache = net.forward(params, x)
        return loss, grads, net.backward(params, cache, y)

    batched = maybe_jit(jax.vmap(per_batch))(xs, ys)
    looped = [per_batch(x, y) for x, y in zip(xs, ys, strict=True)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *looped)
    chex.assert_trees_all_close(batched, stacked, rtol=1e-12, atol=1e-14)


def test_grad_of_a_scalar_function_of_the_output(key, x64, maybe_jit):
    net, params, x, _ = _small(key, jnp.float64, loss="squared_error", out="tanh")

    def ours(p, x):
        return jnp.sum(jnp.sin(net(p, x)))

    def theirs(p, x):
        a = x
        for layer in p:
            a = jnp.tanh(a @ layer["W"].T + layer["b"])
        return jnp.sum(jnp.sin(a))

    got = maybe_jit(jax.grad(ours, argnums=(0, 1)))(params, x)
    want = jax.grad(theirs, argnums=(0, 1))(params, x)
    assert_trees_close(got, want, 1e-12)


def test_grad_through_the_manual_backward(key, x64, maybe_jit):
    """Second order: the hand-written gradient is itself differentiable plain JAX."""
    net, params, x, y = _small(key, jnp.float64, loss="squared_error", out="tanh")

    def sq_norm(grads):
        return sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))

    got = maybe_jit(jax.grad(lambda p: sq_norm(net.value_and_grad(p, x, y)[1])))(params)
    want = jax.grad(lambda p: sq_norm(jax.grad(net.loss)(p, x, y)))(params)
    assert_trees_close(got, want, 1e-10)


@pytest.mark.slow
def test_bfloat16_value_and_grad_runs_and_is_close_to_float32(key):
    net = bp.MLP(SIZES, ("tanh", "relu", "softmax"), "cross_entropy")  # init compiled above
    params = net.init(key, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (16, SIZES[0]), jnp.bfloat16)
    y = jax.random.randint(jax.random.key(2), (16,), 0, SIZES[-1])
    loss, grads = jax.jit(net.value_and_grad)(params, x, y)
    assert loss.dtype == jnp.bfloat16
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
    up = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # exact
    loss32, grads32 = net.value_and_grad(up, x.astype(jnp.float32), y)
    rtol = bp.DEFAULT_RTOL["bfloat16"]
    assert float(loss) == pytest.approx(float(loss32), rel=rtol)
    assert_trees_close(grads, grads32, rtol)


def test_forward_cache_holds_every_z_and_a(key, x64):
    net, params, x, _ = _small(key, jnp.float64)
    out, cache = net.forward(params, x)
    assert isinstance(cache, bp.Cache)
    assert [z.shape for z in cache.z] == [(3, 3), (3, 2)] == [a.shape for a in cache.a]
    chex.assert_trees_all_close(cache.x, x)
    z1 = x @ params[0]["W"].T + params[0]["b"]
    chex.assert_trees_all_close(cache.z[0], z1, rtol=1e-14)
    chex.assert_trees_all_close(cache.a[0], jnp.tanh(z1), rtol=1e-14)
    chex.assert_trees_all_close(cache.a[1], jax.nn.softmax(cache.z[1]), rtol=1e-14)
    assert out is cache.a[-1]
    chex.assert_trees_all_close(net(params, x), out)


def test_backward_returns_a_backward_namedtuple(key, x64):
    net, params, x, y = _small(key, jnp.float64)
    _, cache = net.forward(params, x)
    bw = net.backward(params, cache, y)
    assert isinstance(bw, bp.Backward)
    assert [d.shape for d in bw.deltas] == [(3, 3), (3, 2)]
    assert bw.input_grad.shape == x.shape
    chex.assert_trees_all_equal_structs(bw.grads, params)
