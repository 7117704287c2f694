"""check_grads: a hand-written ``(value, grads)`` against five independent references, leaf by leaf.

:func:`check_grads` takes ``manual(params, *args) -> (value, grads)`` and
``reference(params, *args) -> value`` (plain JAX written from the forward maths) and compares the
manual value and every gradient leaf with:

``jax.grad``
    reverse-mode autodiff of the reference, in the float64 shadow (the truth).
``jax.vjp``
    the reference's pullback of a unit cotangent, in the float64 shadow.
``jvp``
    forward mode: ``jax.jvp`` directional derivatives ``⟨∇f, v⟩`` along random unit directions
    ``v`` supported on one leaf, in float64, against the manual ``⟨g, v⟩``.
``finite_diff``
    central differences ``(f(θ + hv) − f(θ − hv)) / 2h`` of the reference in float64 along the same
    directions, ``h = ε₆₄^{1/3} max(1, ‖θ_leaf‖)``.
``taylor``
    step-size free: the remainder ``r(h) = |f(θ + hv) − f(θ) − h⟨g, v⟩|`` shrinks as ``h²`` for
    the right gradient and only as ``h`` for a wrong one. Over ``h = 2^{-3} … 2^{-20}`` (times
    ``max(1, ‖θ_leaf‖)``), in float64, the observed order is the median slope of ``log r``
    against ``log h`` over the three smallest steps whose remainder stands above the noise floor:
    there a wrong gradient's ``h`` term dominates, and a kink of a piecewise-linear activation
    (relu) has dropped out of the step. A remainder at the noise floor at the smallest step means
    ``f`` is linear along ``v`` near ``θ`` with slope ``⟨g, v⟩``: it passes.

Every row is judged by the one tolerance engine of :mod:`bpjax.check.tolerance`: each leaf against
its float64 truth, within an allowance derived from that leaf's own measured roundoff in the
working dtype. The finite-difference rows add, per direction, the method's own error, estimated
rather than guessed: the truncation error by Richardson extrapolation ``|D(h) − D(2h)| / 3`` and
the roundoff ``ε₆₄ |f| / h``, times a safety factor of 10. The Taylor rows pass when the observed
order is nearer 2 than 1 (``≥ 1.5``); remainders below the noise floor (roundoff of ``f`` plus
``h`` times the leaf's allowance) are left out of the fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._cache import jit_wrapper, memoized
from bpjax._trees import cast_floats, is_float
from bpjax._types import Array, ArrayTree, is_int, is_real
from bpjax.check.report import CheckRow, GradCheckReport, GradientMismatchError
from bpjax.check.tolerance import (
    Tolerance,
    compare,
    compare_directions,
    explicit_tolerance,
    measure,
    to_f64,
)

__all__ = [
    "DEFAULT_RTOL",
    "REFERENCES",
    "assert_grads_match",
    "check_grads",
    "default_rtol",
    "first_difference",
    "least_precise",
]

DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 3e-2,
    "bfloat16": 1e-1,
}
"""A relative accuracy to expect of a backward in each dtype, for your own assertions.

The checks no longer use these: they derive each leaf's allowance (see
:mod:`bpjax.check.tolerance`). ``float64 1e-10 ≈ 1e6 ε``, ``float32 1e-5 ≈ 170 ε``,
``float16 3e-2 ≈ 60 ε``, ``bfloat16 1e-1 ≈ 25 ε``.
"""

REFERENCES = ("jax.grad", "jax.vjp", "jvp", "finite_diff", "taylor")
"""The references :func:`check_grads` compares against, by the names its rows use."""

_FD_SAFETY = 10.0
_TAYLOR_EXPONENTS = tuple(range(3, 21))  # h = 2^-3 … 2^-20, times the leaf's scale
_TAYLOR_FIT_SLOPES = 3  # the order is the median slope over the smallest steps above the floor
_TAYLOR_MIN_ORDER = 1.5


def default_rtol(dtype: Any) -> float:
    """The relative accuracy of :data:`DEFAULT_RTOL` for ``dtype``."""
    name = jnp.dtype(dtype).name
    if name not in DEFAULT_RTOL:
        raise TypeError(f"dtype: no default tolerance for {name}; pass rtol= and atol=.")
    return DEFAULT_RTOL[name]


def least_precise(leaves: Sequence[Any]) -> Any:
    """The floating dtype with the largest epsilon among ``leaves`` (float32 when none)."""
    dtypes = [jnp.dtype(jnp.result_type(x)) for x in leaves if is_float(x)]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=jnp.dtype(jnp.float32))


def first_difference(got: Any, expected: Any) -> str:
    """A short description of where two pytrees' structures first differ (by path)."""
    flat_got = jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: x is None)[0]
    g = [jax.tree_util.keystr(p) for p, _ in flat_got]
    e = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for a, b in zip(g, e, strict=False):
        if a != b:
            return f"has {a or 'a leaf'} where {b or 'a leaf'} is expected"
    if len(g) < len(e):
        return f"lacks {e[len(g)]} ({len(g)} leaves, expected {len(e)})"
    if len(g) > len(e):
        return f"has an extra {g[len(e)]} ({len(g)} leaves, expected {len(e)})"
    return (
        f"is a {type(got).__name__} where a {type(expected).__name__} is expected (same paths, "
        "other container types)"
    )


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return type(x).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")


def _manual_output(out: Any, params: ArrayTree) -> tuple[Any, Any]:
    """``(value, grads)`` from what ``manual`` returned, or a ``TypeError`` naming ``manual``."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            "manual: expected manual(params, *args) -> (value, grads); got "
            f"{_describe(out) if not isinstance(out, (tuple, list)) else f'{len(out)} outputs'}."
        )
    value, grads = out
    if not (hasattr(value, "shape") and np.size(value) == 1 and is_float(value)):
        swapped = hasattr(grads, "shape") and np.size(grads) == 1
        hint = " (it looks like (grads, value): put the value first)" if swapped else ""
        raise TypeError(
            f"manual: expected its first output to be the scalar value, got {_describe(value)}"
            f"{hint}."
        )
    return value, grads


def _explicit(rtol: Any, atol: Any, params: ArrayTree) -> list[Tolerance] | None:
    """The user's per-leaf tolerances (a float for every leaf, or a pytree like ``params``)."""
    if rtol is None and atol is None:
        return None
    n = len(jax.tree.leaves(params))

    def per_leaf(x: Any, name: str) -> list[float | None]:
        if x is None:
            return [None] * n
        if is_real(x):
            return [_tolerance(x, name)] * n
        if jax.tree.structure(x) != jax.tree.structure(params):  # type: ignore[operator]
            raise TypeError(
                f"{name}: expected a float or a pytree of floats with the params' structure, "
                f"got {type(x).__name__} ({first_difference(x, params)})."
            )
        return [_tolerance(v, name) for v in jax.tree.leaves(x)]

    return [
        explicit_tolerance(r, a)
        for r, a in zip(per_leaf(rtol, "rtol"), per_leaf(atol, "atol"), strict=True)
    ]


def _tolerance(value: Any, name: str) -> float:
    """A tolerance as a float: a finite number ``>= 0``, or a ``ValueError`` naming it."""
    scalar = is_real(value) or (hasattr(value, "dtype") and np.ndim(value) == 0)
    number = float(value) if scalar else math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}.")
    return number


def _check_params(params: ArrayTree) -> list[tuple[str, Any]]:
    leaves = [(jax.tree_util.keystr(p), leaf) for p, leaf in
              jax.tree_util.tree_flatten_with_path(params)[0]]  # fmt: skip
    if not leaves or all(np.size(leaf) == 0 for _, leaf in leaves):
        raise ValueError(
            "params: expected a pytree of floating arrays to differentiate, got "
            f"{'no leaves' if not leaves else 'only empty arrays'} (nothing to check)."
        )
    for path, leaf in leaves:
        if not (hasattr(leaf, "dtype") or is_real(leaf)):
            raise TypeError(
                f"params: leaf {path or '(the root)'} is a {type(leaf).__name__}; expected "
                "floating arrays."
            )
        if not is_float(leaf):
            raise TypeError(
                f"params: leaf {path or '(the root)'} has dtype {jnp.result_type(leaf)}; every "
                "params leaf is differentiated, so it must be floating (pass integer data among "
                "*args)."
            )
    return leaves


def _check_reference(reference: Callable[..., Any], params: ArrayTree, args: Any) -> None:
    """A ``TypeError`` naming ``reference`` unless it returns one floating value (shapes only)."""
    out = jax.eval_shape(reference, params, *args)
    if not (hasattr(out, "shape") and math.prod(out.shape) == 1 and is_float(out)):
        got = (
            f"an output of shape {tuple(out.shape)} and dtype {out.dtype}"
            if hasattr(out, "shape")
            else f"a {type(out).__name__}"
        )
        raise TypeError(
            f"reference: expected reference(params, *args) to return the scalar loss, got {got}."
        )


def check_grads(
    manual: Callable[..., tuple[Array, ArrayTree]],
    reference: Callable[..., Array],
    params: ArrayTree,
    *args: Any,
    rtol: float | ArrayTree | None = None,
    atol: float | ArrayTree | None = None,
    directions: int = 2,
    seed: int = 0,
    jit: bool = True,
    references: Sequence[str] = REFERENCES,
) -> GradCheckReport:
    """Checks a hand-written ``(value, grads)`` against autodiff, forward mode and differences.

    Args:
      manual: ``manual(params, *args) -> (value, grads)``, ``grads`` with the params' structure.
      reference: ``reference(params, *args) -> value``: plain JAX from the forward maths alone,
        following its inputs' dtype (the float64 shadow runs it on inputs cast up).
      params: the pytree the gradient is taken with respect to (floating leaves).
      *args: the other arguments of both functions (data, targets).
      rtol: an explicit norm-relative tolerance (``‖g − t‖ ≤ rtol ‖t‖``), replacing the derived
        allowances: a float for every leaf, or a pytree of floats with the params' structure.
      atol: an explicit largest-element tolerance (``max |g − t| ≤ atol``), a float or a pytree
        like ``rtol``; a row passes when either explicit bound holds (a missing one counts as 0).
        The directional rows allow ``atol + rtol ‖t‖``.
      directions: random unit directions per leaf for the ``jvp`` and ``finite_diff`` rows
        (the ``taylor`` rows use the first).
      seed: seeds the random directions and the roundoff measurement.
      jit: run ``manual`` and the references under ``jax.jit`` (``False``: eagerly).
      references: which of :data:`REFERENCES` to compare against.

    Returns:
      A :class:`~bpjax.GradCheckReport`. It never raises on a mismatch: a wrong gradient, a wrong
      value, a NaN, a mis-shaped leaf or a wrong tree structure is a failing row. Use
      :func:`assert_grads_match` to raise.

    Raises:
      ValueError: an unknown name in ``references`` or none, ``directions < 1``, a tolerance
        that is not a finite number ``>= 0``, or params without a leaf (or only empty ones).
      TypeError: ``references`` a string, ``manual``/``reference`` not callable, ``manual``
        not returning ``(value, grads)``, ``reference`` not returning one floating value, a
        params leaf that is not floating, or a ``seed`` that is not an integer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = lambda p, x: jnp.sum(jnp.sin(p["w"] * x))
      >>> manual = lambda p, x: (f(p, x), {"w": x * jnp.cos(p["w"] * x)})
      >>> report = check_grads(manual, f, {"w": jnp.array([0.1, 0.2])}, jnp.array([1.0, 2.0]))
      >>> report.ok
      True
    """
    if isinstance(references, str):
        raise TypeError(
            f"references: expected a sequence of names, got the string {references!r}; "
            f"write ({references!r},)."
        )
    unknown = sorted(set(references) - set(REFERENCES))
    if unknown:
        raise ValueError(
            f"references: unknown {unknown}; expected names from {', '.join(REFERENCES)}."
        )
    if not references:  # the value row alone would pass any gradient
        raise ValueError(
            f"references: expected at least one of {', '.join(REFERENCES)}, got none: "
            "without one no gradient is checked."
        )
    if not is_int(directions) or directions < 1:
        raise ValueError(f"directions: expected at least 1, got {directions!r}.")
    if not is_int(seed):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}: {seed!r}.")
    for name, fn in (("manual", manual), ("reference", reference)):
        if not callable(fn):
            raise TypeError(f"{name}: expected a function, got {type(fn).__name__}.")
    named_leaves = _check_params(params)
    _check_reference(reference, params, args)
    paths = [path or "params" for path, _ in named_leaves]  # a bare array is the root leaf
    p_leaves = [leaf for _, leaf in named_leaves]
    treedef = jax.tree.structure(params)
    dtype = least_precise(p_leaves)
    wrap = jit_wrapper(jit)

    value, grads = _manual_output(wrap(manual)(params, *args), params)
    explicit = _explicit(rtol, atol, params)
    measured = measure(
        _value_and_grad(reference), params, args, dtype=dtype, wrap=wrap, seed=seed,
        explicit=None if explicit is None else explicit_tolerance(0.0, 0.0),
    )  # fmt: skip
    truth = measured.truth["grads"]
    tols = measured.tolerances["grads"] if explicit is None else explicit
    overflow = [
        ~np.isfinite(a) & np.isfinite(t)
        for a, t in zip(measured.autodiff.get("grads", truth), truth, strict=True)
    ]
    value_truth = measured.truth["value"][0]
    value_tol = measured.tolerances["value"][0]
    if explicit is not None:  # a scalar rtol holds the value to rtol · max(1, |C|)
        r = rtol if isinstance(rtol, (int, float)) else 0.0
        a = atol if isinstance(atol, (int, float)) else r * max(1.0, float(np.abs(value_truth)))
        value_tol = explicit_tolerance(r, a)
    rows = [compare("value", "reference", value, value_truth, value_tol)]

    def report(rows: list[CheckRow]) -> GradCheckReport:
        largest = max((t.max_abs for t in tols if math.isfinite(t.max_abs)), default=0.0)
        given = [t.rtol for t in tols] if explicit is not None else [0.0]
        return GradCheckReport(
            tuple(rows), jnp.dtype(dtype).name, max(given, default=0.0), largest,
            derived=explicit is None,
        )  # fmt: skip

    if jax.tree.structure(grads, is_leaf=lambda x: x is None) != treedef:  # type: ignore[operator]
        note = f"grads {first_difference(grads, params)}"
        rows.append(CheckRow("grads", "structure", math.nan, math.nan, None, False, note=note))
        return report(rows)
    m_leaves = jax.tree.leaves(grads)

    tangents = [
        _unit_directions(np.random.default_rng([seed, i]), leaf, directions)
        for i, leaf in enumerate(p_leaves)
    ]
    want_lines = "finite_diff" in references or "taylor" in references
    with jax.enable_x64(True):
        params64, args64 = cast_floats(params, jnp.float64), cast_floats(args, jnp.float64)
        trees = _leaf_tangent_trees(tangents, treedef)
        shadow = wrap(_shadow_fn(reference, "jax.vjp" in references, "jvp" in references))(
            params64, trees, *args64
        )
        lines = _lines(reference, params64, args64, trees, wrap) if want_lines else None

    for name in ("jax.grad", "jax.vjp"):
        if name in references:
            refs = (
                truth
                if name == "jax.grad"
                else [to_f64(r) for r in jax.tree.leaves(shadow["jax.vjp"])]
            )
            for i, path in enumerate(paths):
                rows.append(
                    compare(path, name, m_leaves[i], refs[i], tols[i], overflow=overflow[i])
                )

    manual_dd = [
        np.tensordot(t, to_f64(m), axes=np.ndim(m)) if np.shape(m) == np.shape(p) else None
        for t, m, p in zip(tangents, m_leaves, p_leaves, strict=True)
    ]
    norms = [float(np.linalg.norm(t[np.isfinite(t)])) for t in truth]
    for i, path in enumerate(paths):
        dd = manual_dd[i]
        for name in [r for r in ("jvp", "finite_diff", "taylor") if r in references]:
            if dd is None:
                note = f"shape {np.shape(m_leaves[i])}, expected {np.shape(p_leaves[i])}"
                rows.append(CheckRow(path, name, math.nan, math.nan, None, False, note=note))
            elif name == "jvp":
                jvp = to_f64(shadow["jvp"][i])
                rows.append(compare_directions(path, "jvp", dd, jvp, tols[i], norms[i]))
            elif lines is not None:
                rows.append(_line_row(name, path, i, lines, dd, tols[i], norms[i]))
    return report(_nothing_judged(_in_reference_order(rows, references), truth, paths))


def _nothing_judged(
    rows: list[CheckRow], truth: list[np.ndarray], paths: list[str]
) -> list[CheckRow]:
    """``rows``, plus a failing one when the reference gradient is undefined everywhere.

    Undefined reference elements are not judged (tolerance.py); where that is every element of
    every leaf, no row judged anything and "ok" would be a verdict on nothing: a wrong manual
    gradient would pass. That happens when the inputs are outside the reference's domain, e.g.
    class labels out of range under jit (the loss is NaN by design, bpjax.losses.label_poison).
    """
    sizes = [t.size for t in truth]
    if not sum(sizes) or any(np.isfinite(t).any() for t in truth):
        return rows
    note = (
        "the reference gradient is NaN/Inf at every element of every leaf: nothing was judged. "
        "The inputs are outside the reference's domain (class labels out of range? NaN inputs?)"
    )
    return [*rows, CheckRow("grads", "reference", math.nan, math.nan, None, False,
                            note=note)]  # fmt: skip


def _in_reference_order(rows: list[CheckRow], references: Sequence[str]) -> list[CheckRow]:
    """The value row, then each reference's leaf rows in turn."""
    order = {name: k for k, name in enumerate(REFERENCES)}
    head, leaves = rows[:1], rows[1:]
    return head + sorted(leaves, key=lambda r: order.get(r.reference, len(order)))


@memoized
def _value_and_grad(reference: Callable[..., Array]) -> Callable[..., dict[str, Any]]:
    def refs(params: ArrayTree, *args: Any) -> dict[str, Any]:
        value, grads = jax.value_and_grad(reference)(params, *args)
        return {"value": value, "grads": grads}

    return refs


@memoized
def _shadow_fn(
    reference: Callable[..., Array], want_vjp: bool, want_jvp: bool
) -> Callable[..., dict[str, Any]]:
    """``jax.vjp`` and the ``jvp`` directional derivatives, compiled together (in float64).

    ``tangent_trees[i]`` stacks leaf ``i``'s directions (zeros on the other leaves); the ``jvp``
    entry is ``⟨∇f, v⟩`` for each, by forward mode vmapped over the directions.
    """

    def refs(params: ArrayTree, tangent_trees: list[ArrayTree], *args: Any) -> dict[str, Any]:
        def f(p: ArrayTree) -> Array:
            return reference(p, *args)

        out: dict[str, Any] = {}
        if want_vjp:
            primal, pullback = jax.vjp(f, params)
            out["jax.vjp"] = pullback(jnp.ones_like(primal))[0]
        if want_jvp:
            out["jvp"] = [
                jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(tree) for tree in tangent_trees
            ]
        return out

    return refs


def _unit_directions(rng: np.random.Generator, leaf: Array, count: int) -> np.ndarray:
    """``count`` random directions of the leaf's shape, each of unit Euclidean norm (float64).

    Drawn with NumPy on the host: the same directions on every machine, and no compilation
    (eager ``jax.random`` compiles a sampler per leaf shape, ~0.3 s each).
    """
    v = rng.standard_normal((count, *jnp.shape(leaf)))
    norms = np.sqrt(np.sum(v.reshape(count, -1) ** 2, axis=1))
    return v / norms.reshape((count,) + (1,) * (v.ndim - 1))


def _leaf_tangent_trees(tangents: list[np.ndarray], treedef: Any) -> list[ArrayTree]:
    """For each leaf ``i``: a float64 tree of stacked tangents, its directions, zeros elsewhere."""
    trees = []
    for i in range(len(tangents)):
        leaves = [jnp.asarray(t if j == i else np.zeros_like(t)) for j, t in enumerate(tangents)]
        trees.append(jax.tree.unflatten(treedef, leaves))
    return trees


class _Lines:
    """The reference evaluated along every line ``θ + s v`` (in float64)."""

    def __init__(self, f0: float, along: list[np.ndarray], steps: list[np.ndarray]) -> None:
        self.f0, self.along, self.steps = f0, along, steps


def _lines(
    reference: Callable[..., Array],
    params64: ArrayTree,
    args64: tuple[Any, ...],
    trees: list[ArrayTree],
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> _Lines:
    """Four central-difference steps ``±h, ±2h`` then the Taylor steps, for every direction."""
    eps = float(np.finfo(np.float64).eps)
    steps = []
    for leaf in jax.tree.leaves(params64):
        scale = max(1.0, float(np.linalg.norm(np.asarray(leaf))))
        h = eps ** (1 / 3) * scale
        taylor = np.array([2.0**-e for e in _TAYLOR_EXPONENTS]) * scale
        steps.append(np.concatenate([[h, -h, 2 * h, -2 * h], taylor]))
    f0, along = wrap(_lines_fn(reference))(
        params64, trees, [jnp.asarray(s) for s in steps], *args64
    )
    return _Lines(float(f0), [np.asarray(a, np.float64) for a in along], steps)


@memoized
def _lines_fn(reference: Callable[..., Array]) -> Callable[..., Any]:
    """``(params, trees, steps, *args) -> (f(θ), [f(θ + s v) for each leaf's v and s])``."""

    def lines(p: ArrayTree, trees: list[ArrayTree], steps: list[Array], *a: Any) -> Any:
        def at(t: ArrayTree, s: Array) -> Array:
            return reference(jax.tree.map(lambda x, v: x + s * v, p, t), *a)

        along = [
            jax.vmap(lambda t, s=s: jax.vmap(lambda si: at(t, si))(s))(tree)
            for tree, s in zip(trees, steps, strict=True)
        ]
        return reference(p, *a), along

    return lines


def _line_row(
    name: str, path: str, i: int, lines: _Lines, manual_dd: np.ndarray, tol: Tolerance, norm: float
) -> CheckRow:
    """The ``finite_diff`` or ``taylor`` row of leaf ``i``."""
    eps = float(np.finfo(np.float64).eps)
    f, s, f0 = lines.along[i], lines.steps[i], lines.f0
    if name == "finite_diff":
        h = float(s[0])
        with np.errstate(invalid="ignore", over="ignore"):  # an undefined f is reported, not judged
            d_h = (f[:, 0] - f[:, 1]) / (2 * h)
            d_2h = (f[:, 2] - f[:, 3]) / (4 * h)
            # Richardson: D(2h) − D(h) ≈ 3 c h²; roundoff ≈ ε |f| / h
            method = _FD_SAFETY * (np.abs(d_2h - d_h) / 3 + eps * abs(f0) / h)
        if not math.isfinite(f0):
            d_h = np.full_like(d_h, math.nan)
        return compare_directions(
            path, "finite_diff", manual_dd, d_h, tol, norm, method_error=method
        )
    hs, f_t = s[4:], f[0, 4:]
    if not (math.isfinite(f0) and np.all(np.isfinite(f_t))):
        return CheckRow(path, "taylor", math.nan, math.nan, None, True,
                        note="the reference is undefined along the line: not judged")  # fmt: skip
    if not math.isfinite(manual_dd[0]):
        return CheckRow(path, "taylor", math.nan, math.nan, (0,), False,
                        note=f"manual ⟨g, v⟩ is {manual_dd[0]}")  # fmt: skip
    remainder = np.abs(f_t - f0 - hs * manual_dd[0])
    floor = 64 * eps * np.maximum(abs(f0), np.abs(f_t)) + hs * tol.along(norm)
    return _taylor_row(path, hs, remainder, floor)


def _taylor_row(path: str, hs: np.ndarray, remainder: np.ndarray, floor: np.ndarray) -> CheckRow:
    """Observed order of the Taylor remainder: slopes of log r against log h at the smallest steps.

    The smallest steps decide: there a wrong gradient's first-order term ``h |⟨g − ∇f, v⟩|``
    dominates the ``h²`` term (and scales as the floor's allowance term ``h · tol`` does), and a
    kink of a piecewise-smooth activation (relu) is no longer between θ and θ + hv. The order is
    fitted on the run of steps above the noise floor that ends at the smallest step. A smallest
    step at the floor passes: ``⟨g, v⟩`` is the slope of ``f`` there to within the allowance; the
    order of the run above the floor is then shown for information.
    """
    smallest = float(remainder[-1])
    above = remainder > floor
    if not above[-1]:
        last = int(np.flatnonzero(above)[-1]) if above.any() else -1
        return CheckRow(
            path, "taylor", smallest, math.nan, None, True, _fit_order(hs, remainder, above, last),
            "smallest steps at the noise floor: ⟨g, v⟩ is the slope of f there",
        )  # fmt: skip
    order = _fit_order(hs, remainder, above, len(hs) - 1)
    if order is None:
        return CheckRow(
            path, "taylor", smallest, math.nan, None, True, None,
            "one step above the noise floor: too little signal to fit an order",
        )  # fmt: skip
    passed = order >= _TAYLOR_MIN_ORDER
    note = "" if passed else f"remainder shrinks as h^{order:.2f}: the gradient is wrong"
    return CheckRow(path, "taylor", smallest, math.nan, None, passed, order, note)


def _fit_order(hs: np.ndarray, remainder: np.ndarray, above: np.ndarray, last: int) -> float | None:
    """Median slope of ``log r`` against ``log h`` over the smallest steps of a run.

    The run is the contiguous stretch of steps above the noise floor ending at step ``last``;
    ``None`` when it has fewer than two steps.
    """
    if last < 1 or not above[last - 1]:
        return None
    first = last
    while first > 0 and above[first - 1]:
        first -= 1
    slopes = [
        math.log(remainder[k] / remainder[k + 1]) / math.log(hs[k] / hs[k + 1])
        for k in range(first, last)
    ]
    return float(np.median(slopes[-_TAYLOR_FIT_SLOPES:]))


def assert_grads_match(
    manual: Callable[..., tuple[Array, ArrayTree]],
    reference: Callable[..., Array],
    params: ArrayTree,
    *args: Any,
    **kwargs: Any,
) -> GradCheckReport:
    """Like :func:`check_grads`, but raises :class:`~bpjax.GradientMismatchError` on any failure.

    Returns:
      The passing :class:`~bpjax.GradCheckReport`.

    Raises:
      GradientMismatchError: (an ``AssertionError``) with the report table as its message.
    """
    __tracebackhide__ = True  # pytest shows the report, not this frame
    report = check_grads(manual, reference, params, *args, **kwargs)
    if not report.ok:
        raise GradientMismatchError(report)
    return report
