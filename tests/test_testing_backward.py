"""bpjax.testing: assert_backward_matches on custom_vjp functions, right and deliberately wrong."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.testing import (
    BACKWARD_REFERENCES,
    CONTRACTS,
    BackwardMismatchError,
    BackwardReport,
    allowed_errors,
    assert_backward_matches,
    check_backward,
    unit_roundoff,
)

# A small layer with a hand-written backward: y = tanh(x W) * s, residuals (x, W, s, y).


def layer_fwd(x, w, s):
    y = jnp.tanh(x @ w)
    return y * s, (x, w, s, y)


def layer_bwd(res, g):
    x, w, s, y = res
    dz = g * s * (1 - y**2)  # δ = (g ∘ s) ∘ tanh'(z)
    return dz @ w.T, x.T @ dz, jnp.sum(g * y, axis=0)


@jax.custom_vjp
def layer(x, w, s):
    return layer_fwd(x, w, s)[0]


layer.defvjp(layer_fwd, layer_bwd)


def _inputs(dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(1), (3, 4), dtype)
    w = jax.random.normal(jax.random.key(2), (4, 2), dtype) / 2
    return x, w, jnp.asarray([1.5, -0.5], dtype)


def _failing(report):
    """The contracts and references with a failing row, by their short names."""
    return {row.reference.split(":")[0].split(",")[0] for row in report.failures}


# -- right backward passes -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_right_fwd_bwd_pair_passes_every_check(jit):
    report = assert_backward_matches(layer_fwd, layer_bwd, *_inputs(), jit=jit)
    assert isinstance(report, BackwardReport) and report.ok
    names = {row.reference.split(":")[0].split(",")[0] for row in report.rows}
    assert names == {"jax.vjp", "jvp", "finite_diff", "taylor", *CONTRACTS[:-1], "no retrace"}
    assert {row.path for row in report.rows} >= {"x", "w", "s"}
    assert report.dtype == "float32" and report.scale > 0


def test_custom_vjp_function_is_checked_through_jax_vjp():
    report = assert_backward_matches(layer, None, *_inputs())
    assert report.ok and [p for p, _ in report.kappa] == ["x", "w", "s"]


def test_network_custom_vjp_with_integer_labels_and_a_reference():
    net = bp.MLP((4, 5, 3), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x, y = _inputs()[0], jnp.array([0, 2, 1])
    report = assert_backward_matches(
        bp.custom_vjp(net, loss=True), None, params, x, y, reference=net.loss,
        references=("jax.vjp",), contracts=("linear", "zero"),
    )  # fmt: skip
    assert {row.path for row in report.rows} == {
        "params[0]['W']", "params[0]['b']", "params[1]['W']", "params[1]['b']", "x",
    }  # fmt: skip  # the integer labels are held fixed


def test_report_table_shows_allowed_beside_observed():
    report = check_backward(layer_fwd, layer_bwd, *_inputs(), contracts=("zero",))
    header = str(report).splitlines()[0].split()
    assert header[header.index("|Δ|") + 1] == "allowed"
    vjp = next(r for r in report.rows if r.reference == "jax.vjp" and r.path == "w")
    assert 0 <= vjp.max_abs_err <= vjp.allowed < 1e-5 * report.scale


# -- each contract catches a backward that violates it -------------------------------------


def bwd_plus_constant(res, g):
    dx, dw, ds = layer_bwd(res, g)
    return dx + 0.01, dw, ds


def bwd_unit_cotangent(res, g):  # ignores the cotangent's scale
    return layer_bwd(res, g / jnp.sqrt(jnp.sum(g**2)))


def test_a_backward_that_adds_a_constant_fails_linearity_and_zero():
    report = check_backward(layer_fwd, bwd_plus_constant, *_inputs())
    assert {"linear", "additive", "zero", "jax.vjp", "jvp"} <= _failing(report)
    assert {"vmap", "deterministic", "no retrace"}.isdisjoint(_failing(report))
    assert set(report.failing_paths) == {"x"}
    with pytest.raises(BackwardMismatchError, match="zero: bwd") as info:
        assert_backward_matches(layer_fwd, bwd_plus_constant, *_inputs())
    assert isinstance(info.value, AssertionError) and info.value.report.failing_paths == ("x",)


def test_a_backward_that_ignores_the_cotangent_scale_fails_linearity():
    report = check_backward(layer_fwd, bwd_unit_cotangent, *_inputs(), references=("jax.vjp",))
    assert {"linear", "additive", "jax.vjp"} <= _failing(report)
    zero = [row for row in report.failures if row.reference.startswith("zero")]
    assert zero and all("nan" in row.note for row in zero)  # 0 / 0, named as a NaN


@jax.custom_batching.custom_vmap
def _scale_rows(g):
    return 2.0 * g


@_scale_rows.def_vmap
def _scale_rows_vmap(axis_size, in_batched, g):  # wrong batching rule: mixes the examples
    del axis_size, in_batched
    return 2.0 * jnp.mean(g, axis=0, keepdims=True) * jnp.ones_like(g), True


def bwd_wrong_under_vmap(res, g):
    return layer_bwd(res, _scale_rows(g) / 2.0)


def test_a_backward_whose_vmapped_form_differs_fails_vmap_only():
    report = check_backward(layer_fwd, bwd_wrong_under_vmap, *_inputs())
    assert _failing(report) == {"vmap"}
    assert {row.path for row in report.failures} == {"x", "w", "s"}
    row = next(row for row in report.failures if row.path == "x")
    assert row.note.startswith("3 examples") and len(row.worst_index) == 3  # (example, i, j)


def _ulps(shape):  # a few ulps of noise, drawn anew on every call
    return np.random.default_rng().integers(-4, 5, shape).astype(np.int32)


def bwd_nondeterministic(res, g):
    noise = jax.pure_callback(_ulps, jax.ShapeDtypeStruct(g.shape, jnp.int32), g.shape,
                              vmap_method="sequential")  # fmt: skip
    return layer_bwd(res, g * (1 + noise.astype(g.dtype) * jnp.finfo(g.dtype).eps))


def test_a_nondeterministic_backward_fails_determinism_unless_a_tolerance_is_stated():
    # contracts only: the ±4-ulp noise on g is up to 8u relative, above what the jax.vjp rows
    # allow a well-conditioned float32 backward (C_UNIT·u plus the measured roundoff)
    options = {"references": (), "contracts": ("deterministic",)}
    report = check_backward(layer_fwd, bwd_nondeterministic, *_inputs(), **options)
    assert _failing(report) == {"deterministic"}, report
    assert check_backward(
        layer_fwd, bwd_nondeterministic, *_inputs(), determinism_rtol=1e-5, **options
    ).ok


def bwd_new_jit_every_call(res, g):
    x, w, s, y = res
    scale = jax.jit(lambda g, s: g * s)  # a new function object: traced and compiled every call
    dz = scale(g, s) * (1 - y**2)
    return dz @ w.T, x.T @ dz, jnp.sum(g * y, axis=0)


def test_a_backward_that_builds_a_new_jit_every_call_fails_the_retrace_contract():
    options = {"references": ("jax.vjp",), "contracts": ("no_retrace",)}
    report = check_backward(layer_fwd, bwd_new_jit_every_call, *_inputs(), **options)
    assert _failing(report) == {"no retrace"}, report
    assert "called as it is: 1 new traces" in report.failures[0].note
    assert check_backward(layer_fwd, layer_bwd, *_inputs(), jit=False, **options).ok
    assert check_backward(layer, None, *_inputs(), **options).ok


# -- NaN and Inf, dtypes, tolerances ---------------------------------------------------------


def bwd_nan_at_one(res, g):
    dx, dw, ds = layer_bwd(res, g)
    return dx.at[1, 2].set(jnp.nan), dw, ds


def test_a_nan_is_named_with_its_leaf_and_first_index():
    report = check_backward(layer_fwd, bwd_nan_at_one, *_inputs(), references=("jax.vjp",),
                            contracts=())  # fmt: skip
    (row,) = [r for r in report.failures if r.reference == "jax.vjp"]
    assert row.path == "x" and row.worst_index == (1, 2) and "manual is nan at (1, 2)" in row.note


def xlogx_fwd(x):  # x log x, 0 at 0
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, x * jnp.log(safe), 0.0), x


def xlogx_fwd_naive(x):  # its autodiff is 0 · (−∞) = nan at 0
    return jnp.where(x > 0, x * jnp.log(x), 0.0), x


def xlogx_bwd(x, g):  # d/dx = log x + 1, taken as 0 at 0 (one-sided convention)
    return (jnp.where(x > 0, g * (jnp.log(jnp.where(x > 0, x, 1.0)) + 1), 0.0),)


def test_a_reference_nan_is_named_and_left_out_where_the_backward_is_finite():
    x = jnp.array([0.0, 0.5, 2.0])
    options = {"references": ("jax.vjp",), "contracts": ("linear",)}
    report = check_backward(xlogx_fwd_naive, xlogx_bwd, x, **options)
    assert report.ok, report
    vjp = [row for row in report.rows if row.reference.startswith("jax.vjp")]
    undefined = "1 of 3 elements (first (0,)) where the reference is undefined"
    assert all(undefined in r.note for r in vjp)
    assert check_backward(xlogx_fwd, xlogx_bwd, x, **options).ok  # the safe forward: all compared


def test_bfloat16_checks_through_the_float64_shadow():
    x, w, s = _inputs(jnp.bfloat16)
    report = assert_backward_matches(layer_fwd, layer_bwd, x, w, s,
                                     contracts=("linear", "zero"))  # fmt: skip
    assert report.dtype == "bfloat16"
    finite_diff = [r for r in report.rows if r.reference == "finite_diff"]
    assert finite_diff and all(r.passed and float(r.note.split()[-1]) > 0 for r in finite_diff)

    def bwd_missing_derivative(res, g):  # forgets tanh': wrong far beyond bfloat16's roundoff
        x, w, s, y = res
        dz = g * s
        return dz @ w.T, x.T @ dz, jnp.sum(g * y, axis=0)

    wrong = check_backward(layer_fwd, bwd_missing_derivative, x, w, s, contracts=())
    assert {"x", "w"} <= set(wrong.failing_paths) and "s" not in wrong.failing_paths


def test_float64_primals_are_held_to_float64_roundoff(x64):
    x, w, s = _inputs(jnp.float64)
    report = assert_backward_matches(layer_fwd, layer_bwd, x, w, s, contracts=())
    vjp = [r for r in report.rows if r.reference.startswith("jax.vjp")]
    assert len(vjp) == 3 and all(r.allowed < 1e-12 * report.scale for r in vjp)


def test_allowed_errors_follow_the_formula():
    reference = [np.array([1.0, -4.0]), np.array([0.5])]
    measured = [np.array([1.0, -4.0 + 8 * 2.0**-24]), np.array([np.inf])]
    allowed, kappa = allowed_errors(reference, measured, dtype=jnp.bfloat16,
                                    measured_dtype=jnp.float32)  # fmt: skip
    u = unit_roundoff(jnp.bfloat16)
    assert kappa[0] == pytest.approx(8.0) and kappa[1] == np.inf
    # C_ELEMENT · κ u (the measured error in bfloat16's units) + C_UNIT · u · max |r|, per leaf
    assert allowed[0] == pytest.approx(u * (4 * 8.0 + 4 * 4.0)) and allowed[1] == np.inf


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_named():
    with pytest.raises(TypeError, match=r"reference: forward is not a jax\.custom_vjp"):
        check_backward(jnp.sin, None, jnp.ones(2))
    with pytest.raises(ValueError, match=r"contracts: .*unknown: \['linearity'\]"):
        check_backward(layer_fwd, layer_bwd, *_inputs(), contracts=("linearity",))
    with pytest.raises(ValueError, match="references: "):
        check_backward(layer_fwd, layer_bwd, *_inputs(), references="jax.vjp")
    with pytest.raises(ValueError, match="primals: no floating leaf"):
        check_backward(lambda n: (n * 1.0, None), lambda r, g: (None,), jnp.arange(3))
    with pytest.raises(ValueError, match="argnums: expected positions among the 3 primals"):
        check_backward(layer_fwd, layer_bwd, *_inputs(), argnums=5)
    with pytest.raises(TypeError, match="backward: expected"):
        check_backward(layer_fwd, "bwd", *_inputs())


def test_a_backward_with_the_wrong_structure_is_one_failing_row():
    report = check_backward(layer_fwd, lambda res, g: layer_bwd(res, g)[:2], *_inputs())
    (row,) = report.rows
    assert not report.ok and row.reference == "structure" and "2 cotangents for 3" in row.note


def test_public_names():
    assert set(BACKWARD_REFERENCES) == {"jax.vjp", "jvp", "finite_diff", "taylor"}
    assert bp.testing.check_backward is check_backward
    assert all(hasattr(bp.testing, name) for name in bp.testing.__all__)
