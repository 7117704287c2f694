"""Contract checks of a backward that need no step size, and that nothing in JAX offers.

A VJP ``c ↦ Jᵀc`` at fixed primals is a linear map, and a function JAX can transform. Each
contract is a row per floating leaf (or one row for the whole backward), in the working dtype,
within the leaf's derived allowed error ``a_i`` (see :mod:`bpjax.testing._tolerance`):

==============  ======================================================  ==================
name            the contract                                            allowed
==============  ======================================================  ==================
linear          ``bwd(2c) = 2 bwd(c)`` (scaling by 2 is exact)           ``2 a_i``
additive        ``bwd(c₁ + c₂) = bwd(c₁) + bwd(c₂)``                     ``4 a_i``
zero            ``bwd(0) = 0``                                          ``a_i``
vmap            ``vmap(bwd)`` over 3 examples equals a loop over them    ``2 a_i``
deterministic   two runs on the same inputs give the same cotangents    ``rtol · M``
no_retrace      a second call of the same shapes (other values) does    no new trace
                not trace again: the whole VJP under ``jax.jit``; the
                backward alone called as it is (not the forward: an
                eager ``while_loop`` or ``scan`` retraces by design)
==============  ======================================================  ==================

A backward that adds a constant fails ``linear``, ``additive`` and ``zero``; one that normalises or
ignores the cotangent's scale fails ``linear``; one whose batching rule is wrong fails ``vmap``; one
that builds a new ``jax.jit`` function on every call (and so compiles every step) fails
``no_retrace``.
The dot-product identity ``⟨c, J u⟩ = ⟨Jᵀc, u⟩`` is the ``jvp`` row of the main check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._cache import cached_jit, memoized
from bpjax._trees import is_float, to_dtype
from bpjax._types import ArrayTree
from bpjax.check import CheckRow
from bpjax.check.tolerance import compare, explicit_tolerance, to_f64
from bpjax.testing._adapt import ManualVJP
from bpjax.testing._trees import host_map, manual_leaves, random_like

__all__ = ["CONTRACTS", "count_traces"]

CONTRACTS = ("linear", "additive", "zero", "vmap", "deterministic", "no_retrace")
"""The contract checks :func:`bpjax.testing.check_backward` runs by default, by name."""

_LABELS = {
    "linear": "linear: bwd(2c) = 2 bwd(c)",
    "additive": "additive: bwd(c1 + c2) = bwd(c1) + bwd(c2)",
    "zero": "zero: bwd(0) = 0",
    "vmap": "vmap: vmap(bwd) = loop",
    "deterministic": "deterministic: two runs equal",
    "no_retrace": "no retrace: jit traces once",
}
_VMAP_EXAMPLES = 3
_PERTURBATION = 0.1  # the extra examples' floating leaves are x (1 + 0.1 ξ), ξ ~ N(0, 1)


class Inputs(NamedTuple):
    """What the contracts run on."""

    primals: tuple[Any, ...]  # as passed to the manual VJP
    cotangent: ArrayTree  # c, the output's structure
    where: list[int]  # flat indices of the floating leaves checked
    names: list[str]  # their paths, for the rows
    allowed: list[float]  # their allowed errors in the working dtype
    seed: int  # for the extra cotangents and examples


def check(
    manual: Callable[..., Any],
    inputs: Inputs,
    contracts: Sequence[str],
    *,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    determinism_rtol: float,
) -> list[CheckRow]:
    """The rows of the named contracts for ``manual(primals, c) -> (out, cotangents)``."""
    run = wrap(manual)

    def cts(primals: tuple[Any, ...], c: ArrayTree) -> list[Any]:
        return _leaves(run(primals, c)[1], primals, inputs.where)

    p, c = inputs.primals, inputs.cotangent
    rng = np.random.default_rng(inputs.seed + 1)
    base = cts(p, c)
    rows: list[CheckRow] = []
    if "linear" in contracts:
        scaled = [2 * g for g in base]
        rows += _rows("linear", inputs, cts(p, host_map(lambda a: 2 * a, c)), scaled, factor=2)
    if "additive" in contracts:
        c2 = host_map(np.multiply, c, random_like(rng, c))
        summed = [g + h for g, h in zip(base, cts(p, c2), strict=True)]
        rows += _rows("additive", inputs, cts(p, host_map(np.add, c, c2)), summed, factor=4)
    if "zero" in contracts:
        rows += _rows("zero", inputs, cts(p, host_map(np.zeros_like, c)), [0 * g for g in base])
    examples = _examples(rng, p, c)
    if "vmap" in contracts:
        stacked_p, stacked_c = (_stack([e[i] for e in examples]) for i in (0, 1))
        batched = _leaves(wrap(_vmapped(manual))(stacked_p, stacked_c)[1], stacked_p, inputs.where)
        loop = [np.stack(gs) for gs in zip(*(cts(pk, ck) for pk, ck in examples), strict=True)]
        rows += _rows("vmap", inputs, batched, loop, factor=2)
    if "deterministic" in contracts:
        scale = max((float(np.max(np.abs(g), initial=0.0)) for g in base), default=0.0)
        rows += _rows("deterministic", inputs, cts(p, c), base, atol=determinism_rtol * scale)
    if "no_retrace" in contracts:
        rows.append(_retrace_row(manual, examples))
    return rows


def _leaves(cts: tuple[Any, ...], primals: tuple[Any, ...], where: list[int]) -> list[np.ndarray]:
    """Host float64 copies of the checked leaves' cotangents (zeros where the backward gave None).

    The main check has already failed a backward whose structure is wrong; here such a backward
    gets zeros, so every contract still has a row to show.
    """
    leaves, _ = manual_leaves(tuple(cts), primals)
    flat = jax.tree.leaves(primals)
    out = []
    for i in where:
        leaf = None if leaves is None else leaves[i]
        out.append(np.zeros(np.shape(flat[i])) if leaf is None else to_f64(leaf))
    return out


def _stack(trees: list[ArrayTree]) -> ArrayTree:
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *trees)


@memoized
def _vmapped(manual: Callable[..., Any]) -> Callable[..., Any]:
    return jax.vmap(manual)


def _examples(
    rng: np.random.Generator, primals: tuple[Any, ...], c: ArrayTree
) -> list[tuple[Any, Any]]:
    """The primals and cotangent, then perturbed copies: floating leaves ``x (1 + 0.1 ξ)``."""
    out = [(primals, c)]
    for _ in range(_VMAP_EXAMPLES - 1):
        perturbed = jax.tree.map(lambda x: _perturb(rng, x) if is_float(x) else x, primals)
        out.append((perturbed, host_map(np.multiply, c, random_like(rng, c))))
    return out


def _perturb(rng: np.random.Generator, x: Any) -> Any:
    noise = 1 + _PERTURBATION * rng.standard_normal(np.shape(x))
    return to_dtype(np.asarray(x, np.float64) * noise, x.dtype)


def _rows(
    contract: str,
    inputs: Inputs,
    got: list[Any],
    expected: list[Any],
    *,
    factor: float = 1.0,
    atol: float | None = None,
) -> list[CheckRow]:
    label = _LABELS[contract]
    rows = []
    for name, g, e, a in zip(inputs.names, got, expected, inputs.allowed, strict=True):
        allowed = factor * a if atol is None else atol
        row = compare(name, label, g, e, explicit_tolerance(0.0, allowed))
        if contract == "vmap" and not row.note:
            row = row._replace(note=f"{_VMAP_EXAMPLES} examples; the first index is the example")
        rows.append(row._replace(allowed=allowed))
    return rows


_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded by every top-level jit trace


def count_traces(fn: Callable[..., Any], *args: Any) -> int:
    """How many top-level ``jax.jit`` traces calling ``fn(*args)`` runs (``jax.monitoring``)."""
    count = [0]

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        del duration_secs, kwargs
        count[0] += event == _TRACE_EVENT

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(fn(*args))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return count[0]


def _retrace_row(manual: Callable[..., Any], examples: list[tuple[Any, Any]]) -> CheckRow:
    """A second call with the same shapes and other values traces nothing, jitted or not.

    Under the check's ``jax.jit`` the forward and the backward are one function, traced once: a
    retrace means unstable static metadata (a pytree's ``aux_data``, a weak type). Called as it is,
    only the backward is counted (a :class:`~bpjax.testing._adapt.ManualVJP` is run in its two
    halves): the forward runs first, outside the count, because an eager ``lax.while_loop``,
    ``lax.scan`` or ``shard_map`` traces its body on every call by design. A retrace there means
    the backward builds a new ``jax.jit`` function (or passes changing static arguments) on every
    call, and so compiles every step.
    """
    (p1, c1), (p2, c2) = examples[1], examples[2]  # made alike (device arrays), values apart
    jitted = cached_jit(manual)
    jitted(p1, c1)
    counts = [("under jax.jit", count_traces(jitted, p2, c2))]
    if isinstance(manual, ManualVJP):
        manual.backward(manual.forward(p1)[1], c1)
        _, state = manual.forward(p2)  # the forward's traces are not the backward's
        counts.append(("called as it is", count_traces(manual.backward, state, c2)))
    else:
        manual(p1, c1)
        counts.append(("called as it is", count_traces(manual, p2, c2)))
    retraces = [f"{name}: {again} new traces" for name, again in counts if again]
    note = (
        "; ".join(retraces) + " in the second call of the same shapes"
        if retraces
        else "the second call of the same shapes traced nothing, jitted or not"
    )
    return CheckRow(
        "backward", _LABELS["no_retrace"], float(len(retraces)), math.nan, None, not retraces,
        note=note, allowed=0.0,
    )  # fmt: skip
