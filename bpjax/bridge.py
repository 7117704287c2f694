"""The bridge to JAX autodiff: networks whose ``jax.grad``/``jax.vjp`` run the manual backward.

:func:`custom_vjp` wraps a network's forward in :func:`jax.custom_vjp`, with the δ-recursion
(:func:`bpjax.layers.backprop`) as its VJP. The result is an ordinary JAX function: it drops into
an optax training loop, into ``jax.grad`` of a larger model (the network as one block of it), and
composes with ``jax.jit`` and ``jax.vmap``. The reverse pass JAX runs through it is the manual one,
so a bug in a hand-written backward shows in the gradients instead of being papered over by
autodiff.

Two forms:

- ``custom_vjp(net)`` is ``f(params, x, key=None) -> y``, the network's output; its VJP maps the
  cotangent ``ȳ = ∂L/∂y`` of any downstream ``L`` through ``backprop(output_error=ȳ)`` to
  ``(∂L/∂θ, ∂L/∂x)``.
- ``custom_vjp(net, loss=True)`` is ``f(params, x, y, key=None) -> C``, the batch-mean loss; its VJP
  starts from the output error of the loss (the fused ``δ^L = a^L − y`` for the canonical pairs)
  and scales by the incoming cotangent ``C̄``: ``(C̄ ∇_θ C, C̄ ∇_x C)``.

Targets and keys are not differentiated: the bridge raises a ``ValueError`` at trace time when a
transformation asks for the gradient with respect to ``y`` rather than return a silent zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from bpjax._types import Array
from bpjax.network import OutputError, Serial

__all__ = ["custom_vjp"]


def custom_vjp(net: Serial, *, loss: bool = False) -> Callable[..., Array]:
    """The network as a JAX function whose VJP is the hand-written backward.

    Args:
      net: a :class:`bpjax.MLP` or a :func:`bpjax.serial` network.
      loss: ``False`` gives the network's output ``f(params, x, key=None)``, shape
        ``(batch, *out_shape)``; ``True`` gives the batch-mean loss ``f(params, x, y, key=None)``,
        a scalar.

    Returns:
      A function to call, ``jax.jit``, ``jax.vmap`` and differentiate with ``jax.grad`` or
      ``jax.vjp`` (reverse mode: a ``jax.custom_vjp`` has no forward mode). Its reverse pass is
      :func:`bpjax.layers.backprop`: for an output cotangent ``ȳ`` (shape of ``y``) it returns
      ``Σ_n ȳ_nᵀ ∂y_n/∂θ`` for the params and ``ȳ_nᵀ ∂y_n/∂x_n`` for each input (``None`` for
      integer inputs). The same ``net`` gives the same function object, so ``jax.jit`` caches it.

    Raises:
      TypeError: ``net`` is not a bpjax network.
      ValueError: at trace time, when the gradient with respect to the targets ``y`` is asked
        for (the loss form does not differentiate the targets).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import bpjax as bp
      >>> net = bp.MLP((3, 8, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
      >>> apply = bp.custom_vjp(net)  # the output, inside a larger loss
      >>> def loss(p):
      ...     probs = apply(p, x)
      ...     return optax.safe_softmax_cross_entropy(jnp.log(probs), jax.nn.one_hot(y, 2)).mean()
      >>> grads = jax.grad(loss)(params)  # runs the manual δ-recursion
      >>> loss_fn = bp.custom_vjp(net, loss=True)
      >>> grads = jax.jit(jax.grad(loss_fn))(params, x, y)  # == net.value_and_grad(...)[1]
      >>> [g["W"].shape for g in grads]
      [(8, 3), (2, 8)]
    """
    if not isinstance(net, Serial):
        raise TypeError(
            f"net: expected a bpjax network (bpjax.MLP or bpjax.serial(...)), got "
            f"{type(net).__name__}."
        )
    return _build(net, bool(loss))


@functools.lru_cache(maxsize=256)
def _build(net: Serial, loss: bool) -> Callable[..., Array]:
    return _loss_function(net) if loss else _output_function(net)


def _value(arg: Any) -> Any:
    return jax.tree.map(lambda p: p.value, arg, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _perturbed(arg: Any) -> bool:
    leaves = jax.tree.leaves(arg, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))
    return any(p.perturbed for p in leaves)


def _dtype_tag(x: Array) -> Array:
    """A zero-size array that carries ``x``'s dtype into the residuals (dtypes are not arrays)."""
    return jnp.zeros((0,), jnp.result_type(x))


def _input_cotangent(dx: Array | None, tag: Array) -> Array | None:
    """``∂/∂x`` in the dtype of ``x`` itself (the forward casts ``x`` to the params' dtype)."""
    if dx is None or not jnp.issubdtype(tag.dtype, jnp.floating):
        return None
    return dx.astype(tag.dtype)


def _dense_cotangent(ct: Any, like: Array) -> Array:
    return jnp.zeros_like(like) if isinstance(ct, SymbolicZero) else ct


def _output_function(net: Serial) -> Callable[..., Array]:
    @jax.custom_vjp
    def apply(params: Any, x: Array, key: Any) -> Array:
        return net.forward(params, x, key=key)[0]

    def apply_fwd(params: Any, x: Any, key: Any) -> tuple[Array, Any]:
        y, cache = net.forward(_value(params), _value(x), key=_value(key))
        return y, (_value(params), cache, _dtype_tag(_value(x)))

    def apply_bwd(residuals: Any, y_bar: Any) -> tuple[Any, Any, None]:
        params, cache, tag = residuals
        y_bar = _dense_cotangent(y_bar, cache.out)
        grads, _, dx = net.backprop(params, cache, OutputError(y_bar, None))
        return grads, _input_cotangent(dx, tag), None

    apply.defvjp(apply_fwd, apply_bwd, symbolic_zeros=True)

    def output(params: Any, x: Array, key: Any = None) -> Array:
        return apply(params, x, key)

    output.__doc__ = f"The output of {net!r}; its VJP is the hand-written backward."
    return output


def _loss_function(net: Serial) -> Callable[..., Array]:
    @jax.custom_vjp
    def batch_loss(params: Any, x: Array, y: Array, key: Any) -> Array:
        return net.loss(params, x, y, key=key)

    def batch_loss_fwd(params: Any, x: Any, y: Any, key: Any) -> tuple[Array, Any]:
        if _perturbed(y):
            raise ValueError(
                "y: bpjax.custom_vjp(net, loss=True) does not differentiate the loss with respect "
                "to the targets; differentiate with respect to params and x only, or use "
                "bpjax.custom_vjp(net) and compute the loss of its output in JAX."
            )
        out, cache = net.forward(_value(params), _value(x), key=_value(key))
        targets = net.check_targets(_value(y), out)
        value = jnp.mean(net.example_losses(cache, targets))
        return value, (_value(params), cache, targets, _dtype_tag(_value(x)))

    def batch_loss_bwd(residuals: Any, c_bar: Any) -> tuple[Any, Any, None, None]:
        params, cache, targets, tag = residuals
        grads, _, dx = net.backprop(params, cache, net.output_error(cache, targets))
        if isinstance(c_bar, SymbolicZero):
            c_bar = jnp.zeros((), cache.out.dtype)
        grads = jax.tree.map(lambda g: (g * c_bar).astype(g.dtype), grads)
        dx = None if dx is None else dx * c_bar.astype(dx.dtype)
        return grads, _input_cotangent(dx, tag), None, None

    batch_loss.defvjp(batch_loss_fwd, batch_loss_bwd, symbolic_zeros=True)

    def loss(params: Any, x: Array, y: Array, key: Any = None) -> Array:
        return batch_loss(params, x, y, key)

    loss.__doc__ = f"The batch-mean loss of {net!r}; its VJP is the hand-written backward."
    return loss
