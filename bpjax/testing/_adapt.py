"""The forms a hand-written VJP comes in, normalised to the one :func:`check_backward` runs.

:func:`bpjax.testing.check_backward` checks ``forward(*primals)`` where every primal is a pytree
of arrays, differentiated (its floating leaves) or held fixed. Real functions also take Python
values that must stay Python values (a callable, a float that selects a branch, a string), and
keyword arguments. :func:`adapt` binds those into the functions, so that the rest of the check
sees only *dynamic* primals:

- ``static_argnums``: positions of primals held fixed as they are (hashed, closed over: never
  converted with ``jnp.asarray`` nor traced by ``jax.jit``).
- ``nondiff_argnums``: the positions :class:`jax.custom_vjp` calls non-differentiable. They are
  static too, and the backward gets them first, as :meth:`jax.custom_vjp.defvjp` passes them:
  ``backward(*nondiff, residuals, cotangent)``, returning cotangents for the other primals only.
  A ``jax.custom_vjp`` or ``jax.custom_jvp`` checked with ``backward=None`` brings its own.
- ``kwargs``: keyword arguments of ``forward`` and ``reference``. A value whose leaves are all
  arrays is held fixed as arrays (one more dynamic primal, a dict, cast to float64 in the shadow
  like the other inputs, never differentiated); any other value is static.

With none of them the user's functions are used as they are. :class:`ManualVJP` is the manual VJP
split at its residuals, so that the ``no_retrace`` contract can count the traces of the backward
alone; :func:`output_structure` and :func:`cotangent_for` name what is wrong with an output or a
given cotangent before anything runs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._cache import memoized
from bpjax._trees import cast_floats, is_float
from bpjax._types import ArrayTree
from bpjax.testing._trees import random_like

__all__ = [
    "Form",
    "ManualVJP",
    "adapt",
    "cotangent_for",
    "leaf_paths",
    "manual_vjp",
    "output_structure",
]

_KWARGS = "kwargs"  # the name of the dynamic primal holding the array keyword arguments


class Form(NamedTuple):
    """A function normalised to dynamic primals (see the module docstring).

    Attributes:
      forward: ``forward(*primals) -> out`` (``backward=None``) or ``-> (out, residuals)``.
      backward: ``backward(residuals, c) -> cotangents``, one per dynamic primal, or ``None``.
      reference: ``reference(*primals) -> out``, plain JAX.
      primals: the dynamic primals, pytrees of arrays: the user's positional primals less the
        static ones, then (if any) a dict of the array keyword arguments.
      argnums: the positions among ``primals`` whose floating leaves are checked.
      names: the name of each dynamic primal, for the rows (``forward``'s parameter names).
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None
    reference: Callable[..., Any]
    primals: tuple[Any, ...]
    argnums: tuple[int, ...]
    names: tuple[str, ...]


class _Layout(NamedTuple):
    """Where the dynamic primals go among the user's arguments (hashable: a memoization key)."""

    n: int  # the user's positional primals
    static: tuple[tuple[int, Any], ...]  # (position, value) held fixed
    static_kwargs: tuple[tuple[str, Any], ...]  # (name, value) held fixed
    kwargs_slot: bool  # whether the last dynamic primal is the dict of array keyword arguments
    types: tuple[type, ...]  # of the static values: 1, 1.0 and True are equal keys, not equal args

    def merge(self, dynamic: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        """The user's ``(args, kwargs)`` for the dynamic primals."""
        static = dict(self.static)
        kwargs = dict(self.static_kwargs)
        if self.kwargs_slot:
            kwargs.update(dynamic[-1])
        it = iter(dynamic)
        return [static[i] if i in static else next(it) for i in range(self.n)], kwargs

    def dynamic_positions(self) -> list[int]:
        static = dict(self.static)
        return [i for i in range(self.n) if i not in static]


def positions(argname: str, value: Any, n: int) -> tuple[int, ...]:
    """``value`` (an int, a sequence of ints or ``None``) as sorted positions among ``n`` primals.

    Raises:
      TypeError: not an int or a sequence of ints.
      ValueError: a position outside ``-n ≤ i < n``.
    """
    if value is None:
        return ()
    try:
        nums = (value,) if isinstance(value, int) else tuple(value)
    except TypeError:
        nums = (value,)
    if isinstance(value, str) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in nums
    ):
        raise TypeError(
            f"{argname}: expected an int or a sequence of ints (positions among the primals), "
            f"got {value!r}."
        )
    if not all(-n <= i < n for i in nums):
        raise ValueError(f"{argname}: expected positions among the {n} primals, got {value!r}.")
    return tuple(sorted({i % n for i in nums}))


def primal_names(forward: Callable[..., Any], n: int) -> list[str]:
    """``forward``'s positional parameter names, or ``primals[i]`` where it has too few."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:n] if len(positional) >= n else [f"primals[{i}]" for i in range(n)]


def _own_nondiff(forward: Callable[..., Any]) -> tuple[int, ...] | None:
    """The ``nondiff_argnums`` of a ``jax.custom_vjp``/``jax.custom_jvp``, else ``None``."""
    if isinstance(forward, (jax.custom_vjp, jax.custom_jvp)):
        return tuple(forward.nondiff_argnums)
    return None


def _nondiff(
    forward: Callable[..., Any], backward: Callable[..., Any] | None, given: Any, n: int
) -> tuple[int, ...]:
    """The non-differentiable positions: given for a fwd/bwd pair, the function's own without."""
    nums = positions("nondiff_argnums", given, n)
    own = _own_nondiff(forward) if backward is None else None
    if own is None:
        if backward is None and nums:
            raise ValueError(
                "nondiff_argnums: they say which primals backward(*nondiff, residuals, cotangent) "
                "takes first, and backward is None; hold a primal of forward fixed with "
                "static_argnums."
            )
        return nums
    own = positions("nondiff_argnums", own, n)
    if given is not None and nums != own:
        raise ValueError(
            f"nondiff_argnums: forward is a {type(forward).__name__} with nondiff_argnums={own}, "
            f"got {given!r}."
        )
    return own


def _hashable(argname: str, value: Any) -> None:
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{argname}: a static value is hashed (jax.jit caches on it), and a "
            f"{type(value).__name__} is not hashable; pass an array as a primal held fixed "
            "(leave it out of argnums) or in kwargs, or a tuple for a list."
        ) from None


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split_kwargs(kwargs: Any) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """``kwargs`` as (static items, array items): a value whose leaves are all arrays is dynamic."""
    if kwargs is None:
        return (), {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"kwargs: expected a dict of keyword arguments by name, got {type(kwargs).__name__}."
        )
    static, arrays = [], {}
    for name, value in kwargs.items():
        leaves = jax.tree.leaves(value)
        if leaves and all(_is_array(x) for x in leaves):
            arrays[name] = jax.tree.map(jnp.asarray, value)
        else:
            _hashable(f"kwargs[{name!r}]", value)
            static.append((name, value))
    return tuple(sorted(static, key=lambda item: item[0])), arrays


def _as_arrays(primal: Any, where: str, position: int, checked: bool) -> Any:
    """A primal's leaves as arrays, naming one that is not (a Python value meant to be static)."""

    def leaf(path: Any, x: Any) -> Any:
        name = where + jax.tree_util.keystr(path)
        try:
            array = jnp.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(
                f"primals: {name} is a {type(x).__name__}, not an array; hold a Python value "
                f"fixed with static_argnums=({position},)."
            ) from None
        if checked and jnp.issubdtype(array.dtype, jnp.complexfloating):
            raise TypeError(
                f"primals: {name} is {array.dtype}: complex inputs are not supported (the check "
                "compares real cotangents); pass the real and imaginary parts as two real arrays, "
                "or hold it fixed (leave it out of argnums)."
            )
        return array

    return jax.tree_util.tree_map_with_path(leaf, primal)


def adapt(
    forward: Callable[..., Any],
    backward: Callable[..., Any] | None,
    reference: Callable[..., Any],
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] | None,
    static_argnums: int | Sequence[int] | None,
    nondiff_argnums: int | Sequence[int] | None,
    kwargs: Mapping[str, Any] | None,
) -> Form:
    """The :class:`Form` of a check: the functions bound to the static values, dynamic primals.

    Args:
      forward, backward, reference: the user's functions, taking all positional primals (and
        ``backward`` the ``nondiff`` ones first); ``reference`` already resolved.
      primals: the user's positional primals.
      argnums: the positions to check (default: every position not static).
      static_argnums: positions held fixed as Python values.
      nondiff_argnums: the non-differentiable positions of a fwd/bwd pair (see the module
        docstring); with ``backward=None``, ``forward``'s own.
      kwargs: keyword arguments of ``forward`` and ``reference``.

    Raises:
      TypeError: a misused argument, named: positions that are not ints, a static value that is not
        hashable, a primal leaf that is not an array, a complex checked leaf, ``kwargs`` not a dict.
      ValueError: a position out of range, a static position in ``argnums``, ``nondiff_argnums``
        that disagree with a ``jax.custom_vjp``'s own.
    """
    n = len(primals)
    nondiff = _nondiff(forward, backward, nondiff_argnums, n)
    static_nums = positions("static_argnums", static_argnums, n)
    for i in static_nums:
        _hashable(f"static_argnums: primals[{i}]", primals[i])
    static = sorted(set(static_nums) | set(nondiff))
    if argnums is None:
        checked = [i for i in range(n) if i not in static]
    else:
        checked = list(positions("argnums", argnums, n))
        if set(checked) & set(static):
            raise ValueError(
                f"argnums: positions {sorted(set(checked) & set(static))} are static "
                "(static_argnums or nondiff_argnums): held fixed, not checked."
            )
    static_kwargs, array_kwargs = _split_kwargs(kwargs)
    names = primal_names(forward, n)
    dynamic_pos = [i for i in range(n) if i not in static]
    dynamic = [_as_arrays(primals[i], names[i], i, i in checked) for i in dynamic_pos]
    dyn_names = [names[i] for i in dynamic_pos]
    if array_kwargs:
        dynamic.append(array_kwargs)
        dyn_names.append(_KWARGS)
    dyn_argnums = tuple(dynamic_pos.index(i) for i in checked)
    if not static and kwargs is None:  # the user's functions as they are (and their jit caches)
        return Form(forward, backward, reference, tuple(dynamic), dyn_argnums, tuple(dyn_names))
    values = tuple((i, primals[i]) for i in static)
    types = tuple(type(v) for _, v in (*values, *static_kwargs))
    layout = _Layout(n, values, static_kwargs, bool(array_kwargs), types)
    bound_backward = None if backward is None else _bind_backward(backward, layout, nondiff)
    return Form(
        _bind(forward, layout), bound_backward, _bind(reference, layout),
        tuple(dynamic), dyn_argnums, tuple(dyn_names),
    )  # fmt: skip


@memoized
def _bind(fn: Callable[..., Any], layout: _Layout) -> Callable[..., Any]:
    """``(*dynamic) -> fn(*args, **kwargs)`` with the static values in place."""

    def bound(*dynamic: Any) -> Any:
        args, kwargs = layout.merge(dynamic)
        return fn(*args, **kwargs)

    return bound


@memoized
def _bind_backward(
    backward: Callable[..., Any], layout: _Layout, nondiff: tuple[int, ...]
) -> Callable[..., Any]:
    """``(residuals, c) -> one cotangent per dynamic primal`` from ``backward(*nondiff, res, c)``.

    ``backward`` returns one cotangent per differentiable position (all but ``nondiff``, as
    :meth:`jax.custom_vjp.defvjp` expects); those of other static positions are dropped, and the
    dict of array keyword arguments gets ``None``. A wrong count is passed on as it is: the
    check's structure row names it.
    """
    static = dict(layout.static)
    nondiff_values = [static[i] for i in nondiff]
    differentiable = [i for i in range(layout.n) if i not in nondiff]
    dynamic = layout.dynamic_positions()

    def bound(residuals: Any, c: ArrayTree) -> tuple[Any, ...]:
        cts = backward(*nondiff_values, residuals, c)
        cts = tuple(cts) if isinstance(cts, (tuple, list)) else (cts,)
        if len(cts) != len(differentiable):
            return cts
        by_position = dict(zip(differentiable, cts, strict=True))
        out = tuple(by_position[i] for i in dynamic)
        return (*out, None) if layout.kwargs_slot else out

    return bound


def leaf_paths(
    names: Sequence[str], primals: Sequence[Any], argnums: Sequence[int]
) -> list[tuple[int, str]]:
    """``(flat index, path)`` of each floating leaf of the checked primals (``params[0]['W']``)."""
    out, flat = [], 0
    for i, primal in enumerate(primals):
        for path, leaf in jax.tree_util.tree_flatten_with_path(primal)[0]:
            if i in argnums and is_float(leaf):
                out.append((flat, names[i] + jax.tree_util.keystr(path)))
            flat += 1
    return out


@dataclasses.dataclass(frozen=True)
class ManualVJP:
    """The manual VJP ``(primals, c) -> (out, cotangents)``, split at its residuals.

    :meth:`forward` runs the forward (``forward(*primals)``, or ``jax.vjp`` of it w.r.t. the
    checked primals when there is no hand-written ``backward``) and :meth:`backward` the
    hand-written backward (or the ``jax.vjp`` pullback) on what it kept. Called, it runs both:
    equal objects for equal functions, so ``jax.jit`` of it hits the same cache.

    Attributes:
      fwd: ``forward(*primals)``: ``(out, residuals)`` with a backward, else ``out``.
      bwd: ``backward(residuals, c) -> cotangents`` (one per primal), or ``None``.
      argnums: the checked positions (those ``jax.vjp`` differentiates when ``bwd`` is None).
    """

    fwd: Callable[..., Any]
    bwd: Callable[..., Any] | None
    argnums: tuple[int, ...]

    def forward(self, primals: tuple[Any, ...]) -> tuple[Any, Any]:
        """``(out, state)``: the residuals, or the ``jax.vjp`` pullback and the primal count."""
        if self.bwd is not None:
            return self.fwd(*primals)

        def f(*checked: Any) -> Any:  # the other primals held fixed
            full = list(primals)
            for i, value in zip(self.argnums, checked, strict=True):
                full[i] = value
            return self.fwd(*full)

        out, pullback = jax.vjp(f, *(primals[i] for i in self.argnums))
        return out, (pullback, len(primals))

    def backward(self, state: Any, c: ArrayTree) -> tuple[Any, ...]:
        """One cotangent per primal (``None`` for those ``jax.vjp`` did not differentiate)."""
        if self.bwd is not None:
            cts = self.bwd(state, c)
            return tuple(cts) if isinstance(cts, (tuple, list)) else (cts,)
        pullback, n = state
        by_position = dict(zip(self.argnums, pullback(c), strict=True))
        return tuple(by_position.get(i) for i in range(n))

    def __call__(self, primals: tuple[Any, ...], c: ArrayTree) -> tuple[Any, tuple[Any, ...]]:
        out, state = self.forward(primals)
        return out, self.backward(state, c)


def manual_vjp(
    forward: Callable[..., Any], backward: Callable[..., Any] | None, argnums: tuple[int, ...]
) -> ManualVJP:
    """The :class:`ManualVJP` of a :class:`Form`'s ``forward``/``backward``."""
    return ManualVJP(forward, backward, tuple(argnums))


def _bad_leaves(out: Any, ok: Callable[[Any], bool]) -> list[tuple[str, Any]]:
    """``(path, dtype)`` of the output leaves that fail ``ok``."""
    return [
        (jax.tree_util.keystr(path), leaf.dtype)
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]
        if not ok(leaf)
    ]


def output_structure(reference: Callable[..., Any], primals: tuple[Any, ...]) -> Any:
    """The output's shapes and dtypes (a tree of ``jax.ShapeDtypeStruct``), checked.

    Every output leaf must be real floating (each gets a floating cotangent ``c``: an integer
    output has no cotangent to check), and must follow the inputs' dtype: the float64 shadow runs
    the forward on the inputs cast to float64 and needs float64 outputs back.

    Raises:
      TypeError: naming ``forward``, the output leaf and its dtype, and what was expected.
    """
    out = jax.eval_shape(reference, *primals)
    complex_ = _bad_leaves(out, lambda x: not jnp.issubdtype(x.dtype, jnp.complexfloating))
    if complex_:
        path, dtype = complex_[0]
        raise TypeError(
            f"forward: output{path} is {dtype}: complex outputs are not supported; return the "
            "real and imaginary parts as two real leaves."
        )
    integer = _bad_leaves(out, is_float)
    if integer:
        path, dtype = integer[0]
        raise TypeError(
            f"forward: expected floating outputs (the cotangent is floating), but output{path} is "
            f"{dtype}; return integer results as residuals, or check a wrapper without them."
        )
    with jax.enable_x64(True):
        out64 = jax.eval_shape(reference, *cast_floats(primals, jnp.float64))
    fixed = _bad_leaves(out64, lambda x: x.dtype == jnp.float64)
    structure: Any = jax.tree.structure(out64)
    if fixed or structure != jax.tree.structure(out):
        path, dtype = fixed[0] if fixed else ("", "of another structure")
        raise TypeError(
            f"forward: output{path} is {dtype} when the inputs are cast to float64; the float64 "
            "shadow expects outputs that follow the inputs' dtype (cast to x.dtype, not to a fixed "
            "dtype such as jnp.float32)."
        )
    return out


def cotangent_for(out: Any, cotangent: ArrayTree | None, seed: int) -> ArrayTree:
    """The output cotangent ``c``: ``cotangent`` checked against ``out``, or random normal.

    Raises:
      ValueError: ``cotangent`` is not the output's structure, or a leaf's shape or dtype differs.
    """
    if cotangent is None:
        return random_like(np.random.default_rng(seed), out)
    expected: Any = jax.tree.structure(out)
    got = jax.tree.structure(cotangent)
    if got != expected:
        raise ValueError(f"cotangent: structure {got}, expected the output's {expected}.")
    for (path, o), c in zip(
        jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(cotangent), strict=True
    ):
        shape, dtype = np.shape(c), jnp.result_type(c)
        if shape != o.shape or dtype != o.dtype:
            raise ValueError(
                f"cotangent{jax.tree_util.keystr(path)}: {dtype}{list(shape)}, expected the "
                f"output's {o.dtype}{list(o.shape)}."
            )
    return cotangent
