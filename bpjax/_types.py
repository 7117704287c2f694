"""Type names used across bpjax, defined once."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

Array = jax.Array
ArrayTree = Any  # a pytree whose leaves are arrays
Params = list[dict[str, Array]]  # one {"W": (n_l, n_{l-1}), "b": (n_l,)} per layer
Grads = Params  # gradients have the structure of the params
PRNGKey = jax.Array


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool): a size read from an array."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy real number (not a bool): a rate, an epsilon."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
