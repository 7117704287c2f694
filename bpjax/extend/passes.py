"""What every :mod:`bpjax.extend` quantity shares: the checked net, the passes, the jit wrapper.

A quantity of :mod:`bpjax.extend` is a contraction of the forward's per-layer inputs
``a^{l-1}_n`` and the δ-recursion's per-example errors ``δ^l_n``; this module produces both
through the network protocol of :mod:`bpjax.network` (``forward``, ``check_targets``,
``output_error``, ``backprop``), so an :class:`~bpjax.MLP` and a :func:`~bpjax.serial` network of
Dense layers take the one code path. :mod:`bpjax.check.curvature` and :mod:`bpjax.parallel` build
on the same helpers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import losses as _losses
from bpjax._types import Array, Params
from bpjax.layers import Dense, DenseCache
from bpjax.network import Cache, OutputError

__all__ = [
    "ForwardPass",
    "check_like_params",
    "check_net",
    "check_positive",
    "compiled",
    "example_deltas",
    "factor_deltas",
    "forward",
    "loss_from_z",
]


class ForwardPass(NamedTuple):
    """The forward pass of a network of Dense layers, and the checked targets."""

    cache: Cache  # the network's cache: cache.layers[l-1] is DenseCache(a^{l-1}, z^l, a^l)
    y: Array  # targets as the loss takes them (net.check_targets)

    @property
    def caches(self) -> list[DenseCache]:
        """A :class:`~bpjax.layers.DenseCache` per layer: ``x: (batch, n_{l-1})``, z, a."""
        return self.cache.layers

    @property
    def z(self) -> Array:
        """``z^L``, the output layer's weighted input, shape ``(batch, n_L)``."""
        return self.cache.layers[-1].z


def check_net(net: Any, *, purpose: str = "bpjax.extend works on") -> tuple[Dense, ...]:
    """``net``'s layers, or a ``TypeError`` unless it is a network of Dense layers on vectors.

    Args:
      net: the network to check.
      purpose: how the message introduces the restriction (``"bpjax.extend works on"``).

    Raises:
      TypeError: ``net`` not a network, or one with a layer other than
        :class:`~bpjax.layers.Dense` or inputs other than ``(batch, n_0)``.
    """
    layers = getattr(net, "layers", None)
    objective = getattr(net, "objective", None)
    if (
        not isinstance(layers, tuple)
        or not layers
        or not isinstance(objective, _losses.Loss)
        or not callable(getattr(net, "forward", None))
    ):
        raise TypeError(
            f"net: expected a bpjax.MLP or a bpjax.serial network of bpjax.layers.Dense layers, "
            f"got {type(net).__name__}."
        )
    bad = [
        f"layers[{i}] is {type(l).__name__}" for i, l in enumerate(layers) if type(l) is not Dense
    ]
    input_shape = getattr(net, "input_shape", None)
    if input_shape is not None and len(input_shape) != 1:
        bad.append(f"input_shape is {input_shape}, not (n_0,)")
    if bad:
        raise TypeError(
            f"net: {purpose} networks made only of bpjax.layers.Dense layers on "
            "(batch, n_0) inputs; " + ", ".join(bad) + "."
        )
    return layers


def check_positive(value: Any, name: str) -> None:
    """Raises unless ``value`` is a positive scalar (its sign is checked while it is concrete).

    Raises:
      TypeError: not a number or an array.
      ValueError: not a scalar, or a concrete value that is not positive.
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "dtype")):
        raise TypeError(
            f"{name}: expected a positive number, got {type(value).__name__}: {value!r}."
        )
    if np.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}.")
    if _is_concrete_number(value) and not float(value) > 0:
        raise ValueError(f"{name}: expected a positive number, got {float(value)!r}.")


def _is_concrete_number(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0


def check_like_params(v: Any, params: Params, name: str) -> Any:
    """``v`` cast to the params' dtypes, after checking it has their tree and shapes.

    Raises:
      TypeError: ``v`` cannot be flattened as a pytree.
      ValueError: another tree, or leaves of other shapes or not floating (one line each).
    """
    p_flat, p_def = jax.tree.flatten(params)
    try:
        v_flat, v_def = jax.tree.flatten(v)
    except Exception as err:
        raise TypeError(f"{name}: cannot read it as a pytree: {err}") from None
    if v_def != p_def:  # type: ignore[operator]
        raise ValueError(f"{name}: expected the params' tree {p_def}, got {v_def}.")
    problems = []
    for (path, p), leaf in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], v_flat, strict=True
    ):
        where = jax.tree_util.keystr(path)
        if jnp.shape(leaf) != jnp.shape(p):
            problems.append(f"{name}{where}: expected shape {jnp.shape(p)}, got {jnp.shape(leaf)}.")
        elif not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            problems.append(
                f"{name}{where}: expected a floating dtype, got {jnp.result_type(leaf)}."
            )
    if problems:
        raise ValueError("\n".join(problems))
    return jax.tree.unflatten(
        p_def,
        [
            jnp.asarray(leaf).astype(jnp.result_type(p))
            for leaf, p in zip(v_flat, p_flat, strict=True)
        ],
    )


def compiled(
    *, static_argnames: tuple[str, ...] = (), positive: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs a public ``f(net, ...)`` under ``jax.jit`` with ``net`` static, after checks in Python.

    ``net`` is checked first (a clear TypeError, not jit's "unhashable static argument"), and the
    arguments named in ``positive`` and the labels ``y`` while they are still concrete. Called
    eagerly, the function compiles once per net and shapes instead of dispatching op by op;
    inside a caller's ``jit`` it is inlined.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        jitted = jax.jit(fn, static_argnums=0, static_argnames=static_argnames)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(net: Any, *args: Any, **kwargs: Any) -> Any:
            check_net(net)
            bound = signature.bind(net, *args, **kwargs)
            for name in positive:
                check_positive(bound.arguments[name], name)
            if "y" in bound.arguments:  # inside the jit the labels are traced: poisoned, unchecked
                bound.arguments["y"] = net.check_labels(bound.arguments["y"])
                return jitted(*bound.args, **bound.kwargs)
            return jitted(net, *args, **kwargs)

        return wrapper

    return decorate


def forward(net: Any, params: Params, x: Array, y: Array) -> ForwardPass:
    """``net.forward`` (which checks params and x) and ``net.check_targets``, for a Dense net."""
    check_net(net)
    out, cache = net.forward(params, x)
    return ForwardPass(cache, net.check_targets(y, out))


def loss_from_z(net: Any, z: Array, y: Array) -> Array:
    """``C_n`` of shape ``(batch,)`` from ``z^L`` (``(batch, n_L)``), as ``net.loss`` computes it.

    ``y`` as ``net.check_targets`` returns it; the loss is taken from the logits for a fused
    canonical pair (``net.output_loss``).
    """
    return net.output_loss(z, net.layers[-1].activation.forward(z), y)


def example_deltas(net: Any, params: Params, fwd: ForwardPass) -> list[Array]:
    """The per-example, unscaled ``δ^l_n`` of every layer, ``(batch, n_l)`` each.

    The δ-recursion (``net.backprop``) from ``net.output_error`` with every weight ``w_n = 1``.
    """
    cache = fwd.cache
    weights = jnp.ones(cache.out.shape[0], cache.out.dtype)
    _, errors, _ = net.backprop(params, cache, net.output_error(cache, fwd.y, weights=weights))
    return errors


def factor_deltas(net: Any, params: Params, cache: Cache, factor: Array) -> list[Array]:
    """Each column of ``factor`` (batch, n_L, k) sent down the δ-recursion: L × (k, batch, n_l).

    Every column ``s_{n,c}`` is handed to ``net.backprop`` as the output layer's ``δ^L``.
    """

    def down(column: Array) -> list[Array]:
        return net.backprop(params, cache, OutputError(None, column))[1]

    return jax.vmap(down, in_axes=2)(factor)
