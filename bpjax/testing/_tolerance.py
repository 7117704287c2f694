"""Allowed errors for your own comparisons, from the one tolerance engine of :mod:`bpjax.check`.

:func:`allowed_errors` is the engine's per-leaf allowance (see :mod:`bpjax.check.tolerance`) for
one measurement you made yourself: the float64 truth ``r_i`` of each leaf and the same quantity
computed in a lower precision. Leaf ``i`` is allowed

    max |g_i − r_i| ≤ C_ELEMENT · max |r̂_i − r_i| · u / u_m + C_UNIT · u · max |r_i|

(``u`` the unit roundoff of the dtype the allowance is for, ``u_m`` that of the measured dtype;
a leaf whose truth is exactly zero is held at the scale of the largest leaf), never scaled by
another leaf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpjax.check.tolerance import C_ELEMENT, derive_tolerances, unit_roundoff

__all__ = ["allowed_errors", "unit_roundoff"]


def allowed_errors(
    reference: Sequence[Any],
    measured: Sequence[Any],
    *,
    dtype: Any,
    measured_dtype: Any,
    kappa_floor: float = 0.0,
) -> tuple[list[float], list[float]]:
    """The allowed ``max |g_i − r_i|`` of each leaf, and the measured amplifications ``κ_i``.

    Args:
      reference: the float64 truth ``r_i`` of each leaf (any shapes).
      measured: the same leaves computed in ``measured_dtype``.
      dtype: the dtype whose rounding the allowance is for.
      measured_dtype: the dtype ``measured`` was computed in.
      kappa_floor: a lower bound for every ``κ_i`` (in units of ``u(measured_dtype)``): an
        amplification measured another way.

    Returns:
      ``(allowed, kappa)``, one entry per leaf: ``κ_i = max |measured_i − r_i| / u_m``. Where
      ``measured`` is not finite and the reference is, the lower precision overflowed: ``κ_i`` and
      the allowance are ``inf``.

    Example:
      >>> import numpy as np
      >>> r = [np.array([1.0, -2.0])]
      >>> m = [np.array([1.0, -2.0 + 2.4e-7])]  # two float32 ulps off
      >>> allowed, kappa = allowed_errors(r, m, dtype="float32", measured_dtype="float32")
      >>> round(kappa[0], 1), f"{allowed[0]:.1e}"
      (4.0, '1.4e-06')
    """
    u, u_m = unit_roundoff(dtype), unit_roundoff(measured_dtype)
    refs = [np.asarray(r, np.float64) for r in reference]
    errors = [np.asarray(m, np.float64) - r for m, r in zip(measured, refs, strict=True)]
    tols = derive_tolerances(refs, [errors], dtype=dtype, measured_dtype=measured_dtype)
    floor = C_ELEMENT * u * kappa_floor
    allowed = [t.max_abs + floor for t in tols]
    kappa = [
        math.inf if not math.isfinite(t.max_abs) else float(np.max(np.abs(e), initial=0.0)) / u_m
        for t, e in zip(tols, errors, strict=True)
    ]
    return allowed, kappa
