"""Recurrent layers: BPTT by hand against jax.vjp of plain-JAX forwards written from the equations.

The references below are scans over time steps, written from the forward maths alone
(``h_t = f(x_t W_xhᵀ + h_{t−1} W_hhᵀ + b)``; the LSTM's gate equations), never from bpjax's code.
Truncated BPTT with ``truncate=k`` is checked against the reference with ``lax.stop_gradient`` on
the state entering steps ``k, 2k, …`` (0-based).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpjax as bp
from bpjax.layers import Dense
from bpjax.rnn import LSTM, Elman, LastStep
from bpjax.testing import allowed_errors
from tests.reference import JAX_NN_FORWARD

JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
RTOL = 1e-10  # float64, relative to the largest element of the reference


def _wrap(jit: bool) -> Any:
    return jax.jit if jit else (lambda f: f)


def _assert_close(got: Any, want: Any, rtol: float = RTOL) -> None:
    """Leaf by leaf: ``max |got − want| ≤ rtol · max |want|``, shapes and dtypes equal.

    Relative to the leaf's largest element, not elementwise: an element that is a sum with
    cancellation is only as accurate as the terms it sums.
    """
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * float(np.max(np.abs(w), initial=0)))


# -- references: scans over time, from the equations ---------------------------------------


def _cuts(steps: int, truncate: int | None) -> np.ndarray:
    """Truncated BPTT: is the state entering step t (0-based) a constant? At t = k, 2k, …"""
    t = np.arange(steps)
    if truncate is None:
        return np.zeros(steps, bool)
    return (t > 0) & (t % truncate == 0)


def _cut(state: Any, cut: Any) -> Any:
    return jax.tree.map(lambda s: jnp.where(cut, jax.lax.stop_gradient(s), s), state)


def elman_reference(params, x, activation="tanh", truncate=None, dz=None):
    """``h_t = f(x_t W_xhᵀ + h_{t−1} W_hhᵀ + b [+ dz_t])``, ``h_0 = 0``: all h_t."""
    f = JAX_NN_FORWARD[activation]
    batch, steps, _ = x.shape
    dz = jnp.zeros((batch, steps, params["b"].shape[0]), x.dtype) if dz is None else dz

    def step(h, inputs):
        x_t, dz_t, cut = inputs
        h = _cut(h, cut)
        h = f(x_t @ params["W_xh"].T + h @ params["W_hh"].T + params["b"] + dz_t)
        return h, h

    h0 = jnp.zeros((batch, params["W_hh"].shape[0]), x.dtype)
    inputs = (jnp.swapaxes(x, 0, 1), jnp.swapaxes(dz, 0, 1), _cuts(steps, truncate))
    return jnp.swapaxes(jax.lax.scan(step, h0, inputs)[1], 0, 1)


def lstm_reference(params, x, truncate=None, dz=None):
    """The LSTM from its equations, gates ``i, f, g, o``, ``h_0 = c_0 = 0``: all h_t."""
    batch, steps, _ = x.shape
    hidden = params["W_h"].shape[1]
    dz = jnp.zeros((batch, steps, 4 * hidden), x.dtype) if dz is None else dz

    def step(state, inputs):
        x_t, dz_t, cut = inputs
        h, c = _cut(state, cut)
        z = x_t @ params["W_x"].T + h @ params["W_h"].T + params["b"] + dz_t
        gate_i = jax.nn.sigmoid(z[:, :hidden])
        gate_f = jax.nn.sigmoid(z[:, hidden : 2 * hidden])
        cand = jnp.tanh(z[:, 2 * hidden : 3 * hidden])
        gate_o = jax.nn.sigmoid(z[:, 3 * hidden :])
        c = gate_f * c + gate_i * cand
        h = gate_o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((batch, hidden), x.dtype)
    inputs = (jnp.swapaxes(x, 0, 1), jnp.swapaxes(dz, 0, 1), _cuts(steps, truncate))
    return jnp.swapaxes(jax.lax.scan(step, (zeros, zeros), inputs)[1], 0, 1)


def _reference_vjp(reference, params, x, dy, n_z):
    """``(y, param grads, dx, ∂C/∂z)`` of ``C = ⟨dy, y⟩`` by jax.vjp of the reference."""
    dz = jnp.zeros((*x.shape[:2], n_z), x.dtype)
    y, pullback = jax.vjp(lambda p, x, dz: reference(p, x, dz=dz), params, x, dz)
    return (y, *pullback(dy))


def _manual(layer, params, x, dy, direct):
    y, cache = layer.forward(params, x)
    delta = layer.delta(cache, dy)
    grads, dx = layer.backward_delta(params, cache, delta)
    # backward is delta then backward_delta; checked on the fixed shapes only (compile time)
    backward = layer.backward(params, cache, dy) if direct else (grads, dx)
    return y, grads, dx, delta, backward


def _random_case(layer, shape, seed, gain=1.0, dtype=jnp.float64):
    """Float64 params (weights ``N(0, gain²/fan_in)``, biases ``U(−½, ½)``), ``x`` and ``dy``.

    Drawn with NumPy: an eager JAX draw would compile afresh for every new shape.
    """
    batch, steps, n_in, hidden = shape
    rng = np.random.default_rng(seed)
    structs = jax.eval_shape(lambda: layer.init(jax.random.key(0), (steps, n_in))[0])
    params = {
        k: rng.normal(0, gain / np.sqrt(v.shape[-1]), v.shape)
        if v.ndim == 2
        else rng.uniform(-0.5, 0.5, v.shape)
        for k, v in structs.items()
    }
    x = rng.normal(size=(batch, steps, n_in))
    dy = rng.normal(size=(batch, steps, hidden))
    return jax.tree.map(lambda a: jnp.asarray(a.astype(np.float32)).astype(dtype), (params, x, dy))


SHAPES = st.tuples(
    st.integers(1, 5),  # batch
    st.integers(1, 12),  # T
    st.integers(1, 5),  # n_in
    st.integers(1, 6),  # hidden
)


@st.composite
def truncations(draw, steps):
    return draw(st.one_of(st.none(), st.integers(1, steps + 1)))


def _check_layer(layer, reference, shape, seed, gain, jit, n_z, direct=True):
    """Forward, δ, param grads and dx of ``layer`` against the reference's vjp, in float64."""
    params, x, dy = _random_case(layer, shape, seed, gain)

    def both(p, x, dy):
        return _manual(layer, p, x, dy, direct), _reference_vjp(reference, p, x, dy, n_z)

    if jit:  # one compilation for both: the shapes vary from example to example
        got, want = jax.jit(both)(params, x, dy)
    else:
        got, want = _manual(layer, params, x, dy, direct), jax.jit(both)(params, x, dy)[1]
    y, grads, dx, delta, backward = got
    want_y, want_grads, want_dx, want_delta = want
    _assert_close(y, want_y)
    _assert_close(grads, want_grads)
    _assert_close(dx, want_dx)
    _assert_close(delta, want_delta)
    _assert_close(backward, (grads, dx), rtol=0)


def _elman_case(shape, activation, truncate, seed, gain, jit, direct=True):
    layer = Elman(shape[3], activation, truncate=truncate)

    def reference(p, x, dz):
        return elman_reference(p, x, activation, truncate, dz)

    with jax.enable_x64(True):
        _check_layer(layer, reference, shape, seed, gain, jit, shape[3], direct)


def _lstm_case(shape, truncate, seed, gain, jit, direct=True):
    layer = LSTM(shape[3], truncate=truncate)

    def reference(p, x, dz):
        return lstm_reference(p, x, truncate, dz)

    with jax.enable_x64(True):
        _check_layer(layer, reference, shape, seed, gain, jit, 4 * shape[3], direct)


# -- the layers against their references ----------------------------------------------------

# Hypothesis varies the shapes, so each example compiles afresh: jitted here (an eager run compiles
# every op for every new shape, several times slower); the eager path runs on fixed shapes below,
# and checks there that backward is delta followed by backward_delta.


@pytest.mark.slow
@settings(max_examples=10)
@given(
    data=st.data(),
    shape=SHAPES,
    activation=st.sampled_from(["tanh", "sigmoid", "relu", "softplus", "softmax"]),
    seed=st.integers(0, 2**16),
    gain=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_elman_bptt_matches_vjp_of_the_equations(data, shape, activation, seed, gain):
    truncate = data.draw(truncations(shape[1]), label="truncate")
    _elman_case(shape, activation, truncate, seed, gain, jit=True, direct=False)


@pytest.mark.slow
@settings(max_examples=8)
@given(
    data=st.data(),
    shape=SHAPES,
    seed=st.integers(0, 2**16),
    gain=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_lstm_bptt_matches_vjp_of_the_equations(data, shape, seed, gain):
    truncate = data.draw(truncations(shape[1]), label="truncate")
    _lstm_case(shape, truncate, seed, gain, jit=True, direct=False)


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [None, 2])
def test_elman_bptt_eager(truncate):
    _elman_case((3, 7, 2, 4), "tanh", truncate, seed=1, gain=1.5, jit=False)


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [None, 3])
def test_lstm_bptt_eager(truncate):
    _lstm_case((3, 7, 2, 4), truncate, seed=2, gain=1.5, jit=False)


@JIT
@pytest.mark.parametrize("truncate", [None, 1, 3])
def test_truncation_cuts_the_gradient_exactly_at_chunk_boundaries(x64, jit, truncate):
    """With ``truncate=k`` the last output's error reaches back at most to its chunk's start."""
    steps, k = 7, truncate
    layer = Elman(4, truncate=truncate)
    params, x, _ = _random_case(layer, (3, steps, 2, 4), seed=0)
    dy = jnp.zeros((3, steps, 4)).at[:, -1].set(1.0)  # only the last step's output matters
    _, cache = _wrap(jit)(layer.forward)(params, x)
    _, dx = _wrap(jit)(layer.backward)(params, cache, dy)
    reached = np.abs(np.asarray(dx)).sum(axis=(0, 2)) > 0
    first = 0 if k is None else ((steps - 1) // k) * k  # the chunk of the last step starts here
    np.testing.assert_array_equal(reached, np.arange(steps) >= first)


@pytest.mark.parametrize("layer", [Elman(4, "tanh"), LSTM(3)], ids=["elman", "lstm"])
def test_init_shapes_dtypes_and_forget_bias(layer):
    for dtype in (jnp.bfloat16, jnp.float16):
        params = jax.eval_shape(lambda d=dtype: layer.init(jax.random.key(0), (6, 5), d)[0])
        assert {str(v.dtype) for v in params.values()} == {jnp.dtype(dtype).name}
    params, out_shape = layer.init(jax.random.key(0), (6, 5), jnp.float32)
    assert out_shape == (6, layer.hidden)
    assert {str(v.dtype) for v in params.values()} == {"float32"}
    w_rec = params["W_hh"] if isinstance(layer, Elman) else params["W_h"]
    # the recurrent weights are orthogonal: orthonormal columns
    np.testing.assert_allclose(w_rec.T @ w_rec, np.eye(layer.hidden), atol=1e-5)
    if isinstance(layer, LSTM):
        h = layer.hidden
        np.testing.assert_array_equal(params["b"][h : 2 * h], 1.0)  # forget gate
        np.testing.assert_array_equal(params["b"][:h], 0.0)
        np.testing.assert_array_equal(params["b"][2 * h :], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer, dtype",
    [
        (Elman(4, truncate=2), jnp.float32),
        (Elman(4, truncate=2), jnp.bfloat16),
        (LSTM(3), jnp.float16),
        (LSTM(3), jnp.bfloat16),
    ],
    ids=["elman-float32", "elman-bfloat16", "lstm-float16", "lstm-bfloat16"],
)
def test_low_precision_runs_and_keeps_its_dtype(layer, dtype):
    """The float32/bfloat16/float16 layer stays in its dtype and near the float64 gradients.

    Near: within bpjax.testing's allowed error ``u (16 M + 8 κ)`` per leaf (derived in
    bpjax/testing/_tolerance.py), against the float64 shadow of the reference equations' jax.vjp
    on the same inputs, where ``κ`` is the error of that jax.vjp computed in the same dtype. So
    the allowance follows the rounding this CPU and XLA's fusion choices give the dtype (how
    often a bfloat16 intermediate is rounded back is XLA's choice) instead of a fixed multiple of
    its ε, which seven recurrent steps of roundings can approach.
    """
    params32, x32, dy32 = _random_case(layer, (3, 7, 2, layer.hidden), 0, dtype=jnp.float32)

    def run(params, x, dy):
        y, cache = layer.forward(params, x)
        return y, *layer.backward(params, cache, dy)

    def reference(params, x, dy):  # (y, param grads, dx) by jax.vjp of the equations
        if isinstance(layer, Elman):
            forward = lambda p, x: elman_reference(p, x, layer.activation.name, layer.truncate)  # noqa: E731
        else:
            forward = lambda p, x: lstm_reference(p, x, layer.truncate)  # noqa: E731
        y, pullback = jax.vjp(forward, params, x)
        return y, *pullback(dy)

    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)  # noqa: E731
    args = (cast(params32), cast(x32), cast(dy32))
    got = jax.jit(run)(*args)
    for leaf in jax.tree.leaves(got):
        assert leaf.dtype == dtype
    measured = jax.jit(reference)(*args)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        shadow = [np.asarray(s) for s in jax.tree.leaves(jax.jit(reference)(*map(to64, args)))]
    allowed, _ = allowed_errors(
        shadow, jax.tree.leaves(measured), dtype=dtype, measured_dtype=dtype
    )
    for g, s, limit in zip(jax.tree.leaves(got), shadow, allowed, strict=True):
        err = float(np.max(np.abs(np.asarray(g, np.float64) - s)))
        assert err <= limit, (err, limit, jnp.dtype(dtype).name)


@pytest.mark.parametrize("layer", [Elman(4, truncate=2), LSTM(4)], ids=["elman", "lstm"])
def test_vmap_over_an_extra_axis_equals_a_loop(x64, layer):
    params, x, dy = _random_case(layer, (3, 7, 2, 4), seed=0)
    xs, dys = jnp.stack([x, -x, 2 * x]), jnp.stack([dy, dy, -dy])

    def run(x, dy):
        _, cache = layer.forward(params, x)
        return layer.backward(params, cache, dy)

    batched = jax.jit(jax.vmap(run))(xs, dys)
    looped = jax.jit(run)
    for i in range(3):
        _assert_close(jax.tree.map(lambda a, i=i: a[i], batched), looped(xs[i], dys[i]), 1e-13)


def test_specs_are_hashable_and_jit_without_static_args():
    assert Elman(3, truncate=2) == Elman(3, "tanh", truncate=2)
    assert hash(Elman(3)) == hash(Elman(3, "tanh")) and hash(LSTM(2)) == hash(LSTM(2))
    assert Elman(3, truncate=2) != Elman(3) and LastStep() == LastStep()
    net = bp.serial(Elman(3), LastStep(), Dense(2), loss="squared_error", input_shape=(4, 2))
    params = net.init(jax.random.key(0))
    _, grads = jax.jit(net.value_and_grad)(params, jnp.ones((5, 4, 2)), jnp.ones((5, 2)))
    assert grads[1] == {} and grads[0]["W_hh"].shape == (3, 3)


@JIT
def test_last_step(x64, jit):
    layer = LastStep()
    params, out_shape = layer.init(jax.random.key(0), (5, 2, 3))
    assert params == {} and out_shape == (2, 3)
    x = jax.random.normal(jax.random.key(1), (4, 5, 2, 3), jnp.float64)
    dy = jax.random.normal(jax.random.key(2), (4, 2, 3), jnp.float64)
    y, cache = _wrap(jit)(layer.forward)(params, x)
    grads, dx = _wrap(jit)(layer.backward)(params, cache, dy)
    want_y, pullback = jax.vjp(lambda x: x[:, -1], x)
    _assert_close((y, dx), (want_y, *pullback(dy)), rtol=0)
    assert grads == {}


# -- in serial networks ---------------------------------------------------------------------


def _sequences(seed, batch, steps, n_in, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, steps, n_in), dtype)


@pytest.mark.slow
def test_stacked_network_checks_out(x64):
    """The harness (autodiff, forward mode, finite differences, Taylor) on a stacked RNN.

    Elman into LSTM into a softmax readout per step: the LSTM's ``dx`` is the Elman's ``dy``.
    """
    net = bp.serial(
        Elman(4), LSTM(3), Dense(3, "softmax"), loss="cross_entropy", input_shape=(5, 2)
    )
    params = net.init(jax.random.key(0), jnp.float64)
    x = _sequences(1, 4, 5, 2)
    labels = jax.random.randint(jax.random.key(2), (4, 5), 0, 3)
    report = bp.check_grads(net.value_and_grad, net.loss, params, x, labels)
    assert report.ok, str(report)


def _reference_loss(rnn, params, x, y):
    """The net's loss written out: a reference RNN, a softmax readout, mean cross-entropy."""
    if isinstance(rnn, Elman):
        h = elman_reference(params[0], x, rnn.activation.name, rnn.truncate)
    else:
        h = lstm_reference(params[0], x, rnn.truncate)
    if y.ndim == 1:  # many-to-one: the last step only
        h = h[:, -1]
    logp = jax.nn.log_softmax(h @ params[-1]["W"].T + params[-1]["b"], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "rnn, many, jit",
    [
        (Elman(4, "relu"), True, True),
        (Elman(4, "relu"), False, False),
        (LSTM(3, truncate=2), True, False),
        (LSTM(3, truncate=2), False, True),
    ],
    ids=[
        "elman-relu-many-to-many-jit",
        "elman-relu-many-to-one-nojit",
        "lstm-truncated-many-to-many-nojit",
        "lstm-truncated-many-to-one-jit",
    ],
)
def test_networks_match_autodiff_of_the_equations(x64, jit, rnn, many):
    """Manual BPTT through serial vs jax.grad of the reference; truncation included."""
    steps, batch = 6, 4
    readout = (Dense(3, "softmax"),) if many else (LastStep(), Dense(3, "softmax"))
    net = bp.serial(rnn, *readout, loss="cross_entropy", input_shape=(steps, 2))
    params = net.init(jax.random.key(0), jnp.float64)
    x = _sequences(1, batch, steps, 2)
    y = jax.random.randint(jax.random.key(2), (batch, steps) if many else (batch,), 0, 3)
    loss, grads = _wrap(jit)(net.value_and_grad)(params, x, y)
    want_loss, want_grads = jax.value_and_grad(lambda p: _reference_loss(rnn, [p[0], p[-1]], x, y))(
        params
    )
    _assert_close(loss, want_loss)
    _assert_close(grads, want_grads)
    # the error serial records at the recurrent layer is its per-example δ = ∂C_n/∂z_t
    _, cache = _wrap(jit)(net.forward)(params, x)
    deltas = net.backward(params, cache, y).deltas
    assert deltas[0].shape == (batch, steps, (4 if isinstance(rnn, LSTM) else 1) * rnn.hidden)


# -- forward_shifted and check_network: the recorded δ_t against jax.vjp --------------------


@pytest.mark.parametrize(
    "layer", [Elman(4, "tanh"), Elman(4, "relu"), LSTM(4)], ids=["elman-tanh", "elman-relu", "lstm"]
)
def test_forward_shifted_is_the_forward_and_its_vjp_is_delta(x64, layer):
    """Unshifted, ``forward_shifted`` is ``forward``; its vjp in the shift at 0 is the manual δ."""
    params, x, dy = _random_case(layer, (3, 6, 2, layer.hidden), seed=3, gain=1.5)

    def run(params, x, dy):
        y, cache = layer.forward(params, x)
        h, z = layer.forward_shifted(params, x)
        zero = jnp.zeros_like(z)
        h0, pullback = jax.vjp(lambda dz: layer.forward_shifted(params, x, dz)[0], zero)
        return y, h, h0, z, layer.delta(cache, dy), pullback(dy)[0]

    y, h, h0, z, delta, want_delta = jax.jit(run)(params, x, dy)
    _assert_close((h, h0), (y, y))  # one program: XLA may fuse the copies differently
    assert z.shape == delta.shape  # the shift has the shape of δ
    if isinstance(layer, Elman):
        _assert_close(z, layer.forward(params, x)[1].z)
    _assert_close(delta, want_delta)


def test_forward_shifted_shifts_every_later_step_and_checks_its_shape(x64):
    layer = Elman(3)
    params, x, _ = _random_case(layer, (2, 4, 2, 3), seed=0)
    h, z = layer.forward_shifted(params, x)
    dz = jnp.zeros((2, 4, 3)).at[:, 1].set(0.5)  # a shift at step 1 (0-based) only
    h_shifted, z_shifted = layer.forward_shifted(params, x, dz)
    _assert_close(z_shifted[:, :2], z[:, :2] + dz[:, :2])  # z_1 + dz_1, the shift is in z
    _assert_close(h_shifted, elman_reference(params, x, dz=dz))  # and in the later steps
    changed = np.abs(np.asarray(h_shifted - h)).sum(axis=(0, 2)) > 0
    np.testing.assert_array_equal(changed, [False, True, True, True])
    for bad in (LSTM(3), Elman(3)):
        p, x, _ = _random_case(bad, (2, 4, 2, 3), seed=0)
        with pytest.raises(ValueError, match=r"dz: .* shifts its weighted input z, shape"):
            bad.forward_shifted(p, x, jnp.zeros((2, 4, 1)))  # would broadcast


class _ScaledStepElman(Elman):
    """A planted bug in the BPTT step: ``δ_t`` at one step scaled by 1.5."""

    def delta(self, cache, dy):
        return super().delta(cache, dy).at[:, 2].multiply(1.5)


class _ForgetfulLSTM(LSTM):
    """A planted bug: the recurrent error terms dropped (``δ_{t+1} W_h`` and the cell's)."""

    def delta(self, cache, dy):
        return LSTM(self.hidden, truncate=1).delta(cache, dy)


def _rnn_check(layers, many, jit, seed=0, steps=5, batch=4):
    """``check_network`` (jax.grad leaf rows) on ``layers`` + a softmax readout, in float64."""
    readout = (Dense(3, "softmax"),) if many else (LastStep(), Dense(3, "softmax"))
    net = bp.serial(*layers, *readout, loss="cross_entropy", input_shape=(steps, 2))
    params = net.init(jax.random.key(seed), jnp.float64)
    x = _sequences(seed + 1, batch, steps, 2)
    y = jax.random.randint(jax.random.key(seed + 2), (batch, steps) if many else (batch,), 0, 3)
    return bp.check_network(net, params, x, y, references=("jax.grad",), jit=jit)


def _rows(report):
    return {row.path.split(" ")[0]: row for row in report.rows if row.path.startswith("δ^")}


@pytest.mark.parametrize(
    "rnn, many, jit",
    [
        (Elman(4, "tanh"), True, True),
        pytest.param(Elman(4, "relu"), False, False, marks=pytest.mark.slow),
        pytest.param(LSTM(3), True, False, marks=pytest.mark.slow),
        (LSTM(3), False, True),
    ],
    ids=[
        "elman-tanh-many-to-many-jit",
        "elman-relu-many-to-one-nojit",
        "lstm-many-to-many-nojit",
        "lstm-many-to-one-jit",
    ],
)
def test_check_network_checks_the_recurrent_delta(x64, rnn, many, jit):
    """A correct recurrent layer passes, its δ_t row included (no false alarm)."""
    report = _rnn_check([rnn], many, jit)
    assert report.ok, str(report)
    assert _rows(report)["δ^1"].passed


@pytest.mark.parametrize(
    "bad, jit",
    [
        (_ScaledStepElman(4), True),
        pytest.param(_ScaledStepElman(4, "relu"), False, marks=pytest.mark.slow),
        (_ForgetfulLSTM(3), True),
    ],
    ids=["elman-scaled-step-jit", "elman-relu-scaled-step-nojit", "lstm-no-recurrent-error-jit"],
)
def test_check_network_blames_a_planted_bptt_bug(x64, bad, jit):
    """A wrong δ step in the upper of two recurrent layers: the blame is on that layer."""
    report = _rnn_check([Elman(3), bad], many=True, jit=jit)
    assert not report.ok
    assert report.first_bad_layer == 2, str(report)
    rows = _rows(report)
    assert rows["δ^3"].passed and not rows["δ^2"].passed, str(report)
    assert type(bad).__name__ in report.summary()


def test_check_network_flags_truncated_bptt(x64):
    """Truncated BPTT is not the gradient of the loss: check_network says so, at that layer.

    The untruncated layer on the same network passes
    (``test_check_network_checks_the_recurrent_delta``).
    """
    report = _rnn_check([Elman(4, truncate=2)], many=True, jit=True)
    assert not report.ok and report.first_bad_layer == 1, str(report)
    rows = _rows(report)
    assert rows["δ^2"].passed and not rows["δ^1"].passed, str(report)


# -- bad configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Elman(0), ValueError, "hidden: expected a positive integer, got 0"),
        (lambda: Elman(2.5), ValueError, "hidden: expected a positive integer, got 2.5"),
        (lambda: LSTM(True), ValueError, "hidden: expected a positive integer, got True"),
        (lambda: Elman(3, truncate=0), ValueError, "truncate: expected None .* got 0"),
        (lambda: LSTM(3, truncate=-2), ValueError, "truncate: expected None .* got -2"),
        (lambda: Elman(3, "nope"), ValueError, "unknown activation 'nope'"),
        (lambda: Elman(3, 7), TypeError, "activation: expected an activation name"),
        (
            lambda: Elman(3).init(jax.random.key(0), (4,)),
            ValueError,
            r"in_shape: Elman takes sequences .* must be \(T, n_in\) .* got \(4,\)",
        ),
        (
            lambda: LSTM(3).init(jax.random.key(0), (4, 2, 2)),
            ValueError,
            r"in_shape: LSTM takes .* got \(4, 2, 2\)",
        ),
        (
            lambda: LastStep().init(jax.random.key(0), (4,)),
            ValueError,
            r"in_shape: LastStep takes .* got \(4,\)",
        ),
    ],
)
def test_bad_configuration(build, error, match):
    with pytest.raises(error, match=match):
        build()


@JIT
@pytest.mark.parametrize("layer", [Elman(3), LSTM(3)], ids=["elman", "lstm"])
def test_bad_inputs(jit, layer):
    name = type(layer).__name__
    params, _ = layer.init(jax.random.key(0), (4, 2))
    forward = _wrap(jit)(layer.forward)
    with pytest.raises(ValueError, match=rf"x: {name} expects sequences of shape \(batch, T, 2\)"):
        forward(params, jnp.ones((5, 2)))  # no time axis
    with pytest.raises(ValueError, match=r"got \(5, 4, 3\)"):
        forward(params, jnp.ones((5, 4, 3)))  # wrong n_in
    with pytest.raises(ValueError, match=r"T ≥ 1, got \(5, 0, 2\)"):
        forward(params, jnp.ones((5, 0, 2)))
    _, cache = forward(params, jnp.ones((5, 4, 2)))
    with pytest.raises(ValueError, match=rf"dy: {name} expects .* shape \(5, 4, 3\), got \(5, 3\)"):
        _wrap(jit)(layer.backward)(params, cache, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"x: LastStep expects sequences"):
        _wrap(jit)(LastStep().forward)({}, jnp.ones((5, 3)))


def test_a_network_rejects_sequences_of_the_wrong_length():
    net = bp.serial(LSTM(3), LastStep(), Dense(2), loss="squared_error", input_shape=(4, 2))
    params = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 4, 2\), got \(5, 6, 2\)"):
        net.loss(params, jnp.ones((5, 6, 2)), jnp.ones((5, 2)))
