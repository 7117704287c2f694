"""The gradient-checking harness: hand-written gradients against JAX autodiff, leaf by leaf.

:func:`check_grads` takes ``manual(params, *args) -> (value, grads)`` and
``reference(params, *args) -> value`` (plain JAX written from the forward maths) and compares the
manual value and every gradient leaf with five independent references:

``jax.grad``
    reverse-mode autodiff of the reference.
``jax.vjp``
    the reference's pullback of a unit cotangent.
``jvp``
    forward mode: ``jax.jvp`` directional derivatives ``⟨∇f, v⟩`` along random unit directions
    ``v`` supported on one leaf, against the manual ``⟨g, v⟩``.
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

Tolerances
----------
A row passes when its norm-relative error ``‖g − g_ref‖ / ‖g_ref‖ ≤ rtol`` or its largest element
error ``max |g − g_ref| ≤ atol``. ``rtol`` defaults by the params' dtype (:data:`DEFAULT_RTOL`);
``atol`` defaults to ``rtol × max |g_ref|`` over the whole tree, so a leaf whose gradient is tiny
next to the others (a bias gradient that is a sum with cancellation, a dead unit's zeros) is held to
the absolute accuracy the computation has, not to a relative one it cannot have.

The defaults come from the unit roundoff ``ε`` of each dtype. Two orderings of the same sums
(manual vs autodiff) differ by about ``ε √k`` relative for sums of ``k`` terms, and the error grows
with each layer the δ-recursion passes through; for networks up to a few layers of a few hundred
units that stays under ``≈ 100 ε``:

==========  ============  ==========  ==========================================
dtype       ε             rtol        derivation
==========  ============  ==========  ==========================================
float64     1.1e-16       1e-10       ≈ 1e6 ε: far below any real bug, well above roundoff
float32     6.0e-8        1e-5        ≈ 170 ε
float16     4.9e-4        3e-2        ≈ 60 ε
bfloat16    3.9e-3        1e-1        ≈ 25 ε (8 significant bits; every product rounds)
==========  ============  ==========  ==========================================

The finite-difference rows add, per direction, the method's own error, estimated rather than
guessed: the truncation error by Richardson extrapolation ``|D(h) − D(2h)| / 3`` and the roundoff
``ε₆₄ |f| / h``, times a safety factor of 10. The Taylor rows pass when the observed order is
nearer 2 than 1 (``≥ 1.5``); remainders below the noise floor (roundoff of ``f`` plus ``h`` times
the gradient tolerance) are left out of the fit. Only a kink closer than ``2^{-20}`` of the
leaf's scale (a unit sitting on it, ``z = 0`` exactly) can still lower the order of a right
gradient; finite differences cannot judge such a point either.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._trees import cast_floats
from bpjax._types import Array, ArrayTree
from bpjax.layers._core import layer_forward, split_key
from bpjax.network import SerialCache

__all__ = [
    "DEFAULT_RTOL",
    "REFERENCES",
    "CheckRow",
    "GradCheckReport",
    "GradientMismatchError",
    "assert_grads_match",
    "check_grads",
    "check_mlp",
    "check_network",
    "default_rtol",
]

DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 3e-2,
    "bfloat16": 1e-1,
}
"""Default norm-relative tolerance by dtype name; see the module docstring for the derivation."""

REFERENCES = ("jax.grad", "jax.vjp", "jvp", "finite_diff", "taylor")
"""The references :func:`check_grads` compares against, by the names its rows use."""

_FD_SAFETY = 10.0
_TAYLOR_EXPONENTS = tuple(range(3, 21))  # h = 2^-3 … 2^-20, times the leaf's scale
_TAYLOR_FIT_SLOPES = 3  # the order is the median slope over the smallest steps above the floor
_TAYLOR_MIN_ORDER = 1.5


def _memoized(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Memoizes a builder of functions on its (hashable) arguments.

    Building the same reference closure for the same user function on every call would make
    ``jax.jit`` compile it again each time; an equal closure object hits JAX's cache instead.
    Unhashable arguments simply build afresh.
    """
    cached = functools.lru_cache(maxsize=128)(builder)

    def build(*args: Any) -> Any:
        try:
            return cached(*args)
        except TypeError:
            return builder(*args)

    return build


_cached_jit = _memoized(jax.jit)


def _wrapper(jit: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``jax.jit`` (memoized per function) or the identity."""
    return _cached_jit if jit else (lambda f: f)


def default_rtol(dtype: Any) -> float:
    """The default relative tolerance for ``dtype`` (see :data:`DEFAULT_RTOL`)."""
    name = jnp.dtype(dtype).name
    if name not in DEFAULT_RTOL:
        raise TypeError(f"dtype: no default tolerance for {name}; pass rtol= and atol=.")
    return DEFAULT_RTOL[name]


class CheckRow(NamedTuple):
    """One comparison: a leaf (or the value, or a layer's δ) against one reference."""

    path: str  # "value", "[1]['W']", "δ^2 (deltas[1])", ...
    reference: str  # one of REFERENCES, or what the δ/input checks compare with
    max_abs_err: float  # max |manual − reference| over the elements (or directions)
    rel_err: float  # ‖manual − reference‖ / ‖reference‖ (norm-relative)
    worst_index: tuple[int, ...] | None  # index of the worst element (or direction)
    passed: bool
    order: float | None = None  # Taylor rows: the observed order of the remainder
    note: str = ""
    allowed: float | None = None  # the largest max_abs_err that passes, where a check derives one


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """The outcome of :func:`check_grads`: one :class:`CheckRow` per leaf and reference.

    Attributes:
      rows: every comparison, in order: the value, then each reference's leaf rows.
      dtype: the params' dtype name.
      rtol: the relative tolerance used.
      atol: the absolute tolerance used.
      deltas_checked: whether the rows include per-layer δ checks (from :func:`check_mlp` or
        :func:`check_network`).
      layer_names: for :func:`check_network`, each layer's name (``"Conv2D"``), input first;
        empty for an MLP, whose layers are all Dense.
    """

    rows: tuple[CheckRow, ...]
    dtype: str
    rtol: float
    atol: float
    deltas_checked: bool = False
    layer_names: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(row.passed for row in self.rows)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> tuple[CheckRow, ...]:
        """The rows that failed."""
        return tuple(row for row in self.rows if not row.passed)

    @property
    def failing_paths(self) -> tuple[str, ...]:
        """The distinct paths with at least one failing row, in report order."""
        return tuple(dict.fromkeys(row.path for row in self.failures))

    @property
    def first_bad_layer(self) -> int | None:
        """The first layer, in backprop order (output → input), where something disagrees.

        Numbered as in the maths (layer ``l`` holds ``params[l-1]`` and ``deltas[l-1]``). A
        failing δ wins over failing leaves, since a wrong δ^l makes every gradient below it wrong.
        ``None`` when nothing failed or no row names a layer.
        """
        failing = [(row.path.startswith("δ"), _layer_of(row.path)) for row in self.failures]
        delta_layers = [layer for is_delta, layer in failing if is_delta and layer is not None]
        leaf_layers = [layer for _, layer in failing if layer is not None]
        return max(delta_layers or leaf_layers, default=None)

    def summary(self) -> str:
        """One paragraph: all good, or where the first disagreement is and what it points to."""
        if self.ok:
            return f"all {len(self.rows)} checks passed ({self.dtype}, rtol={self.rtol:.1e})."
        lines = [
            f"{len(self.failures)} of {len(self.rows)} checks failed ({self.dtype}, "
            f"rtol={self.rtol:.1e}, atol={self.atol:.1e}); failing: "
            + ", ".join(self.failing_paths)
            + "."
        ]
        layer = self.first_bad_layer
        if layer is not None and self.deltas_checked:
            bad_deltas = {_layer_of(r.path) for r in self.failures if r.path.startswith("δ")}
            if layer in bad_deltas:
                top = max(_layer_of(r.path) or 0 for r in self.rows if r.path.startswith("δ"))
                lines.append(
                    f"First bad layer in backprop order: {self._layer_label(layer)}; look at "
                    f"{self._delta_step(layer, top)}."
                )
            elif self.layer_names:
                lines.append(
                    f"Every δ agrees; the params gradient of layer {self._layer_label(layer)} is "
                    "wrong (its backward's grads from a right dy)."
                )
            else:
                lines.append(
                    f"Every δ agrees; the gradient formula of layer {layer} is wrong "
                    f"(∇W = (1/B) δᵀ a, ∇b = (1/B) Σ_n δ_n)."
                )
        elif layer is not None:
            lines.append(f"First bad layer in backprop order: {layer}.")
        return " ".join(lines)

    def _layer_label(self, layer: int) -> str:
        if 0 < layer <= len(self.layer_names):
            return f"{layer} ({self.layer_names[layer - 1]})"
        return str(layer)

    def _delta_step(self, layer: int, top: int) -> str:
        """What a first wrong ``δ^layer`` points to in the recursion."""
        if layer == top:
            return "the output error δ^L (the loss gradient or the output activation's backward)"
        if self.layer_names:
            return (
                f"the backward of layer {self._layer_label(layer + 1)} (its dx) or the δ step of "
                f"layer {self._layer_label(layer)}"
            )
        return (
            f"the step from δ^{layer + 1} to δ^{layer} "
            f"(the product with W^{layer + 1} or the derivative of f^{layer})"
        )

    def _show_allowed(self) -> bool:
        return any(row.allowed is not None for row in self.rows)

    def _header(self) -> tuple[str, ...]:
        """The table's columns; ``allowed`` beside ``max |Δ|`` when a row derives its own."""
        if not self._show_allowed():
            return self._HEADER
        return (*self._HEADER[:3], "allowed", *self._HEADER[3:])

    def _table_rows(self) -> list[list[str]]:
        allowed = self._show_allowed()
        return [
            [
                row.path,
                row.reference,
                _fmt(row.max_abs_err),
                *([] if not allowed else ["" if row.allowed is None else _fmt(row.allowed)]),
                _fmt(row.rel_err),
                "" if row.worst_index is None else str(row.worst_index),
                "" if row.order is None else f"{row.order:.2f}",
                "ok" if row.passed else "FAIL",
                row.note,
            ]
            for row in self.rows
        ]

    _HEADER = ("leaf", "reference", "max |Δ|", "rel err", "worst at", "order", "status", "note")

    def __str__(self) -> str:
        body, header = self._table_rows(), self._header()
        widths = [
            max(len(h), *(len(r[i]) for r in body)) if body else len(h)
            for i, h in enumerate(header)
        ]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r).rstrip() for r in body]
        lines.append(self.summary())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._header())
        body = []
        for row, cells in zip(self.rows, self._table_rows(), strict=True):
            style = "" if row.passed else ' style="background:#fdd"'
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            body.append(f"<tr{style}>{tds}</tr>")
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<p>{html.escape(self.summary())}</p>"
        )

    def to_rich(self) -> Any:
        """The report as a ``rich.table.Table`` (failures in red)."""
        from rich.table import Table

        table = Table(*self._header(), title=self.summary())
        for row, cells in zip(self.rows, self._table_rows(), strict=True):
            table.add_row(*cells, style=None if row.passed else "red")
        return table


class GradientMismatchError(AssertionError):
    """Raised by :func:`assert_grads_match`; ``.report`` holds the :class:`GradCheckReport`."""

    def __init__(self, report: GradCheckReport) -> None:
        super().__init__("manual gradients disagree with the references:\n" + str(report))
        self.report = report


def _layer_of(path: str) -> int | None:
    """Maths layer number (1-based) of a params leaf path ``[l][...]`` or a ``δ^l`` path."""
    if path.startswith("δ^"):
        digits = path[2:].split(" ", 1)[0]
        return int(digits) if digits.isdigit() else None
    if path.startswith("["):
        head = path[1:].split("]", 1)[0]
        return int(head) + 1 if head.isdigit() else None
    return None


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2e}"


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path)


def _to_f64_np(x: Any) -> np.ndarray:
    """A host float64 copy; every float dtype (bfloat16 included) converts exactly."""
    return np.asarray(jax.device_get(x)).astype(np.float64)


def _compare_arrays(
    path: str, reference_name: str, manual: Any, reference: Any, *, rtol: float, atol: float
) -> CheckRow:
    """A :class:`CheckRow` comparing two arrays of the same shape (in float64 on the host)."""
    m, r = _to_f64_np(manual), _to_f64_np(reference)
    if m.shape != r.shape:
        return CheckRow(
            path,
            reference_name,
            math.nan,
            math.nan,
            None,
            False,
            note=f"shape {m.shape}, expected {r.shape}",
        )
    finite_m, finite_r = np.isfinite(m), np.isfinite(r)
    if not (finite_m.all() and finite_r.all()):
        bad = ~(finite_m & finite_r)
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        which = "manual" if not finite_m[index] else "reference"
        value = m[index] if which == "manual" else r[index]
        both_same = np.array_equal(m[bad], r[bad], equal_nan=True)
        if not both_same:
            return CheckRow(
                path,
                reference_name,
                math.nan,
                math.nan,
                index,
                False,
                note=f"{which} is {value} at {index}",
            )
    diff = np.where(finite_m & finite_r, np.abs(m - r), 0.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    worst = (
        tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape)) if diff.size else None
    )
    norm_ref = float(np.linalg.norm(np.where(finite_r, r, 0.0)))
    norm_diff = float(np.linalg.norm(diff))
    rel = norm_diff / norm_ref if norm_ref > 0 else (0.0 if norm_diff == 0 else math.inf)
    passed = rel <= rtol or max_abs <= atol
    return CheckRow(path, reference_name, max_abs, rel, worst, passed)


def _unit_directions(key: Array, leaf: Array, count: int) -> np.ndarray:
    """``count`` random directions of the leaf's shape, each of unit Euclidean norm (float64)."""
    v = np.asarray(jax.random.normal(key, (count, *jnp.shape(leaf)), jnp.float32), np.float64)
    norms = np.sqrt(np.sum(v.reshape(count, -1) ** 2, axis=1))
    return v / norms.reshape((count,) + (1,) * (v.ndim - 1))


def check_grads(
    manual: Callable[..., tuple[Array, ArrayTree]],
    reference: Callable[..., Array],
    params: ArrayTree,
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    directions: int = 2,
    seed: int = 0,
    jit: bool = True,
    references: Sequence[str] = REFERENCES,
) -> GradCheckReport:
    """Checks a hand-written ``(value, grads)`` against autodiff, forward mode and differences.

    Args:
      manual: ``manual(params, *args) -> (value, grads)``, ``grads`` with the params' structure.
      reference: ``reference(params, *args) -> value``: plain JAX from the forward maths alone.
      params: the pytree the gradient is taken with respect to (floating leaves).
      *args: the other arguments of both functions (data, targets).
      rtol: norm-relative tolerance; defaults by the params' dtype (:data:`DEFAULT_RTOL`).
      atol: largest-element tolerance; defaults to ``rtol × max |∇f|`` over all leaves.
      directions: random unit directions per leaf for the ``jvp`` and ``finite_diff`` rows
        (the ``taylor`` rows use the first).
      seed: seeds the random directions.
      jit: run ``manual`` and the references under ``jax.jit`` (``False``: eagerly).
      references: which of :data:`REFERENCES` to compare against.

    Returns:
      A :class:`GradCheckReport`. It never raises on a mismatch: a wrong gradient, a wrong value,
      a NaN or a mis-shaped leaf is a failing row. Use :func:`assert_grads_match` to raise.

    Raises:
      ValueError: an unknown name in ``references`` or ``directions < 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = lambda p, x: jnp.sum(jnp.sin(p["w"] * x))
      >>> manual = lambda p, x: (f(p, x), {"w": x * jnp.cos(p["w"] * x)})
      >>> report = check_grads(manual, f, {"w": jnp.array([0.1, 0.2])}, jnp.array([1.0, 2.0]))
      >>> report.ok
      True
    """
    unknown = sorted(set(references) - set(REFERENCES))
    if unknown:
        raise ValueError(
            f"references: unknown {unknown}; expected names from {', '.join(REFERENCES)}."
        )
    if directions < 1:
        raise ValueError(f"directions: expected at least 1, got {directions}.")
    wrap = _wrapper(jit)

    value, grads = wrap(manual)(params, *args)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path_str(p) for p, _ in leaves_with_path]
    p_leaves = [leaf for _, leaf in leaves_with_path]
    dtype = jnp.result_type(*p_leaves) if p_leaves else jnp.float32
    rtol = default_rtol(dtype) if rtol is None else float(rtol)

    keys = jax.random.split(jax.random.key(seed), len(p_leaves))
    tangents = [
        _unit_directions(k, leaf, directions) for k, leaf in zip(keys, p_leaves, strict=True)
    ]
    dtypes = [jnp.result_type(leaf) for leaf in p_leaves]
    refs = wrap(_reference_fn(reference, "jax.vjp" in references, "jvp" in references))(
        params, _leaf_tangent_trees(tangents, treedef, dtypes), *args
    )
    ref_value, ref_leaves = refs["value"], jax.tree.leaves(refs["jax.grad"])
    scale = max((float(np.max(np.abs(_to_f64_np(g)))) for g in ref_leaves if g.size), default=0.0)
    atol = rtol * scale if atol is None else float(atol)

    # the value is held to rtol relative to max(1, |C|): a loss near 0 is judged absolutely
    value_atol = rtol * max(1.0, abs(float(ref_value)))
    rows = [_compare_arrays("value", "reference", value, ref_value, rtol=rtol, atol=value_atol)]
    if jax.tree.structure(grads) != treedef:  # type: ignore[operator]
        note = f"tree {jax.tree.structure(grads)}, expected {treedef}"
        rows.append(CheckRow("grads", "structure", math.nan, math.nan, None, False, note=note))
        return GradCheckReport(tuple(rows), jnp.dtype(dtype).name, rtol, atol)
    m_leaves = jax.tree.leaves(grads)

    for name in ("jax.grad", "jax.vjp"):
        if name in references:
            for path, m, r in zip(paths, m_leaves, jax.tree.leaves(refs[name]), strict=True):
                rows.append(_compare_arrays(path, name, m, r, rtol=rtol, atol=atol))

    manual_dd = [
        np.tensordot(t, _to_f64_np(m), axes=np.ndim(m))
        for t, m in zip(tangents, m_leaves, strict=True)
    ]
    grad_norms = [float(np.linalg.norm(_to_f64_np(g))) for g in ref_leaves]
    if "jvp" in references:
        for i, path in enumerate(paths):
            jvp_dd = _to_f64_np(refs["jvp"][i])
            rows.append(
                _directional_row(path, "jvp", manual_dd[i], jvp_dd, grad_norms[i], rtol, atol)
            )
    if "finite_diff" in references or "taylor" in references:
        with jax.enable_x64(True):
            rows += _float64_rows(
                reference, params, args, tangents, manual_dd, grad_norms, paths, treedef,
                rtol=rtol, atol=atol, wrap=wrap, references=references,
            )  # fmt: skip
    return GradCheckReport(tuple(rows), jnp.dtype(dtype).name, rtol, atol)


@_memoized
def _reference_fn(
    reference: Callable[..., Array], want_vjp: bool, want_jvp: bool
) -> Callable[..., dict[str, Any]]:
    """One function computing every autodiff reference, so they compile together.

    ``tangent_trees[i]`` stacks leaf ``i``'s directions (zeros on the other leaves); the ``jvp``
    entry is ``⟨∇f, v⟩`` for each, by forward mode vmapped over the directions.
    """

    def refs(params: ArrayTree, tangent_trees: list[ArrayTree], *args: Any) -> dict[str, Any]:
        def f(p: ArrayTree) -> Array:
            return reference(p, *args)

        value, grads = jax.value_and_grad(f)(params)
        out: dict[str, Any] = {"value": value, "jax.grad": grads}
        if want_vjp:
            primal, pullback = jax.vjp(f, params)
            out["jax.vjp"] = pullback(jnp.ones_like(primal))[0]
        if want_jvp:
            out["jvp"] = [
                jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(tree) for tree in tangent_trees
            ]
        return out

    return refs


def _directional_row(
    path: str,
    name: str,
    manual: np.ndarray,
    ref: np.ndarray,
    grad_norm: float,
    rtol: float,
    atol: float,
    allowance: np.ndarray | None = None,
) -> CheckRow:
    """Compares ``⟨g, v_k⟩`` with a reference's directional derivatives over directions ``k``.

    The relative error is taken against ``‖∇f_leaf‖``, the largest a directional derivative along a
    unit direction can be (Cauchy–Schwarz).
    """
    manual, ref = np.asarray(manual, np.float64), np.asarray(ref, np.float64)
    if not (np.all(np.isfinite(manual)) and np.all(np.isfinite(ref))):
        k = int(np.argmax(~(np.isfinite(manual) & np.isfinite(ref))))
        return CheckRow(
            path, name, math.nan, math.nan, (k,), False,
            note=f"direction {k}: manual {manual[k]}, reference {ref[k]}",
        )  # fmt: skip
    err = np.abs(manual - ref)
    k = int(np.argmax(err))
    max_abs = float(err[k])
    rel = max_abs / grad_norm if grad_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    allowed = err <= atol + rtol * grad_norm
    note = ""
    if allowance is not None:
        allowed |= err <= atol + rtol * grad_norm + allowance
        note = f"allowance {float(np.max(allowance)):.1e}"
    return CheckRow(path, name, max_abs, rel, (k,), bool(np.all(allowed)), note=note)


def _leaf_tangent_trees(
    tangents: list[np.ndarray], treedef: Any, dtypes: list[Any]
) -> list[ArrayTree]:
    """For each leaf ``i``: a tree of stacked tangents, its directions and zeros elsewhere."""
    trees = []
    for i in range(len(tangents)):
        leaves = [
            jnp.asarray(t if j == i else np.zeros_like(t), dtypes[j])
            for j, t in enumerate(tangents)
        ]
        trees.append(jax.tree.unflatten(treedef, leaves))
    return trees


def _float64_rows(
    reference: Callable[..., Array],
    params: ArrayTree,
    args: tuple[Any, ...],
    tangents: list[np.ndarray],
    manual_dd: list[np.ndarray],
    grad_norms: list[float],
    paths: list[str],
    treedef: Any,
    *,
    rtol: float,
    atol: float,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    references: Sequence[str],
) -> list[CheckRow]:
    """The finite-difference and Taylor rows: the reference evaluated in float64 along lines.

    Every line ``θ + s v`` (each leaf's directions × its steps) is evaluated by one vmapped
    function: four central-difference steps ``±h, ±2h`` then the Taylor steps.
    """
    params64 = cast_floats(params, jnp.float64)
    args64 = cast_floats(args, jnp.float64)
    eps = float(np.finfo(np.float64).eps)
    p_leaves = jax.tree.leaves(params64)
    scales = [max(1.0, float(np.linalg.norm(np.asarray(leaf)))) for leaf in p_leaves]
    steps = []
    for scale in scales:
        h = eps ** (1 / 3) * scale
        taylor = np.array([2.0**-e for e in _TAYLOR_EXPONENTS]) * scale
        steps.append(jnp.asarray(np.concatenate([[h, -h, 2 * h, -2 * h], taylor])))

    trees = _leaf_tangent_trees(tangents, treedef, [jnp.float64] * len(p_leaves))
    f0, along = wrap(_lines_fn(reference))(params64, trees, steps, *args64)
    f0 = float(f0)
    rows: list[CheckRow] = []
    for i, path in enumerate(paths):
        f = np.asarray(along[i], np.float64)  # (directions, 4 + len(_TAYLOR_EXPONENTS))
        s = np.asarray(steps[i])
        h = s[0]
        if "finite_diff" in references:
            d_h = (f[:, 0] - f[:, 1]) / (2 * h)
            d_2h = (f[:, 2] - f[:, 3]) / (4 * h)
            # Richardson: D(2h) − D(h) ≈ 3 c h²; roundoff ≈ ε |f| / h
            allowance = _FD_SAFETY * (np.abs(d_2h - d_h) / 3 + eps * abs(f0) / h)
            rows.append(
                _directional_row(
                    path, "finite_diff", manual_dd[i], d_h, grad_norms[i], rtol, atol, allowance
                )
            )
        if "taylor" in references:
            hs, f_t = s[4:], f[0, 4:]
            remainder = np.abs(f_t - f0 - hs * manual_dd[i][0])
            floor = 64 * eps * np.maximum(abs(f0), np.abs(f_t)) + hs * (atol + rtol * grad_norms[i])
            rows.append(_taylor_row(path, hs, remainder, floor))
    return rows


@_memoized
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


def _taylor_row(path: str, hs: np.ndarray, remainder: np.ndarray, floor: np.ndarray) -> CheckRow:
    """Observed order of the Taylor remainder: slopes of log r against log h at the smallest steps.

    The smallest steps decide: there a wrong gradient's first-order term ``h |⟨g − ∇f, v⟩|``
    dominates the ``h²`` term (and scales as the floor's gradient-tolerance term ``h · tol``
    does), and a kink of a piecewise-smooth activation (relu) is no longer between θ and θ + hv.
    The order is fitted on the run of steps above the noise floor that ends at the smallest step.
    A smallest step at the floor passes: ``⟨g, v⟩`` is the slope of ``f`` there to within the
    tolerance; the order of the run above the floor is then shown for information.
    """
    if not np.all(np.isfinite(remainder)):
        k = int(np.argmax(~np.isfinite(remainder)))
        return CheckRow(
            path, "taylor", math.nan, math.nan, (k,), False, None,
            f"remainder not finite at h={hs[k]:.1e}",
        )  # fmt: skip
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
    """Like :func:`check_grads`, but raises :class:`GradientMismatchError` on any failing row.

    Returns:
      The passing :class:`GradCheckReport`.

    Raises:
      GradientMismatchError: (an ``AssertionError``) with the report table as its message.
    """
    report = check_grads(manual, reference, params, *args, **kwargs)
    if not report.ok:
        raise GradientMismatchError(report)
    return report


def check_mlp(
    net: Any,
    params: ArrayTree,
    x: Array,
    y: Array,
    *,
    backward: Callable[..., Any] | None = None,
    order: int = 1,
    **kwargs: Any,
) -> GradCheckReport:
    """:func:`check_grads` for an :class:`~bpjax.MLP`, plus every layer's δ and ``∂C/∂x``.

    A :func:`bpjax.serial` network goes to :func:`check_network`, which does the same for any
    layers.

    Besides the leaf rows of :func:`check_grads` (``net.loss`` is the reference), each per-example
    error ``δ^l`` of the backward is compared with ``jax.vjp`` of the sub-network *above* layer
    ``l``: ``z^l ↦ (C_n)_n``, pulled back with a cotangent of ones, is exactly ``∂C_n/∂z^l_n``.
    Rows ``δ^l (deltas[l-1])`` name the layer; :attr:`GradCheckReport.first_bad_layer` is the
    first one, from the output down, that disagrees, and :meth:`GradCheckReport.summary` says which
    step of the recursion that points to. ``input_grad`` is compared with ``jax.grad`` of
    ``net.loss`` with respect to ``x``.

    Args:
      net: the :class:`~bpjax.MLP`.
      params: its params.
      x: inputs ``(batch, n_0)``.
      y: targets as ``net.loss`` takes them.
      backward: ``backward(params, cache, y) -> Backward`` to check instead of ``net.backward``
        (your own, or a deliberately broken copy).
      order: ``2`` adds the second-order rows of :func:`bpjax.extend.check_curvature`: the
        Hessian-vector product over the manual backward against ``jax.hessian`` of ``net.loss``,
        and the exact GGN diagonal against ``(1/B) Σ_n J_nᵀ H_n J_n`` from ``jax.jacobian`` and
        ``jax.hessian`` (``P × P`` matrices: for small networks).
      **kwargs: passed on to :func:`check_grads` (``rtol``, ``atol``, ``directions``, ``seed``,
        ``jit``, ``references``).

    Returns:
      A :class:`GradCheckReport` with ``deltas_checked=True``.

    Raises:
      ValueError: ``order`` is not 1 or 2.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> report = check_mlp(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> report.ok, report.first_bad_layer
      (True, None)
    """
    if not hasattr(net, "num_layers"):  # a serial network: its layers are not all Dense
        return check_network(net, params, x, y, backward=backward, order=order, **kwargs)
    _check_order(order)
    backward = net.backward if backward is None else backward
    wrap = _wrapper(kwargs.get("jit", True))
    fns = _mlp_fns(net, backward)
    report = check_grads(fns.manual, net.loss, params, x, y, **kwargs)
    rtol = report.rtol

    _, bw = wrap(fns.run_backward)(params, x, y)
    ref_deltas = wrap(fns.reference_deltas)(params, x, y)
    delta_scale = max(float(np.max(np.abs(_to_f64_np(d)))) for d in ref_deltas)
    rows = list(report.rows)
    for l in reversed(range(net.num_layers)):
        manual_delta = bw.deltas[l] if l < len(bw.deltas) else jnp.zeros((0,))
        rows.append(
            _compare_arrays(
                f"δ^{l + 1} (deltas[{l}])",
                "jax.vjp (layers above)",
                manual_delta,
                ref_deltas[l],
                rtol=rtol,
                atol=rtol * delta_scale,
            )
        )
    ref_input = wrap(fns.reference_input_grad)(params, x, y)
    input_scale = float(np.max(np.abs(_to_f64_np(ref_input))))
    rows.append(
        _compare_arrays(
            "input_grad",
            "jax.grad (x)",
            bw.input_grad,
            ref_input,
            rtol=rtol,
            atol=rtol * input_scale,
        )
    )
    rows += _second_order_rows(order, net, params, x, y, rtol, kwargs)
    return dataclasses.replace(report, rows=tuple(rows), deltas_checked=True)


def _check_order(order: Any) -> None:
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(
            f"order: expected 1 (gradients) or 2 (also hvp and the GGN diagonal), got {order!r}."
        )


def _second_order_rows(
    order: int, net: Any, params: ArrayTree, x: Array, y: Array, rtol: float | None, kwargs: Any
) -> list[CheckRow]:
    """The rows of :func:`bpjax.extend.check_curvature` when ``order == 2``, else none."""
    if order == 1:
        return []
    from bpjax.extend import check_curvature  # extend builds on this module

    report = check_curvature(
        net, params, x, y, rtol=rtol, seed=kwargs.get("seed", 0), jit=kwargs.get("jit", True)
    )
    return list(report.rows)


class _MLPFns(NamedTuple):
    """The functions :func:`check_mlp` runs, built once per (net, backward)."""

    run_backward: Callable[..., Any]  # (params, x, y) -> (cache, Backward)
    manual: Callable[..., Any]  # (params, x, y) -> (loss, grads) by the backward under test
    reference_deltas: Callable[..., Any]  # (params, x, y) -> [δ^l by jax.vjp]
    reference_input_grad: Callable[..., Any]  # (params, x, y) -> ∂C/∂x by jax.grad


@_memoized
def _mlp_fns(net: Any, backward: Callable[..., Any]) -> _MLPFns:
    def run_backward(p: ArrayTree, xs: Array, ys: Array) -> Any:
        _, cache = net.forward(p, xs)
        return cache, backward(p, cache, ys)

    def manual(p: ArrayTree, xs: Array, ys: Array) -> tuple[Array, ArrayTree]:
        cache, bw = run_backward(p, xs, ys)
        per_example = net.output_loss(cache.z[-1], cache.a[-1], net._check_targets(ys, cache))
        return jnp.mean(per_example), bw.grads

    def reference_deltas(p: ArrayTree, xs: Array, ys: Array) -> list[Array]:
        return _reference_deltas(net, p, xs, ys)

    return _MLPFns(run_backward, manual, reference_deltas, jax.grad(net.loss, argnums=1))


def _reference_deltas(net: Any, params: ArrayTree, x: Array, y: Array) -> list[Array]:
    """``δ^l_n = ∂C_n/∂z^l_n`` for every layer, by ``jax.vjp`` of the forward above ``z^l``.

    Uses only the forward maths (activations' ``forward``, ``z = a Wᵀ + b``, the loss value), never
    the hand-written backward.
    """
    _, cache = net.forward(params, x)
    y = net._check_targets(y, cache)

    def above(l: int, z: Array) -> Array:
        a = net.activations[l].forward(z)
        for m in range(l + 1, net.num_layers):
            z = a @ params[m]["W"].T + params[m]["b"]
            a = net.activations[m].forward(z)
        return net.output_loss(z, a, y)

    deltas = []
    for l in range(net.num_layers):
        losses, pullback = jax.vjp(lambda z, l=l: above(l, z), cache.z[l])
        deltas.append(pullback(jnp.ones_like(losses))[0])
    return deltas


def check_network(
    net: Any,
    params: ArrayTree,
    x: Array,
    y: Array,
    *,
    backward: Callable[..., Any] | None = None,
    key: Array | None = None,
    order: int = 1,
    **kwargs: Any,
) -> GradCheckReport:
    """:func:`check_mlp` for any :func:`bpjax.serial` network: grads, each layer's error, ∂C/∂x.

    Each layer's recorded error (``Backward.deltas[i]``: ``δ = ∂C_n/∂z`` for a layer with a
    weighted input, such as Dense or Conv2D, else ``∂C_n/∂y`` at its output) is compared with
    ``jax.vjp`` of the network *above* it, built from the layers' ``forward`` functions alone (and
    the layer's own ``activation.forward`` between ``z`` and its output): a cotangent of ones on
    ``(C_n)_n`` pulls back exactly ``∂C_n/∂(·)_n``. Rows ``δ^l (deltas[l-1])`` name the layer;
    :attr:`GradCheckReport.first_bad_layer` is the first one, from the output down, that
    disagrees, and :meth:`GradCheckReport.summary` names its type and which backward to look at.

    Args:
      net: a :func:`bpjax.serial` network (an :class:`~bpjax.MLP` goes to :func:`check_mlp`).
      params: its params.
      x: inputs ``(batch, *input_shape)``.
      y: targets as ``net.loss`` takes them.
      backward: ``backward(params, cache, y) -> Backward`` to check instead of ``net.backward``.
      key: the PRNG key of a training-mode forward (layers with ``needs_key``, such as Dropout);
        the manual and the reference passes draw the same randomness from it.
      order: ``2`` adds the second-order rows (hvp and the GGN diagonal, as in
        :func:`check_mlp`); for networks of Dense layers, which :mod:`bpjax.extend` covers.
      **kwargs: passed on to :func:`check_grads` (``rtol``, ``atol``, ``directions``, ``seed``,
        ``jit``, ``references``).

    Returns:
      A :class:`GradCheckReport` with ``deltas_checked=True`` and ``layer_names``.

    Raises:
      TypeError: ``net`` is not a network, an MLP is given a ``key``, or ``order=2`` for a
        network with layers other than Dense.
      ValueError: ``order`` is not 1 or 2.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> from bpjax.layers import Dense
      >>> net = bp.serial(Dense(4, "tanh"), Dense(2, "softmax"), loss="cross_entropy",
      ...                 input_shape=(3,))
      >>> params = net.init(jax.random.key(0))
      >>> report = check_network(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> report.ok, report.layer_names
      (True, ('Dense', 'Dense'))
    """
    if hasattr(net, "num_layers"):
        if key is not None:
            raise TypeError("key: an MLP draws no randomness; call check_network without key.")
        return check_mlp(net, params, x, y, backward=backward, order=order, **kwargs)
    _check_order(order)
    if not all(hasattr(net, m) for m in ("layers", "forward", "backward", "loss")):
        raise TypeError(
            f"net: expected a bpjax network (bpjax.serial(...) or bpjax.MLP), got "
            f"{type(net).__name__}."
        )
    if order == 2 and key is not None:
        raise TypeError("key: order=2 checks networks of Dense layers, which draw no randomness.")
    # first, so that a network order 2 does not cover fails before the first-order work
    second_order = _second_order_rows(order, net, params, x, y, kwargs.get("rtol"), kwargs)
    backward = net.backward if backward is None else backward
    wrap = _wrapper(kwargs.get("jit", True))
    fns = _network_fns(net, backward)
    report = check_grads(fns.manual, fns.reference, params, x, y, key, **kwargs)
    rtol = report.rtol

    _, bw = wrap(fns.run_backward)(params, x, y, key)
    ref_errors = wrap(fns.reference_errors)(params, x, y, key)
    scale = max(float(np.max(np.abs(_to_f64_np(e)), initial=0.0)) for e in ref_errors)
    rows = list(report.rows)
    for l in reversed(range(len(net.layers))):
        manual_error = bw.deltas[l] if l < len(bw.deltas) else jnp.zeros((0,))
        rows.append(
            _compare_arrays(
                f"δ^{l + 1} (deltas[{l}])",
                "jax.vjp (layers above)",
                manual_error,
                ref_errors[l],
                rtol=rtol,
                atol=rtol * scale,
            )
        )
    if bw.input_grad is not None or jnp.issubdtype(jnp.result_type(x), jnp.floating):
        ref_input = wrap(fns.reference_input_grad)(params, x, y, key)
        input_scale = float(np.max(np.abs(_to_f64_np(ref_input)), initial=0.0))
        manual_input = jnp.zeros((0,)) if bw.input_grad is None else bw.input_grad
        rows.append(
            _compare_arrays(
                "input_grad",
                "jax.grad (x)",
                manual_input,
                ref_input,
                rtol=rtol,
                atol=rtol * input_scale,
            )
        )
    rows += second_order
    names = tuple(type(layer).__name__ for layer in net.layers)
    return dataclasses.replace(report, rows=tuple(rows), deltas_checked=True, layer_names=names)


class _NetworkFns(NamedTuple):
    """The functions :func:`check_network` runs, built once per (net, backward)."""

    run_backward: Callable[..., Any]  # (params, x, y, key) -> (cache, Backward)
    manual: Callable[..., Any]  # (params, x, y, key) -> (loss, grads) by the backward under test
    reference: Callable[..., Any]  # (params, x, y, key) -> C, plain JAX
    reference_errors: Callable[..., Any]  # (params, x, y, key) -> [error of layer i by jax.vjp]
    reference_input_grad: Callable[..., Any]  # (params, x, y, key) -> ∂C/∂x by jax.grad


@_memoized
def _network_fns(net: Any, backward: Callable[..., Any]) -> _NetworkFns:
    def run_backward(p: ArrayTree, xs: Array, ys: Array, key: Any) -> Any:
        _, cache = net.forward(p, xs, key=key)
        return cache, backward(p, cache, ys)

    def manual(p: ArrayTree, xs: Array, ys: Array, key: Any) -> tuple[Array, ArrayTree]:
        cache, bw = run_backward(p, xs, ys, key)
        return jnp.mean(net._output_loss(cache, net._check_targets(ys, cache.out))), bw.grads

    def reference(p: ArrayTree, xs: Array, ys: Array, key: Any) -> Array:
        return net.loss(p, xs, ys, key=key)

    def reference_errors(p: ArrayTree, xs: Array, ys: Array, key: Any) -> list[Array]:
        return _reference_errors(net, p, xs, ys, key)

    return _NetworkFns(
        run_backward, manual, reference, reference_errors, jax.grad(reference, argnums=1)
    )


def _reference_errors(net: Any, params: ArrayTree, x: Array, y: Array, key: Any) -> list[Array]:
    """Each layer's per-example error by ``jax.vjp`` of the layers' forwards above it.

    For a layer with a weighted input the error is at ``z`` (its cache's ``z``; its output is
    ``activation.forward(z)``), else at the layer's output. Uses only forward functions and the
    loss value (from the last layer's ``z`` for a fused output pair, as the network computes it).
    """
    layers, n = net.layers, len(net.layers)
    keys = split_key(key, n)
    h, outs, layer_caches = net._check_inputs(params, x), [], []
    for layer, layer_params, layer_key in zip(layers, params, keys, strict=True):
        h, layer_cache = layer_forward(layer, layer_params, h, layer_key)
        outs.append(h)
        layer_caches.append(layer_cache)
    out = outs[-1]
    cache = SerialCache(layer_caches, out)
    targets = net._check_targets(y, out)
    fused = net.fused is not None

    def loss_at(last_z: Array | None, out: Array) -> Array:
        caches = list(cache.layers)
        if fused:
            caches[-1] = caches[-1]._replace(z=last_z)
        return net._output_loss(cache._replace(layers=caches, out=out), targets)

    def above(i: int, h: Array) -> Array:
        last_cache = None
        for j in range(i + 1, n):
            h, last_cache = layer_forward(layers[j], params[j], h, keys[j])
        return loss_at(last_cache.z if fused and last_cache is not None else None, h)

    def from_z(i: int, z: Array) -> Array:
        a = layers[i].activation.forward(z)
        return loss_at(z, a) if i == n - 1 else above(i, a)

    errors = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "backward_delta"):
            losses, pullback = jax.vjp(lambda z, i=i: from_z(i, z), cache.layers[i].z)
        else:
            losses, pullback = jax.vjp(lambda h, i=i: above(i, h), outs[i])
        errors.append(pullback(jnp.ones_like(losses))[0])
    return errors
