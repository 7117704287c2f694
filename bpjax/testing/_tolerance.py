"""Allowed errors derived from the dtype and the computation, not guessed.

A backward computed in a dtype with unit roundoff ``u`` (half its machine epsilon) differs from
the exact cotangent by rounding alone. :func:`allowed_errors` estimates that difference per leaf
from two things the check has already computed:

- the **float64 shadow**: the reference VJP (``jax.vjp`` of the forward) run on the same inputs cast
  up to float64, exactly, since every float casts up without rounding. Its largest magnitude over
  the whole tree, ``M = max_i max |r_i|``, is the scale every leaf's rounding is measured against
  (a leaf whose cotangent is tiny next to the others, a bias gradient that is a sum with
  cancellation, is held to the absolute accuracy the computation has, not to a relative one it
  cannot have).
- the **measured amplification** ``κ_i = max |r̂_i − r_i| / u_m``: the same reference VJP computed
  in a lower precision ``m`` (the working dtype, or float32 when the working dtype is float64)
  against the shadow, in units of that precision's roundoff. A backward does the same sums and
  products as autodiff's transpose of the forward, in another order, so its rounding error has the
  same size: ``κ_i`` is the condition of this computation at these inputs (saturated activations,
  large logits and cancelling sums raise it), measured rather than bounded.

The allowed error of leaf ``i`` in a dtype with unit roundoff ``u`` is then

    allowed_i = u · (C_M · M + C_κ · κ_i),      C_M = 16,  C_κ = 8,

an absolute bound on ``max |g_i − r_i|`` over the leaf's elements. ``C_M · u · M`` is the a-priori
part: a few roundings of the largest term, with room for ``√k`` growth over sums of up to a few
hundred terms, so that a leaf autodiff happens to get exactly right still allows the backward its
own rounding. ``C_κ`` covers the other summation order, which can round up to a few times worse than
the one measured. For float32 (``u = 6.0e-8``) a well-conditioned backward is allowed about
``1e-6 · M``, three orders of magnitude below an error of ``1e-3 · M``; for bfloat16
(``u = 3.9e-3``) the same formula allows a few percent, which is what eight significant bits give.
The float64 shadow of the backward itself is held to the same formula with ``u = 1.1e-16``, and
with ``κ`` at least the float64 roundoff the computation shows directly: the gap
``|⟨Jᵀc, v⟩ − ⟨c, J v⟩| / u`` between the shadow's reverse and forward mode along a random unit
direction ``v`` (a lower precision that happens to round a cancelling sum to exactly zero would
otherwise under-report it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["C_KAPPA", "C_M", "allowed_errors", "unit_roundoff"]

C_M = 16.0
"""The a-priori factor of ``u · M`` in the allowed error (see the module docstring)."""

C_KAPPA = 8.0
"""The factor of the measured amplification ``κ_i`` in the allowed error."""


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


def _finite_max_abs(x: np.ndarray) -> float:
    finite = np.abs(x[np.isfinite(x)])
    return float(finite.max()) if finite.size else 0.0


def allowed_errors(
    reference: Sequence[Any],
    measured: Sequence[Any],
    *,
    dtype: Any,
    measured_dtype: Any,
    kappa_floor: float = 0.0,
) -> tuple[list[float], list[float]]:
    """The allowed ``max |g_i − r_i|`` of each leaf, and the measured amplifications ``κ_i``.

    ``allowed_i = u(dtype) · (C_M · M + C_κ · κ_i)`` with ``M = max_i max |r_i|`` and
    ``κ_i = max |measured_i − r_i| / u(measured_dtype)`` (non-finite elements left out: they are
    reported as such, before any numeric comparison). Where ``measured`` is not finite and the
    reference is, the lower precision overflowed and the roundoff of the computation could not be
    measured: ``κ_i`` and the allowed error are ``inf`` (the check says so in its note).

    Args:
      reference: the float64 shadow's cotangent leaves ``r_i`` (any shapes).
      measured: the same cotangents computed in ``measured_dtype``, leaf by leaf.
      dtype: the dtype whose rounding the allowance is for.
      measured_dtype: the dtype ``measured`` was computed in.
      kappa_floor: a lower bound for every ``κ_i``: an amplification measured another way (for
        the float64 shadow, the gap between its forward and reverse mode).

    Returns:
      ``(allowed, kappa)``: two lists of floats, one entry per leaf.

    Example:
      >>> import numpy as np
      >>> r = [np.array([1.0, -2.0])]
      >>> m = [np.array([1.0, -2.0 + 2.4e-7])]  # two float32 ulps off
      >>> allowed, kappa = allowed_errors(r, m, dtype="float32", measured_dtype="float32")
      >>> round(kappa[0], 1), f"{allowed[0]:.1e}"
      (4.0, '3.8e-06')
    """
    u, u_m = unit_roundoff(dtype), unit_roundoff(measured_dtype)
    refs = [np.asarray(r, np.float64) for r in reference]
    scale = max((_finite_max_abs(r) for r in refs), default=0.0)
    kappas = []
    for r, m in zip(refs, measured, strict=True):
        m = np.asarray(m, np.float64)
        if np.any(np.isfinite(r) & ~np.isfinite(m)):  # the lower precision overflowed here
            kappas.append(math.inf)
            continue
        both = np.isfinite(r) & np.isfinite(m)
        kappas.append(float(np.max(np.abs(m - r)[both], initial=0.0)) / u_m)
    allowed = [u * (C_M * scale + C_KAPPA * max(kappa, kappa_floor)) for kappa in kappas]
    return allowed, kappas
