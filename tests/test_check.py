"""The gradient-checking harness: its report, its verdicts, and the planted bugs it must find."""

from __future__ import annotations

import html
import math
import re

import jax
import jax.numpy as jnp
import pytest
from rich.console import Console
from rich.table import Table

import bpjax as bp
from bpjax.layers import Dense

# -- a small function with a hand-written gradient ------------------------------------------------


def f(p, x):
    """A scalar with curvature along every direction: sin and cubes."""
    return jnp.sum(jnp.sin(p["w"] * x)) + 0.5 * jnp.sum(p["v"] ** 3)


def right(p, x):
    return f(p, x), {"w": x * jnp.cos(p["w"] * x), "v": 1.5 * p["v"] ** 2}


def wrong_v(p, x):
    """∇v off by 10%: a real bug, not roundoff."""
    value, grads = right(p, x)
    return value, {"w": grads["w"], "v": 1.1 * grads["v"]}


def _params(dtype=jnp.float64):
    p = {"w": jnp.array([0.3, -0.7, 1.2], dtype), "v": jnp.array([[0.5, -1.0], [2.0, 0.1]], dtype)}
    return p, jnp.array([1.0, 2.0, -0.5], dtype)


LEAVES = ("['v']", "['w']")  # jax's flattening order: sorted dict keys


def test_report_rows_for_right_gradients(x64):
    p, x = _params()
    report = bp.check_grads(right, f, p, x)
    assert isinstance(report, bp.GradCheckReport)
    assert report.ok and bool(report)
    assert report.failures == () and report.failing_paths == () and report.first_bad_layer is None
    assert report.dtype == "float64" and report.derived and report.rtol == 0.0
    assert not report.deltas_checked
    assert report.rows[0].path == "value" and report.rows[0].reference == "reference"
    leaf_rows = report.rows[1:]
    assert len(leaf_rows) == len(LEAVES) * len(bp.REFERENCES)
    assert {(r.path, r.reference) for r in leaf_rows} == {
        (leaf, ref) for leaf in LEAVES for ref in bp.REFERENCES
    }
    for row in report.rows:
        assert isinstance(row, bp.CheckRow) and row.passed
        assert row.max_abs_err >= 0
        if row.reference in ("jax.grad", "jax.vjp"):
            assert row.rel_err <= 1e-14
            assert isinstance(row.worst_index, tuple)
            assert len(row.worst_index) == (2 if row.path == "['v']" else 1)


def test_report_renders_as_text_html_and_rich(x64):
    p, x = _params()
    report = bp.check_grads(wrong_v, f, p, x)
    text = str(report)
    lines = text.splitlines()
    for column in ("leaf", "reference", "max |Δ|", "rel err", "worst at", "order", "status"):
        assert column in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(report.rows) + 1  # header, rule, a line per row, the summary
    failing_first = [r for r in report.rows if not r.passed] + [r for r in report.rows if r.passed]
    for line, row in zip(lines[2:], failing_first, strict=False):
        assert line.startswith(row.path)
        assert ("FAIL" in line) != row.passed
    assert lines[-1] == report.summary()
    assert "failing: ['v']" in report.summary()

    page = report._repr_html_()
    assert page.startswith("<table>") and "</table>" in page
    assert page.count("<tr") == 1 + len(report.rows)
    assert page.count('style="background:#fdd"') == len(report.failures)
    assert html.escape(report.summary()) in page

    table = report.to_rich()
    assert isinstance(table, Table)
    assert table.row_count == len(report.rows)
    assert [c.header for c in table.columns][:3] == ["leaf", "reference", "max |Δ|"]
    console = Console(record=True, width=200)
    console.print(table)
    assert "FAIL" in console.export_text()


def test_wrong_gradient_fails_every_reference_for_that_leaf_only(x64):
    p, x = _params()
    report = bp.check_grads(wrong_v, f, p, x)
    assert not report.ok
    assert report.failing_paths == ("['v']",)
    assert {r.reference for r in report.failures} == set(bp.REFERENCES)
    (grad_row,) = [r for r in report.failures if r.reference == "jax.grad"]
    assert grad_row.rel_err == pytest.approx(0.1, rel=1e-6)


def test_taylor_order_is_two_for_right_and_one_for_wrong(x64):
    p, x = _params()
    ok = {r.path: r.order for r in bp.check_grads(right, f, p, x).rows if r.reference == "taylor"}
    bad = {r.path: r for r in bp.check_grads(wrong_v, f, p, x).rows if r.reference == "taylor"}
    assert ok["['v']"] == pytest.approx(2.0, abs=0.1)
    assert ok["['w']"] == pytest.approx(2.0, abs=0.1)
    assert bad["['v']"].order == pytest.approx(1.0, abs=0.1) and not bad["['v']"].passed
    assert "h^1.0" in bad["['v']"].note
    assert bad["['w']"].passed


def test_assert_grads_match_raises_with_the_table(x64):
    p, x = _params()
    assert bp.assert_grads_match(right, f, p, x).ok
    with pytest.raises(bp.GradientMismatchError) as info:
        bp.assert_grads_match(wrong_v, f, p, x)
    err = info.value
    assert isinstance(err, AssertionError)
    assert not err.report.ok
    assert str(err.report) in str(err)
    assert "FAIL" in str(err) and "['v']" in str(err)
    with pytest.raises(AssertionError, match=r"manual gradients disagree"):
        bp.assert_grads_match(wrong_v, f, p, x)


def test_nan_in_manual_grads_is_reported_as_such(x64):
    p, x = _params()

    def with_nan(p, x):
        value, grads = right(p, x)
        return value, {"w": grads["w"].at[1].set(jnp.nan), "v": grads["v"]}

    report = bp.check_grads(with_nan, f, p, x)
    assert not report.ok and report.failing_paths == ("['w']",)
    grad_row = next(r for r in report.failures if r.reference == "jax.grad")
    assert math.isnan(grad_row.max_abs_err) and grad_row.worst_index == (1,)
    assert grad_row.note == "manual is nan at (1,)"
    assert "manual is nan" in str(report)


def test_wrong_tree_structure_is_reported_not_raised(x64):
    p, x = _params()

    def as_list(p, x):
        value, grads = right(p, x)
        return value, [grads["v"], grads["w"]]

    report = bp.check_grads(as_list, f, p, x)
    assert not report.ok
    (row,) = report.failures
    assert (row.path, row.reference) == ("grads", "structure")
    assert row.note == "grads has [0] where ['v'] is expected"  # the first differing path


def test_wrong_value_is_reported(x64):
    p, x = _params()
    report = bp.check_grads(lambda p, x: (f(p, x) + 1e-3, right(p, x)[1]), f, p, x)
    assert report.failing_paths == ("value",)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_check_grads_jit_and_not(jit, x64):
    p, x = _params()
    good = bp.check_grads(right, f, p, x, jit=jit)
    bad = bp.check_grads(wrong_v, f, p, x, jit=jit)
    assert good.ok and not bad.ok and bad.failing_paths == ("['v']",)
    other = bp.check_grads(right, f, p, x, jit=not jit)
    assert [(r.path, r.reference, r.passed) for r in good.rows] == [
        (r.path, r.reference, r.passed) for r in other.rows
    ]


def test_tolerances_are_derived_per_leaf_and_overridable(x64):
    p, x = _params()

    def slightly_off(p, x):  # 1e-7 relative: roundoff for float32, a bug for float64
        value, grads = right(p, x)
        return value, jax.tree.map(lambda g: g * (1 + 1e-7), grads)

    assert not bp.check_grads(slightly_off, f, p, x).ok
    loose = bp.check_grads(slightly_off, f, p, x, rtol=1e-5)
    assert loose.ok and loose.rtol == 1e-5
    assert bp.check_grads(slightly_off, f, p, x, atol=1.0).atol == 1.0

    p32, x32 = _params(jnp.float32)
    report32 = bp.check_grads(right, f, p32, x32)
    assert report32.dtype == "float32" and report32.derived
    assert report32.ok


def test_references_subset_and_bad_options(x64):
    p, x = _params()
    report = bp.check_grads(right, f, p, x, references=("jax.grad",))
    assert [r.reference for r in report.rows] == ["reference", "jax.grad", "jax.grad"]
    with pytest.raises(ValueError, match=r"references: unknown \['numerical'\]"):
        bp.check_grads(right, f, p, x, references=("jax.grad", "numerical"))
    with pytest.raises(ValueError, match=r"directions: expected at least 1, got 0"):
        bp.check_grads(right, f, p, x, directions=0)


# -- check_mlp and the planted bugs ---------------------------------------------------------------

# Three layers; the hidden and output widths are equal, so W and Wᵀ have the same shape and the
# bias of layer 2 could take layer 3's δ without a shape error. Batch 5 ≠ 6 keeps the batch axis
# from lining up with any other.
SIZES = (4, 6, 6, 6)
BATCH = 5
BUGS = (
    "sign flip in δ^2",
    "missing f' at layer 2",
    "W for Wᵀ in δ^1",
    "dropped 1/B",
    "∇b^2 from δ^3",
)


def _net():
    return bp.MLP(SIZES, ("tanh", "sigmoid", "softmax"), "cross_entropy")


def _data():
    net = _net()
    params = net.init(jax.random.key(0), jnp.float64)
    params = [
        {"W": layer["W"], "b": 0.3 * jax.random.normal(jax.random.key(l), layer["b"].shape)}
        for l, layer in enumerate(params)
    ]
    x = jax.random.normal(jax.random.key(7), (BATCH, SIZES[0]), jnp.float64)
    y = jnp.array([0, 5, 2, 2, 3])
    return net, params, x, y


def planted(net: bp.MLP, bug: str | None):
    """A copy of the δ-recursion from docs/design.md, written out here, with at most one bug.

    Layers are numbered as in the maths: layer l holds params[l-1] and deltas[l-1].
    """

    def backward(params, cache, y):
        batch = cache.x.shape[0]
        scale = 1.0 if bug == "dropped 1/B" else 1.0 / batch
        delta = net.output_delta(cache, y)  # δ^L, per example
        a_prev = [cache.x, *cache.a[:-1]]
        grads, deltas = [None] * net.num_layers, [None] * net.num_layers
        for l in range(net.num_layers, 0, -1):
            deltas[l - 1] = delta
            # ∇W^l = (1/B) (δ^l)ᵀ a^{l-1},  ∇b^l = (1/B) Σ_n δ^l_n
            grads[l - 1] = {
                "W": scale * (delta.T @ a_prev[l - 1]),
                "b": scale * jnp.sum(delta, axis=0),
            }
            w = params[l - 1]["W"]
            da = delta @ (w.T if bug == "W for Wᵀ in δ^1" and l == 2 else w)  # ∂C_n/∂a^{l-1}
            if l == 1:
                input_grad = scale * da
                break
            if bug == "missing f' at layer 2" and l - 1 == 2:
                delta = da
            else:  # δ^{l-1} = (δ^l W^l) ∘ f'(z^{l-1})
                delta = net.activations[l - 2].backward(cache.z[l - 2], cache.a[l - 2], da)
            if bug == "sign flip in δ^2" and l - 1 == 2:
                delta = -delta
        if bug == "∇b^2 from δ^3":
            grads[1]["b"] = scale * jnp.sum(deltas[2], axis=0)
        return bp.Backward(grads, deltas, input_grad)

    return backward


def _paths(*layers: int) -> set[str]:
    return {f"[{l - 1}]['{k}']" for l in layers for k in ("W", "b")}


EXPECTED = {
    # bug: (the first bad layer in backprop order, every path that must fail)
    "sign flip in δ^2": (2, {"δ^2 (deltas[1])", "δ^1 (deltas[0])", "input_grad"} | _paths(1, 2)),
    "missing f' at layer 2": (
        2,
        {"δ^2 (deltas[1])", "δ^1 (deltas[0])", "input_grad"} | _paths(1, 2),
    ),
    "W for Wᵀ in δ^1": (1, {"δ^1 (deltas[0])", "input_grad"} | _paths(1)),
    "dropped 1/B": (3, {"input_grad"} | _paths(1, 2, 3)),
    "∇b^2 from δ^3": (2, {"[1]['b']"}),
}


@pytest.mark.slow
def test_check_mlp_passes_the_real_backward_and_the_faithful_copy(x64):
    net, params, x, y = _data()
    for backward in (None, planted(net, None)):
        report = bp.check_mlp(net, params, x, y, backward=backward)
        assert report.ok, str(report)
        assert report.deltas_checked and report.first_bad_layer is None
        paths = [r.path for r in report.rows]
        assert [p for p in paths if p.startswith("δ") or p == "input_grad"] == [
            "δ^3 (deltas[2])",
            "δ^2 (deltas[1])",
            "δ^1 (deltas[0])",
            "input_grad",
        ]
        assert report.summary().startswith(f"all {len(report.rows)} checks passed")


@pytest.mark.slow
@pytest.mark.parametrize("bug", BUGS)
def test_check_mlp_finds_the_planted_bug(bug, x64):
    net, params, x, y = _data()
    report = bp.check_mlp(net, params, x, y, backward=planted(net, bug))
    layer, failing = EXPECTED[bug]
    assert not report.ok
    assert report.first_bad_layer == layer, str(report)
    assert set(report.failing_paths) == failing, str(report)
    summary = report.summary()
    if any(p.startswith("δ") for p in failing):
        assert f"First bad layer in backprop order: {layer}" in summary
    else:
        assert f"Every δ agrees; the gradient formula of layer {layer} is wrong" in summary


@pytest.mark.slow
def test_check_mlp_float32():
    net = bp.MLP((3, 5, 2), ("relu", "sigmoid"), "binary_cross_entropy")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.uniform(jax.random.key(2), (4, 2))
    report = bp.check_mlp(net, params, x, y, references=("jax.grad", "jax.vjp"))
    assert report.ok, str(report)
    assert report.dtype == "float32" and report.derived
    assert {r.path for r in report.rows} == {
        "value",
        "[0]['W']",
        "[0]['b']",
        "[1]['W']",
        "[1]['b']",
        "δ^2 (deltas[1])",
        "δ^1 (deltas[0])",
        "input_grad",
    }


@pytest.mark.slow
@pytest.mark.parametrize("w", [-1e-3, 1e-3])
def test_taylor_passes_a_right_gradient_next_to_a_relu_kink(x64, w):
    """A dead unit 1e-3 from its kink: f is flat near θ and first order beyond the kink.

    The smallest steps decide, so the right (zero) gradient passes on both sides of the kink.
    """
    net = bp.MLP((1, 1), ("relu",), "squared_error")
    params = [{"W": jnp.array([[w]]), "b": jnp.array([0.0])}]
    report = bp.check_mlp(net, params, jnp.array([[1.0]]), jnp.array([[1.0]]), jit=False)
    assert report.ok, str(report)
    taylor = [row for row in report.rows if row.reference == "taylor"]
    assert len(taylor) == 2
    if w > 0:  # a live unit: f is smooth near θ and the order is 2
        assert all(abs(row.order - 2) < 0.05 for row in taylor)


def test_taylor_catches_a_wrong_gradient_next_to_a_relu_kink(x64):
    """The same dead unit with a made-up gradient: the smallest steps show order 1."""
    net = bp.MLP((1, 1), ("relu",), "squared_error")
    params = [{"W": jnp.array([[-1e-3]]), "b": jnp.array([0.0])}]
    x, y = jnp.array([[1.0]]), jnp.array([[1.0]])

    def wrong(p, xs, ys):
        loss, grads = net.value_and_grad(p, xs, ys)
        return loss, jax.tree.map(lambda g: g + 0.1, grads)

    report = bp.check_grads(wrong, net.loss, params, x, y, jit=False, references=("taylor",))
    assert not report.ok
    assert all(row.order is not None and row.order < 1.2 for row in report.failures)


# -- check_network: δ localisation for any serial network ------------------------------------


def _scale_layer(grad_factor=1.0, dx_factor=1.0):
    """A user's layer y = x ∘ s, its backward optionally broken by a factor."""

    def forward(params, x):
        return x * params["s"], x

    def backward(params, x, dy):
        return {"s": grad_factor * jnp.sum(dy * x, axis=0)}, dx_factor * dy * params["s"]

    def init(key, shape, dtype):
        return {"s": 1 + 0.1 * jax.random.normal(key, shape, dtype)}, shape

    return bp.layers.Layer(init, forward, backward)


_SCALE_OK = _scale_layer()
_SCALE_BAD_DX = _scale_layer(dx_factor=1.001)
_SCALE_BAD_GRAD = _scale_layer(grad_factor=1.001)


def _scale_net(scale):
    return bp.serial(
        Dense(6, "tanh"), scale, Dense(5, "elu"), Dense(3, "softmax"), loss="cross_entropy",
        input_shape=(4,),
    )  # fmt: skip


def _scale_data(net):
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)
    return params, x, y


@pytest.mark.slow
def test_check_network_passes_a_right_serial_network(x64):
    net = _scale_net(_SCALE_OK)
    report = bp.check_network(net, *_scale_data(net))
    assert report.ok, str(report)
    assert report.deltas_checked
    assert report.layer_names == ("Dense", "Layer", "Dense", "Dense")
    paths = {row.path for row in report.rows}
    assert {"δ^4 (deltas[3])", "δ^2 (deltas[1])", "δ^1 (deltas[0])", "input_grad"} <= paths
    assert "[1]['s']" in paths
    # check_mlp hands a serial network on
    assert bp.check_mlp(net, *_scale_data(net)).layer_names == report.layer_names


def test_check_network_names_the_layer_whose_dx_is_wrong(x64):
    net = _scale_net(_SCALE_BAD_DX)
    report = bp.check_network(net, *_scale_data(net))
    assert not report.ok
    # the error the Scale layer received is right; the one it handed down is not
    assert report.first_bad_layer == 1
    failing = set(report.failing_paths)
    assert "δ^1 (deltas[0])" in failing and "δ^2 (deltas[1])" not in failing
    assert "the backward of layer 2 (Layer) (its dx)" in report.summary()


def test_check_network_names_a_wrong_params_gradient(x64):
    net = _scale_net(_SCALE_BAD_GRAD)
    report = bp.check_network(net, *_scale_data(net))
    assert not report.ok and report.first_bad_layer == 2
    assert set(report.failing_paths) == {"[1]['s']"}
    assert "params gradient of layer 2 (Layer) is wrong" in report.summary()


def test_check_network_names_a_user_layer_by_the_name_it_was_given(x64):
    named = _scale_layer(grad_factor=1.001)._replace(name="gain")
    net = _scale_net(named)
    report = bp.check_network(net, *_scale_data(net), references=("jax.grad",))
    assert report.layer_names == ("Dense", "gain", "Dense", "Dense")
    assert "params gradient of layer 2 (gain) is wrong" in report.summary()


@pytest.mark.slow
def test_check_network_on_sequence_outputs_and_a_training_key(x64):
    def noisy(params, x, *, key=None):
        del params
        scale = jnp.ones_like(x) if key is None else 1 + 0.2 * jax.random.normal(key, x.shape)
        return x * scale, scale

    noise = bp.layers.Layer(lambda key, shape, dtype: ({}, shape), noisy,
                            lambda params, scale, dy: ({}, dy * scale), needs_key=True)  # fmt: skip
    net = bp.serial(Dense(5, "tanh"), noise, Dense(3, "softmax"), loss="cross_entropy",
                    input_shape=(4, 2))  # fmt: skip
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4, 2), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (3, 4), 0, 3)
    report = bp.check_network(net, params, x, y, key=jax.random.key(7), jit=False)
    assert report.ok, str(report)


def test_check_network_bad_input():
    with pytest.raises(TypeError, match="net: expected a bpjax network"):
        bp.check_network(object(), [], jnp.ones((1, 1)), jnp.zeros(1, int))
    net = bp.MLP((2, 2), ("softmax",), "cross_entropy")
    with pytest.raises(TypeError, match="key: an MLP draws no randomness"):
        bp.check_network(net, net.init(jax.random.key(0)), jnp.ones((1, 2)), jnp.zeros(1, int),
                         key=jax.random.key(0))  # fmt: skip


@pytest.mark.slow
def test_order_2_adds_the_curvature_rows(x64):
    net = bp.MLP((3, 5, 4), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (6,), 0, 4)
    report = bp.check_mlp(net, params, x, y, order=2)
    assert report.ok, str(report)
    references = {row.reference for row in report.rows}
    curvature = {
        "jax.hessian (hvp)",
        "jax.jacobian GGN (diag_ggn)",
        "jax.hessian diagonal (diag_hessian)",
    }
    assert curvature <= references
    first_order = bp.check_mlp(net, params, x, y)
    assert len(report.rows) == len(first_order.rows) + 3 * len(jax.tree.leaves(params))
    serial = bp.serial(*net.layers, loss="cross_entropy", input_shape=(3,))
    serial_report = bp.check_network(serial, params, x, y, order=2)
    assert serial_report.ok and len(serial_report.rows) == len(report.rows)


def test_order_2_bad_input():
    net = bp.MLP((2, 3), ("softmax",), "cross_entropy")
    params, x, y = net.init(jax.random.key(0)), jnp.ones((2, 2)), jnp.array([0, 1])
    for order in (0, 3, True, "2"):
        with pytest.raises(ValueError, match=r"order: expected 1 .* or 2"):
            bp.check_mlp(net, params, x, y, order=order)
    cnn = bp.serial(bp.layers.Flatten(), Dense(3, "softmax"), loss="cross_entropy",
                    input_shape=(2, 2))  # fmt: skip
    with pytest.raises(ValueError, match=r"x: expected shape"):  # order 2 takes any network
        bp.check_network(cnn, cnn.init(jax.random.key(0)), jnp.ones((2, 2)), y, order=2)
    serial = bp.serial(Dense(3, "softmax"), loss="cross_entropy", input_shape=(2,))
    with pytest.raises(TypeError, match="key: order=2"):
        bp.check_network(serial, params, x, y, order=2, key=jax.random.key(0))


def test_a_report_says_when_parts_were_not_judged(x64):
    """A NaN params element makes the reference undefined there: passed, but not silently."""
    p, x = _params()
    p = {"w": p["w"].at[0].set(jnp.nan), "v": p["v"]}
    report = bp.check_grads(right, f, p, x, references=("jax.grad",))
    assert report.ok
    assert "not judged" in report.summary()
    (row,) = [r for r in report.rows if r.path == "['w']"]
    assert row.note.startswith("1 of 3 elements (first (0,)) where the reference is undefined")


def test_a_reference_undefined_everywhere_fails_instead_of_judging_nothing():
    """Class labels out of range under jit make the reference NaN at every element (by design):
    with nothing judged, "ok" would pass a gradient wrong by a factor 2."""
    net = bp.MLP((3, 4, 3), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x, bad = jax.random.normal(jax.random.key(1), (5, 3)), jnp.array([0, 1, 3, 2, 0])

    def wrong(p, x, y):
        loss, g = net.value_and_grad(p, x, y)
        return loss, jax.tree.map(lambda a: 2 * a, g)

    for manual in (wrong, net.value_and_grad):
        report = bp.check_grads(manual, net.loss, params, x, bad)
        assert not report.ok
        assert "nothing was judged" in str(report)
    with pytest.raises(bp.GradientMismatchError):
        bp.assert_grads_match(wrong, net.loss, params, x, bad)


def test_references_must_name_at_least_one_reference(x64):
    p, x = _params()
    with pytest.raises(ValueError, match=r"references: expected at least one of jax\.grad"):
        bp.check_grads(right, f, p, x, references=())
    with pytest.raises(TypeError, match=re.escape("write ('jax.grad',)")):
        bp.check_grads(right, f, p, x, references="jax.grad")
