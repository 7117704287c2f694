"""LayerNorm, Dropout, Residual and Embedding: hand-written backward passes against JAX autodiff.

Each layer's ``forward``/``backward`` is compared in float64 with ``jax.vjp`` of a plain-JAX
forward written here from the maths alone (``jnp.mean``/``jnp.var``, ``jax.random.bernoulli``,
``W[x]``), to 1e-10 of the largest element of the compared quantity (of the terms that cancel,
for LayerNorm's ``dx``), over shapes drawn by hypothesis, jitted and not; then small serial
networks containing the layers go through the harness (:func:`bpjax.check_grads`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpjax as bp
from bpjax.layers import Dense, Dropout, Embedding, LayerNorm, Residual
from bpjax.layers._core import layer_forward
from tests.reference import JAX_NN_FORWARD

RTOL = 1e-10


def examples(n: int) -> settings:
    """At most ``n`` examples (fewer under a smaller profile); the fixtures used with ``given``
    (``x64``, ``maybe_jit``) hold no state between examples."""
    return settings(
        max_examples=min(n, settings.default.max_examples),
        suppress_health_check=[
            *settings.default.suppress_health_check,
            HealthCheck.function_scoped_fixture,
        ],
    )


def assert_close(got: Any, want: Any, scale: float | None = None, rtol: float = RTOL) -> None:
    """``max |got − want| ≤ rtol · scale``, ``scale`` the largest ``|want|`` unless given."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if scale is None:
        scale = float(np.max(np.abs(want), initial=0.0))
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= rtol * scale or err == 0.0, f"max error {err:.3g} > {rtol:g} × {scale:.3g}"


def normals(seed: int, *shapes: tuple[int, ...]) -> list[Any]:
    """Standard normal float64 arrays, drawn by NumPy: no compilation per new shape."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape)) for shape in shapes]


# One function object per layer spec or reference, so that jax.jit's cache (keyed on the
# function, the shapes and dtypes) spans hypothesis examples and tests: compiling dominates.


@functools.cache
def forward_backward(layer: Any) -> Any:
    """``(params, x, dy, key) -> (y, cache, grads, dx)`` for ``layer``, by its own passes."""

    def run(params, x, dy, key=None):
        y, cache = layer_forward(layer, params, x, key)
        grads, dx = layer.backward(params, cache, dy)
        return y, cache, grads, dx

    return run


@functools.cache
def reference_vjp(forward: Any) -> Any:
    """``(params, x, dy, *args) -> (y, ∂/∂params, ∂/∂x)``: jax.vjp of a plain-JAX forward."""

    def vjp(params, x, dy, *args):
        y, pullback = jax.vjp(lambda p, x: forward(p, x, *args), params, x)
        return y, *pullback(dy)

    return jax.jit(vjp)


# -- plain-JAX forwards, from the maths ---------------------------------------------------------


def ref_layer_norm(params, x, eps, scale, offset):
    """``γ (x − μ) / sqrt(var + eps) + β`` over the last axis, by jnp.mean and jnp.var."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    y = (x - mu) / jnp.sqrt(var + eps)
    if scale:
        y = params["scale"] * y
    if offset:
        y = y + params["offset"]
    return y


def ref_dropout(x, key, rate):
    """``x ∘ m / (1 − rate)``, ``m ~ Bernoulli(1 − rate)`` drawn with ``key`` (float32 uniforms)."""
    m = jax.random.bernoulli(key, jnp.float32(1 - rate), x.shape)
    return x * m.astype(x.dtype) / (1 - rate)


def ref_dense(params, x, activation):
    return JAX_NN_FORWARD[activation](x @ params["W"].T + params["b"])


def ref_embedding(params, x):
    return params["W"][x]


# -- LayerNorm ----------------------------------------------------------------------------------


@functools.cache
def layer_norm_reference(eps: float, scale: bool, offset: bool) -> Any:
    return lambda p, x: ref_layer_norm(p, x, eps, scale, offset)


@pytest.mark.slow
@examples(12)
@given(
    shape=st.sampled_from(((1, 1), (3, 2), (3, 5), (1, 2, 5), (2, 2, 1, 3))),
    eps=st.sampled_from((1e-5, 0.5)),
    scale=st.booleans(),
    offset=st.booleans(),
    spread=st.sampled_from((1e-3, 1.0, 1e3)),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_matches_vjp_of_the_maths(
    x64, maybe_jit, shape, eps, scale, offset, spread, seed
):
    """Inputs (batch, ..., n), n = 1 included; features far apart, nearly equal, or in between."""
    layer = LayerNorm(eps, scale=scale, offset=offset)
    n = shape[-1]
    params, out_shape = layer.init(jax.random.key(0), shape[1:], jnp.float64)
    assert out_shape == shape[1:]
    assert sorted(params) == sorted(k for k, on in (("scale", scale), ("offset", offset)) if on)
    x, dy, gamma, beta = normals(seed, shape, shape, (n,), (n,))
    x = 3.0 + spread * x
    if scale:
        params["scale"] = 1 + 0.5 * gamma
    if offset:
        params["offset"] = beta

    y, cache, grads, dx = maybe_jit(forward_backward(layer))(params, x, dy)
    want_y, want_grads, want_dx = reference_vjp(layer_norm_reference(eps, scale, offset))(
        params, x, dy
    )
    assert_close(y, want_y)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for name in grads:
        assert_close(grads[name], want_grads[name])
    # dx is a difference of terms of size |γ dy| / σ: its error is relative to them
    g = dy * params["scale"] if scale else dy
    terms = float(jnp.max(jnp.abs(g)) * jnp.max(cache.inv_sigma))
    assert_close(dx, want_dx, scale=terms)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_layer_norm_in_lower_precision_tracks_float64(dtype):
    """Half precision is normalised in float32: results within a few roundoffs of the dtype."""
    dtype = jnp.dtype(dtype)
    layer = LayerNorm()
    x, dy, gamma = normals(0, (4, 3, 16), (4, 3, 16), (16,))
    x = 100.0 + 300.0 * x  # (x − μ)² passes float16's largest value, 65504
    params = {"scale": 1 + gamma, "offset": jnp.ones(16)}
    low = jax.tree.map(lambda a: a.astype(dtype), (params, x, dy))
    y, _, grads, dx = jax.jit(forward_backward(layer))(*low)
    assert y.dtype == dx.dtype == grads["scale"].dtype == grads["offset"].dtype == dtype
    with jax.enable_x64(True):
        up = jax.tree.map(lambda a: np.asarray(a, np.float64), low)
        want_y, _, want_grads, want_dx = jax.jit(forward_backward(layer))(*up)
    # a few roundoffs of the dtype per term, relative to each quantity's largest element
    tol = 8 * float(jnp.finfo(dtype).eps) * math.sqrt(16 * 12)
    for got, want in [(y, want_y), (dx, want_dx), *((grads[k], want_grads[k]) for k in grads)]:
        assert np.all(np.isfinite(np.asarray(got, np.float64)))
        assert_close(np.asarray(got, np.float64), np.asarray(want), rtol=tol)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), True, "1e-5", None])
def test_layer_norm_rejects_a_bad_eps(eps):
    with pytest.raises(ValueError, match=r"eps: expected a positive finite number.*got"):
        LayerNorm(eps)


def test_layer_norm_options_are_keyword_only_and_init_needs_a_feature_axis(key):
    with pytest.raises(TypeError):
        LayerNorm(1e-5, False)  # type: ignore[misc]
    assert LayerNorm(1e-3, scale=False) == LayerNorm(1e-3, scale=False)
    assert hash(LayerNorm()) == hash(LayerNorm())
    with pytest.raises(ValueError, match=r"in_shape: LayerNorm normalises over the last axis"):
        LayerNorm().init(key, ())
    params, shape = LayerNorm(scale=False, offset=False).init(key, (2, 7))
    assert params == {} and shape == (2, 7)
    params, _ = LayerNorm().init(key, (7,), jnp.bfloat16)
    assert params["scale"].dtype == params["offset"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["scale"], 1)
    np.testing.assert_array_equal(params["offset"], 0)


def test_layer_norm_checks_the_feature_axis(maybe_jit, key):
    params, _ = LayerNorm().init(key, (4,))
    with pytest.raises(ValueError, match=r"params\['scale'\]: expected shape \(3,\) for inputs"):
        maybe_jit(LayerNorm().forward)(params, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="x: LayerNorm takes inputs"):
        LayerNorm().forward(params, jnp.float32(1))


# -- Dropout ------------------------------------------------------------------------------------


@functools.cache
def dropout_reference(rate: float) -> Any:
    return lambda p, x, key: ref_dropout(x, key, rate)


@pytest.mark.slow
@examples(10)
@given(
    shape=st.sampled_from(((1, 3), (4, 5), (2, 3, 4))),
    rate=st.sampled_from((0.0, 0.1, 0.5, 0.9)),
    seed=st.integers(0, 2**16),
)
def test_dropout_matches_vjp_of_bernoulli_with_the_same_key(x64, maybe_jit, shape, rate, seed):
    layer = Dropout(rate)
    x, dy = normals(seed, shape, shape)
    key = jax.random.key(seed)
    params, out_shape = layer.init(key, shape[1:], jnp.float64)
    assert params == {} and out_shape == shape[1:]
    y, _, grads, dx = maybe_jit(forward_backward(layer))(params, x, dy, key)
    want_y, _, want_dx = reference_vjp(dropout_reference(rate))(params, x, dy, key)
    assert grads == {}
    assert_close(y, want_y)
    assert_close(dx, want_dx)


def test_dropout_without_a_key_is_the_identity(maybe_jit):
    layer = Dropout(0.5)
    x, dy = normals(0, (3, 4), (3, 4))
    y, cache, grads, dx = maybe_jit(forward_backward(layer))({}, x, dy, None)
    assert cache.mask is None and grads == {}
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


def test_dropout_masks_depend_on_the_key_only_and_keep_the_mean(key):
    layer = Dropout(0.25)
    x = jnp.ones((200, 500))
    y1, c1 = jax.jit(lambda x, k: layer.forward({}, x, key=k))(x, key)
    y2, c2 = layer.forward({}, x, key=key)
    with jax.enable_x64(True):  # the mask does not depend on the x64 mode or the dtype
        _, c64 = layer.forward({}, jnp.ones((200, 500), jnp.float64), key=key)
    _, c3 = layer.forward({}, x, key=jax.random.fold_in(key, 1))
    np.testing.assert_array_equal(c1.mask, c2.mask)
    np.testing.assert_array_equal(c1.mask, c64.mask)
    np.testing.assert_array_equal(y1, y2)
    assert c1.mask.dtype == jnp.bool_ and not bool(jnp.all(c1.mask == c3.mask))
    # 10^5 Bernoulli(0.75) draws: the kept fraction within 5 standard deviations
    kept, sd = float(jnp.mean(c1.mask)), math.sqrt(0.75 * 0.25 / x.size)
    assert abs(kept - 0.75) < 5 * sd
    np.testing.assert_array_equal(np.unique(y1), np.array([0.0, 1 / 0.75], np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dropout_keeps_the_dtype(dtype, key):
    x = jnp.ones((2, 8), dtype)
    y, cache = Dropout(0.5).forward({}, x, key=key)
    _, dx = Dropout(0.5).backward({}, cache, x)
    assert y.dtype == dx.dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("rate", [-0.1, 1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_dropout_rejects_a_bad_rate(rate):
    with pytest.raises(ValueError, match=r"rate: expected the probability .* in \[0, 1\), got"):
        Dropout(rate)


def test_dropout_declares_it_needs_a_key():
    assert Dropout(0.1).needs_key and Dropout(0).rate == 0.0
    assert Dropout(0.5) == Dropout(0.5) and hash(Dropout(0.5)) == hash(Dropout(0.5))


# -- Residual -----------------------------------------------------------------------------------


def _ln(p, x):
    return ref_layer_norm(p, x, 1e-5, True, True)


# name: (branch, plain-JAX y = x + F(x), feature shape); every branch keeps the shape
RESIDUALS = {
    "dense": (
        (Dense(4, "tanh"),),
        lambda p, x: x + ref_dense(p[0], x, "tanh"),
        (4,),
    ),
    "dense-layernorm": (
        (Dense(4, "gelu"), LayerNorm()),
        lambda p, x: x + _ln(p[1], ref_dense(p[0], x, "gelu")),
        (3, 4),
    ),
    "layernorm-dense-dense": (
        (LayerNorm(), Dense(6, "relu"), Dense(4)),
        lambda p, x: x + ref_dense(p[2], ref_dense(p[1], _ln(p[0], x), "relu"), "identity"),
        (4,),
    ),
    "nested": (
        (Residual(Dense(4, "sigmoid")), Residual(LayerNorm(), Dense(4, "silu"))),
        lambda p, x: (
            x
            + (h := x + ref_dense(p[0][0], x, "sigmoid"))
            + ref_dense(p[1][1], _ln(p[1][0], h), "silu")
        ),
        (2, 4),
    ),
}


def _perturb(params, seed):
    """Every leaf moved off its initial value, so that LayerNorm's γ and β are generic."""
    leaves, treedef = jax.tree.flatten(params)
    moves = normals(seed, *(leaf.shape for leaf in leaves))
    moved = [leaf + (0.3 * m).astype(leaf.dtype) for leaf, m in zip(leaves, moves, strict=True)]
    return jax.tree.unflatten(treedef, moved)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESIDUALS))
def test_residual_matches_vjp_of_the_maths(x64, maybe_jit, name):
    branch, reference, features = RESIDUALS[name]
    block = Residual(*branch)
    params, out_shape = block.init(jax.random.key(0), features, jnp.float64)
    assert out_shape == features
    params = _perturb(params, 1)
    x, dy = normals(2, (5, *features), (5, *features))
    y, _, grads, dx = maybe_jit(forward_backward(block))(params, x, dy)
    want_y, want_grads, want_dx = reference_vjp(reference)(params, x, dy)
    assert_close(y, want_y)
    assert_close(dx, want_dx)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(got, want)


def _dropout_block_reference(p, x, key):
    """``x + Dense(Dropout(tanh Dense(x)))``, the Dropout (layer 1 of the branch) keyed
    ``fold_in(key, 1)``."""
    h = ref_dropout(ref_dense(p[0], x, "tanh"), jax.random.fold_in(key, 1), 0.5)
    return x + ref_dense(p[2], h, "identity")


@pytest.mark.slow
def test_residual_hands_keys_to_its_branch(x64, maybe_jit):
    """``needs_key`` when a branch layer has it; layer i of the branch gets ``fold_in(key, i)``."""
    block = Residual(Dense(6, "tanh"), Dropout(0.5), Dense(6))
    assert block.needs_key and not Residual(Dense(2)).needs_key
    assert Residual(Residual(Dropout(0.1))).needs_key
    params = _perturb(block.init(jax.random.key(0), (6,), jnp.float64)[0], 1)
    x, dy = normals(2, (4, 6), (4, 6))
    key = jax.random.key(3)
    y, _, grads, dx = maybe_jit(forward_backward(block))(params, x, dy, key)
    want_y, want_grads, want_dx = reference_vjp(_dropout_block_reference)(params, x, dy, key)
    assert_close(y, want_y)
    assert_close(dx, want_dx)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(got, want)
    # evaluation mode: no key, no dropout
    y_eval, _ = block.forward(params, x)
    assert_close(y_eval, x + ref_dense(params[2], ref_dense(params[0], x, "tanh"), "identity"))


def test_residual_is_a_hashable_spec():
    assert Residual(Dense(3), LayerNorm()) == Residual(Dense(3), LayerNorm())
    assert hash(Residual(Dense(3))) == hash(Residual(Dense(3)))
    assert Residual(Dense(3)) != Residual(Dense(4))
    assert "Residual(layers=(Dense(" in repr(Residual(Dense(3)))


def test_residual_rejects_a_branch_that_changes_the_shape(key):
    with pytest.raises(ValueError, match=r"maps \(4,\) to \(3,\); make its last layer give \(4,\)"):
        Residual(Dense(5, "tanh"), Dense(3)).init(key, (4,))
    net = bp.serial(Residual(Dense(3)), Dense(2), loss="squared_error", input_shape=(2, 4))
    with pytest.raises(ValueError, match=r"maps \(2, 4\) to \(2, 3\)"):
        net.init(key)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Residual(), ValueError, "layers: Residual expected at least one branch layer"),
        (
            lambda: Residual(Dense(2), object()),
            TypeError,
            r"layers\[1\]: expected a layer with init, forward and backward, got object",
        ),
        (
            lambda: Residual(Embedding(4, 2)),
            ValueError,
            r"layers\[0\]: Embedding takes integer inputs",
        ),
    ],
)
def test_residual_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_residual_checks_its_params(key):
    block = Residual(Dense(2), Dense(2))
    params, _ = block.init(key, (2,))
    with pytest.raises(ValueError, match=r"params: expected one pytree per branch layer \(2\)"):
        block.forward(params[:1], jnp.ones((3, 2)))


# -- Embedding ----------------------------------------------------------------------------------


@jax.jit
def embedding_reference_vjp(params, x, dy):
    """jax.vjp of the plain lookup ``W[x]`` with respect to the params."""
    y, pullback = jax.vjp(lambda p: ref_embedding(p, x), params)
    return y, *pullback(dy)


@pytest.mark.slow
@examples(12)
@given(
    in_shape=st.sampled_from(((), (4,), (2, 3))),
    vocab=st.sampled_from((1, 3, 17)),
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_vjp_of_the_lookup(x64, maybe_jit, in_shape, vocab, seed):
    """In-range indices, negative ones (from the end, as in NumPy) included; repeats add up."""
    layer = Embedding(vocab, 5)
    params, out_shape = layer.init(jax.random.key(seed), in_shape, jnp.float64)
    assert out_shape == (*in_shape, 5)
    x = jnp.asarray(np.random.default_rng(seed).integers(-vocab, vocab, (3, *in_shape)))
    (dy,) = normals(seed, (3, *in_shape, 5))
    y, _, grads, dx = maybe_jit(forward_backward(layer))(params, x, dy)
    want_y, want_grads = embedding_reference_vjp(params, x, dy)
    assert dx is None
    assert_close(y, want_y)
    assert_close(grads["W"], want_grads["W"])


def _clamped_lookup(p, x):
    """``W[x]`` with ``x`` counted from the end when negative, then clamped to ``[0, V)``."""
    vocab = p["W"].shape[0]
    rows = jnp.clip(jnp.where(x < 0, x + vocab, x), 0, vocab - 1)
    return jnp.take(p["W"], rows, axis=0)


def test_embedding_out_of_range_indices_clamp_in_both_passes(x64, maybe_jit):
    """Beyond ``[−V, V)`` an index clamps to the nearest row, and its ``dy`` lands there too."""
    layer = Embedding(5, 3)
    params, _ = layer.init(jax.random.key(0), (4,), jnp.float64)
    x = jnp.array([[7, -9, 2, 5], [-1, 100, -6, 0]])
    (dy,) = normals(1, (2, 4, 3))
    y, _, grads, _ = maybe_jit(forward_backward(layer))(params, x, dy)
    want_y, pullback = jax.vjp(lambda p: _clamped_lookup(p, x), params)
    assert_close(y, want_y)
    assert_close(y, params["W"][x])  # JAX's own gather clamps the same way
    assert_close(grads["W"], pullback(dy)[0]["W"])


def test_embedding_init_is_standard_normal(key):
    params, shape = Embedding(400, 250).init(key, (), jnp.float32)
    assert shape == (250,) and params["W"].shape == (400, 250)
    assert params["W"].dtype == jnp.float32
    # N = 10⁵ draws: the sample mean has standard deviation 1/√N = 0.0032 and the sample std
    # 1/√(2N) = 0.0022; 5 of each, so that no draw of jax.random's stream (which may change with
    # the jax version) fails a right init, while a wrong scale (0.1, √2) is off by far more
    n = params["W"].size
    assert abs(float(jnp.std(params["W"])) - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(jnp.mean(params["W"]))) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_embedding_keeps_the_params_dtype(dtype):
    layer = Embedding(4, 2)
    params, _ = layer.init(jax.random.key(0), (3,), jnp.dtype(dtype))
    x = jnp.array([[0, 3, 3]])
    y, cache = layer.forward(params, x)
    grads, _ = layer.backward(params, cache, jnp.ones((1, 3, 2), dtype))
    assert y.dtype == grads["W"].dtype == params["W"].dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(grads["W"], np.float32)[:, 0], [1, 0, 0, 2])


@pytest.mark.parametrize("dtype", ["float32", "bool"])
def test_embedding_rejects_non_integer_indices(maybe_jit, key, dtype):
    layer = Embedding(4, 2)
    params, _ = layer.init(key, (3,))
    match = rf"x: Embedding looks up integer token indices, got dtype {dtype}"
    with pytest.raises(TypeError, match=match):
        maybe_jit(layer.forward)(params, jnp.zeros((2, 3), dtype))


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 3), "vocab_size: expected a positive integer, got 0"),
        ((True, 3), "vocab_size: expected a positive integer, got True"),
        ((4, -1), "features: expected a positive integer, got -1"),
        ((4, 2.0), "features: expected a positive integer, got 2.0"),
    ],
)
def test_embedding_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        Embedding(*args)


# -- every layer under vmap ---------------------------------------------------------------------

VMAP_LAYERS = {
    "layernorm": (LayerNorm(), (4,)),
    "dropout": (Dropout(0.5), (4,)),
    "residual": (Residual(Dense(4, "tanh"), LayerNorm()), (4,)),
    "embedding": (Embedding(6, 4), (3,)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VMAP_LAYERS))
def test_vmap_over_independent_batches_equals_a_loop(x64, name):
    """float64: vmapped against one batch at a time is one computation compiled two ways, so
    they differ by roundoff alone. Every quantity is a few roundings of ≤ 4-term sums of O(1)
    terms (LayerNorm over 4 features, a 4×4 Dense, batch sums of 2), ≲ 1e-15 absolute; rtol and
    atol 1e-12 hold that with room, where float32's atol 1e-6 was within 3× of its roundoff.
    The dropout masks are drawn from the same keys either way."""
    layer, in_shape = VMAP_LAYERS[name]
    params, out_shape = layer.init(jax.random.key(0), in_shape, jnp.float64)
    params = _perturb(params, 1)
    rng = np.random.default_rng(2)
    if getattr(layer, "integer_input", False):
        xs = jnp.asarray(rng.integers(0, 6, (3, 2, *in_shape)), jnp.int32)
    else:
        xs = jnp.asarray(rng.standard_normal((3, 2, *in_shape)), jnp.float64)
    dys = jnp.asarray(rng.standard_normal((3, 2, *out_shape)), jnp.float64)
    keys = jax.random.split(jax.random.key(3), 3)
    run = forward_backward(layer)
    batched = jax.jit(jax.vmap(run, in_axes=(None, 0, 0, 0)))(params, xs, dys, keys)
    for i in range(3):
        one = jax.jit(run)(params, xs[i], dys[i], keys[i])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-12)


# -- in serial networks, through the harness ----------------------------------------------------


def _labels(seed, shape, n):
    return jnp.asarray(np.random.default_rng(seed).integers(0, n, shape), jnp.int32)


@pytest.mark.slow
def test_serial_with_a_residual_layer_norm_block_checks_out(x64):
    net = bp.serial(
        Dense(8, "tanh"),
        Residual(Dense(8, "tanh"), LayerNorm()),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(5,),
    )
    params = _perturb(net.init(jax.random.key(0), jnp.float64), 1)
    (x,) = normals(2, (6, 5))
    y = _labels(3, (6,), 3)
    report = bp.check_grads(net.value_and_grad, net.loss, params, x, y, directions=1)
    assert report.ok, str(report)
    assert "[1][1]['scale']" in {row.path for row in report.rows}


@pytest.mark.slow
def test_serial_from_token_embeddings_with_dropout_checks_out(x64):
    """Integer inputs (batch, T) → (batch, T, 6) → a label per position, the loss their mean.

    :func:`bpjax.check_network` in training mode (a key): the grads by finite differences and
    the Taylor test, and the error recorded at each layer against ``jax.vjp`` of the layers above.
    """
    net = bp.serial(
        Embedding(20, 6),
        Dropout(0.2),
        Residual(LayerNorm(), Dense(6, "relu")),
        Dense(4, "softmax"),
        loss="cross_entropy",
        input_shape=(5,),
    )
    params = _perturb(net.init(jax.random.key(0), jnp.float64), 1)
    x, y = _labels(2, (3, 5), 20), _labels(3, (3, 5), 4)
    # jax.grad, jax.vjp and jvp are autodiff again, run on the float network above: the ones
    # left differentiate nothing
    report = bp.check_network(
        net,
        params,
        x,
        y,
        key=jax.random.key(4),
        directions=1,
        references=("finite_diff", "taylor"),
    )
    assert report.ok, str(report)
    assert report.layer_names == ("Embedding", "Dropout", "Residual", "Dense")
    _, cache = net.forward(params, x, key=jax.random.key(4))
    assert net.backward(params, cache, y).input_grad is None


DROPOUT_NET = bp.serial(
    Dense(8, "tanh"),
    Dropout(0.3),
    Residual(Dense(8, "relu"), Dropout(0.2)),
    LayerNorm(),
    Dense(2, "sigmoid"),
    loss="binary_cross_entropy",
    input_shape=(3,),
)


def _dropout_net_value_and_grad(params, x, y, key):
    return DROPOUT_NET.value_and_grad(params, x, y, key=key)


def _dropout_net_loss(params, x, y, key):
    return DROPOUT_NET.loss(params, x, y, key=key)


@pytest.mark.slow
def test_serial_with_dropout_trains_against_jax_grad_with_the_same_key(x64):
    """Dropout, also inside a Residual branch; the harness runs on the other two networks."""
    net = DROPOUT_NET
    params = _perturb(net.init(jax.random.key(0), jnp.float64), 1)
    (x,) = normals(2, (7, 3))
    y = jnp.asarray(np.random.default_rng(3).uniform(size=(7, 2)))
    key = jax.random.key(4)
    # SGD steps, a fresh key each: the manual gradient and jax.grad of the same loss (the same
    # masks) agree at every step
    step = jax.jit(_dropout_net_value_and_grad)
    reference = jax.jit(jax.value_and_grad(_dropout_net_loss))
    for i in range(3):
        k = jax.random.fold_in(key, i)
        (loss, grads), (want_loss, want_grads) = step(params, x, y, k), reference(params, x, y, k)
        assert_close(loss, want_loss)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            assert_close(got, want, scale=scale)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    # evaluation mode (no key) is the network without its Dropout layers
    plain = bp.serial(
        Dense(8, "tanh"),
        Residual(Dense(8, "relu")),
        LayerNorm(),
        Dense(2, "sigmoid"),
        loss="binary_cross_entropy",
        input_shape=(3,),
    )
    plain_params = [params[0], [params[2][0]], params[3], params[4]]
    assert_close(jax.jit(net.loss)(params, x, y), jax.jit(plain.loss)(plain_params, x, y))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_serial_of_every_layer_in_lower_precision(dtype):
    """Runs in each dtype, grads in the params' dtype, near the float64 grads of the same net."""
    dtype = jnp.dtype(dtype)
    net = bp.serial(
        Embedding(10, 8),
        Residual(LayerNorm(), Dense(8, "tanh"), Dropout(0.25)),
        LayerNorm(),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(4,),
    )
    params = _perturb(net.init(jax.random.key(0), jnp.float32), 1)
    low = jax.tree.map(lambda p: p.astype(dtype), params)
    x, y, key = _labels(2, (5, 4), 10), _labels(3, (5, 4), 3), jax.random.key(4)
    fn = jax.jit(net.value_and_grad)
    loss, grads = fn(low, x, y, key=key)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in jax.tree.leaves(grads))
    with jax.enable_x64(True):
        up = jax.tree.map(lambda p: np.asarray(p, np.float64), low)
        want_loss, want_grads = fn(up, x, y, key=key)
    rtol = bp.DEFAULT_RTOL[dtype.name]
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=rtol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want)
        assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_weights_are_jax_variance_scaling_drawn_flat(dtype):
    """The init draws flat and reshapes (XLA:CPU compiles 4-D draws slowly): the numbers are
    jax.nn.initializers.variance_scaling's, the same bits through the same elementwise maths,
    so at most a rounding apart (4 units of the dtype's epsilon, relative)."""
    from bpjax.layers._init import INIT_SCALING, truncated_normal_weight

    with jax.enable_x64(dtype == "float64"):
        for shape, (in_axis, out_axis) in (((7, 5), (-1, -2)), ((3, 3, 4, 6), (-2, -1))):
            for scheme, (scale, mode) in INIT_SCALING.items():
                want = jax.nn.initializers.variance_scaling(
                    scale, mode, "truncated_normal", in_axis=in_axis, out_axis=out_axis
                )(jax.random.key(3), shape, dtype)
                got = truncated_normal_weight(
                    jax.random.key(3), shape, dtype, scheme, in_axis=in_axis, out_axis=out_axis
                )
                eps = float(jnp.finfo(dtype).eps)
                gap = jnp.abs(got.astype(float) - want.astype(float))
                assert got.dtype == want.dtype
                assert bool(jnp.all(gap <= 4 * eps * jnp.abs(want.astype(float))))
