"""The layer contract and the one δ-recursion that chains layers: :func:`backprop`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from bpjax._types import Array, PRNGKey

__all__ = [
    "Layer",
    "backprop",
    "chain_forward",
    "chain_init",
    "check_layers",
    "layer_forward",
    "split_key",
]


class Layer(NamedTuple):
    """A layer built from three pure functions: the contract of :mod:`bpjax.layers`, spelled out.

    Any object with ``init``, ``forward`` and ``backward`` is a layer; this NamedTuple builds one
    from plain functions (optax's ``GradientTransformation`` habit), so a user's layer needs no
    class. Keep the functions module-level (or otherwise stable): the layer is part of a
    network's hashable spec, and ``jax.jit`` caches on it. The optional parts of the contract
    for a weighted input (``delta``, ``backward_delta`` and ``forward_shifted``, see
    :mod:`bpjax.layers`) are not among its fields: such a layer is a class (as
    :class:`~bpjax.layers.Dense` and :class:`~bpjax.layers.Elman` are); wrapped in a ``Layer``,
    it records and is checked as a layer without them.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scale = Layer(
      ...     init=lambda key, shape, dtype: ({"s": jnp.ones(shape, dtype)}, shape),
      ...     forward=lambda params, x: (x * params["s"], x),  # y = x ∘ s, cache x
      ...     backward=lambda params, x, dy: ({"s": (dy * x).sum(0)}, dy * params["s"]),
      ... )
      >>> params, out_shape = scale.init(jax.random.key(0), (3,), jnp.float32)
      >>> y, cache = scale.forward(params, jnp.ones((2, 3)))
      >>> scale.backward(params, cache, jnp.ones((2, 3)))[0]["s"].tolist()
      [2.0, 2.0, 2.0]
    """

    init: Callable[..., tuple[Any, tuple[int, ...]]]
    """``init(key, in_shape, dtype) -> (params, out_shape)``, shapes without the batch axis."""
    forward: Callable[..., tuple[Array, Any]]
    """``forward(params, x) -> (y, cache)``; with ``needs_key``, ``forward(params, x, key=...)``."""
    backward: Callable[..., tuple[Any, Array | None]]
    """``backward(params, cache, dy) -> (grads, dx)``: the VJP, ``dy = ∂C/∂y``, ``dx = ∂C/∂x``."""
    needs_key: bool = False
    """Whether ``forward`` takes ``key=`` (a PRNG key in training, ``None`` in evaluation)."""
    integer_input: bool = False
    """Whether the layer takes integer inputs (indices); its ``backward`` returns ``dx=None``."""
    name: str = ""
    """What reports call the layer (``check_network``'s summary); its type's name when empty."""


_LAYER_METHODS = ("init", "forward", "backward")


def check_layers(layers: Sequence[Any]) -> None:
    """Raises ``TypeError`` naming the first of ``layers`` without init, forward, backward."""
    for i, layer in enumerate(layers):
        missing = [m for m in _LAYER_METHODS if not callable(getattr(layer, m, None))]
        if missing:
            raise TypeError(
                f"layers[{i}]: expected a layer with init, forward and backward, got "
                f"{type(layer).__name__} without {', '.join(missing)}."
            )


def layer_forward(layer: Any, params: Any, x: Array, key: PRNGKey | None) -> tuple[Array, Any]:
    """``layer.forward(params, x)``, handing ``key`` on to a layer that declares ``needs_key``."""
    if getattr(layer, "needs_key", False):
        return layer.forward(params, x, key=key)
    return layer.forward(params, x)


def split_key(key: PRNGKey | None, count: int) -> list[PRNGKey | None]:
    """One key per layer (``fold_in`` by position), or ``None`` for each in evaluation mode."""
    if key is None:
        return [None] * count
    return [jax.random.fold_in(key, i) for i in range(count)]


def chain_init(
    layers: Sequence[Any], key: PRNGKey, in_shape: tuple[int, ...], dtype: Any
) -> tuple[list[Any], tuple[int, ...]]:
    """Each layer's params, initialised in order from ``in_shape``: a chain of ``init`` calls.

    Returns:
      ``(params, out_shape)``: a list with one params pytree per layer, and the last layer's
      output shape (without the batch axis).
    """
    shape = tuple(in_shape)
    params = []
    for layer_key, layer in zip(jax.random.split(key, len(layers)), layers, strict=True):
        layer_params, shape = layer.init(layer_key, shape, dtype)
        params.append(layer_params)
    return params, tuple(shape)


def chain_forward(
    layers: Sequence[Any], params: Sequence[Any], x: Array, key: PRNGKey | None
) -> tuple[Array, list[Any]]:
    """The layers' forwards in series: ``y = L_k(… L_1(x))``, and one cache per layer.

    ``key`` is split by position (:func:`split_key`) for the layers that take one; ``None`` is
    evaluation mode. The caches are what :func:`backprop` takes back.
    """
    caches = []
    for layer, layer_params, layer_key in zip(
        layers, params, split_key(key, len(layers)), strict=True
    ):
        x, cache = layer_forward(layer, layer_params, x, layer_key)
        caches.append(cache)
    return x, caches


def backprop(
    layers: Sequence[Any],
    params: Sequence[Any],
    caches: Sequence[Any],
    *,
    output_error: Array | None = None,
    output_delta: Array | None = None,
) -> tuple[list[Any], list[Array], Array | None]:
    """The δ-recursion over a serial composition: one reversed loop over the layers.

    Layer ``i`` gets ``dy`` = the ``dx`` of layer ``i + 1``. A layer with a weighted input
    (``delta``/``backward_delta``) records ``δ = ∂C/∂z``; any other layer records the ``dy`` it
    received.

    Args:
      layers: the layers, input first.
      params: one params pytree per layer.
      caches: one cache per layer, from its ``forward``.
      output_error: ``∂C/∂y`` of the last layer's output, or
      output_delta: ``δ`` of the last layer directly (a fused output pair); exactly one is given.

    Returns:
      ``(grads, errors, input_grad)``: grads per layer, the error recorded at each layer (scaled
      as the given output error is), and ``∂C/∂x`` of the first layer's input (``None`` when the
      first layer takes integer inputs, such as :class:`~bpjax.layers.Embedding`).
    """
    if (output_error is None) == (output_delta is None):
        raise ValueError("backprop: pass exactly one of output_error and output_delta.")
    n = len(layers)
    grads: list[Any] = [None] * n
    errors: list[Any] = [None] * n
    dy = output_error
    for i in reversed(range(n)):
        layer, cache = layers[i], caches[i]
        if i == n - 1 and output_delta is not None:
            delta = output_delta
        elif hasattr(layer, "backward_delta"):
            delta = layer.delta(cache, dy)  # δ^l = J_{f^l}ᵀ (δ^{l+1} W^{l+1})
        else:
            errors[i] = dy
            grads[i], dy = layer.backward(params[i], cache, dy)
            continue
        errors[i] = delta
        grads[i], dy = layer.backward_delta(params[i], cache, delta)
    return grads, errors, dy
