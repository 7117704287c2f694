"""The layer rows of the ``bpjax check`` matrix: a small serial network around each layer.

Every layer of :mod:`bpjax.layers` besides Dense (which the MLP rows cover) gets a tiny network
built with :func:`bpjax.serial`, in float32 and float64, checked with :func:`bpjax.check_network`:
the gradient against ``jax.grad``, ``jax.vjp``, ``jvp``, finite differences and the Taylor order,
each layer's recorded error against ``jax.vjp`` of the layers above it, and ``∂C/∂x`` (not for
integer inputs). Each network is the layer under test alone, or followed by a Dense layer where
the layer has no params of its own (MaxPool2D, AvgPool2D, Dropout), and ends in squared_error
against standard normal targets at every output position (Dropout: a sigmoid output and
binary_cross_entropy against soft targets): the layer's backward gets a generic output error, and
the harness's programs stay small. The Elman row has a target at every step, the LSTM row ends
with LastStep (many-to-one).

- ``Dropout`` is checked in training mode: the network's ``key=`` is a seeded PRNG key, and the
  manual and the reference passes draw the same mask from it.
- ``Elman`` and ``LSTM`` (full BPTT) are checked as they are: besides the gradient of every weight
  and the ``∂C/∂x`` they pass down, their row compares the per-step ``δ_t = ∂C_n/∂z_t`` the BPTT
  recursion records (an LSTM's four gate pre-activations) with ``jax.vjp`` of their
  ``forward_shifted`` (the forward with a shift added to every ``z_t``) in the shift at zero.

The params have ``net.init``'s shapes (traced, never run) and values drawn with numpy (standard
normal over the square root of each weight's fan-in, ``0.5 N(0, 1)`` for vectors such as biases
and LayerNorm's scale and offset, none of them at their special initial values); so do the inputs
and targets: no random kernels to compile per shape, and float32 and float64 check the same
numbers. The rows are seeded by ``--seed``.

Unlike the MLP rows, which share their shapes so that the harness's eager kernels serve every case,
each of these networks has shapes of its own: the harness runs them jitted (``jit=True``), a few
programs per network, compiled with XLA's fast settings. Compiling them is nearly all the cost,
2 to 8.5 CPU-seconds a layer for both dtypes (the LSTM's scans the most; an MLP case takes ~1.8).
A network's float32 and float64 rows are checked in the same worker, where the float64 row reuses
some of what the float32 row compiled (a float32 row measures its roundoff against float64).

Timing: as for the MLP rows, the jitted manual ``value_and_grad`` against jitted
``jax.value_and_grad(net.loss)`` (with the Dropout row's key), compiled with XLA's fast settings:
every one of these networks is dispatch-bound, far below 1 MFLOP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

_VOCAB = 7  # the Embedding row's vocabulary: tokens are integers in [0, _VOCAB)
_DROPOUT_RATE = 0.5


class LayerNetwork(NamedTuple):
    """How the row of one layer builds its network and its data."""

    label: str  # the row's name in the table: the layer's class name
    layers: Callable[[], tuple[Any, ...]]  # builds the network's layers (bpjax imported lazily)
    input_shape: tuple[int, ...]  # one example's shape
    output_shape: tuple[int, ...]  # one example's output shape
    loss: str
    targets: str  # "probabilities" (in [0, 1), for binary_cross_entropy) or "reals"
    tokens: bool = False  # integer inputs in [0, _VOCAB) rather than standard normal ones
    key: bool = False  # a training-mode forward with a PRNG key (Dropout)
    # CPU seconds to check the float32 and float64 rows, measured (2-core x86): spreads the layer
    # rows over the workers, nothing else
    cost: float = 5.0


def _conv2d() -> tuple[Any, ...]:
    from bpjax.layers import Conv2D

    return (Conv2D(3, 3, padding="SAME", activation="tanh"),)


def _maxpool2d() -> tuple[Any, ...]:
    from bpjax.layers import Dense, MaxPool2D

    # overlapping windows (3 × 3, stride 2) and padding: the errors of a cell chosen twice add up;
    # then a softmax over the channels at every position
    return MaxPool2D(3, 2, "SAME"), Dense(3)


def _avgpool2d() -> tuple[Any, ...]:
    from bpjax.layers import AvgPool2D, Dense

    return AvgPool2D(3, 2, "SAME"), Dense(3)


def _layernorm() -> tuple[Any, ...]:
    from bpjax.layers import LayerNorm

    return (LayerNorm(),)


def _residual() -> tuple[Any, ...]:
    from bpjax.layers import Dense, Residual

    return (Residual(Dense(4, "tanh"), Dense(4)),)


def _embedding() -> tuple[Any, ...]:
    from bpjax.layers import Embedding

    return (Embedding(_VOCAB, 3),)


def _dropout() -> tuple[Any, ...]:
    from bpjax.layers import Dense, Dropout

    return Dropout(_DROPOUT_RATE), Dense(3, "sigmoid")


def _elman() -> tuple[Any, ...]:
    from bpjax.rnn import Elman

    return (Elman(4),)  # many-to-many: a target at every step


def _lstm() -> tuple[Any, ...]:
    from bpjax.rnn import LSTM, LastStep

    return LSTM(4), LastStep()  # many-to-one


LAYER_NETWORKS: dict[str, LayerNetwork] = {
    "conv2d": LayerNetwork(
        "Conv2D", _conv2d, (4, 4, 2), (4, 4, 3), "squared_error", "reals", cost=2.6
    ),
    "maxpool2d": LayerNetwork(
        "MaxPool2D", _maxpool2d, (4, 4, 2), (2, 2, 3), "squared_error", "reals", cost=2.5
    ),
    "avgpool2d": LayerNetwork(
        "AvgPool2D", _avgpool2d, (4, 4, 2), (2, 2, 3), "squared_error", "reals", cost=2.2
    ),
    "layernorm": LayerNetwork(
        "LayerNorm", _layernorm, (3, 4), (3, 4), "squared_error", "reals", cost=2.6
    ),
    "residual": LayerNetwork("Residual", _residual, (4,), (4,), "squared_error", "reals", cost=2.5),
    "embedding": LayerNetwork(
        "Embedding", _embedding, (5,), (5, 3), "squared_error", "reals", tokens=True, cost=1.8
    ),
    "dropout": LayerNetwork(
        "Dropout", _dropout, (4,), (3,), "binary_cross_entropy", "probabilities", key=True, cost=5.1
    ),
    "elman": LayerNetwork("Elman", _elman, (5, 4), (5, 4), "squared_error", "reals", cost=4.8),
    "lstm": LayerNetwork("LSTM", _lstm, (5, 4), (4,), "squared_error", "reals", cost=8.5),
}
"""The layer rows, by the name ``--layers`` takes, in the order the table lists them."""


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer's row: its network (:data:`LAYER_NETWORKS`) in one dtype."""

    layer: str  # a key of LAYER_NETWORKS
    dtype: str  # "float32" or "float64"
    batch: int
    seed: int  # seeds the params, inputs, targets and the Dropout key; float32 and float64 share it

    @property
    def network(self) -> LayerNetwork:
        """How this row builds its network and its data."""
        return LAYER_NETWORKS[self.layer]


def build_layer_matrix(
    layers: Sequence[str], *, dtypes: Sequence[str], batch: int, seed: int
) -> list[LayerCase]:
    """A row per layer × dtype, in :data:`LAYER_NETWORKS` order (a dtype's rows together).

    Each layer's seed depends on its place in :data:`LAYER_NETWORKS`, not on the selection, so a
    restricted matrix reproduces the full one's rows.
    """
    cases = []
    for i, layer in enumerate(LAYER_NETWORKS):
        if layer in layers:
            case_seed = (seed * 100 + 50 + i) % 2**31
            cases += [LayerCase(layer, dtype, batch, case_seed) for dtype in dtypes]
    return cases


def shape_text(shape: Sequence[int]) -> str:
    """``4×4×2``: one example's shape."""
    return "×".join(str(n) for n in shape)


def layer_names(case: LayerCase) -> list[str]:
    """The names of the network's layers, input first, as the reports name them."""
    return [getattr(layer, "name", "") or type(layer).__name__ for layer in case.network.layers()]


def layer_net(case: LayerCase) -> Any:
    """The case's network, :func:`bpjax.serial` of its layers."""
    import bpjax as bp

    spec = case.network
    return bp.serial(*spec.layers(), loss=spec.loss, input_shape=spec.input_shape)


def _draw(rng: Any, shape: tuple[int, ...]) -> Any:
    """A weight (2 axes or more): N(0, 1) / √(size / shape[0]), ~ its fan-in; else 0.5 N(0, 1)."""
    import numpy as np

    values = rng.standard_normal(shape, np.float32)
    if len(shape) >= 2:
        return values / np.float32(np.sqrt(np.prod(shape[1:])))
    return np.float32(0.5) * values


def layer_case_data(case: LayerCase) -> tuple[Any, Any, Any, Any, Any]:
    """``(net, params, x, y, key)``; float32 and float64 cases get the same numbers.

    ``key`` is ``None`` but for the Dropout row, whose training-mode forward draws its mask from it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    spec = case.network
    net = layer_net(case)
    dtype = jnp.dtype(case.dtype)
    rng = np.random.default_rng(case.seed)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.float32))
    params = jax.tree.map(lambda s: jnp.asarray(_draw(rng, s.shape), dtype), shapes)
    x_shape = (case.batch, *spec.input_shape)
    if spec.tokens:
        x = jnp.asarray(rng.integers(0, _VOCAB, x_shape), jnp.int32)
    else:
        x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
    out = jax.eval_shape(net, params, x)
    if out.shape[1:] != spec.output_shape:
        raise AssertionError(
            f"the {spec.label} network's output has shape {out.shape[1:]} per example, "
            f"not the {spec.output_shape} of its row"
        )
    y_shape = (case.batch, *spec.output_shape)
    if spec.targets == "probabilities":
        y = jnp.asarray(rng.random(y_shape, np.float32), dtype)  # soft binary targets
    else:
        y = jnp.asarray(rng.standard_normal(y_shape, np.float32), dtype)
    key = jax.random.key(case.seed) if spec.key else None
    return net, params, x, y, key
