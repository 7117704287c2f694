"""The MLP rows of the ``bpjax check`` matrix: every activation × every loss × dtype.

Each :class:`Case` is a random MLP (:func:`build_matrix`) with its params, inputs and targets
(:func:`case_data`); float32 and float64 cases of one activation × loss pair check the same
numbers. Every case shares one set of layer widths (each depth is a prefix of one architecture), so
that the harness's eager kernels, compiled once per shape and dtype, serve every case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

DTYPES = ("float32", "float64")
"""The dtypes the matrix checks, in the order the table lists them."""
# the output activation each loss is checked with; None: the activation under test itself
_OUTPUT_FOR_LOSS = {
    "squared_error": None,
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
}
_DEPTHS = (1, 2, 3, 4)


# -- the matrix ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One network to check: an activation under test, a loss, a dtype and an architecture."""

    activation: str  # the activation under test (hidden layers, and the output for squared_error)
    loss: str
    dtype: str  # "float32" or "float64"
    sizes: tuple[int, ...]  # (n_0, ..., n_L)
    batch: int
    targets: str  # "labels", "probabilities" or "reals"
    seed: int  # seeds the params, inputs and targets; float32 and float64 share it

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation of each layer."""
        output = _OUTPUT_FOR_LOSS[self.loss] or self.activation
        return (self.activation,) * (len(self.sizes) - 2) + (output,)


def _random_widths(seed: int) -> tuple[int, int, int]:
    """``(n_0, hidden, n_L)``: seeded random widths shared by every case of the matrix."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_in, hidden, n_out = (int(v) for v in rng.integers((3, 5, 2), (9, 13, 6)))
    return n_in, hidden, n_out


def build_matrix(
    *,
    activations: Sequence[str],
    losses: Sequence[str],
    dtypes: Sequence[str],
    sizes: tuple[int, ...] | None,
    batch: int,
    seed: int,
) -> tuple[list[Case], list[str]]:
    """Every activation × loss × dtype, with its architecture and targets.

    The activation × loss pairs are numbered ``i`` in registry order (so a restricted matrix
    reproduces the full one's rows). Without ``sizes``, pair ``i`` has depth ``1 + i mod 4`` on
    seeded random widths ``(n_0, h, …, h, n_L)``, at least two layers where the loss fixes the
    output activation, so that the activation under test is in the network. With ``sizes`` every
    case uses it; pairs whose only layer would be the loss's fixed output are skipped.
    cross_entropy takes integer labels for even-numbered activations and probabilities for odd.

    Returns:
      ``(cases, skipped)``: the cases and a line per skipped activation × loss pair.
    """
    import bpjax as bp

    n_in, hidden, n_out = _random_widths(seed)
    cases, skipped = [], []
    for activation in activations:
        i_act = list(bp.ACTIVATIONS).index(activation)
        for loss in losses:
            i = i_act * len(_OUTPUT_FOR_LOSS) + list(_OUTPUT_FOR_LOSS).index(loss)
            output = _OUTPUT_FOR_LOSS[loss]
            uses_activation = output is None or output == activation
            if sizes is None:
                depth = _DEPTHS[i % len(_DEPTHS)]
                if depth == 1 and not uses_activation:
                    depth = 2
                case_sizes = (n_in, *([hidden] * (depth - 1)), n_out)
            elif len(sizes) == 2 and not uses_activation:
                skipped.append(f"{activation} × {loss}: its one layer would be the {output} output")
                continue
            else:
                case_sizes = sizes
            if loss == "cross_entropy":
                targets = "labels" if i_act % 2 == 0 else "probabilities"
            elif loss == "binary_cross_entropy":
                targets = "probabilities"
            else:
                targets = "reals"
            case_seed = (seed * 100 + i) % 2**31
            cases += [
                Case(activation, loss, dtype, case_sizes, batch, targets, case_seed)
                for dtype in dtypes
            ]
    return cases, skipped


def case_data(case: Case) -> tuple[Any, Any, Any, Any]:
    """``(net, params, x, y)`` for a case; float32 and float64 cases get the same numbers.

    The weights are ``net.init``'s in float32, cast to the case's dtype; the biases, inputs and
    targets are drawn with numpy (no random kernels to compile per shape and dtype). The biases
    are standard normal, not init's zeros: with zero biases, an example whose previous layer is all
    dead ReLUs has ``z = b = 0`` exactly, on the next ReLU's kink, where the loss is not
    differentiable and finite differences disagree with any gradient.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bpjax as bp

    net = bp.MLP(case.sizes, case.activations, case.loss)
    dtype = jnp.dtype(case.dtype)
    rng = np.random.default_rng(case.seed)
    params = [
        {
            "W": layer["W"].astype(dtype),
            "b": jnp.asarray(rng.standard_normal(layer["b"].shape, np.float32), dtype),
        }
        for layer in net.init(jax.random.key(case.seed), jnp.float32)
    ]
    n_in, n_out, batch = case.sizes[0], case.sizes[-1], case.batch
    x = jnp.asarray(rng.standard_normal((batch, n_in), np.float32), dtype)
    if case.targets == "labels":
        y = jnp.asarray(rng.integers(0, n_out, batch), jnp.int32)
    elif case.targets == "probabilities" and case.loss == "cross_entropy":
        logits = rng.standard_normal((batch, n_out), np.float32)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        y = jnp.asarray(p / p.sum(axis=-1, keepdims=True), dtype)  # rows on the simplex
    elif case.targets == "probabilities":
        y = jnp.asarray(rng.random((batch, n_out), np.float32), dtype)  # soft binary targets
    else:
        y = jnp.asarray(rng.standard_normal((batch, n_out), np.float32), dtype)
    return net, params, x, y
