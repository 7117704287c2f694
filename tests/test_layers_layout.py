"""bpjax.layers.weight_grad and its dot layout: pinned, measured once, the same maths either way.

Nothing here times anything: which layout is faster is the machine's business (the benchmarks
record it); the tests check that the choice is one of the two, made once per shape, pinned by the
environment variable, and that both layouts compute ``δᵀ a``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.layers import LAYOUT_ENV, _layout, weight_grad, weight_grad_layout

BIG = (64, 1024, 1024)  # 2·B·n_l·n_{l-1} = 2^27 ≥ MEASURE_FLOPS: measured in auto


@pytest.mark.parametrize("layout", ["fold", "materialise", " Materialise "])
def test_the_environment_pins_the_layout(monkeypatch, layout):
    monkeypatch.setenv(LAYOUT_ENV, layout)
    assert weight_grad_layout(*BIG, jnp.float32) == layout.strip().lower()
    assert weight_grad_layout(2, 3, 4, jnp.float32) == layout.strip().lower()


def test_a_bad_pin_is_named(monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, "transpose")
    with pytest.raises(ValueError, match=f"{LAYOUT_ENV}: expected one of fold, materialise"):
        weight_grad_layout(*BIG, jnp.float32)


def test_auto_folds_small_dots_and_measures_big_ones_once(monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    assert _layout.MEASURE_FLOPS > 2 * 4 * 8 * 8
    assert weight_grad_layout(4, 8, 8, jnp.float32) == "fold"
    first = weight_grad_layout(*BIG, jnp.float32)
    assert first in _layout.LAYOUTS
    misses = _layout._measured_layout.cache_info().misses
    assert weight_grad_layout(*BIG, jnp.float32) == first  # cached: no second measurement
    assert _layout._measured_layout.cache_info().misses == misses


@pytest.mark.parametrize("layout", ["fold", "materialise", "auto"])
@pytest.mark.parametrize("jit", [False, True])
def test_every_layout_is_delta_transposed_times_a(monkeypatch, x64, layout, jit):
    monkeypatch.setenv(LAYOUT_ENV, layout)
    batch, n_out, n_in = BIG
    kd, ka = jax.random.split(jax.random.key(0))
    delta = jax.random.normal(kd, (batch, n_out), jnp.float64)
    a = jax.random.normal(ka, (batch, n_in), jnp.float64)
    got = (jax.jit(weight_grad) if jit else weight_grad)(delta, a)
    want = np.asarray(delta).T @ np.asarray(a)
    # each entry sums B = 64 products: |error| ≤ γ_64 Σ_n |δ_n a_n| with γ_64 ≈ 64 · 2^-53
    bound = 64 * 2.0**-53 * (np.abs(np.asarray(delta)).T @ np.abs(np.asarray(a)))
    assert np.all(np.abs(np.asarray(got) - want) <= bound)


def test_a_network_traces_with_a_measured_layout_under_jit_and_vmap(monkeypatch):
    # the measurement runs while the caller's program is being traced: it must not be staged
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    net = bp.MLP((1024, 1024, 4), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x = jnp.ones((2, 48, 1024))  # B = 48: a shape no other test measured, so it is measured here
    y = jnp.zeros((2, 48), jnp.int32)
    misses = _layout._measured_layout.cache_info().misses
    grads = jax.vmap(jax.jit(net.value_and_grad), in_axes=(None, 0, 0))(params, x, y)[1]
    assert _layout._measured_layout.cache_info().misses > misses  # measured inside the trace
    assert grads[0]["W"].shape == (2, 1024, 1024)
    assert bool(jnp.all(jnp.isfinite(grads[0]["W"])))


@pytest.mark.parametrize("layout", ["fold", "materialise"])
def test_the_timed_program_computes_the_repeated_backward_step(x64, layout):
    # The measurement times R steps δ_i = g ∘ tanh'(z + iε), Σ δ_iᵀa, Σ δ_i W in one loop; if XLA
    # could hoist or drop them the timing would say nothing. Check the sums against NumPy.
    repeats, eps = 5, 1e-7
    g = jnp.arange(12.0, dtype=jnp.float64).reshape(4, 3) / 7
    z = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)
    a = jnp.arange(8.0, dtype=jnp.float64).reshape(4, 2) / 5
    w = jnp.arange(6.0, dtype=jnp.float64).reshape(3, 2) / 3
    fn = dict(zip(_layout.LAYOUTS, (_layout._fold, _layout._materialise), strict=True))[layout]
    got_w, got_x = (np.asarray(t) for t in _layout._repeated(fn, repeats)(g, z, a, w))
    # the same XLA tanh as the loop's, so only the summation orders differ
    deltas = [np.asarray(g * (1 - jnp.tanh(z + i * eps) ** 2)) for i in range(repeats)]
    want_w = sum(d.T @ np.asarray(a) for d in deltas)
    want_x = sum(d @ np.asarray(w) for d in deltas)
    # every term is ≥ 0 (g, a, w ≥ 0 and tanh' > 0): each sum of 5·4 products stays within ~25 u
    # relative (u = 2^-53) in any order, on both sides; 128 u leaves room for a fused δ_i that
    # rounds differently by an ulp or two
    np.testing.assert_allclose(got_w, want_w, rtol=128 * 2.0**-53)
    np.testing.assert_allclose(got_x, want_x, rtol=128 * 2.0**-53)


@pytest.mark.parametrize(
    ("delta_shape", "a_shape"),
    [((3,), (3, 2)), ((3, 2), (4, 2)), ((3, 2, 1), (3, 2)), ((3, 2), (3,))],
)
@pytest.mark.parametrize("jit", [False, True])
def test_weight_grad_names_its_arguments_on_bad_shapes(delta_shape, a_shape, jit):
    fn = jax.jit(weight_grad) if jit else weight_grad
    with pytest.raises(ValueError, match=r"weight_grad: expected delta \(B, n_l\) and a_prev"):
        fn(jnp.ones(delta_shape), jnp.ones(a_shape))


def test_the_measurement_runs_under_a_callers_transfer_guard(monkeypatch):
    # measuring builds its own inputs inside the caller's trace: a disallowing guard is the
    # caller's rule for its own arrays, not for the measurement's
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    delta, a = jnp.ones((40, 1024)), jnp.ones((40, 768))  # a shape no other test measured
    misses = _layout._measured_layout.cache_info().misses
    with jax.transfer_guard("disallow"):
        grad = jax.jit(weight_grad)(delta, a)
    assert _layout._measured_layout.cache_info().misses > misses
    assert grad.shape == (1024, 768)
