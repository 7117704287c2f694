"""Memoized builders of functions, so that checks called again hit ``jax.jit``'s cache."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["cached_jit", "jit_wrapper", "memoized"]


def memoized(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Memoizes a builder of functions on its (hashable) arguments.

    Building the same closure for the same user function on every call would make ``jax.jit``
    compile it again each time; an equal closure object hits JAX's cache instead. Unhashable
    arguments simply build afresh.
    """
    cached = functools.lru_cache(maxsize=128)(builder)

    def build(*args: Any) -> Any:
        try:
            return cached(*args)
        except TypeError:
            return builder(*args)

    return build


cached_jit = memoized(jax.jit)
"""``jax.jit``, returning the same jitted object for the same function."""


def jit_wrapper(jit: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`cached_jit` when ``jit``, else the identity (run eagerly)."""
    return cached_jit if jit else (lambda f: f)
