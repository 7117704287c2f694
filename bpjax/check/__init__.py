"""The gradient-checking harness: hand-written gradients against JAX autodiff, leaf by leaf.

- :mod:`bpjax.check.tolerance`: the one tolerance engine (per-leaf allowances derived from the
  float64 truth and the measured roundoff of the working dtype), and the comparisons.
- :mod:`bpjax.check.report`: :class:`CheckRow`, :class:`GradCheckReport` and their rendering.
- :mod:`bpjax.check.grads`: :func:`check_grads` against ``jax.grad``, ``jax.vjp``, forward mode,
  finite differences and the Taylor remainder.
- :mod:`bpjax.check.network`: :func:`check_mlp` and :func:`check_network`, which add every
  layer's error δ and ``∂C/∂x`` and name the layer whose backward is at fault.
- :mod:`bpjax.check.curvature`: :func:`check_curvature`, the harness at order 2 (the
  Hessian-vector product and the GGN diagonal of :mod:`bpjax.extend` against explicit matrices).
"""

from bpjax.check.curvature import check_curvature
from bpjax.check.grads import (
    DEFAULT_RTOL,
    REFERENCES,
    assert_grads_match,
    check_grads,
    default_rtol,
)
from bpjax.check.network import check_mlp, check_network
from bpjax.check.report import CheckRow, GradCheckReport, GradientMismatchError

__all__ = [
    "DEFAULT_RTOL",
    "REFERENCES",
    "CheckRow",
    "GradCheckReport",
    "GradientMismatchError",
    "assert_grads_match",
    "check_curvature",
    "check_grads",
    "check_mlp",
    "check_network",
    "default_rtol",
]
