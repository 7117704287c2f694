"""bpjax.testing.check_backward on the forms real hand-written VJPs take.

``jax.custom_vjp`` with ``nondiff_argnums`` (and its fwd/bwd pair), ``jax.custom_jvp``, static and
keyword arguments, pytree outputs, the ``no_retrace`` contract on a forward that retraces when
called eagerly, and ``order=2``: each right one passes and a planted wrong one fails. Every check
runs in float64, so a pass or a failure is the maths, not float32 roundoff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from bpjax.testing import BackwardMismatchError, assert_backward_matches, check_backward
from bpjax.testing._contracts import count_traces

pytestmark = pytest.mark.usefixtures("x64")

JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
VJP_ONLY = {"references": ("jax.vjp",), "contracts": ()}  # when the contracts are beside the point
ORDER2 = "jax.vjp∘jax.vjp (order 2)"


def _x(n=5):
    return jnp.linspace(-1.2, 0.9, n)  # float64: the x64 fixture is on


def _failing(report):
    """The references and contracts with a failing row, by their short names."""
    return {row.reference.split(":")[0].split(",")[0] for row in report.failures}


# -- jax.custom_vjp with nondiff_argnums, and the fwd/bwd pair ------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scaled_tanh(scale, x):  # scale: a Python float, static
    return jnp.tanh(scale * x)


def scaled_tanh_fwd(scale, x):
    assert isinstance(scale, float)  # never converted to an array nor traced
    y = jnp.tanh(scale * x)
    return y, y


def scaled_tanh_bwd(scale, y, g):  # d/dx tanh(a x) = a (1 - tanh²(a x))
    return (g * scale * (1 - y**2),)


def scaled_tanh_bwd_unscaled(scale, y, g):  # forgets the chain rule's factor a
    del scale
    return (g * (1 - y**2),)


scaled_tanh.defvjp(scaled_tanh_fwd, scaled_tanh_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply(fn, x):  # fn: a Python callable, static
    return fn(x)


def apply_fwd(fn, x):
    return fn(x), x


def apply_bwd(fn, x, g):
    return (jax.vjp(fn, x)[1](g)[0],)


apply.defvjp(apply_fwd, apply_bwd)


@JIT
def test_custom_vjp_with_nondiff_argnums_holds_them_fixed(jit):
    report = assert_backward_matches(scaled_tanh, None, 2.5, _x(), jit=jit)
    assert {row.path for row in report.rows} == {"x", "backward"}  # scale is not checked
    report = assert_backward_matches(apply, None, jnp.sin, _x(), jit=jit, **VJP_ONLY)
    assert [row.path for row in report.rows] == ["x"]


@JIT
def test_fwd_bwd_pair_with_nondiff_argnums_as_defvjp_takes_them(jit):
    report = check_backward(scaled_tanh_fwd, scaled_tanh_bwd, 2.5, _x(), nondiff_argnums=0,
                            jit=jit)  # fmt: skip
    assert report.ok, report
    wrong = check_backward(scaled_tanh_fwd, scaled_tanh_bwd_unscaled, 2.5, _x(),
                           nondiff_argnums=(0,), jit=jit, contracts=())  # fmt: skip
    assert {"jax.vjp", "jvp", "finite_diff"} <= _failing(wrong)
    assert wrong.failing_paths == ("x",)


def test_a_wrong_nondiff_backward_is_caught_through_the_custom_vjp():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(scale, x):
        return jnp.tanh(scale * x)

    f.defvjp(scaled_tanh_fwd, scaled_tanh_bwd_unscaled)
    assert "jax.vjp" in _failing(check_backward(f, None, 2.5, _x(), **VJP_ONLY))


# -- jax.custom_jvp: the manual VJP is JAX's transpose of the rule --------------------------


def _softplus_with_rule(rule):
    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    @softplus.defjvp
    def softplus_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return softplus(x), t * rule(x)

    return softplus


@JIT
def test_custom_jvp_right_rule_passes_and_a_wrong_one_fails(jit):
    right = _softplus_with_rule(jax.nn.sigmoid)  # softplus' = σ
    report = assert_backward_matches(right, None, _x(), jit=jit)
    assert [p for p, _ in report.kappa] == ["x"]
    wrong = check_backward(_softplus_with_rule(jnp.tanh), None, _x(), jit=jit, contracts=())
    assert {"jax.vjp", "jvp", "finite_diff"} <= _failing(wrong)


# -- static and keyword arguments ---------------------------------------------------------


def power_fwd(x, n):  # n: a static Python int (x**n is then an exact integer power)
    assert isinstance(n, int)
    y = x**n
    return y, (x, jnp.asarray(n, x.dtype))


def power_bwd(res, g):
    x, n = res
    return g * n * x ** (n - 1), None  # no cotangent for the static exponent


@JIT
def test_static_argnums_are_held_fixed_as_python_values(jit):
    report = assert_backward_matches(power_fwd, power_bwd, _x(), 3, static_argnums=1, jit=jit)
    assert {row.path for row in report.rows} == {"x", "backward"}


_tanh_vjp = jax.custom_vjp(jnp.tanh)
_tanh_vjp.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)), lambda y, g: (g * (1 - y**2),))


def act(x, name, *, w, shift):  # name: static string; w: array held fixed; shift: static float
    z = x * w + shift
    return {"tanh": _tanh_vjp, "sin": jnp.sin}[name](z)


def act_reference(x, name, *, w, shift):
    return {"tanh": jnp.tanh, "sin": jnp.sin}[name](x * w + shift)


@JIT
def test_kwargs_arrays_are_held_fixed_and_other_values_are_static(jit):
    w = jnp.linspace(0.5, 1.5, 5)
    options = {"static_argnums": 1, "kwargs": {"w": w, "shift": 0.25}, "reference": act_reference}
    report = assert_backward_matches(act, None, _x(), "tanh", jit=jit, **options)
    assert {row.path for row in report.rows} == {"x", "backward"}

    def act_wrong(x, name, *, w, shift):  # drops w from the chain rule: d/dx = w tanh'(z)
        return _tanh_vjp(jax.lax.stop_gradient(x * (w - 1)) + x + shift)

    wrong = check_backward(act_wrong, None, _x(), "tanh", **options, **VJP_ONLY)
    assert wrong.failing_paths == ("x",)


def test_misused_arguments_are_named():
    x = _x()
    with pytest.raises(TypeError, match=r"primals: n is a str, not an array.*=\(1,\)"):
        check_backward(power_fwd, power_bwd, x, "3")
    with pytest.raises(TypeError, match="static_argnums: expected an int or a sequence of ints"):
        check_backward(power_fwd, power_bwd, x, 3, static_argnums="1")
    with pytest.raises(ValueError, match="static_argnums: expected positions among the 2"):
        check_backward(power_fwd, power_bwd, x, 3, static_argnums=2)
    with pytest.raises(TypeError, match=r"static_argnums: primals\[1\].*list is not hashable"):
        check_backward(power_fwd, power_bwd, x, [3], static_argnums=1)
    with pytest.raises(ValueError, match=r"argnums: positions \[1\] are static"):
        check_backward(power_fwd, power_bwd, x, 3, static_argnums=1, argnums=(0, 1))
    with pytest.raises(TypeError, match="kwargs: expected a dict"):
        check_backward(act, None, x, "tanh", static_argnums=1, kwargs=[("w", x)],
                       reference=act_reference)  # fmt: skip
    with pytest.raises(TypeError, match=r"kwargs\['shift'\]: .*list is not hashable"):
        check_backward(act, None, x, "tanh", static_argnums=1, kwargs={"w": x, "shift": [0.1]},
                       reference=act_reference)  # fmt: skip
    with pytest.raises(ValueError, match=r"nondiff_argnums: forward is a custom_vjp with .*\(0,\)"):
        check_backward(scaled_tanh, None, 2.5, x, nondiff_argnums=1)
    with pytest.raises(ValueError, match=r"nondiff_argnums: .* backward is None"):
        check_backward(act, None, x, "tanh", nondiff_argnums=1, reference=act_reference)
    for order in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="order: expected 1"):
            check_backward(power_fwd, power_bwd, x, 3, static_argnums=1, order=order)


# -- outputs: pytrees, dtypes, complex ------------------------------------------------------


@jax.custom_vjp
def tanh_and_norm(x):  # (y, {"norm": ‖y‖²}): a tuple holding a dict
    y = jnp.tanh(x)
    return y, {"norm": jnp.sum(y**2)}


def tanh_and_norm_fwd(x):
    y = jnp.tanh(x)
    return (y, {"norm": jnp.sum(y**2)}), y


def tanh_and_norm_bwd(y, g):
    gy, gaux = g
    return ((gy + 2 * gaux["norm"] * y) * (1 - y**2),)


tanh_and_norm.defvjp(tanh_and_norm_fwd, tanh_and_norm_bwd)


@JIT
def test_pytree_outputs_get_a_cotangent_of_their_structure(jit):
    assert_backward_matches(tanh_and_norm, None, _x(), jit=jit)
    c = (jnp.ones(5), {"norm": jnp.asarray(-2.0)})
    report = assert_backward_matches(tanh_and_norm_fwd, tanh_and_norm_bwd, _x(), cotangent=c,
                                     jit=jit, **VJP_ONLY)  # fmt: skip
    assert report.ok
    with pytest.raises(ValueError, match=r"cotangent: structure .*expected the output's"):
        check_backward(tanh_and_norm, None, _x(), cotangent=(jnp.ones(5), jnp.asarray(1.0)))
    with pytest.raises(ValueError, match=r"cotangent\[1\]\['norm'\]: float64\[2\], expected .*"):
        check_backward(tanh_and_norm, None, _x(), cotangent=(jnp.ones(5), {"norm": jnp.ones(2)}))


def test_outputs_that_do_not_follow_the_inputs_dtype_are_named():
    def fwd_count(x):  # an integer output leaf has no cotangent
        return (jnp.sin(x), jnp.sum(x > 0)), jnp.cos(x)

    with pytest.raises(TypeError, match=r"forward: expected floating outputs.*output\[1\] is int"):
        check_backward(fwd_count, lambda cos, g: (g[0] * cos,), _x())

    def fwd_f32(x):  # a fixed cast: the float64 shadow cannot run it
        return jnp.sin(x).astype(jnp.float32), jnp.cos(x)

    with pytest.raises(TypeError, match="forward: output is float32 when the inputs are cast to"):
        check_backward(fwd_f32, lambda cos, g: (g * cos,), _x().astype(jnp.float32))


def test_complex_is_not_supported_and_says_so():
    z = _x().astype(jnp.complex128)
    with pytest.raises(TypeError, match="primals: x is complex128: complex inputs are not"):
        check_backward(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),), z)
    with pytest.raises(TypeError, match="forward: output is complex128: complex outputs are not"):
        check_backward(lambda x: (x.astype(jnp.complex128), None), lambda r, g: (g,), _x())


# -- no_retrace counts the backward's traces, not the forward's ------------------------------


def _newton_lambertw(x, steps=None):
    """W(x), the root of w eʷ = x (x > 0), by Newton: a while_loop, or ``steps`` unrolled."""

    def step(w):
        ew = jnp.exp(w)
        return w - (w * ew - x) / (ew * (1 + w))

    w0 = jnp.log1p(x)
    if steps is not None:  # a fixed count is reverse-differentiable: the reference
        return lax.fori_loop(0, steps, lambda i, w: step(w), w0)

    def not_converged(state):  # a step within a few ulps: Newton has converged (quadratically)
        i, w, w_prev = state
        ulps = 4 * jnp.finfo(w.dtype).eps * (1 + jnp.abs(w))
        return (i < 100) & jnp.any(jnp.abs(w - w_prev) > ulps)

    return lax.while_loop(not_converged, lambda s: (s[0] + 1, step(s[1]), s[1]),
                          (0, step(w0), w0))[1]  # fmt: skip


@jax.custom_vjp
def lambertw(x):
    return _newton_lambertw(x)


def _lambertw_fwd(x):
    w = _newton_lambertw(x)
    return w, (x, w)


def _lambertw_bwd(res, g):  # W'(x) = W / (x (1 + W)), from differentiating w eʷ = x
    x, w = res
    return (g * w / (x * (1 + w)),)


lambertw.defvjp(_lambertw_fwd, _lambertw_bwd)


# eagerly, each call of the while_loop compiles anew: the nojit check is the slow one
@pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["jit", "nojit"])  # fmt: skip
def test_a_forward_that_retraces_eagerly_passes_no_retrace(jit):
    x, x2 = jnp.linspace(0.5, 3.0, 4), jnp.linspace(0.7, 2.0, 4)
    lambertw(x)
    assert count_traces(lambertw, x2) > 0  # the premise: an eager while_loop traces on every call
    reference = functools.partial(_newton_lambertw, steps=12)  # quadratic: converged long before
    options = {"references": ("jax.vjp",), "contracts": ("no_retrace",)}
    report = assert_backward_matches(lambertw, None, x, reference=reference, jit=jit, **options)
    row = next(r for r in report.rows if r.reference.startswith("no retrace"))
    assert row.passed and "traced nothing" in row.note


def test_a_custom_vjp_backward_that_builds_a_new_jit_every_call_fails_no_retrace():
    @jax.custom_vjp
    def f(x):
        return _newton_lambertw(x)

    def bwd(res, g):
        x, w = res
        derivative = jax.jit(lambda x, w: w / (x * (1 + w)))  # a new function every call
        return (g * derivative(x, w),)

    f.defvjp(_lambertw_fwd, bwd)
    report = check_backward(f, None, jnp.linspace(0.5, 3.0, 4), references=("jax.vjp",),
                            contracts=("no_retrace",),
                            reference=functools.partial(_newton_lambertw, steps=12))  # fmt: skip
    assert _failing(report) == {"no retrace"}
    assert report.failures[0].note.startswith("called as it is: 1 new traces")


# -- order=2: the VJP of the VJP ------------------------------------------------------------


def sin_fwd(x):
    return jnp.sin(x), x


def sin_bwd(x, g):
    return (g * jnp.cos(x),)


def sin_bwd_frozen(x, g):  # right at the point; its derivative misses −sin x: cos is held constant
    return (g * jnp.cos(lax.stop_gradient(x)),)


def _order2(report):
    return [row for row in report.rows if row.reference.startswith(ORDER2)]


@JIT
def test_order2_passes_a_right_backward_and_catches_a_frozen_term(jit):
    report = assert_backward_matches(sin_fwd, sin_bwd, _x(), order=2, jit=jit, **VJP_ONLY)
    rows = _order2(report)
    assert {row.path for row in rows} == {"x", "cotangent"}
    assert all(row.note == "the backward run in float64" for row in rows)
    first = check_backward(sin_fwd, sin_bwd_frozen, _x(), jit=jit, **VJP_ONLY)
    assert first.ok  # first order cannot see it
    wrong = check_backward(sin_fwd, sin_bwd_frozen, _x(), order=2, jit=jit, **VJP_ONLY)
    # θ̄ = Σ c ∂²f d is wrong; c̄ = J d is not
    assert [(row.path, row.reference.split(",")[0]) for row in wrong.failures] == [("x", ORDER2)]
    with pytest.raises(BackwardMismatchError, match="order 2"):
        assert_backward_matches(sin_fwd, sin_bwd_frozen, _x(), order=2, **VJP_ONLY)


def _softplus_with_hvp(grad_bwd):
    """softplus whose backward is itself a custom_vjp: a hand-written HVP ``grad_bwd``."""

    @jax.custom_vjp
    def grad(x, g):  # g σ(x)
        return g * jax.nn.sigmoid(x)

    grad.defvjp(lambda x, g: (g * jax.nn.sigmoid(x), (x, g)), grad_bwd)

    @jax.custom_vjp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defvjp(lambda x: (jnp.logaddexp(x, 0.0), x), lambda x, g: (grad(x, g),))
    return softplus


def hvp_right(res, h):  # ∂(g σ)/∂x = g σ (1 − σ), ∂(g σ)/∂g = σ
    x, g = res
    s = jax.nn.sigmoid(x)
    return h * g * s * (1 - s), h * s


def hvp_wrong(res, h):  # forgets the (1 − σ) of σ'
    x, g = res
    s = jax.nn.sigmoid(x)
    return h * g * s, h * s


@JIT
def test_order2_checks_a_hand_written_hvp(jit):
    x = 2 * _x()
    report = assert_backward_matches(_softplus_with_hvp(hvp_right), None, x, order=2, jit=jit,
                                     **VJP_ONLY)  # fmt: skip
    assert len(_order2(report)) == 2
    wrong = check_backward(_softplus_with_hvp(hvp_wrong), None, x, order=2, jit=jit, **VJP_ONLY)
    assert wrong.failing_paths == ("x",)
    assert all(row.reference.startswith(ORDER2) for row in wrong.failures)


def layer_fwd(x, w, s):  # y = tanh(x W) s, several leaves and a matrix product
    y = jnp.tanh(x @ w)
    return y * s, (x, w, s, y)


def layer_bwd(res, g):
    x, w, s, y = res
    dz = g * s * (1 - y**2)
    return dz @ w.T, x.T @ dz, jnp.sum(g * y, axis=0)


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float64, marks=pytest.mark.slow), jnp.float32])
def test_order2_of_a_layer_every_leaf(dtype):
    x = jax.random.normal(jax.random.key(1), (3, 4), dtype)
    w = jax.random.normal(jax.random.key(2), (4, 2), dtype) / 2
    s = jnp.asarray([1.5, -0.5], dtype)
    report = assert_backward_matches(layer_fwd, layer_bwd, x, w, s, order=2, **VJP_ONLY)
    rows = _order2(report)
    assert {row.path for row in rows} == {"x", "w", "s", "cotangent"}
    working = [row for row in rows if row.reference == ORDER2]
    assert len(working) == (0 if dtype == jnp.float64 else 4)  # float64 is its own shadow
    assert all(0 <= row.max_abs_err <= row.allowed for row in rows)
