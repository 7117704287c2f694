"""Any hand-written backward against autodiff, forward mode and finite differences, leaf by leaf.

:func:`check_backward` takes a function in either of two forms:

- ``forward(*primals) -> (out, residuals)`` and ``backward(residuals, cotangent) -> cotangents``
  (one per primal, ``None`` for a non-floating one): the ``fwd`` and ``bwd`` of
  :meth:`jax.custom_vjp.defvjp`. The reference is ``jax.vjp`` of ``forward(*primals)[0]``: autodiff
  through the forward's own computation.
- ``forward(*primals) -> out`` with ``backward=None``: a function whose reverse mode is the
  hand-written one (a :func:`jax.custom_vjp` function, or :func:`bpjax.custom_vjp` of a network).
  The manual VJP is ``jax.vjp(forward, ...)``; the reference is ``reference=`` or, for a
  ``jax.custom_vjp``, its undecorated primal function ``forward.fun``. A :func:`jax.custom_jvp`
  function is checked the same way: its manual VJP is JAX's transpose of the hand-written JVP
  rule, its reference ``forward.fun``.

Real functions take more than arrays (see :mod:`bpjax.testing._adapt`): ``static_argnums`` holds
Python values fixed (callables, floats, strings: never converted to arrays nor traced);
``nondiff_argnums`` are those of :class:`jax.custom_vjp` (a ``jax.custom_vjp`` brings its own; for
a fwd/bwd pair, ``backward(*nondiff, residuals, cotangent)`` as ``defvjp`` calls it); ``kwargs``
are keyword arguments of the forward and the reference, held fixed. The output may be any pytree
of real floating arrays (``(y, {"aux": a})``); the cotangent has its structure. Integer or complex
outputs, complex checked inputs, and a forward whose outputs do not follow its inputs' dtype (a
fixed ``.astype(jnp.float32)``, which the float64 shadow cannot run) are a ``TypeError`` naming
``forward`` or the input, before anything runs.

For a cotangent ``c`` of the output (random unless given), the manual cotangents ``Jᵀc`` are
compared, for every floating leaf of the primals:

- in the working dtype, with the float64 shadow's ``jax.vjp`` (the forward run on the inputs cast
  up to float64), within the allowed error derived in :mod:`bpjax.testing._tolerance`;
- in the float64 shadow (the same functions on the same inputs in float64) with the shadow's
  ``jax.vjp``, ``jvp`` (the dot-product identity ``⟨c, J u⟩ = ⟨Jᵀc, u⟩`` with ``J u`` by forward
  mode), central finite differences and the Taylor remainder of ``⟨c, f⟩`` (the references of
  :func:`bpjax.check_grads`, which runs them): a bfloat16 check gets finite differences whose step
  is far above its epsilon, because the shadow carries them.

Then the contract checks of :mod:`bpjax.testing._contracts` (linearity in ``c``, zero, vmap, two
runs, no retrace of the backward), and with ``order=2`` the second order of
:mod:`bpjax.testing._second_order`: the VJP of the manual VJP ``(θ, c) ↦ Jᵀc`` against
``jax.vjp ∘ jax.vjp`` of the reference, as ``torch.autograd.gradgradcheck`` does. NaN and Inf
are named before any numeric comparison, with the leaf and the first index: a backward that is
not finite where the reference is fails its row; elements where the reference is not finite (an
autodiff ``0 · ∞``) or where ``jax.vjp`` overflows in the working dtype too are left out of the
comparison, and the note says how many and where.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._cache import jit_wrapper, memoized
from bpjax._trees import cast_floats
from bpjax._types import Array, ArrayTree
from bpjax.check import CheckRow, GradCheckReport, GradientMismatchError, check_grads
from bpjax.check.grads import least_precise
from bpjax.check.tolerance import Tolerance, compare, measure, unit_roundoff
from bpjax.testing._adapt import adapt, cotangent_for, leaf_paths, manual_vjp, output_structure
from bpjax.testing._contracts import CONTRACTS, Inputs
from bpjax.testing._contracts import check as check_contracts
from bpjax.testing._second_order import check_order, second_order_rows
from bpjax.testing._trees import manual_leaves

__all__ = [
    "BACKWARD_REFERENCES",
    "BackwardMismatchError",
    "BackwardReport",
    "assert_backward_matches",
    "check_backward",
]

BACKWARD_REFERENCES = ("jax.vjp", "jvp", "finite_diff", "taylor")
"""What :func:`check_backward` compares the manual cotangents with (see the module docstring)."""

_SHADOW = "float64 shadow"


@dataclasses.dataclass(frozen=True)
class BackwardReport(GradCheckReport):
    """The outcome of :func:`check_backward`: one :class:`~bpjax.CheckRow` per leaf and check.

    The rows are those of a :class:`~bpjax.GradCheckReport` (the same table, HTML and rich forms)
    with the derived ``allowed`` error beside the observed ``max |Δ|``. ``rtol`` is 0 (every
    tolerance is absolute and derived per leaf) and ``atol`` the largest allowed error of the
    working dtype.

    Attributes:
      kappa: the measured amplification ``κ_i`` of each leaf, by path (see
        :func:`bpjax.testing.allowed_errors`).
      scale: ``M``, the largest magnitude of the float64 shadow's cotangents over all leaves.
    """

    kappa: tuple[tuple[str, float], ...] = ()
    scale: float = 0.0

    def summary(self) -> str:
        """One line: all good, or which checks failed on which leaves."""
        if self.ok:
            unjudged = sum("not judged" in row.note for row in self.rows)
            partly = f"; {unjudged} with parts not judged (see their notes)" if unjudged else ""
            return (
                f"all {len(self.rows)} checks passed ({self.dtype}; allowed errors derived from "
                f"the float64 shadow){partly}."
            )
        failed: dict[str, list[str]] = {}
        for row in self.failures:
            failed.setdefault(row.reference, []).append(row.path)
        parts = "; ".join(f"{name}: {', '.join(paths)}" for name, paths in failed.items())
        return f"{len(self.failures)} of {len(self.rows)} checks failed ({self.dtype}): {parts}."


class BackwardMismatchError(GradientMismatchError):
    """Raised by :func:`assert_backward_matches`; ``.report`` holds the :class:`BackwardReport`."""

    def __init__(self, report: GradCheckReport) -> None:
        AssertionError.__init__(
            self, "the hand-written backward disagrees with the references:\n" + str(report)
        )
        self.report = report


class _Fns(NamedTuple):
    """The functions a check runs, built once per (forward, backward, reference)."""

    manual: Callable[..., Any]  # (primals, c) -> (out, cotangents as returned, one per primal)
    reference_vjp: Callable[..., Any]  # (primals, c) -> (out, [cotangent of each float leaf])
    reference: Callable[..., Any]  # (*primals) -> out, plain JAX


@memoized
def _fns(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    reference: Callable[..., Any],
    argnums: tuple[int, ...],
    where: tuple[int, ...],
) -> _Fns:
    # (primals, c) -> (out, cotangents): backward(forward(*primals)[1], c), or without a backward
    # the function's own reverse mode w.r.t. the checked primals; split at the residuals so that
    # the no_retrace contract can count the backward's traces alone
    manual = manual_vjp(forward, backward, argnums)

    def of_float_leaves(primals: tuple[Any, ...]) -> tuple[Callable[..., Any], list[Array]]:
        """``reference`` as a function of the checked float leaves alone, and those leaves."""
        leaves, treedef = jax.tree.flatten(primals)

        def f(float_leaves: list[Array]) -> Any:
            full = list(leaves)
            for i, leaf in zip(where, float_leaves, strict=True):
                full[i] = leaf
            return reference(*jax.tree.unflatten(treedef, full))

        return f, [leaves[i] for i in where]

    def reference_vjp(primals: tuple[Any, ...], c: ArrayTree) -> tuple[Any, list[Array]]:
        f, float_leaves = of_float_leaves(primals)
        out, pullback = jax.vjp(f, float_leaves)
        return out, pullback(c)[0]

    return _Fns(manual, reference_vjp, reference)


def _resolve_reference(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    reference: Callable[..., Any] | None,
) -> Callable[..., Any]:
    if not callable(forward):
        raise TypeError(f"forward: expected a function, got {type(forward).__name__}.")
    if backward is not None and not callable(backward):
        raise TypeError(
            f"backward: expected backward(residuals, cotangent) -> cotangents or None, got "
            f"{type(backward).__name__}."
        )
    if reference is not None:
        if not callable(reference):
            raise TypeError(f"reference: expected a function, got {type(reference).__name__}.")
        return reference
    if backward is not None:
        return _first_output(forward)
    if isinstance(forward, (jax.custom_vjp, jax.custom_jvp)):
        return forward.fun  # the undecorated function: autodiff of it ignores the custom rule
    raise TypeError(
        "reference: forward is not a jax.custom_vjp or jax.custom_jvp and no backward was given, "
        "so there is no plain-JAX forward to differentiate; pass reference=f (the same function "
        "without the hand-written VJP), or forward/backward as the fwd/bwd pair of "
        "jax.custom_vjp.defvjp."
    )


@memoized
def _first_output(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``*primals -> forward(*primals)[0]``, the same object for the same forward (jit caches)."""

    def out(*primals: Any, **kwargs: Any) -> Any:
        return forward(*primals, **kwargs)[0]

    return out


def check_backward(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    *primals: Any,
    cotangent: ArrayTree | None = None,
    reference: Callable[..., Any] | None = None,
    argnums: int | Sequence[int] | None = None,
    static_argnums: int | Sequence[int] | None = None,
    nondiff_argnums: int | Sequence[int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    order: int = 1,
    references: Sequence[str] = BACKWARD_REFERENCES,
    contracts: Sequence[str] = CONTRACTS,
    determinism_rtol: float = 0.0,
    directions: int = 2,
    seed: int = 0,
    jit: bool = True,
) -> BackwardReport:
    """Checks a hand-written VJP against autodiff, forward mode, finite differences and contracts.

    Args:
      forward: ``forward(*primals) -> (out, residuals)`` when ``backward`` is given (the ``fwd``
        of ``jax.custom_vjp.defvjp``), else ``forward(*primals) -> out`` whose reverse mode is the
        hand-written one (a ``jax.custom_vjp`` function, :func:`bpjax.custom_vjp` of a network;
        or a ``jax.custom_jvp`` function, whose VJP JAX transposes from its JVP rule). Its output
        is a pytree of real floating arrays whose dtypes follow the inputs': the float64 shadow
        runs it on float64 inputs.
      backward: ``backward(residuals, cotangent) -> cotangents``, a tuple with one cotangent per
        primal (the primal's structure and shapes; ``None`` for a primal that is not
        differentiated, such as integer labels or a static value), or ``None``. With
        ``nondiff_argnums``: ``backward(*nondiff, residuals, cotangent)``, with one cotangent per
        other primal, as :meth:`jax.custom_vjp.defvjp` calls it.
      *primals: the inputs (pytrees of arrays, and static values at ``static_argnums`` and
        ``nondiff_argnums``); floating leaves are checked, others held fixed.
      cotangent: the output cotangent ``c`` (the output's structure, shapes and dtypes); random
        normal by default.
      reference: ``reference(*primals, **kwargs) -> out`` in plain JAX, the function autodiff
        differentiates; defaults to ``forward(*primals)[0]`` when ``backward`` is given and to
        ``forward.fun`` for a ``jax.custom_vjp`` or ``jax.custom_jvp``.
      argnums: the positions of the primals to check (their floating leaves); default all but
        the static ones. The others (float targets the backward does not differentiate) are held
        fixed, and the backward's cotangents for them are not looked at.
      static_argnums: positions of primals that are Python values (a callable, a float that
        selects a branch, a string): passed to the functions as they are, never converted to
        arrays nor traced, and not checked. They must be hashable (``jax.jit`` caches on them).
      nondiff_argnums: the positions :class:`jax.custom_vjp` calls non-differentiable, for a
        fwd/bwd pair: static like ``static_argnums``, and passed to ``backward`` first. A
        ``jax.custom_vjp`` or ``jax.custom_jvp`` checked with ``backward=None`` brings its own
        (giving other positions is a ``ValueError``).
      kwargs: keyword arguments of ``forward`` and ``reference`` (not of ``backward``), held
        fixed: a value whose leaves are all arrays is passed as arrays (cast to float64 in the
        shadow like the primals), any other value as it is (static, hashable).
      order: 1 checks the VJP; 2 also its own VJP, w.r.t. the checked primals and the cotangent
        (rows ``<argument>`` and ``cotangent<path>`` against ``jax.vjp∘jax.vjp (order 2)``; see
        :mod:`bpjax.testing._second_order`). The backward must then be differentiable by JAX (its
        ``jnp`` code, or a ``jax.custom_vjp`` of its own: a hand-written HVP).
      references: which of :data:`BACKWARD_REFERENCES` to compare with.
      contracts: which of :data:`bpjax.testing.CONTRACTS` to check.
      determinism_rtol: the ``deterministic`` contract's tolerance, relative to the largest
        cotangent: 0 (two runs bitwise equal) unless the backend is nondeterministic.
      directions: random unit directions per leaf for the ``jvp`` and ``finite_diff`` rows.
      seed: seeds the cotangent, the directions and the contracts' extra inputs.
      jit: run everything under ``jax.jit`` (``False``: eagerly; the ``no_retrace`` contract
        calls the backward both ways, and counts only the backward's traces when called eagerly).

    Returns:
      A :class:`BackwardReport`; it never raises on a mismatch (see
      :func:`assert_backward_matches`). Rows are named ``<argument><path>``, e.g. ``x`` or
      ``params[0]['W']``; the reference column says which check.

    Raises:
      TypeError: a function argument is not callable, or no reference can be found; misused
        ``static_argnums``, ``nondiff_argnums`` or ``kwargs`` (not ints, not a dict, an
        unhashable static value), a primal leaf that is not an array (pass ``static_argnums``), a
        complex checked input; an integer, complex or fixed-dtype output of ``forward``.
      ValueError: an unknown name in ``references`` or ``contracts``, no floating leaf, positions
        out of range or static ones in ``argnums``, ``nondiff_argnums`` that differ from a
        ``jax.custom_vjp``'s own, a ``cotangent`` not of the output's structure, shapes and
        dtypes, an ``order`` other than 1 or 2.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def fwd(x, w):
      ...     y = jnp.tanh(x @ w)
      ...     return y, (x, w, y)
      >>> def bwd(res, g):
      ...     x, w, y = res
      ...     dz = g * (1 - y**2)  # δ = g ∘ tanh'(z)
      ...     return dz @ w.T, x.T @ dz
      >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 0.1)
      >>> report = check_backward(fwd, bwd, x, w)
      >>> report.ok, report.rows[0].path, report.rows[0].reference
      (True, 'x', 'jax.vjp')
    """
    _check_names("references", references, BACKWARD_REFERENCES)
    _check_names("contracts", contracts, CONTRACTS)
    order = check_order(order)
    # the user's form (static and keyword arguments, nondiff_argnums) bound into the functions:
    # from here on every primal is a pytree of arrays (see bpjax.testing._adapt)
    form = adapt(
        forward, backward, _resolve_reference(forward, backward, reference), primals,
        argnums=argnums, static_argnums=static_argnums, nondiff_argnums=nondiff_argnums,
        kwargs=kwargs,
    )  # fmt: skip
    ref_fn, primals, nums = form.reference, form.primals, form.argnums
    paths = leaf_paths(form.names, primals, nums)
    if not paths:
        raise ValueError(
            f"primals: no floating leaf to differentiate with respect to among {len(primals)} "
            f"primals (argnums={argnums!r})."
        )
    fns = _fns(form.forward, form.backward, ref_fn, nums, tuple(i for i, _ in paths))
    flat_primals = jax.tree.leaves(primals)
    dtype = least_precise([flat_primals[i] for i, _ in paths])
    wrap = jit_wrapper(jit)

    c = cotangent_for(output_structure(ref_fn, primals), cotangent, seed)

    _, cts = wrap(fns.manual)(primals, c)  # the contracts run the same compiled function
    manual, problem = manual_leaves(cts, primals)
    # the one tolerance engine: each leaf against the float64 shadow's jax.vjp, within the
    # roundoff measured for jax.vjp in the working dtype (bpjax.check.tolerance)
    measured = measure(
        _cotangents_of(fns.reference_vjp), primals, (c,), dtype=dtype, wrap=wrap, seed=seed
    )
    ref64, tols = measured.truth["cotangents"], measured.tolerances["cotangents"]
    autodiff = measured.autodiff.get("cotangents")
    allowed = [t.max_abs for t in tols]
    kappa = [t.roundoff / unit_roundoff(dtype) for t in tols]
    with jax.enable_x64(True):
        primals64, c64 = cast_floats(primals, jnp.float64), cast_floats(c, jnp.float64)
        _, cts64 = wrap(fns.manual)(primals64, c64)

    names = [path for _, path in paths]
    rows: list[CheckRow] = []
    manual64, problem64 = manual_leaves(cts64, primals64)
    if manual is None or manual64 is None:
        rows.append(CheckRow("backward", "structure", math.nan, math.nan, None, False,
                             note=problem or problem64))  # fmt: skip
        return _report(rows, dtype, allowed, names, kappa, ref64)
    manual = [manual[i] for i, _ in paths]
    manual64 = [manual64[i] for i, _ in paths]

    if "jax.vjp" in references:
        if dtype != jnp.float64:
            rows += _vjp_rows(names, manual, ref64, tols, "jax.vjp", autodiff=autodiff)
        rows += _vjp_rows(names, manual64, ref64, tols, f"jax.vjp, {_SHADOW}", shadow=True)
    directional = [r for r in references if r != "jax.vjp"]
    if directional:
        rows += _directional_rows(
            fns, primals64, c64, manual64, tols, names, paths, directional,
            directions=directions, seed=seed, jit=jit,
        )  # fmt: skip
    inputs = Inputs(primals, c, [i for i, _ in paths], names, allowed, seed)
    rows += check_contracts(
        fns.manual, inputs, contracts, wrap=wrap, determinism_rtol=determinism_rtol,
    )  # fmt: skip
    if order == 2:
        rows += second_order_rows(
            fns.manual, ref_fn, primals, c, [i for i, _ in paths], names,
            dtype=dtype, jit=jit, seed=seed,
        )  # fmt: skip
    return _report(rows, dtype, allowed, names, kappa, ref64)


def _check_names(argname: str, given: Sequence[str], valid: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if isinstance(given, str) or unknown:
        raise ValueError(
            f"{argname}: expected a sequence of names from {', '.join(valid)}; got "
            f"{given!r}" + (f" (unknown: {unknown})." if unknown else ".")
        )


def _report(
    rows: list[CheckRow],
    dtype: Any,
    allowed: list[float],
    names: list[str],
    kappa: list[float],
    reference: list[np.ndarray],
) -> BackwardReport:
    return BackwardReport(
        tuple(rows),
        jnp.dtype(dtype).name,
        0.0,
        max(allowed, default=0.0),
        kappa=tuple(zip(names, kappa, strict=True)),
        scale=max(
            (float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)) for r in reference), default=0.0
        ),
    )


def _vjp_rows(
    names: list[str],
    manual: list[Any],
    reference: list[np.ndarray],
    tols: list[Tolerance],
    label: str,
    *,
    shadow: bool = False,
    autodiff: list[np.ndarray] | None = None,
) -> list[CheckRow]:
    """Each leaf's manual cotangent against the float64 shadow's ``jax.vjp``.

    Both the backward run in the working dtype and the same backward run in float64 are held to
    the working dtype's allowance: a float32 check judges at float32's accuracy. Undefined
    reference elements are reported, not judged; a manual NaN where ``jax.vjp`` in the working
    dtype (``autodiff``) is not finite either is the dtype overflowing, also left out.
    """
    rows = []
    for k, (name, m, r, tol) in enumerate(zip(names, manual, reference, tols, strict=True)):
        if m is None:
            rows.append(CheckRow(name, label, math.nan, math.nan, None, False,
                                 note="backward returned None for a floating input"))  # fmt: skip
            continue
        overflow = None
        if autodiff is not None and np.shape(autodiff[k]) == np.shape(r):
            overflow = ~np.isfinite(autodiff[k]) & np.isfinite(r)
        row = compare(name, label, m, r, tol, overflow=overflow)
        default = "the backward run in float64" if shadow else "against the float64 shadow"
        rows.append(row._replace(note=row.note or default))
    return rows


@memoized
def _cotangents_of(reference_vjp: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    """``(primals, c) -> {"cotangents": [Jᵀc of each checked leaf]}`` for the tolerance engine."""

    def cotangents(primals: tuple[Any, ...], c: ArrayTree) -> dict[str, Any]:
        return {"cotangents": list(reference_vjp(primals, c)[1])}

    return cotangents


def _directional_rows(
    fns: _Fns,
    primals64: tuple[Any, ...],
    c64: ArrayTree,
    manual64: list[Any],
    tols: list[Tolerance],
    names: list[str],
    paths: list[tuple[int, str]],
    references: list[str],
    *,
    directions: int,
    seed: int,
    jit: bool,
) -> list[CheckRow]:
    """``jvp``, ``finite_diff`` and ``taylor`` rows: :func:`bpjax.check_grads` of ``⟨c, f⟩``.

    In the float64 shadow, the scalar ``s(θ) = ⟨c, f(θ)⟩`` has the gradient ``Jᵀc``: the manual
    cotangents are its hand-written gradient. A unit direction ``u`` on a leaf gets
    ``|⟨Δ, u⟩| ≤ ‖Δ‖₂``, so each leaf's rows allow its own norm allowance (in the working dtype).
    """
    with jax.enable_x64(True):
        flat, treedef = jax.tree.flatten(primals64)
        where = tuple(i for i, _ in paths)
        others = [flat[i] for i in range(len(flat)) if i not in where]
        float_leaves = [flat[i] for i in where]
        grads = [jnp.asarray(g, jnp.float64) for g in manual64]
        atol = [t.norm for t in tols]
        manual_s, reference_s = _scalar_fns(fns.reference, treedef, where)
        report = check_grads(
            manual_s, reference_s, float_leaves, c64, others, grads,
            rtol=0.0, atol=atol, directions=directions, seed=seed, jit=jit,
            references=tuple(references),
        )  # fmt: skip
    by_path = {f"[{k}]": name for k, name in enumerate(names)}
    labels = {"jvp": "jvp: ⟨c, J u⟩ = ⟨Jᵀc, u⟩", "finite_diff": "finite_diff", "taylor": "taylor"}
    rows = []
    unmeasured = {name for name, t in zip(names, tols, strict=True) if not math.isfinite(t.norm)}
    for row in report.rows:
        if row.path not in by_path:  # the value row: ⟨c, f⟩ against itself
            continue
        row = row._replace(path=by_path[row.path], reference=labels[row.reference])
        if row.path in unmeasured and not row.passed:
            row = row._replace(passed=True, note="roundoff unmeasured (see the jax.vjp row)")
        rows.append(row)
    return rows


@memoized
def _scalar_fns(
    reference: Callable[..., Any], treedef: Any, where: tuple[int, ...]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``s(float_leaves, c, others) = ⟨c, f⟩`` and a "manual" that returns given gradients."""

    def s(float_leaves: list[Array], c: ArrayTree, others: list[Array], grads: Any) -> Array:
        del grads
        it_f, it_o = iter(float_leaves), iter(others)
        full = [next(it_f) if i in where else next(it_o) for i in range(treedef.num_leaves)]
        out = reference(*jax.tree.unflatten(treedef, full))
        terms = jax.tree.map(lambda a, b: jnp.sum(a * b.astype(a.dtype)), out, c)
        return functools.reduce(jnp.add, jax.tree.leaves(terms))

    def manual(float_leaves: list[Array], c: ArrayTree, others: list[Array], grads: Any) -> Any:
        return s(float_leaves, c, others, grads), grads

    return manual, s


def assert_backward_matches(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    *primals: Any,
    **options: Any,
) -> BackwardReport:
    """Like :func:`check_backward`, but raises :class:`BackwardMismatchError` on any failing row.

    Args:
      forward: as for :func:`check_backward`.
      backward: as for :func:`check_backward`.
      *primals: as for :func:`check_backward`.
      **options: the keyword options of :func:`check_backward`.

    Returns:
      The passing :class:`BackwardReport`.

    Raises:
      BackwardMismatchError: (an ``AssertionError``) with the report table as its message.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> @jax.custom_vjp
      ... def square(x):
      ...     return x**2
      >>> square.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))
      >>> report = assert_backward_matches(square, None, jnp.arange(3.0))
      >>> len(report.rows) > 5
      True
    """
    __tracebackhide__ = True  # pytest shows the report, not this frame
    report = check_backward(forward, backward, *primals, **options)
    if not report.ok:
        raise BackwardMismatchError(report)
    return report
