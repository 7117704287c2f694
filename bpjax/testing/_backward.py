"""Any hand-written backward against autodiff, forward mode and finite differences, leaf by leaf.

:func:`check_backward` takes a function in either of two forms:

- ``forward(*primals) -> (out, residuals)`` and ``backward(residuals, cotangent) -> cotangents``
  (one per primal, ``None`` for a non-floating one): the ``fwd`` and ``bwd`` of
  :meth:`jax.custom_vjp.defvjp`. The reference is ``jax.vjp`` of ``forward(*primals)[0]``: autodiff
  through the forward's own computation.
- ``forward(*primals) -> out`` with ``backward=None``: a function whose reverse mode is the
  hand-written one (a :func:`jax.custom_vjp` function, or :func:`bpjax.custom_vjp` of a network).
  The manual VJP is ``jax.vjp(forward, ...)``; the reference is ``reference=`` or, for a
  ``jax.custom_vjp``, its undecorated primal function ``forward.fun``.

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
runs, no retrace). NaN and Inf are named before any numeric comparison, with the leaf and the first
index: a backward that is not finite where the reference is fails its row; elements where the
reference is not finite (an autodiff ``0 · ∞``) or where ``jax.vjp`` overflows in the working dtype
too are left out of the comparison, and the note says how many and where.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._trees import cast_floats, is_float
from bpjax._types import Array, ArrayTree
from bpjax.check import (
    CheckRow,
    GradCheckReport,
    GradientMismatchError,
    _compare_arrays,
    _memoized,
    _to_f64_np,
    _wrapper,
    check_grads,
)
from bpjax.testing import _contracts
from bpjax.testing._tolerance import _finite_max_abs, allowed_errors, unit_roundoff
from bpjax.testing._trees import manual_leaves, random_like

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
            return (
                f"all {len(self.rows)} checks passed ({self.dtype}; allowed errors derived from "
                "the float64 shadow)."
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
    shadow: Callable[..., Any]  # (primals, c, u) -> (manual's, reference_vjp's, ⟨c, J u⟩)
    reference: Callable[..., Any]  # (*primals) -> out, plain JAX


@_memoized
def _fns(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    reference: Callable[..., Any],
    argnums: tuple[int, ...],
    where: tuple[int, ...],
) -> _Fns:
    def manual(primals: tuple[Any, ...], c: ArrayTree) -> tuple[Any, Any]:
        if backward is None:  # the function's own reverse mode, w.r.t. the checked primals

            def f(*checked: Any) -> Any:
                full = list(primals)
                for i, value in zip(argnums, checked, strict=True):
                    full[i] = value
                return forward(*full)

            out, pullback = jax.vjp(f, *(primals[i] for i in argnums))
            cts = dict(zip(argnums, pullback(c), strict=True))
            return out, tuple(cts.get(i) for i in range(len(primals)))
        out, residuals = forward(*primals)
        cts = backward(residuals, c)
        return out, tuple(cts) if isinstance(cts, (tuple, list)) else (cts,)

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

    def shadow(primals: tuple[Any, ...], c: ArrayTree, u: list[Array]) -> tuple[Any, Any, Any]:
        """Both VJPs, and ``⟨c, J u⟩`` by forward mode: its gap to ``⟨Jᵀc, u⟩`` is roundoff."""
        f, float_leaves = of_float_leaves(primals)
        _, tangent = jax.jvp(f, (float_leaves,), (u,))
        terms = jax.tree.map(lambda t, ci: jnp.sum(t * ci.astype(t.dtype)), tangent, c)
        return manual(primals, c), reference_vjp(primals, c), sum(jax.tree.leaves(terms))

    return _Fns(manual, reference_vjp, shadow, reference)


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
    if isinstance(forward, jax.custom_vjp):
        return forward.fun
    raise TypeError(
        "reference: forward is not a jax.custom_vjp and no backward was given, so there is no "
        "plain-JAX forward to differentiate; pass reference=f (the same function without the "
        "hand-written VJP), or forward/backward as the fwd/bwd pair of jax.custom_vjp.defvjp."
    )


@_memoized
def _first_output(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``*primals -> forward(*primals)[0]``, the same object for the same forward (jit caches)."""

    def out(*primals: Any) -> Any:
        return forward(*primals)[0]

    return out


def _argnums(argnums: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    if argnums is None:
        return tuple(range(n))
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not all(isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in nums):
        raise ValueError(f"argnums: expected positions among the {n} primals, got {argnums!r}.")
    return tuple(sorted({i % n for i in nums}))


def _leaf_paths(
    forward: Callable[..., Any], primals: tuple[Any, ...], argnums: tuple[int, ...]
) -> list[tuple[int, str]]:
    """``(flat index, path)`` of every floating leaf of the checked primals, named by the
    forward's parameter names."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = positional if len(positional) >= len(primals) else []
    out, flat = [], 0
    for i, primal in enumerate(primals):
        head = names[i] if names else f"primals[{i}]"
        for path, leaf in jax.tree_util.tree_flatten_with_path(primal)[0]:
            if i in argnums and is_float(leaf):
                out.append((flat, head + jax.tree_util.keystr(path)))
            flat += 1
    return out


def _unit_direction(seed: int, leaves: list[Any]) -> list[Array]:
    """A random direction over the checked leaves, of unit Euclidean norm, in float64."""
    rng = np.random.default_rng(seed + 2)
    v = [rng.standard_normal(np.shape(leaf)) for leaf in leaves]
    norm = math.sqrt(sum(float(np.sum(x**2)) for x in v)) or 1.0
    return [jnp.asarray(x / norm) for x in v]


def _least_precise(leaves: Sequence[Any]) -> Any:
    dtypes = [jnp.dtype(jnp.result_type(x)) for x in leaves]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=jnp.dtype(jnp.float32))


def check_backward(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    *primals: Any,
    cotangent: ArrayTree | None = None,
    reference: Callable[..., Any] | None = None,
    argnums: int | Sequence[int] | None = None,
    references: Sequence[str] = BACKWARD_REFERENCES,
    contracts: Sequence[str] = _contracts.CONTRACTS,
    determinism_rtol: float = 0.0,
    directions: int = 2,
    seed: int = 0,
    jit: bool = True,
) -> BackwardReport:
    """Checks a hand-written VJP against autodiff, forward mode, finite differences and contracts.

    Args:
      forward: ``forward(*primals) -> (out, residuals)`` when ``backward`` is given (the ``fwd``
        of ``jax.custom_vjp.defvjp``), else ``forward(*primals) -> out`` whose reverse mode is the
        hand-written one (a ``jax.custom_vjp`` function, :func:`bpjax.custom_vjp` of a network).
        Its computation must follow its inputs' dtype: the float64 shadow runs it on float64
        inputs.
      backward: ``backward(residuals, cotangent) -> cotangents``, a tuple with one cotangent per
        primal (the primal's structure and shapes; ``None`` for a primal that is not
        differentiated, such as integer labels), or ``None``.
      *primals: the inputs (pytrees of arrays); floating leaves are checked, others held fixed.
      cotangent: the output cotangent ``c`` (the output's structure); random normal by default.
      reference: ``reference(*primals) -> out`` in plain JAX, the function autodiff
        differentiates; defaults to ``forward(*primals)[0]`` when ``backward`` is given and to
        ``forward.fun`` for a ``jax.custom_vjp``.
      argnums: the positions of the primals to check (their floating leaves); default all. The
        others (float targets the backward does not differentiate) are held fixed, and the
        backward's cotangents for them are not looked at.
      references: which of :data:`BACKWARD_REFERENCES` to compare with.
      contracts: which of :data:`bpjax.testing.CONTRACTS` to check.
      determinism_rtol: the ``deterministic`` contract's tolerance, relative to the largest
        cotangent: 0 (two runs bitwise equal) unless the backend is nondeterministic.
      directions: random unit directions per leaf for the ``jvp`` and ``finite_diff`` rows.
      seed: seeds the cotangent, the directions and the contracts' extra inputs.
      jit: run everything under ``jax.jit`` (``False``: eagerly; the ``no_retrace`` contract
        calls the backward both ways).

    Returns:
      A :class:`BackwardReport`; it never raises on a mismatch (see
      :func:`assert_backward_matches`). Rows are named ``<argument><path>``, e.g. ``x`` or
      ``params[0]['W']``; the reference column says which check.

    Raises:
      TypeError: a function argument is not callable, or no reference can be found.
      ValueError: an unknown name in ``references`` or ``contracts``, or no floating leaf.

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
    _check_names("contracts", contracts, _contracts.CONTRACTS)
    ref_fn = _resolve_reference(forward, backward, reference)
    primals = tuple(jax.tree.map(jnp.asarray, primals))
    nums = _argnums(argnums, len(primals))
    paths = _leaf_paths(forward, primals, nums)
    if not paths:
        raise ValueError(
            f"primals: no floating leaf to differentiate with respect to among {len(primals)} "
            f"primals (argnums={argnums!r})."
        )
    fns = _fns(forward, backward, ref_fn, nums, tuple(i for i, _ in paths))
    flat_primals = jax.tree.leaves(primals)
    dtype = _least_precise([flat_primals[i] for i, _ in paths])
    wrap = _wrapper(jit)

    out = jax.eval_shape(ref_fn, *primals)
    if not all(is_float(x) for x in jax.tree.leaves(out)):
        raise TypeError("forward: expected floating outputs (the cotangent is floating).")
    c = random_like(np.random.default_rng(seed), out) if cotangent is None else cotangent

    _, cts = wrap(fns.manual)(primals, c)  # the contracts run the same compiled function
    _, ref_work = wrap(fns.reference_vjp)(primals, c)
    manual, problem = manual_leaves(cts, primals)
    with jax.enable_x64(True):
        primals64, c64 = cast_floats(primals, jnp.float64), cast_floats(c, jnp.float64)
        u = _unit_direction(seed, [flat_primals[i] for i, _ in paths])
        (_, cts64), (_, ref64), jvp64 = wrap(fns.shadow)(primals64, c64, u)
        ref64 = [_to_f64_np(r) for r in ref64]
    # the float64 roundoff of this computation: forward and reverse mode disagree by about as much
    vjp_u = sum(float(np.sum(r * np.asarray(v))) for r, v in zip(ref64, u, strict=True))
    gap = abs(float(jvp64) - vjp_u)
    kappa64 = gap / unit_roundoff(jnp.float64) if math.isfinite(gap) else 0.0
    measured_dtype = dtype if dtype != jnp.float64 else jnp.dtype(jnp.float32)
    if measured_dtype != dtype:
        low = cast_floats(primals, measured_dtype), cast_floats(c, measured_dtype)
        ref_work = wrap(fns.reference_vjp)(*low)[1]
    measured = [_to_f64_np(r) for r in ref_work]
    allowed, kappa = allowed_errors(ref64, measured, dtype=dtype, measured_dtype=measured_dtype)
    allowed64, _ = allowed_errors(
        ref64, measured, dtype=jnp.float64, measured_dtype=measured_dtype, kappa_floor=kappa64
    )

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
            same_dtype = measured if measured_dtype == dtype else None
            rows += _vjp_rows(names, manual, ref64, allowed, "jax.vjp", autodiff=same_dtype)
        rows += _vjp_rows(names, manual64, ref64, allowed64, f"jax.vjp, {_SHADOW}", shadow=True)
    directional = [r for r in references if r != "jax.vjp"]
    if directional:
        rows += _directional_rows(
            fns, primals64, c64, manual64, allowed64, names, paths, directional,
            directions=directions, seed=seed, jit=jit,
        )  # fmt: skip
    inputs = _contracts.Inputs(primals, c, [i for i, _ in paths], names, allowed, seed)
    rows += _contracts.check(
        fns.manual, inputs, contracts, wrap=wrap, determinism_rtol=determinism_rtol,
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
        scale=max((_finite_max_abs(r) for r in reference), default=0.0),
    )


def _vjp_rows(
    names: list[str],
    manual: list[Any],
    reference: list[np.ndarray],
    allowed: list[float],
    label: str,
    *,
    shadow: bool = False,
    autodiff: list[np.ndarray] | None = None,
) -> list[CheckRow]:
    """Each leaf's manual cotangent against the float64 shadow's ``jax.vjp``.

    Where ``autodiff`` (``jax.vjp`` in the working dtype) is not finite too, the dtype cannot hold
    the computation, whoever runs it; where the reference is not finite and the backward is (an
    autodiff ``0 · ∞``), nothing can check the backward: those elements are left out of the
    comparison and the note names the first. Elsewhere a non-finite element of the backward fails
    the row, naming the first index.
    """
    rows = []
    for k, (name, m, r, a) in enumerate(zip(names, manual, reference, allowed, strict=True)):
        if m is None:
            rows.append(CheckRow(name, label, math.nan, math.nan, None, False,
                                 note="backward returned None for a floating input"))  # fmt: skip
            continue
        m, notes = _to_f64_np(m), []
        if m.shape == r.shape:
            masks = [(np.isfinite(m) & ~np.isfinite(r), "the reference is not finite where the "
                      "backward is: unverifiable there")]  # fmt: skip
            if autodiff is not None:
                masks.append((~np.isfinite(m) & ~np.isfinite(autodiff[k]), "not finite, as "
                              "jax.vjp is in the same dtype: the dtype overflows"))  # fmt: skip
            for mask, why in masks:
                if mask.any():
                    first = tuple(int(i) for i in np.argwhere(mask)[0])
                    notes.append(f"{int(mask.sum())} elements (first {first}) {why}, left out")
                    m, r = np.where(mask, 0.0, m), np.where(mask, 0.0, r)
        note = "; ".join(notes)
        row = _compare_arrays(name, label, m, r, rtol=0.0, atol=a)
        if not math.isfinite(a) and not row.note:
            note = "jax.vjp in a lower precision overflows here: roundoff unmeasured, not compared"
        default = "the backward run in float64" if shadow else "against the float64 shadow"
        rows.append(row._replace(allowed=a, note=row.note or note or default))
    return rows


def _directional_rows(
    fns: _Fns,
    primals64: tuple[Any, ...],
    c64: ArrayTree,
    manual64: list[Any],
    allowed64: list[float],
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
    ``|⟨Δ, u⟩| ≤ ‖Δ‖₂ ≤ √n · max |Δ|``, so the rows allow the largest leaf's ``√n · allowed``.
    """
    with jax.enable_x64(True):
        flat, treedef = jax.tree.flatten(primals64)
        where = tuple(i for i, _ in paths)
        others = [flat[i] for i in range(len(flat)) if i not in where]
        float_leaves = [flat[i] for i in where]
        grads = [jnp.asarray(g, jnp.float64) for g in manual64]
        sizes = [max(int(np.size(g)), 1) for g in grads]
        finite = [math.sqrt(n) * a for n, a in zip(sizes, allowed64, strict=True)]
        atol = max((a for a in finite if math.isfinite(a)), default=0.0)
        manual_s, reference_s = _scalar_fns(fns.reference, treedef, where)
        report = check_grads(
            manual_s, reference_s, float_leaves, c64, others, grads,
            rtol=0.0, atol=atol, directions=directions, seed=seed, jit=jit,
            references=tuple(references),
        )  # fmt: skip
    by_path = {f"[{k}]": name for k, name in enumerate(names)}
    labels = {"jvp": "jvp: ⟨c, J u⟩ = ⟨Jᵀc, u⟩", "finite_diff": "finite_diff", "taylor": "taylor"}
    rows = []
    unmeasured = {name for name, a in zip(names, allowed64, strict=True) if not math.isfinite(a)}
    for row in report.rows:
        if row.path not in by_path:  # the value row: ⟨c, f⟩ against itself
            continue
        allowed = atol if row.reference == "jvp" else None
        row = row._replace(path=by_path[row.path], reference=labels[row.reference], allowed=allowed)
        if row.path in unmeasured and not row.passed:
            row = row._replace(passed=True, note="roundoff unmeasured (see the jax.vjp row)")
        rows.append(row)
    return rows


@_memoized
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
