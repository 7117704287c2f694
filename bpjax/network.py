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
from bpjax.layers._core import check_layers, layer_forward, split_key
from bpjax.mlp import Backward

__all__ = ["Serial", "SerialCache", "serial"]


class SerialCache(NamedTuple):
    """What :meth:`Serial.forward` keeps for the backward pass."""

    layers: list[Any]  # one cache per layer, from its forward
    out: Array  # (batch, ..., n_out): the network's output


@dataclasses.dataclass(frozen=True)
class Serial:
    """A serial network spec: layers, loss and input shape, frozen and hashable.

    Build it with :func:`serial`. Params are a list with one pytree per layer; caches a list with
    one cache per layer. ``Backward.deltas[i]`` is layer ``i``'s per-example error, unscaled by
    ``1/B``: ``δ = ∂C_n/∂z`` for a layer with a weighted input (:class:`~bpjax.layers.Dense`),
    else ``∂C_n/∂y`` at its output.

    Outputs may have axes between the batch and the features, ``(batch, ..., n_out)`` (a sequence
    model's time steps): the loss then takes targets ``(batch, ...)`` (labels) or
    ``(batch, ..., n_out)``, and ``C_n`` is the mean over those positions, so ``C`` is the mean
    over all ``batch × positions`` outputs.

    ``forward``, ``loss``, ``per_example_loss`` and ``value_and_grad`` take ``key=``: a PRNG key
    for the layers that draw randomness in training (:class:`~bpjax.layers.Dropout`), one
    ``fold_in`` per layer position; ``None`` (the default) is evaluation mode.
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

    def forward(
        self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, SerialCache]:
        """The output ``(batch, *out_shape)`` and a :class:`SerialCache`."""
        x = self._check_inputs(params, x)
        caches = []
        keys = split_key(key, len(self.layers))
        for layer, layer_params, layer_key in zip(self.layers, params, keys, strict=True):
            x, cache = layer_forward(layer, layer_params, x, layer_key)
            caches.append(cache)
        return x, SerialCache(caches, x)

    def __call__(self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None) -> Array:
        """The network's output."""
        return self.forward(params, x, key=key)[0]

    def _output_loss(self, cache: SerialCache, y: Array) -> Array:
        """``C_n``, shape ``(batch,)``: the mean of the loss over each example's positions."""
        out = cache.out
        fused = self.fused
        if fused is not None:
            per_position = fused.value(_positions(cache.layers[-1].z), y)
        else:
            flat = _positions(out)
            per_position = self.objective.value(flat, flat, y)
        return jnp.mean(per_position.reshape(out.shape[0], -1), axis=1)

    def per_example_loss(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> Array:
        """``C_n`` for each example, shape ``(batch,)``: plain JAX, from the forward maths."""
        out, cache = self.forward(params, x, key=key)
        return self._output_loss(cache, self._check_targets(y, out))

    def loss(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> Array:
        """The batch-mean loss ``C = (1/B) Σ_n C_n``: the plain-JAX reference for autodiff."""
        return jnp.mean(self.per_example_loss(params, x, y, key=key))

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

    def value_and_grad(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, list[Any]]:
        """The batch-mean loss and its gradient, by the forward pass and the δ-recursion."""
        out, cache = self.forward(params, x, key=key)
        y = self._check_targets(y, out)
        loss = jnp.mean(self._output_loss(cache, y))
        grads, _, _ = self._backprop(params, cache, y)
        return loss, grads

    def _backprop(
        self, params: Sequence[Any], cache: SerialCache, y: Array
    ) -> tuple[list[Any], list[Array], Array | None]:
        out = cache.out
        # the mean's 1/(B·positions), applied once to the output error
        scale = 1.0 / (out.size // out.shape[-1])
        fused = self.fused
        if fused is not None:
            last = cache.layers[-1]
            delta = fused.delta(_positions(last.z), _positions(last.a), y) * scale
            return backprop(
                self.layers, params, cache.layers, output_delta=delta.reshape(out.shape)
            )
        flat = _positions(out)
        error = self.objective.grad(flat, flat, y) * scale
        return backprop(self.layers, params, cache.layers, output_error=error.reshape(out.shape))

    # -- checks at trace time --------------------------------------------------------------

    def _check_inputs(self, params: Sequence[Any], x: Array) -> Array:
        leaves = jax.tree.leaves(params)
        x_dtype = jnp.result_type(x)
        integer_input = getattr(self.layers[0], "integer_input", False)
        if integer_input and not jnp.issubdtype(x_dtype, jnp.integer):
            raise TypeError(
                f"x: the first layer ({type(self.layers[0]).__name__}) takes integer inputs, "
                f"got dtype {x_dtype}; cast them with x.astype(jnp.int32)."
            )
        if not integer_input and not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(f"x: expected floating inputs, got dtype {x_dtype}; cast them first.")
        shape = jnp.shape(x)
        if tuple(shape[1:]) != self.input_shape or len(shape) != len(self.input_shape) + 1:
            raise ValueError(
                f"x: expected shape (batch, {', '.join(map(str, self.input_shape))}), got {shape}."
            )
        default_dtype = jnp.float32 if integer_input else x_dtype
        dtype = jnp.result_type(*leaves) if leaves else default_dtype
        expected = jax.eval_shape(lambda: self.init(jax.random.key(0), dtype))
        problems = _tree_problems(params, expected)
        if problems:
            raise ValueError(
                "params: do not match the network's layers:\n  "
                + "\n  ".join(problems)
                + "\nBuild them with net.init(key) or match its shapes."
            )
        return jnp.asarray(x) if integer_input else jnp.asarray(x).astype(dtype)

    def _check_targets(self, y: Array, out: Array) -> Array:
        """``y`` flattened to one target per output position, as the loss takes it."""
        targets = self.objective.targets
        if out.ndim < 2:
            raise ValueError(
                f"the network's output has shape {out.shape}; losses take (batch, ..., n_out): "
                "end the network with a Dense layer."
            )
        y = jnp.asarray(y)
        lead, n_out = out.shape[:-1], out.shape[-1]
        positions = out.size // n_out
        if out.ndim > 2:
            if y.shape[: len(lead)] != lead or y.ndim not in (len(lead), len(lead) + 1):
                raise ValueError(
                    f"y: the network's output has shape {out.shape}; expected targets of shape "
                    f"{lead} (labels) or {out.shape}, got {y.shape}."
                )
            y = y.reshape(positions, *y.shape[len(lead) :])
        if targets is None:
            return y
        return targets(y, positions, n_out, out.dtype)


def _positions(out: Array) -> Array:
    """``(batch, ..., n)`` as ``(batch·positions, n)``: one row per output position."""
    return out.reshape(-1, out.shape[-1])


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
    check_layers(layers)
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
