"""Type names used across bpjax, defined once."""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array
ArrayTree = Any  # a pytree whose leaves are arrays
Params = list[dict[str, Array]]  # one {"W": (n_l, n_{l-1}), "b": (n_l,)} per layer
Grads = Params  # gradients have the structure of the params
PRNGKey = jax.Array
