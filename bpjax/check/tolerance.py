"""The one tolerance engine of every check: per-leaf allowed errors, derived, never guessed.

A gradient computed in a dtype with unit roundoff ``u`` differs from the exact one by rounding
alone. How much depends on the computation: a sum with cancellation, a saturated activation or a
large logit can amplify ``u`` by orders of magnitude, and a leaf whose gradient is tiny next to
another's has its own, smaller, absolute accuracy. So every check judges each leaf ``i`` on its
own, against the **float64 truth** ``t_i`` (the reference run on the same inputs cast up to float64,
exactly, since every float casts up without rounding), with an allowance measured from the same
computation:

- **measured roundoff.** The reference itself (``jax.grad`` of the forward, the δ of the layers
  above, ...) is run in the working dtype at ``S = 3`` points: the inputs, and the inputs perturbed
  by about one unit roundoff (``θ (1 + 2u ξ)``, rounded back to the dtype), which moves every
  rounding of the computation. Each run is compared with its own float64 shadow; the largest
  errors over the runs are ``e_i = max_s ‖r̂_i − t_i‖₂`` and ``m_i = max_s max |r̂_i − t_i|``. A
  hand-written backward does the same sums and products as autodiff's transpose of the forward in
  another order, so its rounding has the same size: ``e_i`` is the accuracy the working dtype can
  give this leaf at these inputs. A float64 check, with no wider dtype above it, measures the
  spread of its float64 results over the inputs moved by one unit roundoff: that moves every
  rounding, and the result moves by as much as the computation's conditioning amplifies ``u``.
- **the result's own rounding.** Even an exact computation rounds its result: ``u ‖t_i‖₂`` and
  ``u max |t_i|``. For a leaf whose truth is exactly zero the scale of the other leaves of the same
  quantity stands in (a zero gradient computed as ``a − a`` rounds at the scale of ``a``).

The allowance of leaf ``i`` is

    ‖g_i − t_i‖₂ ≤ C_NORM · e_i + C_UNIT · u · ‖t_i‖₂     and
    max |g_i − t_i| ≤ C_ELEMENT · m_i + C_UNIT · u · max |t_i|

with ``C_NORM = 2``, ``C_ELEMENT = 4`` and ``C_UNIT = 4``. Another summation order rounds
differently, but over a leaf's elements the two error norms are alike: over 242 leaves of 40
random bfloat16 MLPs and 496 leaves of 80 float32 ones, the correct backward's ``‖g_i − t_i‖`` was
at most 1.8× (bfloat16) and 4.1× (float32, leaves of 1–3 elements, errors of a few ulps) the
largest of autodiff's three, and every such case sat under ``2 e_i + 2u ‖t_i‖``; ``C_UNIT = 4``
doubles that floor (a backward may round its result a few more times than autodiff). A single
element's error is an extreme over the leaf, hence the wider ``C_ELEMENT``. The manual
gradient is judged against the float64 truth, never against working-precision autodiff, so a
backward *more* accurate than autodiff passes; and a float32 check is held to float32's accuracy,
never to float64's. A planted error of relative size ``ρ`` on a leaf is caught when ``ρ`` exceeds
``2 e_i / ‖t_i‖ + 4u``: in float32 that is ``ρ ≳ 1e-6`` for a well-conditioned leaf, and in
bfloat16 about 3% for the median leaf; a leaf whose own roundoff in the working dtype is a large
fraction of the bug cannot be judged by any checker.

Directional references (forward mode, finite differences, the Taylor remainder) compare
``⟨g_i, v⟩`` along unit directions ``v``: by Cauchy–Schwarz ``|⟨g_i − t_i, v⟩| ≤ ‖g_i − t_i‖₂``, so
their allowance is the norm allowance, plus the method's own error where it has one.

**Undefined references.** Where the float64 truth is NaN or ±Inf (an autodiff ``0 · ∞``, a NaN
guard the hand-written rule has and autodiff lacks), nothing can judge the manual value: those
elements are reported, not judged, in every row type. A manual NaN or Inf where the truth is
finite fails, naming the leaf and the first index, unless working-precision autodiff overflows
there too (the dtype cannot hold the computation, whoever runs it).

Explicit ``rtol``/``atol`` override the derived allowance: a leaf then passes when
``‖g_i − t_i‖ ≤ rtol ‖t_i‖`` or ``max |g_i − t_i| ≤ atol``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._trees import cast_floats, is_float, to_dtype
from bpjax.check.report import CheckRow

__all__ = [
    "C_ELEMENT",
    "C_NORM",
    "C_UNIT",
    "SAMPLES",
    "Measured",
    "Tolerance",
    "compare",
    "compare_directions",
    "derive_tolerances",
    "explicit_tolerance",
    "measure",
    "to_f64",
    "unit_roundoff",
]

C_NORM = 2.0
"""The factor of autodiff's measured ``‖r̂ − t‖`` in a leaf's norm allowance."""

C_ELEMENT = 4.0
"""The factor of autodiff's measured ``max |r̂ − t|`` in a leaf's elementwise allowance."""

C_UNIT = 4.0
"""The units of roundoff of the result itself in the allowance."""

SAMPLES = 3
"""How many points (the inputs and perturbed copies) the roundoff is measured at."""


def unit_roundoff(dtype: Any) -> float:
    """Half the machine epsilon of a floating ``dtype``: the largest relative rounding error.

    Example:
      >>> import jax.numpy as jnp
      >>> unit_roundoff(jnp.float32), unit_roundoff(jnp.bfloat16)
      (5.960464477539063e-08, 0.00390625)
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}.")
    return float(jnp.finfo(dtype).eps) / 2


def to_f64(x: Any) -> np.ndarray:
    """A host float64 copy; every float dtype (bfloat16 included) converts exactly."""
    return np.asarray(jax.device_get(x)).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The allowed error of one leaf: derived (both bounds must hold) or explicit (either).

    Attributes:
      max_abs: the allowed ``max |g − t|`` (explicit: ``atol``).
      norm: the allowed ``‖g − t‖₂`` (derived only).
      rtol: explicit only: the allowed ``‖g − t‖ / ‖t‖``.
      explicit: whether the user's ``rtol``/``atol`` decide.
      roundoff: the measured ``e_i`` (working-precision autodiff's error, scaled to the dtype).
      note: why the allowance is what it is, where that needs saying (an unmeasured roundoff).
    """

    max_abs: float
    norm: float = math.inf
    rtol: float = 0.0
    explicit: bool = False
    roundoff: float = math.nan
    note: str = ""

    def passes(self, max_abs: float, err_norm: float, ref_norm: float) -> bool:
        """Whether an observed error passes (see the module docstring)."""
        if self.explicit:
            return err_norm <= self.rtol * ref_norm or max_abs <= self.max_abs
        return max_abs <= self.max_abs and err_norm <= self.norm

    def along(self, ref_norm: float) -> float:
        """The allowed ``|⟨g − t, v⟩|`` along a unit direction ``v``: ``‖g − t‖`` bounds it."""
        if self.explicit:
            return self.max_abs + self.rtol * ref_norm
        return self.norm


def explicit_tolerance(rtol: float | None, atol: float | None) -> Tolerance:
    """The user's tolerances: a missing one of the two counts as 0."""
    return Tolerance(
        max_abs=0.0 if atol is None else float(atol),
        rtol=0.0 if rtol is None else float(rtol),
        explicit=True,
    )


def _finite_norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x[np.isfinite(x)]))


def _finite_max(x: np.ndarray) -> float:
    return float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


def derive_tolerances(
    truth: Sequence[np.ndarray],
    errors: Sequence[Sequence[np.ndarray]],
    *,
    dtype: Any,
    measured_dtype: Any,
) -> list[Tolerance]:
    """Each leaf's allowance from its float64 truth and autodiff's measured errors.

    Args:
      truth: the float64 truth ``t_i`` of each leaf of one quantity (the gradient, the δs, ...).
      errors: per sample, per leaf, ``r̂_i − t_i`` of autodiff run in ``measured_dtype`` against
        its own float64 shadow; an element that is not finite where the truth is means the
        measured dtype overflowed: that leaf's roundoff is unmeasured (an infinite allowance,
        said in the note).
      dtype: the dtype the allowance is for (the check's working dtype).
      measured_dtype: the dtype the errors were measured in.

    Returns:
      One :class:`Tolerance` per leaf (see the module docstring for the formula).
    """
    u = unit_roundoff(dtype)
    scaling = u / unit_roundoff(measured_dtype)
    fallback = max((_finite_max(t) for t in truth), default=0.0)
    out = []
    for i, t in enumerate(truth):
        errs = [np.asarray(sample[i], np.float64) for sample in errors]
        if any(np.any(np.isinf(e) | (np.isnan(e) & np.isfinite(t))) for e in errs):
            out.append(
                Tolerance(
                    max_abs=math.inf, norm=math.inf, roundoff=math.inf,
                    note=f"autodiff in {jnp.dtype(measured_dtype).name} overflows here: roundoff "
                    "unmeasured, not judged",
                )
            )  # fmt: skip
            continue
        e_norm = max((_finite_norm(e) for e in errs), default=0.0) * scaling
        e_max = max((_finite_max(e) for e in errs), default=0.0) * scaling
        t_norm, t_max = _finite_norm(t), _finite_max(t)
        if t_max == 0.0:  # an exactly zero truth rounds at the scale of the quantity
            t_norm = t_max = fallback
        out.append(
            Tolerance(
                max_abs=C_ELEMENT * e_max + C_UNIT * u * t_max,
                norm=C_NORM * e_norm + C_UNIT * u * t_norm,
                roundoff=e_norm,
            )
        )
    return out


class Measured(NamedTuple):
    """What :func:`measure` found for each quantity (the top-level entries of ``fn``'s output)."""

    truth: dict[str, list[np.ndarray]]  # float64 truth leaves at the inputs
    autodiff: dict[str, list[np.ndarray]]  # the working dtype's leaves at the inputs
    tolerances: dict[str, list[Tolerance]]  # each leaf's allowance


def _perturbed(diff: Any, dtype: Any, rng: np.random.Generator) -> Any:
    """The floating leaves as ``x (1 + 2u ξ)`` rounded to ``dtype``: every rounding moves."""
    u = unit_roundoff(dtype)

    def move(x: Any) -> Any:
        x64 = np.asarray(x, np.float64)
        return to_dtype(x64 * (1 + 2 * u * rng.standard_normal(x64.shape)), dtype)

    return jax.tree.map(lambda x: move(x) if is_float(x) else x, diff)


def _leaves_by_key(out: Any) -> dict[str, list[np.ndarray]]:
    return {k: [to_f64(x) for x in jax.tree.leaves(v)] for k, v in out.items()}


def measure(
    fn: Callable[..., dict[str, Any]],
    diff: Any,
    fixed: Sequence[Any],
    *,
    dtype: Any,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    seed: int = 0,
    samples: int = SAMPLES,
    explicit: Tolerance | None = None,
) -> Measured:
    """The float64 truth of ``fn(diff, *fixed)`` and each leaf's derived allowance.

    Args:
      fn: ``fn(diff, *fixed) -> {name: pytree}``, the references (plain JAX that follows its
        inputs' dtype); each top-level entry is one quantity, with its own zero-truth fallback.
      diff: the inputs the roundoff is sampled over (perturbed at about one unit roundoff).
      fixed: the other arguments (labels, keys, ...), cast up with the rest for the truth.
      dtype: the working dtype of the check.
      wrap: ``jax.jit`` (memoized) or the identity.
      seed: seeds the perturbations.
      samples: how many points to measure at.
      explicit: the user's tolerance, which replaces the derived one (and the sampling).

    Returns:
      A :class:`Measured`.
    """
    dtype = jnp.dtype(dtype)
    run = wrap(fn)

    def shadow(d: Any, f: Sequence[Any]) -> dict[str, list[np.ndarray]]:
        with jax.enable_x64(True):
            f64 = cast_floats(tuple(f), jnp.float64)
            return _leaves_by_key(run(cast_floats(d, jnp.float64), *f64))

    truth = shadow(diff, fixed)
    if explicit is not None:
        tolerances = {k: [explicit] * len(v) for k, v in truth.items()}
        return Measured(truth, {}, tolerances)
    rng = np.random.default_rng(seed + 7919)
    errors: dict[str, list[list[np.ndarray]]] = {k: [] for k in truth}
    autodiff: dict[str, list[np.ndarray]] = {}
    if dtype != jnp.float64:
        for s in range(samples):
            point = diff if s == 0 else _perturbed(diff, dtype, rng)
            work = _leaves_by_key(run(point, *fixed))
            ref = truth if s == 0 else shadow(point, fixed)
            autodiff = work if s == 0 else autodiff
            for k in truth:
                errors[k].append([w - r for w, r in zip(work[k], ref[k], strict=True)])
    else:
        # float64 has no wider shadow: its roundoff is the spread of the float64 results over
        # inputs moved by one unit roundoff, which moves every rounding of the computation
        for _ in range(samples - 1):
            moved = shadow(_perturbed(diff, jnp.float64, rng), fixed)
            for k in truth:
                errors[k].append([m - t for m, t in zip(moved[k], truth[k], strict=True)])
    tolerances = {
        k: derive_tolerances(truth[k], errors[k], dtype=dtype, measured_dtype=dtype) for k in truth
    }
    return Measured(truth, autodiff, tolerances)


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def compare(
    path: str,
    reference: str,
    manual: Any,
    truth: Any,
    tol: Tolerance,
    *,
    overflow: np.ndarray | None = None,
) -> CheckRow:
    """One leaf's manual values against the float64 truth, within its allowance.

    Args:
      path: the row's name (``"[0]['W']"``, ``"value"``, ``"δ^2 (deltas[1])"``).
      reference: the reference's name, for the row.
      manual: the hand-written values (any float dtype).
      truth: the float64 truth, same shape.
      tol: the leaf's :class:`Tolerance`.
      overflow: where working-precision autodiff is not finite although the truth is: a manual
        NaN/Inf there is the dtype's limit, not a bug (left out, with a note).

    Returns:
      A :class:`~bpjax.CheckRow`: a wrong shape or a NaN where the truth is finite fails with a
      note; undefined truth elements are left out and counted in the note.
    """
    m, t = to_f64(manual), to_f64(truth)
    if m.shape != t.shape:
        return CheckRow(path, reference, math.nan, math.nan, None, False,
                        note=f"shape {m.shape}, expected {t.shape}")  # fmt: skip
    notes = []
    undefined = ~np.isfinite(t)
    bad = ~undefined & ~np.isfinite(m)
    if overflow is not None and np.any(bad & overflow):
        excused = bad & overflow
        first = _index(int(np.flatnonzero(excused)[0]), m.shape)
        notes.append(
            f"{int(excused.sum())} elements (first {first}) not finite, as autodiff is in the "
            "same dtype: the dtype overflows, left out"
        )
        bad &= ~overflow
        undefined |= excused
    if bad.any():
        index = _index(int(np.flatnonzero(bad)[0]), m.shape)
        return CheckRow(path, reference, math.nan, math.nan, index, False,
                        note=f"manual is {m[index]} at {index}", allowed=tol.max_abs,
                        manual_value=float(m[index]), reference_value=float(t[index]))  # fmt: skip
    if undefined.any() and not notes:
        first = _index(int(np.flatnonzero(undefined)[0]), m.shape)
        notes.append(
            f"{int(undefined.sum())} of {undefined.size} elements (first {first}) where the "
            "reference is undefined (NaN/Inf): not judged"
        )
    diff = np.where(undefined, 0.0, np.abs(m - np.where(undefined, 0.0, t)))
    ref = np.where(undefined, 0.0, t)
    max_abs = float(diff.max()) if diff.size else 0.0
    worst = _index(int(np.argmax(diff)), diff.shape) if diff.size else None
    err_norm, ref_norm = float(np.linalg.norm(diff)), float(np.linalg.norm(ref))
    rel = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)
    passed = tol.passes(max_abs, err_norm, ref_norm)
    if tol.note:
        notes.append(tol.note)
    elif not passed and not tol.explicit:
        notes.append(f"allowed ‖Δ‖ {tol.norm:.1e}, measured roundoff {tol.roundoff:.1e}")
    return CheckRow(
        path, reference, max_abs, rel, worst, passed, note="; ".join(notes),
        allowed=tol.max_abs if not tol.explicit else None,
        manual_value=None if worst is None else float(m[worst]),
        reference_value=None if worst is None else float(t[worst]),
    )  # fmt: skip


def compare_directions(
    path: str,
    reference: str,
    manual: np.ndarray,
    truth: np.ndarray,
    tol: Tolerance,
    truth_norm: float,
    *,
    method_error: np.ndarray | None = None,
) -> CheckRow:
    """``⟨g, v_k⟩`` against a reference's directional derivatives over unit directions ``v_k``.

    Each direction is allowed ``tol.along(‖t‖)`` plus the reference method's own error
    ``method_error[k]`` (finite differences); the note shows the allowance of the worst direction
    (the largest error relative to its allowance). Directions along which the reference is
    undefined are reported, not judged.
    """
    m, r = np.asarray(manual, np.float64), np.asarray(truth, np.float64)
    undefined = ~np.isfinite(r)
    bad = ~undefined & ~np.isfinite(m)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        return CheckRow(path, reference, math.nan, math.nan, (k,), False,
                        note=f"direction {k}: manual {m[k]}, reference {r[k]}",
                        manual_value=float(m[k]), reference_value=float(r[k]))  # fmt: skip
    judged = ~undefined
    if not judged.any():
        note = "the reference is undefined along every direction: not judged"
        return CheckRow(path, reference, math.nan, math.nan, None, True, note=note)
    err = np.where(judged, np.abs(m - np.where(judged, r, 0.0)), 0.0)
    allowed = np.full(err.shape, tol.along(truth_norm))
    if method_error is not None:
        allowed = allowed + np.where(np.isfinite(method_error), method_error, math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / allowed, np.where(err > 0, math.inf, 0.0))
    k = int(np.argmax(ratio))
    rel = float(err[k]) / truth_norm if truth_norm > 0 else (0.0 if err[k] == 0 else math.inf)
    notes = []
    if method_error is not None:
        notes.append(f"direction {k}: allowance {allowed[k]:.1e}")
    if undefined.any():
        notes.append(f"{int(undefined.sum())} directions with an undefined reference: not judged")
    return CheckRow(
        path, reference, float(err[k]), rel, (k,), bool(np.all(err <= allowed)),
        note="; ".join(notes), allowed=float(allowed[k]),
        manual_value=float(m[k]), reference_value=float(r[k]),
    )  # fmt: skip
