"""Hypothesis strategies for property tests of hand-written backward passes.

Networks are :class:`bpjax.MLP` specs with valid output/loss pairings (cross_entropy after a
softmax output, binary_cross_entropy after a sigmoid or softmax, squared_error after any), params
and batches are drawn from a seed and a magnitude, so hypothesis shrinks them towards small,
well-scaled cases. Degenerate sizes (width 1, batch 1) and extreme-but-valid magnitudes (weights
and inputs scaled by up to ``1e2`` or down to ``1e-3``) are part of the space. Arrays are made with
NumPy on the host, so drawing them compiles nothing.

Example:
  >>> from hypothesis import given, settings
  >>> @settings(max_examples=3, deadline=None)
  ... @given(mlp_cases(max_layers=2, max_width=3))
  ... def test_loss_is_finite(case):
  ...     assert bool(jnp.isfinite(case.net.loss(case.params, case.x, case.y)))
  >>> test_loss_is_finite()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from bpjax._types import Array, Params
from bpjax.activations import ACTIVATIONS
from bpjax.mlp import MLP

__all__ = ["MAGNITUDES", "MLPCase", "batches", "mlp_cases", "mlps", "params_for"]

MAGNITUDES = (1.0, 1e-3, 0.1, 10.0, 100.0)
"""Scales of params and inputs: 1 first (hypothesis shrinks towards it), then the extremes."""

_OUTPUTS = {  # loss -> the output activations it is defined on
    "cross_entropy": ("softmax",),
    "binary_cross_entropy": ("sigmoid", "softmax"),
    "squared_error": tuple(ACTIVATIONS),
}
_HIDDEN = tuple(name for name in ACTIVATIONS if name != "softmax")


class MLPCase(NamedTuple):
    """One drawn network with its params and a batch (what :func:`mlp_cases` gives)."""

    net: MLP  # the spec
    params: Params  # [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...] in the drawn dtype
    x: Array  # (batch, n_0), the params' dtype
    y: Array  # targets as net.loss takes them: labels (batch,) or (batch, n_L)


@st.composite
def mlps(
    draw: Any,
    *,
    max_layers: int = 3,
    max_width: int = 6,
    activations: Sequence[str] = _HIDDEN,
    losses: Sequence[str] = tuple(_OUTPUTS),
) -> MLP:
    """:class:`bpjax.MLP` specs: 1 to ``max_layers`` layers of width 1 to ``max_width``.

    A softmax output under binary_cross_entropy has at least 2 units (with one, ``a ≡ 1`` and the
    loss is infinite).

    Args:
      draw: supplied by hypothesis.
      max_layers: the most layers ``L``.
      max_width: the widest layer (and input); width 1 is always possible.
      activations: the hidden layers' activations to draw from.
      losses: the losses to draw from; the output activation is drawn from those valid for it.
    """
    layers = draw(st.integers(1, max_layers))
    sizes = draw(st.lists(st.integers(1, max_width), min_size=layers + 1, max_size=layers + 1))
    loss = draw(st.sampled_from(tuple(losses)))
    output = draw(st.sampled_from(_OUTPUTS[loss]))
    if output == "softmax" and loss == "binary_cross_entropy":  # one unit would give a ≡ 1
        sizes[-1] = max(sizes[-1], 2)
    hidden = [draw(st.sampled_from(tuple(activations))) for _ in range(layers - 1)]
    return MLP(tuple(sizes), (*hidden, output), loss, fuse_output=draw(st.booleans()))


def _rng(draw: Any) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def params_for(
    draw: Any, net: MLP, *, dtype: Any = jnp.float32, magnitudes: Sequence[float] = MAGNITUDES
) -> Params:
    """Params for ``net``: ``W ~ N(0, 1/n_{l-1}) · s`` and ``b ~ N(0, 0.1²) · s``.

    Args:
      draw: supplied by hypothesis.
      net: the :class:`bpjax.MLP`.
      dtype: the params' dtype (float16, bfloat16, float32, float64).
      magnitudes: the scales ``s`` to draw from (one per network).
    """
    rng, scale = _rng(draw), draw(st.sampled_from(tuple(magnitudes)))
    params = []
    for n_in, n_out in zip(net.sizes[:-1], net.sizes[1:], strict=True):
        w = rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)
        b = rng.standard_normal(n_out) * 0.1 * scale
        params.append({"W": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)})
    return params


@st.composite
def batches(
    draw: Any,
    net: MLP,
    *,
    max_batch: int = 5,
    dtype: Any = jnp.float32,
    magnitudes: Sequence[float] = MAGNITUDES,
) -> tuple[Array, Array]:
    """``(x, y)`` for ``net``: ``x ~ N(0, 1) · s`` of shape ``(batch, n_0)`` and valid targets.

    Targets: integer labels or probability rows (a softmax of normals) for cross_entropy, values
    in ``[0, 1]`` (a third of them exactly 0 or 1) for binary_cross_entropy, normals for
    squared_error. The batch is 1 to ``max_batch``.

    Args:
      draw: supplied by hypothesis.
      net: the :class:`bpjax.MLP`.
      max_batch: the largest batch; 1 is always possible.
      dtype: the inputs' (and float targets') dtype.
      magnitudes: the scales ``s`` of ``x`` to draw from.
    """
    batch = draw(st.integers(1, max_batch))
    rng, scale = _rng(draw), draw(st.sampled_from(tuple(magnitudes)))
    n_in, n_out = net.sizes[0], net.sizes[-1]
    x = jnp.asarray(rng.standard_normal((batch, n_in)) * scale, dtype)
    loss = net.objective.name
    if loss == "cross_entropy" and draw(st.booleans()):
        y = jnp.asarray(rng.integers(0, n_out, batch), jnp.int32)
    elif loss == "cross_entropy":
        logits = rng.standard_normal((batch, n_out))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        y = jnp.asarray(probs / probs.sum(axis=1, keepdims=True), dtype)
    elif loss == "binary_cross_entropy":
        u = rng.uniform(size=(batch, n_out))
        y = jnp.asarray(np.where(rng.uniform(size=u.shape) < 1 / 3, np.round(u), u), dtype)
    else:
        y = jnp.asarray(rng.standard_normal((batch, n_out)), dtype)
    return x, y


@st.composite
def mlp_cases(
    draw: Any,
    *,
    dtypes: Sequence[Any] = (jnp.float32,),
    max_layers: int = 3,
    max_width: int = 6,
    max_batch: int = 5,
    magnitudes: Sequence[float] = MAGNITUDES,
    activations: Sequence[str] = _HIDDEN,
    losses: Sequence[str] = tuple(_OUTPUTS),
) -> MLPCase:
    """A network, its params and a batch, in one of ``dtypes``: for ``@given(mlp_cases())``.

    Args:
      draw: supplied by hypothesis.
      dtypes: the dtypes to draw from (float64 needs ``jax.enable_x64``).
      max_layers: as for :func:`mlps`.
      max_width: as for :func:`mlps`.
      max_batch: as for :func:`batches`.
      magnitudes: the scales of params and inputs, as for :func:`params_for`.
      activations: as for :func:`mlps`.
      losses: as for :func:`mlps`.

    Returns:
      An :class:`MLPCase` ``(net, params, x, y)``.
    """
    net = draw(mlps(max_layers=max_layers, max_width=max_width, activations=activations,
                    losses=losses))  # fmt: skip
    dtype = draw(st.sampled_from(tuple(dtypes)))
    params = draw(params_for(net, dtype=dtype, magnitudes=magnitudes))
    x, y = draw(batches(net, max_batch=max_batch, dtype=dtype, magnitudes=magnitudes))
    return MLPCase(net, params, x, y)
