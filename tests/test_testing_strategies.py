"""bpjax.testing.strategies, and the derived tolerances over hypothesis-generated networks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

import bpjax as bp
from bpjax.testing import check_backward, strategies


def _max_abs(x):
    return float(np.max(np.abs(np.asarray(x, np.float64))))


@settings(max_examples=25, deadline=None)
@given(strategies.mlp_cases(dtypes=(jnp.float32, jnp.bfloat16)))
def test_cases_are_valid_networks_params_and_batches(case):
    net, params, x, y = case
    accepts = net.objective.accepts
    assert accepts is None or net.activations[-1].output in accepts
    assert [p["W"].shape for p in params] == list(zip(net.sizes[1:], net.sizes[:-1], strict=True))
    assert [p["b"].shape for p in params] == [(n,) for n in net.sizes[1:]]
    assert x.shape[1] == net.sizes[0] and 1 <= x.shape[0] <= 5
    assert x.dtype == params[0]["W"].dtype == params[-1]["b"].dtype
    labels = np.asarray(y, np.float64)
    if jnp.issubdtype(y.dtype, jnp.integer):
        assert y.shape == x.shape[:1] and labels.min() >= 0 and labels.max() < net.sizes[-1]
    else:
        assert y.shape == (x.shape[0], net.sizes[-1])
        if net.objective.name != "squared_error":
            assert labels.min() >= 0 and labels.max() <= 1


def test_degenerate_sizes_and_extreme_magnitudes_are_drawn():
    narrow = find(strategies.mlp_cases(), lambda c: min(c.net.sizes) == 1 and c.x.shape[0] == 1)
    assert min(narrow.net.sizes) == 1 and narrow.x.shape == (1, narrow.net.sizes[0])
    big = find(strategies.mlp_cases(), lambda c: _max_abs(c.params[0]["W"]) > 20)
    assert _max_abs(big.params[0]["W"]) > 20
    net = bp.MLP((3, 2), ("tanh",), "squared_error")
    small = find(strategies.params_for(net), lambda p: _max_abs(p[0]["W"]) < 1e-2)
    assert small[0]["W"].dtype == jnp.float32
    net = bp.MLP((3, 2), ("softmax",), "cross_entropy")
    _, y = find(strategies.batches(net), lambda b: b[1].ndim == 2)
    np.testing.assert_allclose(np.sum(np.asarray(y), axis=1), 1.0, rtol=1e-6)
    bce = find(strategies.mlps(losses=("binary_cross_entropy",)),
               lambda n: n.activations[-1].name == "softmax")  # fmt: skip
    assert bce.sizes[-1] >= 2


@functools.cache
def _loss_pair(net):
    """``net``'s batch-mean loss as forward/backward, the backward adding ``err`` to its grads.

    ``err`` is a primal (the forward ignores it, so its cotangent is 0), so that the right and the
    wrong backward are one function with one compilation.
    """

    def forward(params, x, y, err):
        return net.loss(params, x, y), (params, x, y, err)

    def backward(res, c):
        params, x, y, err = res
        _, cache = net.forward(params, x)
        bw = net.backward(params, cache, y)
        grads = jax.tree.map(lambda g, e: c * g + e, bw.grads, err)
        return grads, c * bw.input_grad, None, jax.tree.map(jnp.zeros_like, err)

    return forward, backward


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(strategies.mlp_cases(max_layers=2, max_width=4, max_batch=3), st.data())
def test_float32_tolerances_raise_no_false_alarm_and_catch_one_wrong_element(case, data):
    net, params, x, y = case
    forward, backward = _loss_pair(net)
    options = {"argnums": (0, 1, 3), "references": ("jax.vjp",), "contracts": ()}
    zero = jax.tree.map(jnp.zeros_like, params)
    report = check_backward(forward, backward, params, x, y, zero, **options)
    assert report.ok, report  # no false alarm
    assume(report.scale > 0 and all(math.isfinite(k) for _, k in report.kappa))

    leaves, treedef = jax.tree.flatten(zero)
    leaf = data.draw(st.integers(0, len(leaves) - 1), label="leaf")
    wrong = np.zeros(leaves[leaf].shape, np.float32)
    wrong.flat[data.draw(st.integers(0, wrong.size - 1), label="element")] = 1e-3 * report.scale
    leaves[leaf] = jnp.asarray(wrong)
    err = jax.tree.unflatten(treedef, leaves)
    caught = check_backward(forward, backward, params, x, y, err, **options)
    (path,) = {row.path for row in caught.failures}
    assert path == report.rows[leaf].path  # the one wrong leaf, named
