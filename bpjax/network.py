"""Serial networks of layers with hand-written backward passes: :func:`serial`.

A network ``serial(L_1, ..., L_k, loss=..., input_shape=...)`` has the methods of
:class:`bpjax.MLP` (``init``, ``loss``, ``forward``, ``backward``, ``value_and_grad``); its
backward is :func:`bpjax.layers.backprop`, the same δ-recursion the MLP runs. Any object with the
layer contract of :mod:`bpjax.layers` can be a layer, a user's own included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax import losses as _losses
from bpjax._types import Array, PRNGKey
from bpjax.layers import Dense, backprop
from bpjax.mlp import Backward

__all__ = ["Serial", "SerialCache", "serial"]

_LAYER_METHODS = ("init", "forward", "backward")


class SerialCache(NamedTuple):
    """What :meth:`Serial.forward` keeps for the backward pass."""

    layers: list[Any]  # one cache per layer, from its forward
    out: Array  # (batch, n_out): the network's output


@dataclasses.dataclass(frozen=True)
class Serial:
    """A serial network spec: layers, loss and input shape, frozen and hashable.

    Build it with :func:`serial`. Params are a list with one pytree per layer; caches a list with
    one cache per layer. ``Backward.deltas[i]`` is layer ``i``'s per-example error, unscaled by
    ``1/B``: ``δ = ∂C_n/∂z`` for a layer with a weighted input (:class:`~bpjax.layers.Dense`),
    else ``∂C_n/∂y`` at its output.
    """

    layers: tuple[Any, ...]
    objective: _losses.Loss
    input_shape: tuple[int, ...]
    fuse_output: bool = True

    @property
    def fused(self) -> _losses.FusedOutput | None:
        """The fused output pair in use (a last Dense layer with a canonical loss), or ``None``."""
        last = self.layers[-1]
        if not self.fuse_output or not isinstance(last, Dense):
            return None
        return _losses.fused_output(last.activation, self.objective)

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> list[Any]:
        """Each layer's params, initialised in order from ``input_shape``."""
        shape = self.input_shape
        params = []
        for k, layer in zip(jax.random.split(key, len(self.layers)), self.layers, strict=True):
            layer_params, shape = layer.init(k, shape, dtype)
            params.append(layer_params)
        return params

    def forward(self, params: Sequence[Any], x: Array) -> tuple[Array, SerialCache]:
        """The output ``(batch, *out_shape)`` and a :class:`SerialCache`."""
        x = self._check_inputs(params, x)
        caches = []
        for layer, layer_params in zip(self.layers, params, strict=True):
            x, cache = layer.forward(layer_params, x)
            caches.append(cache)
        return x, SerialCache(caches, x)

    def __call__(self, params: Sequence[Any], x: Array) -> Array:
        """The network's output."""
        return self.forward(params, x)[0]

    def _output_loss(self, cache: SerialCache, y: Array) -> Array:
        fused = self.fused
        if fused is not None:
            return fused.value(cache.layers[-1].z, y)
        return self.objective.value(cache.out, cache.out, y)

    def per_example_loss(self, params: Sequence[Any], x: Array, y: Array) -> Array:
        """``C_n`` for each example, shape ``(batch,)``: plain JAX, from the forward maths."""
        out, cache = self.forward(params, x)
        return self._output_loss(cache, self._check_targets(y, out))

    def loss(self, params: Sequence[Any], x: Array, y: Array) -> Array:
        """The batch-mean loss ``C = (1/B) Σ_n C_n``: the plain-JAX reference for autodiff."""
        return jnp.mean(self.per_example_loss(params, x, y))

    def backward(self, params: Sequence[Any], cache: SerialCache, y: Array) -> Backward:
        """The δ-recursion: batch-mean grads, per-example errors and ``∂C/∂x``.

        Args:
          params: as from :meth:`init`.
          cache: from :meth:`forward` on the same params.
          y: targets as :meth:`loss` takes them.
        """
        grads, errors, input_grad = self._backprop(params, cache, self._check_targets(y, cache.out))
        batch = cache.out.shape[0]
        return Backward(grads, [e * batch for e in errors], input_grad)

    def value_and_grad(self, params: Sequence[Any], x: Array, y: Array) -> tuple[Array, list[Any]]:
        """The batch-mean loss and its gradient, by the forward pass and the δ-recursion."""
        out, cache = self.forward(params, x)
        y = self._check_targets(y, out)
        loss = jnp.mean(self._output_loss(cache, y))
        grads, _, _ = self._backprop(params, cache, y)
        return loss, grads

    def _backprop(
        self, params: Sequence[Any], cache: SerialCache, y: Array
    ) -> tuple[list[Any], list[Array], Array]:
        scale = 1.0 / cache.out.shape[0]  # the batch mean's 1/B, applied once to the output error
        fused = self.fused
        if fused is not None:
            last = cache.layers[-1]
            delta = fused.delta(last.z, last.a, y) * scale
            return backprop(self.layers, params, cache.layers, output_delta=delta)
        error = self.objective.grad(cache.out, cache.out, y) * scale
        return backprop(self.layers, params, cache.layers, output_error=error)

    # -- checks at trace time --------------------------------------------------------------

    def _check_inputs(self, params: Sequence[Any], x: Array) -> Array:
        leaves = jax.tree.leaves(params)
        x_dtype = jnp.result_type(x)
        if not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(f"x: expected floating inputs, got dtype {x_dtype}; cast them first.")
        shape = jnp.shape(x)
        if tuple(shape[1:]) != self.input_shape or len(shape) != len(self.input_shape) + 1:
            raise ValueError(
                f"x: expected shape (batch, {', '.join(map(str, self.input_shape))}), got {shape}."
            )
        expected = jax.eval_shape(lambda: self.init(jax.random.key(0), x_dtype))
        problems = _tree_problems(params, expected)
        if problems:
            raise ValueError(
                "params: do not match the network's layers:\n  "
                + "\n  ".join(problems)
                + "\nBuild them with net.init(key) or match its shapes."
            )
        dtype = jnp.result_type(*leaves) if leaves else x_dtype
        return jnp.asarray(x).astype(dtype)

    def _check_targets(self, y: Array, out: Array) -> Array:
        targets = self.objective.targets
        if targets is None:
            return jnp.asarray(y)
        if out.ndim != 2:
            raise ValueError(
                f"the network's output has shape {out.shape}; losses take (batch, n_out): "
                "end the network with a Dense layer."
            )
        return targets(y, out.shape[0], out.shape[1], out.dtype)


def _tree_problems(params: Any, expected: Any) -> list[str]:
    """Every way ``params`` differs from ``expected`` (a tree of ShapeDtypeStructs) in shape."""
    try:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    except Exception as err:  # a params object JAX cannot flatten
        return [f"cannot read the params as a pytree: {err}"]
    flat_expected, treedef_expected = jax.tree_util.tree_flatten_with_path(expected)
    if treedef != treedef_expected:  # type: ignore[operator]
        return [f"expected the tree {treedef_expected}, got {treedef}."]
    problems = []
    for (path, leaf), (_, want) in zip(flat, flat_expected, strict=True):
        if jnp.shape(leaf) != want.shape:
            problems.append(
                f"params{jax.tree_util.keystr(path)}: expected shape {want.shape}, "
                f"got {jnp.shape(leaf)}."
            )
        elif not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            problems.append(
                f"params{jax.tree_util.keystr(path)}: expected a floating dtype, "
                f"got {jnp.result_type(leaf)}."
            )
    return problems


def serial(
    *layers: Any,
    loss: str | _losses.Loss,
    input_shape: Sequence[int],
    fuse_output: bool = True,
) -> Serial:
    """A network of ``layers`` in series, ending in ``loss``.

    Args:
      *layers: objects with the layer contract of :mod:`bpjax.layers` (``init``, ``forward``,
        ``backward``), input first.
      loss: a loss name from :data:`bpjax.LOSSES` or a :class:`bpjax.Loss`.
      input_shape: one example's shape, without the batch axis, e.g. ``(n_0,)``.
      fuse_output: use the fused output error when the last layer is a Dense layer whose
        activation is the loss's canonical partner.

    Returns:
      A :class:`Serial` with ``init``, ``loss``, ``forward``, ``backward``, ``value_and_grad``.

    Raises:
      ValueError: no layers, a bad ``input_shape``, an unknown loss, or a last Dense activation
        the loss is not defined on.
      TypeError: a layer without ``init``, ``forward`` and ``backward``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax.layers import Dense
      >>> net = serial(Dense(4, "tanh"), Dense(2, "softmax"), loss="cross_entropy",
      ...              input_shape=(3,))
      >>> params = net.init(jax.random.key(0))
      >>> loss, grads = jax.jit(net.value_and_grad)(params, jnp.ones((5, 3)), jnp.zeros(5, int))
      >>> [g["W"].shape for g in grads]
      [(4, 3), (2, 4)]
    """
    if not layers:
        raise ValueError("layers: expected at least one layer, got none.")
    for i, layer in enumerate(layers):
        missing = [m for m in _LAYER_METHODS if not callable(getattr(layer, m, None))]
        if missing:
            raise TypeError(
                f"layers[{i}]: expected a layer with init, forward and backward, got "
                f"{type(layer).__name__} without {', '.join(missing)}."
            )
    shape = tuple(input_shape)
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"input_shape: expected positive integers, got {input_shape!r}.")
    objective = _losses.get_loss(loss)
    last = layers[-1]
    if (
        isinstance(last, Dense)
        and objective.accepts is not None
        and last.activation.output not in objective.accepts
    ):
        raise ValueError(
            f"layers[-1]: the loss {objective.name!r} is defined on outputs that are "
            f"{' or '.join(sorted(objective.accepts))} but the output activation "
            f"{last.activation.name!r} gives {last.activation.output} values."
        )
    return Serial(tuple(layers), objective, shape, bool(fuse_output))
