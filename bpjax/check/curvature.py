"""The harness at order 2: bpjax.extend's ``hvp``, ``diag_ggn`` and ``diag_hessian`` against
explicit matrices.

:func:`check_curvature` compares :mod:`bpjax.extend`'s forward-over-backward Hessian-vector
product with ``jax.hessian`` of the loss in the flattened params, its backpropagated GGN
diagonal with ``(1/B) Σ_n J_nᵀ H_n J_n`` from ``jax.jacobian`` and ``jax.hessian``, and its
backpropagated Hessian diagonal with the diagonal of that same ``jax.hessian``, leaf by leaf and
under the tolerance engine of :mod:`bpjax.check.tolerance`. ``check_network(..., order=2)`` adds
these rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bpjax._cache import jit_wrapper, memoized
from bpjax._types import Array, Params
from bpjax.check.grads import least_precise
from bpjax.check.report import CheckRow, GradCheckReport
from bpjax.check.tolerance import compare, explicit_tolerance, measure
from bpjax.extend.diag_hessian import check_hessian_net, diag_hessian
from bpjax.extend.passes import (
    check_like_params,
    check_net,
    forward,
    loss_from_output,
    output_variable,
)
from bpjax.extend.second_order import diag_ggn, hvp

__all__ = ["CURVATURE_REFERENCES", "check_curvature"]

CURVATURE_REFERENCES = ("hvp", "diag_ggn", "diag_hessian")
"""The quantities :func:`check_curvature` compares with ``jax.hessian``/``jax.jacobian``."""


def _applicable(net: Any) -> tuple[str, ...]:
    """Every reference that applies to ``net``: ``diag_hessian`` only where it takes the net."""
    try:
        check_hessian_net(net)
    except TypeError:
        return ("hvp", "diag_ggn")
    return CURVATURE_REFERENCES


def _reference_curvature(
    net: Any, params: Params, x: Array, y: Array, v: Params, which: tuple[str, ...]
) -> dict[str, Any]:
    """``∇²C v`` by ``jax.hessian`` and ``diag(GGN)`` by ``jax.jacobian``/``jax.hessian``.

    Plain JAX from the forward maths (``net.forward``'s ``z^L`` and the loss value), never the
    hand-written backward.
    """
    flat, unravel = ravel_pytree(params)
    out: dict[str, Any] = {}
    if "hvp" in which or "diag_hessian" in which:

        def loss(theta: Array) -> Array:
            return net.loss(unravel(theta), x, y)

        hessian = jax.hessian(loss)(flat)
        if "hvp" in which:
            out["hvp"] = unravel(hessian @ ravel_pytree(v)[0])
        if "diag_hessian" in which:
            out["diag_hessian"] = unravel(jnp.diagonal(hessian))
    if "diag_ggn" in which:
        fwd = forward(net, params, x, y)
        v0 = output_variable(net, fwd.cache)
        batch, n = v0.shape[0], v0.shape[-1]
        y_rows = fwd.y.reshape(batch, -1, *fwd.y.shape[1:])  # each example's target rows

        def outputs(theta: Array) -> Array:
            _, cache = net.forward(unravel(theta), x)
            return output_variable(net, cache).reshape(batch, -1)

        def per_example(v_n: Array, y_n: Array) -> Array:  # C_n: the mean over its positions
            return jnp.mean(loss_from_output(net, v_n.reshape(-1, n), y_n))

        jac = jax.jacobian(outputs)(flat)  # (batch, P·n_L, P)
        hess = jax.vmap(jax.hessian(per_example))(outputs(flat), y_rows)
        ggn = jnp.einsum("bkp,bkl,blq->pq", jac, hess, jac) / jnp.shape(x)[0]
        out["diag_ggn"] = unravel(jnp.diagonal(ggn))
    return out


def check_curvature(
    net: Any,
    params: Params,
    x: Array,
    y: Array,
    *,
    v: Params | None = None,
    quantities: Sequence[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    jit: bool = True,
) -> GradCheckReport:
    """The harness at order 2: :func:`~bpjax.extend.hvp`, :func:`~bpjax.extend.diag_ggn` and
    :func:`~bpjax.extend.diag_hessian` against explicit matrices.

    ``hvp`` is compared with ``jax.hessian`` of ``net.loss`` in the flattened params times ``v``;
    ``diag_ggn`` with the diagonal of ``(1/B) Σ_n J_nᵀ H_n J_n``, ``J_n`` by ``jax.jacobian`` of
    ``z^L`` and ``H_n`` by ``jax.hessian`` of the per-example loss in ``z^L_n``;
    ``diag_hessian`` with the diagonal of the same ``jax.hessian`` as ``hvp``. The references
    form ``P × P`` matrices: for small networks.

    Args:
      net, params, x, y: as for :func:`bpjax.extend.batch_grad`.
      v: the direction for ``hvp``; by default a random unit direction (from ``seed``).
      quantities: which of :data:`CURVATURE_REFERENCES` to check; by default every one that
        applies (``diag_hessian`` where :func:`~bpjax.extend.diag_hessian` takes the network).
      rtol: an explicit norm-relative tolerance per leaf, replacing the derived allowances
        (:mod:`bpjax.check.tolerance`: each leaf against its float64 truth, within the roundoff
        measured for the reference in the working dtype).
      atol: an explicit largest-element tolerance per leaf (either explicit bound passes).
      seed: seeds the default ``v`` and the roundoff measurement.
      jit: run both sides under ``jax.jit``.

    Returns:
      A ``bpjax.GradCheckReport`` with one row per quantity and leaf; the reference column names
      the quantity (``"jax.hessian (hvp)"``, ``"jax.jacobian GGN (diag_ggn)"``,
      ``"jax.hessian diagonal (diag_hessian)"``).

    Raises:
      ValueError: an unknown name in ``quantities``.
      TypeError: ``"diag_hessian"`` asked for a network it does not take, naming the layer.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> check_curvature(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])).ok
      True
    """
    check_net(net)
    if quantities is None:
        quantities = _applicable(net)
    unknown = sorted(set(quantities) - set(CURVATURE_REFERENCES))
    if unknown:
        raise ValueError(
            f"quantities: unknown {unknown}; expected names from {', '.join(CURVATURE_REFERENCES)}."
        )
    if "diag_hessian" in quantities:
        check_hessian_net(net)
    net.check_labels(y)  # concrete labels, before the jitted quantities trace them
    which = tuple(q for q in CURVATURE_REFERENCES if q in quantities)
    leaves = jax.tree.leaves(params)
    dtype = least_precise(leaves)
    if v is None:
        flat, unravel = ravel_pytree(params)
        direction = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
        v = unravel(direction / jnp.linalg.norm(direction))
    else:
        v = check_like_params(v, params, "v")
    wrap = jit_wrapper(jit)
    fns = _curvature_fns(net, which)
    got = wrap(fns[0])(params, x, y, v)
    explicit = None if rtol is None and atol is None else explicit_tolerance(rtol, atol)
    measured = measure(
        fns[1], params, (x, y, v), dtype=dtype, wrap=wrap, seed=seed, explicit=explicit
    )
    names = {
        "hvp": "jax.hessian (hvp)",
        "diag_ggn": "jax.jacobian GGN (diag_ggn)",
        "diag_hessian": "jax.hessian diagonal (diag_hessian)",
    }
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rows: list[CheckRow] = []
    for q in which:
        truth, tols = measured.truth[q], measured.tolerances[q]
        for path, m, t, tol in zip(paths, jax.tree.leaves(got[q]), truth, tols, strict=True):
            rows.append(compare(path, names[q], m, t, tol))
    allowed = [t.max_abs for q in which for t in measured.tolerances[q] if math.isfinite(t.max_abs)]
    return GradCheckReport(
        tuple(rows), jnp.dtype(dtype).name, 0.0 if rtol is None else float(rtol),
        max(allowed, default=0.0) if atol is None else float(atol), derived=explicit is None,
    )  # fmt: skip


@memoized
def _curvature_fns(net: Any, which: tuple[str, ...]) -> tuple[Callable[..., Any], ...]:
    """The manual quantities and their references, built once per (net, quantities)."""

    def manual(p: Params, xs: Array, ys: Array, vs: Params) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "hvp" in which:
            out["hvp"] = hvp(net, p, xs, ys, vs)
        if "diag_ggn" in which:
            out["diag_ggn"] = diag_ggn(net, p, xs, ys)
        if "diag_hessian" in which:
            out["diag_hessian"] = diag_hessian(net, p, xs, ys)
        return out

    def reference(p: Params, xs: Array, ys: Array, vs: Params) -> dict[str, Any]:
        return _reference_curvature(net, p, xs, ys, vs, which)

    return manual, reference
