"""The opt-in checked mode: run a function with its run-time checks on, and raise where one fails.

Some bad input cannot be seen while tracing: integer class labels passed to a jitted function
are tracers, and whether each lies in ``[0, n_L)`` is known only when the program runs. bpjax
never turns such an input into a finite wrong number: an out-of-range label makes its example's
loss and every gradient it reaches NaN (:func:`bpjax.losses.label_poison`). The same code
states each such condition as a ``jax.experimental.checkify.debug_check`` while :func:`checked`
traces it (:func:`checks_enabled`), and runs the function under ``checkify`` so that the first
failing one raises, with the index and the value.

A plain trace states no check at all, not even a dropped one: a ``debug_check`` in a jitted
program is an effect, and an effect sends every call of the jitted function down JAX's Python
dispatch path instead of its C++ one (measured: about 110 µs more per call of a jitted
``value_and_grad`` on a 2-core CPU; bench_mlp's small MLP step went from 0.46 to 0.33-0.39
ms). Whether checks are on is a ``jax.make_user_context``, part of ``jax.jit``'s cache key, so a
function jitted and traced plainly is traced again, with its checks, when :func:`checked` calls
it, and the reverse.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import checkify

__all__ = ["checked", "checks_enabled"]

R = TypeVar("R")

# True while checked() traces: part of jax.jit's cache key (see the module docstring)
_CHECKS_ON = jax.make_user_context(default_value=False)

# what checkify appends to a failing check's message: its own wording, or the source line of
# the check (bpjax's code, not the caller's)
_SUFFIXES = (" (`check` failed)", " (check failed at ")


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool))


def checks_enabled() -> bool:
    """Whether the function being traced runs under :func:`checked`.

    Code that states a run-time condition (``checkify.debug_check``) states it only then: a
    plain program carries no check, and its jitted calls keep JAX's fast dispatch path.
    """
    return bool(_CHECKS_ON.value)


def checked(
    fn: Callable[..., R], *, errors: frozenset[Any] = checkify.user_checks
) -> Callable[..., R]:
    """``fn`` with bpjax's run-time checks on: a failing one raises ``ValueError``.

    ``checked(jax.jit(net.value_and_grad))(params, x, y)`` computes what the jitted function
    computes, and where ``y`` holds a class label outside ``[0, n_L)`` raises instead of returning
    NaN::

        ValueError: y: class label y.ravel()[1] = 2 is outside [0, n_L) = [0, 2).

    ``fn`` may be jitted or not and take any pytrees; arguments that are not arrays (a network
    spec passed to :func:`bpjax.extend.batch_grad`, a Python string) are held fixed, as
    ``static_argnums`` would. The checks cost a little run time (the failing index is computed
    and carried out), and a jitted ``fn`` is traced and compiled once more for checked calls;
    the unchecked function pays nothing for them (:func:`checks_enabled`).

    ``fn`` must still be traceable: a program compiled ahead of time
    (``jax.jit(f).lower(...).compile()``) was compiled without its checks and is refused. Call
    the checked function outside ``jax.jit``, ``jax.vmap`` and ``checked`` itself (it decides in
    Python whether to raise); put ``jax.jit`` inside, as above. ``jax.grad`` around it works.
    JAX's ``checkify`` does not see a check inside a ``lax.scan`` that is differentiated (the
    gradient of a scan over examples): there the bad label still makes the result NaN.

    Args:
      fn: any function built from bpjax (or JAX) code.
      errors: the ``checkify`` error sets to enable; the default, ``checkify.user_checks``, is
        bpjax's own checks. Add ``checkify.nan_checks`` or ``checkify.index_checks`` to stop at
        the first NaN or out-of-bounds index anywhere in ``fn``.

    Returns:
      A function with ``fn``'s signature and results. Call it outside ``jax.jit`` (it raises
      in Python); it may wrap a jitted function.

    Raises:
      TypeError: ``fn`` is not callable, or is a compiled program; or the checked function is
        called inside ``jax.jit``, ``jax.vmap`` or another ``checked``.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params, x = net.init(jax.random.key(0)), jnp.ones((3, 3))
      >>> loss = bp.checked(jax.jit(net.loss))
      >>> bool(jnp.isfinite(loss(params, x, jnp.array([0, 1, 1]))))
      True
      >>> loss(params, x, jnp.array([0, 2, 1]))
      Traceback (most recent call last):
      ...
      ValueError: y: class label y.ravel()[1] = 2 is outside [0, n_L) = [0, 2).
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a function, got {type(fn).__name__}.")
    if isinstance(fn, jax.stages.Compiled):
        raise TypeError(
            "fn: expected a function JAX can trace, got a compiled program (jax.stages.Compiled), "
            "which was compiled without its checks; pass the jitted function itself."
        )

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> R:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

        def with_arrays(arrays: list[Any]) -> R:
            full = list(leaves)
            for i, array in zip(where, arrays, strict=True):
                full[i] = array
            a, kw = jax.tree.unflatten(treedef, full)
            return fn(*a, **kw)

        with _CHECKS_ON(True):
            error, out = checkify.checkify(with_arrays, errors=errors)([leaves[i] for i in where])
        try:
            message = error.get()
        except jax.errors.TracerBoolConversionError:
            raise TypeError(
                "checked: called inside jax.jit, jax.vmap or another checked, where whether to "
                "raise cannot be decided; call it outside them and put jax.jit inside: "
                "bp.checked(jax.jit(f))."
            ) from None
        if message is not None:
            for suffix in _SUFFIXES:
                message = message.split(suffix)[0]
            raise ValueError(message)
        return out

    return run
