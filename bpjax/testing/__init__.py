"""bpjax.testing: prove your own hand-written backward right, in your own test suite.

For a function given as a forward and a hand-written VJP (``backward(residuals, cotangent) ->
cotangents``, the ``fwd``/``bwd`` pair of :meth:`jax.custom_vjp.defvjp`), or for any
``jax.custom_vjp`` function, :func:`assert_backward_matches` compares the manual cotangents, leaf by
leaf, with ``jax.vjp`` of the forward, forward mode (the dot-product identity
``⟨c, J u⟩ = ⟨Jᵀc, u⟩``), finite differences and the Taylor remainder, all in a float64 shadow run
of the same functions, and checks the contracts every VJP must keep (:data:`CONTRACTS`): linear in
the cotangent, zero for a zero cotangent, the same under ``jax.vmap`` as in a loop, deterministic,
and traced once under ``jax.jit``. The allowed error of a float32 or bfloat16 check is derived from
the dtype's roundoff and the computation's magnitudes (:func:`allowed_errors`), and the report shows
it beside the observed error.

A ``jax.custom_jvp`` function (its VJP transposed from the JVP rule), ``nondiff_argnums``,
``static_argnums`` and ``kwargs`` (Python values held fixed), and pytree outputs are checked as
they are; ``order=2`` also checks the VJP of the VJP against ``jax.vjp ∘ jax.vjp`` (see
:func:`check_backward`).

:mod:`bpjax.testing.strategies` (hypothesis strategies for networks, params and batches) and the
pytest plugin :mod:`bpjax.testing.plugin` (the ``grad_check`` fixture, ``--bpjax-x64``) need the
test extras; this module imports neither hypothesis nor pytest.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bpjax.testing import assert_backward_matches
  >>> fwd = lambda x: (jnp.sin(x), jnp.cos(x))  # out, residuals
  >>> bwd = lambda cos_x, g: (g * cos_x,)  # one cotangent per primal
  >>> assert_backward_matches(fwd, bwd, jnp.linspace(-1.0, 1.0, 5)).ok
  True
"""

from bpjax.testing._backward import (
    BACKWARD_REFERENCES,
    BackwardMismatchError,
    BackwardReport,
    assert_backward_matches,
    check_backward,
)
from bpjax.testing._contracts import CONTRACTS
from bpjax.testing._tolerance import allowed_errors, unit_roundoff

__all__ = [
    "BACKWARD_REFERENCES",
    "CONTRACTS",
    "BackwardMismatchError",
    "BackwardReport",
    "allowed_errors",
    "assert_backward_matches",
    "check_backward",
    "unit_roundoff",
]
