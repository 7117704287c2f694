"""What every :mod:`bpjax.extend` quantity shares: the checked net, the passes, the jit wrapper.

A quantity of :mod:`bpjax.extend` is built by the layers' extension rules
(:mod:`bpjax.extend.rules`) from the forward's caches and the δ-recursion's per-example errors;
this module produces both through the network protocol of :mod:`bpjax.network` (``forward``,
``check_targets``, ``output_error``, ``backprop``), so every network takes the one code path.
:mod:`bpjax.check.curvature` and :mod:`bpjax.parallel` build on the same helpers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._types import Array, Params
from bpjax.layers import Conv2D, Dense, DenseCache
from bpjax.losses import Loss
from bpjax.network import Cache, OutputError

__all__ = [
    "ForwardPass",
    "block_diagonal_factor",
    "check_dense_net",
    "check_like_params",
    "check_net",
    "check_positive",
    "compiled",
    "curvature_at_z",
    "example_deltas",
    "factor_deltas",
    "forward",
    "loss_from_output",
    "loss_from_z",
    "output_variable",
    "positive_poison",
]


class ForwardPass(NamedTuple):
    """The forward pass of a network, and the checked targets."""

    cache: Cache  # the network's cache: cache.layers[l-1] is layer l's own cache
    y: Array  # targets as the loss takes them (net.check_targets)

    @property
    def caches(self) -> list[DenseCache]:
        """Each layer's cache (a :class:`~bpjax.layers.DenseCache` ``(x, z, a)`` for Dense)."""
        return self.cache.layers

    @property
    def z(self) -> Array:
        """``z^L``, the output layer's weighted input, shape ``(batch, ..., n_L)``."""
        return self.cache.layers[-1].z


def check_net(net: Any) -> tuple[Any, ...]:
    """``net``'s layers, or a ``TypeError`` unless it is a network (a :class:`bpjax.MLP` or a
    :func:`bpjax.serial` network of any layers, a user's own included).

    Raises:
      TypeError: ``net`` not a network with layers, a loss and a forward.
    """
    layers = getattr(net, "layers", None)
    objective = getattr(net, "objective", None)
    if (
        not isinstance(layers, tuple)
        or not layers
        or not isinstance(objective, Loss)
        or not callable(getattr(net, "forward", None))
    ):
        raise TypeError(
            f"net: expected a bpjax.MLP or a bpjax.serial network with a loss, got "
            f"{type(net).__name__}."
        )
    return layers


def check_dense_net(net: Any, *, purpose: str) -> tuple[Dense, ...]:
    """``net``'s layers, or a ``TypeError`` unless it is a network of Dense layers on vectors.

    Args:
      net: the network to check.
      purpose: how the message introduces the restriction (``"tensor parallelism shards"``).

    Raises:
      TypeError: ``net`` not a network, or one with a layer other than
        :class:`~bpjax.layers.Dense` or inputs other than ``(batch, n_0)``.
    """
    layers = check_net(net)
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


def positive_poison(value: Any, dtype: Any) -> Array:
    """``1`` where ``value > 0``, else NaN: a traced positive scalar that :func:`check_positive`
    could not see, multiplied into a result so that a bad one poisons it (never a finite wrong
    number: a negative clipping norm would flip the gradient's sign, a zero damping solve a
    singular system)."""
    ok = jnp.asarray(value) > 0
    return jnp.where(ok, jnp.ones((), dtype), jnp.full((), jnp.nan, dtype))


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
    """``net.forward`` (which checks params and x) and ``net.check_targets``, for any network."""
    check_net(net)
    out, cache = net.forward(params, x)
    return ForwardPass(cache, net.check_targets(y, out))


def curvature_at_z(net: Any) -> bool:
    """Whether the curvature quantities take the loss Hessian at the last layer's ``z``.

    True when the last layer is a :class:`~bpjax.layers.Dense` or
    :class:`~bpjax.layers.Conv2D` (its output is ``f(z)`` elementwise, so the recursion can start
    from an error at ``z``: the GGN of ``C`` as a function of ``z^L``); otherwise the Hessian is
    taken at the network's output (the GGN of ``C`` as a function of the output).
    """
    return type(net.layers[-1]) in (Dense, Conv2D)


def output_variable(net: Any, cache: Cache) -> Array:
    """What the loss Hessian is taken at: the last ``z`` (:func:`curvature_at_z`) or the output,
    shape ``(batch, ..., n_out)``."""
    return cache.layers[-1].z if curvature_at_z(net) else cache.out


def loss_from_output(net: Any, v: Array, y: Array) -> Array:
    """The loss per row, shape ``(rows,)``, from rows ``v`` (``(rows, n_out)``) of
    :func:`output_variable` and the rows of the checked targets ``y``."""
    if curvature_at_z(net):
        return net.output_loss(v, net.layers[-1].activation.forward(v), y)
    return net.output_loss(v, v, y)


def loss_from_z(net: Any, z: Array, y: Array) -> Array:
    """``C_n`` of shape ``(batch,)`` from ``z^L`` (``(batch, n_L)``), as ``net.loss`` computes it.

    ``y`` as ``net.check_targets`` returns it; the loss is taken from the logits for a fused
    canonical pair (``net.output_loss``).
    """
    return net.output_loss(z, net.layers[-1].activation.forward(z), y)


def example_deltas(net: Any, params: Params, fwd: ForwardPass) -> list[Array]:
    """The per-example, unscaled error every layer records, ``(batch, ...)`` each.

    The δ-recursion (``net.backprop``) from ``net.output_error`` with every weight ``w_n = 1``.
    """
    cache = fwd.cache
    weights = jnp.ones(cache.out.shape[0], cache.out.dtype)
    _, errors, _ = net.backprop(params, cache, net.output_error(cache, fwd.y, weights=weights))
    return errors


def factor_deltas(net: Any, params: Params, cache: Cache, factor: Array) -> list[Array]:
    """Each column of ``factor`` (``(batch, ..., n_out, k)``) sent down the δ-recursion: per
    layer ``(k, batch, ...)``.

    Every column is handed to ``net.backprop`` as the error at :func:`output_variable`: the last
    layer's ``δ`` (:func:`curvature_at_z`), or the error at the output.
    """
    at_z = curvature_at_z(net)

    def down(column: Array) -> list[Array]:
        start = OutputError(None, column) if at_z else OutputError(column, None)
        return net.backprop(params, cache, start)[1]

    return jax.vmap(down, in_axes=factor.ndim - 1)(factor)


def block_diagonal_factor(
    factor: Array, signs: Array | None, shape: tuple[int, ...], *, mean: bool
) -> tuple[Array, Array | None]:
    """Rows' factors ``(batch·P, n, k)`` as each example's: ``(batch, ..., n, P·k)``.

    An example with ``P`` positions (``shape = (batch, ..., n)``) whose matrix is block diagonal
    over them, one block ``M_p = s_p d_p s_pᵀ`` per position, has a factor with a column
    ``(q, c)`` per position and row column, equal to ``s_{p,c}`` at position ``q = p`` and 0
    elsewhere. With ``mean`` every column is divided by ``√P``: ``C_n = (1/P) Σ_p ℓ_p`` is the
    mean over its positions, so the loss Hessian's blocks are ``H_p / P``. For ``P = 1``,
    ``factor`` itself. ``signs`` ``(batch·P, k)`` become ``(batch, P·k)``.
    """
    batch, n = shape[0], shape[-1]
    positions = factor.shape[0] // batch if batch else int(np.prod(shape[1:-1], dtype=int))
    k = factor.shape[-1]
    if positions == 1:
        return factor.reshape(*shape, k), signs
    f = factor.reshape(batch, positions, n, k)
    f = jnp.einsum("bpnc,pq->bpnqc", f, jnp.eye(positions, dtype=factor.dtype))
    if mean:
        f = f / jnp.sqrt(jnp.asarray(positions, factor.dtype))
    f = f.reshape(*shape, positions * k)
    return f, None if signs is None else signs.reshape(batch, positions * k)
