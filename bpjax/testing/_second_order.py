"""Second order: the manual VJP differentiated once more, as ``torch.autograd.gradgradcheck`` does.

At the checked floating leaves ``θ`` the manual VJP is the map ``v(θ, c) = J(θ)ᵀ c`` (``J`` the
Jacobian of the forward, ``c`` the output cotangent). Its own VJP, for a random normal cotangent
``d`` of ``v``'s output (the shapes of ``θ``), is the pair

    θ̄ = ∂⟨d, v⟩/∂θ = Σ_k c_k ∇²f_k(θ) d      (the Hessian of ⟨c, f⟩ times d: an HVP)
    c̄ = ∂⟨d, v⟩/∂c = J(θ) d                  (forward mode, through the backward's linearity)

JAX differentiates whatever computes ``v``: the backward's ``jnp`` code, the residuals the forward
kept for it, or a ``jax.custom_vjp`` the backward calls (a hand-written HVP). A backward right at
the point but built from a term that should depend on ``θ`` and does not (a ``stop_gradient``, a
constant) has the right ``v`` and a wrong ``θ̄``.

The reference is the same pair for the reference's ``jax.vjp`` (``jax.vjp ∘ jax.vjp``), in the
float64 shadow (the inputs, ``c`` and ``d`` cast up to float64). The allowed errors come from the
one tolerance engine (:mod:`bpjax.check.tolerance`): each leaf of the pair within the roundoff
measured for the reference pair in the working dtype, both for the manual pair run in the working
dtype and for the same run in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._cache import jit_wrapper, memoized
from bpjax._trees import cast_floats
from bpjax._types import Array, ArrayTree
from bpjax.check import CheckRow
from bpjax.check.tolerance import Tolerance, compare, measure, to_f64
from bpjax.testing._trees import manual_leaves, random_like

__all__ = ["ORDER2", "ORDERS", "check_order", "second_order_rows"]

ORDERS = (1, 2)
"""The orders :func:`bpjax.testing.check_backward` checks up to."""

ORDER2 = "jax.vjp∘jax.vjp (order 2)"
"""The reference column of the second-order rows."""

_SHADOW = "float64 shadow"


def check_order(order: Any) -> int:
    """``order`` if it is 1 or 2.

    Raises:
      ValueError: naming ``order``.
    """
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(
            f"order: expected 1 (the VJP) or 2 (also the VJP of the VJP), got {order!r}."
        )
    return int(order)


class _ShapeMismatch(ValueError):
    """The manual first-order cotangents do not have the primals' shapes (first order says so)."""


class _Fns(NamedTuple):
    manual: Callable[..., Any]  # (flat, θ, c, d) -> (θ̄, c̄) of the manual VJP
    reference: Callable[..., Any]  # (flat, θ, c, d) -> (θ̄, c̄) of jax.vjp ∘ jax.vjp


@memoized
def _fns(
    manual: Callable[..., Any], reference: Callable[..., Any], treedef: Any, where: tuple[int, ...]
) -> _Fns:
    """The second-order functions; the primals' other leaves ``flat`` are arguments, not
    constants, so that one compiled function serves every call of the same shapes."""

    def full(flat: list[Any], theta: list[Array]) -> tuple[Any, ...]:
        leaves = list(flat)
        for i, x in zip(where, theta, strict=True):
            leaves[i] = x
        return tuple(jax.tree.unflatten(treedef, leaves))

    def manual_first(flat: list[Any], theta: list[Array], c: ArrayTree) -> list[Array]:
        """``v(θ, c)``: the manual cotangents of the checked leaves (zeros where ``None``)."""
        primals = full(flat, theta)
        leaves, problem = manual_leaves(manual(primals, c)[1], primals)
        if leaves is None:  # the first-order structure row has failed already
            raise _ShapeMismatch(problem)
        out = [
            jnp.zeros_like(x) if leaves[i] is None else leaves[i]
            for i, x in zip(where, theta, strict=True)
        ]
        if any(jnp.shape(g) != jnp.shape(x) for g, x in zip(out, theta, strict=True)):
            raise _ShapeMismatch("the manual cotangents do not have the primals' shapes")
        return out

    def reference_first(flat: list[Any], theta: list[Array], c: ArrayTree) -> list[Array]:
        def f(th: list[Array]) -> Any:
            return reference(*full(flat, th))

        return list(jax.vjp(f, theta)[1](c)[0])

    def vjp_of(first: Callable[..., Any]) -> Callable[..., Any]:
        def run(flat: list[Any], theta: list[Array], c: ArrayTree, d: list[Array]) -> Any:
            v, pullback = jax.vjp(functools.partial(first, flat), theta, c)
            # d in v's dtypes: a backward may return another float dtype than its primal's
            return pullback([di.astype(vi.dtype) for di, vi in zip(d, v, strict=True)])

        return run

    return _Fns(vjp_of(manual_first), vjp_of(reference_first))


def _pair_leaves(pair: Any) -> list[np.ndarray]:
    """``(θ̄, c̄)`` as host float64 leaves: θ̄'s leaves, then c̄'s."""
    theta_bar, c_bar = pair
    return [to_f64(x) for x in [*theta_bar, *jax.tree.leaves(c_bar)]]


def second_order_rows(
    manual: Callable[..., Any],
    reference: Callable[..., Any],
    primals: tuple[Any, ...],
    c: ArrayTree,
    where: Sequence[int],
    names: Sequence[str],
    *,
    dtype: Any,
    jit: bool,
    seed: int,
) -> list[CheckRow]:
    """The second-order rows: ``θ̄`` per checked leaf (its name), ``c̄`` per output leaf.

    Args:
      manual: ``manual(primals, c) -> (out, cotangents)``, the manual VJP.
      reference: ``reference(*primals) -> out``, plain JAX.
      primals: the dynamic primals, in the working dtype.
      c: the output cotangent of the first-order check.
      where: the flat indices of the checked floating leaves.
      names: their paths, for the rows.
      dtype: the working dtype (the least precise of the checked leaves).
      jit: run under ``jax.jit``.
      seed: seeds ``d`` and the shadow's unit direction.

    Returns:
      Rows labelled :data:`ORDER2` in the working dtype (unless it is float64) and in the float64
      shadow; one failing row when the manual cotangents are not the primals' shapes.
    """
    wrap = jit_wrapper(jit)
    flat, treedef = jax.tree.flatten(primals)
    fns = _fns(manual, reference, treedef, tuple(where))
    theta = [flat[i] for i in where]
    rng = np.random.default_rng(seed + 3)
    d = random_like(rng, theta)
    c_names = [
        "cotangent" + jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(c)[0]
    ]
    labels = [*names, *c_names]
    try:
        work = _pair_leaves(wrap(fns.manual)(flat, theta, c, d))
    except _ShapeMismatch as error:
        return [CheckRow("backward", ORDER2, math.nan, math.nan, None, False,
                         note=f"{error}: order 2 not checked")]  # fmt: skip
    measured = measure(
        _pair_of(fns.reference, tuple(where)), flat, (c, d), dtype=dtype, wrap=wrap, seed=seed
    )
    ref64, tols = measured.truth["pair"], measured.tolerances["pair"]
    with jax.enable_x64(True):
        flat64, c64, d64 = (cast_floats(t, jnp.float64) for t in (flat, c, d))
        manual64 = _pair_leaves(wrap(fns.manual)(flat64, [flat64[i] for i in where], c64, d64))
    rows = []
    if jnp.dtype(dtype) != jnp.float64:
        rows += _rows(labels, work, ref64, tols, ORDER2, "against the float64 shadow")
    shadow_label = f"{ORDER2}, {_SHADOW}"
    rows += _rows(labels, manual64, ref64, tols, shadow_label, "the backward run in float64")
    return rows


@memoized
def _pair_of(reference2: Callable[..., Any], where: tuple[int, ...]) -> Callable[..., Any]:
    """``(flat, c, d) -> {"pair": [θ̄ leaves, c̄ leaves]}`` for the tolerance engine."""

    def pair(flat: list[Any], c: ArrayTree, d: list[Array]) -> dict[str, Any]:
        theta_bar, c_bar = reference2(flat, [flat[i] for i in where], c, d)
        return {"pair": [*theta_bar, *jax.tree.leaves(c_bar)]}

    return pair


def _rows(
    names: Sequence[str],
    manual: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    tols: Sequence[Tolerance],
    label: str,
    default_note: str,
) -> list[CheckRow]:
    """Both the working-dtype and the float64-shadow rows are held to the working allowance."""
    rows = []
    for name, m, r, tol in zip(names, manual, reference, tols, strict=True):
        row = compare(name, label, m, r, tol)
        rows.append(row._replace(note=row.note or default_note))
    return rows
