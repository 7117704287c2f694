"""The exact diagonal of the Hessian: the loss Hessian and the activations' curvature, sent down.

The Hessian of ``C_n`` with respect to a layer's weighted input obeys its own backward recursion
(BackPACK's ``DiagHessian``; Dangel, Harmeling & Hennig 2020). For a layer
``z^l = W^l a^{l-1} + b^l`` (Dense, or Conv2D: linear in ``W`` and in ``a`` separately) with an
elementwise activation ``a^l = f(z^l)``, and ``g^l_n = ∂C_n/∂a^l_n`` the per-example error
arriving at its output::

    H_{a^{l-1}} = (∂z^l/∂a^{l-1})ᵀ H_{z^l} (∂z^l/∂a^{l-1})
    H_{z^{l-1}} = J_fᵀ H_{a^{l-1}} J_f + R^{l-1},   R^{l-1} = diag(f''(z^{l-1}) ∘ g^{l-1})
    H_{W^l}     = (∂z^l/∂W^l)ᵀ H_{z^l} (∂z^l/∂W^l)      (z^l is linear in W^l: no residual)

The first line is the GGN's recursion; ``R`` is what the GGN drops (the activation's second
derivative weighted by the gradient), and it is why ``diag_hessian`` differs from
:func:`~bpjax.extend.diag_ggn` where activations curve. Keep every ``H_{z^l}`` as a signed factor
``Σ_c d_c s_c s_cᵀ``: the loss Hessian's factor (:func:`~bpjax.extend.loss_hessian_factor`) at the
output variable, plus at each hidden activation the columns of ``R`` (``√|r_m| e_m`` with sign
``sign(r_m)``, one per entry ``m`` of ``z^l``). Every column goes down the δ-recursion from where it
entered, and each layer's ``square_sum`` rule (:mod:`bpjax.extend.rules`) adds the signed squares
of the gradients the columns give::

    diag(∇²_θ C)  = (1/B) Σ_n Σ_c d_{n,c} (g_{n,c})²       g_{n,c} = (∂z_n/∂θ)ᵀ s_{n,c}

This is exact (not an approximation) for the layers it accepts: Dense and Conv2D with any
activation, and the parameter-free layers whose second derivative is zero almost everywhere
(:class:`~bpjax.layers.Flatten`, the pools, :class:`~bpjax.layers.Dropout` in evaluation), with
an :class:`~bpjax.layers.Embedding` first. A built-in elementwise activation contributes
``f''(z) ∘ g`` by forward mode over its hand-written backward; softmax and a user's
:class:`~bpjax.Activation` (which may couple a row's units) contribute each row's
``∂²(g · f(z))/∂z²`` by ``jax.hessian`` and its eigendecomposition, ``n`` columns per row either
way. Cost: one recursion per column, ``k`` columns per example where ``k`` is the loss factor's plus
the size of every hidden ``z`` above the layer with a curved activation (identity, ReLU and leaky
ReLU add none, so there it costs :func:`~bpjax.extend.diag_ggn`) — BackPACK's cost too;
:func:`~bpjax.extend.hvp` gives Hessian-vector products at the cost of two backward passes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._types import Array, Grads, Params
from bpjax.activations import ACTIVATIONS, Activation, identity, leaky_relu, relu
from bpjax.extend import rules
from bpjax.extend.passes import (
    block_diagonal_factor,
    check_net,
    compiled,
    curvature_at_z,
    forward,
    output_variable,
)
from bpjax.extend.second_order import column_weights, loss_hessian_factor
from bpjax.layers import AvgPool2D, Conv2D, Dense, Dropout, Embedding, Flatten, MaxPool2D

__all__ = ["batch_diag_hessian", "check_hessian_net", "diag_hessian"]

_WEIGHTED = (Dense, Conv2D)
_PIECEWISE_LINEAR = (Flatten, MaxPool2D, AvgPool2D, Dropout)
_ELEMENTWISE = tuple(act for name, act in ACTIVATIONS.items() if name != "softmax")
# f'' = 0 wherever f is differentiable (everywhere but the kink, which jax.hessian also reads as
# 0): no residual columns, so a ReLU network's diag_hessian costs what its diag_ggn does.
_PIECEWISE_LINEAR_ACTIVATIONS = (identity, relu, leaky_relu)


def check_hessian_net(net: Any) -> tuple[Any, ...]:
    """The layers of ``net``, each one whose second derivatives :func:`diag_hessian` knows.

    Raises:
      TypeError: naming the first other layer (LayerNorm, the recurrent layers, Residual, a
        user's Layer: their second derivatives have no rule here; :func:`~bpjax.extend.hvp`
        and :func:`~bpjax.extend.diag_ggn` take any network).
    """
    layers = check_net(net)
    for i, layer in enumerate(layers):
        ok = isinstance(layer, _WEIGHTED + _PIECEWISE_LINEAR) or (
            isinstance(layer, Embedding) and i == 0
        )
        if not ok:
            where = (
                "an Embedding after the first layer"
                if isinstance(layer, Embedding)
                else (type(layer).__name__)
            )
            raise TypeError(
                f"net: diag_hessian backpropagates second derivatives through Dense and Conv2D "
                f"layers (any activation), Flatten, MaxPool2D, AvgPool2D, Dropout and a first "
                f"Embedding; layer {i} is {where}. Use hvp for Hessian-vector products or "
                "diag_ggn for the Gauss-Newton diagonal of any network."
            )
    return layers


def _elementwise_curvature(act: Activation, z: Array, g: Array) -> Array:
    """``r = f''(z) ∘ g``, shape of ``z``: forward mode over the backward ``δ = g ∘ f'(z)``."""

    def delta(z_: Array) -> Array:
        return act.backward(z_, act.forward(z_), g)

    return jax.jvp(delta, (z,), (jnp.ones_like(z),))[1]


def _activation_factor(act: Activation, z: Array, g: Array) -> tuple[Array, Array]:
    """``R = ∂²(g · f(z))/∂z²`` row by row as a signed factor, block diagonal over positions.

    Args:
      act: the activation ``f``, acting on the last axis of ``z``.
      z, g: ``(batch, ..., n)``: the weighted input and the error arriving at ``f(z)``.

    Returns:
      ``(S, signs)``: ``S`` of shape ``(batch, ..., n, P·n)`` and ``signs`` ``(batch, P·n)``,
      ``R_n = S_n diag(signs_n) S_nᵀ``.
    """
    n = z.shape[-1]
    z_rows, g_rows = z.reshape(-1, n), g.reshape(-1, n)
    if act in _ELEMENTWISE:
        r = _elementwise_curvature(act, z_rows, g_rows)
        factor = jnp.sqrt(jnp.abs(r))[:, :, None] * jnp.eye(n, dtype=z.dtype)
        signs = jnp.sign(r)
    else:

        def row_curvature(z_r: Array, g_r: Array) -> Array:
            return jax.hessian(lambda u: jnp.vdot(g_r, act.forward(u[None])[0]))(z_r)

        hess = jax.vmap(row_curvature)(z_rows, g_rows)
        eigvals, eigvecs = jnp.linalg.eigh(0.5 * (hess + jnp.swapaxes(hess, 1, 2)))
        factor = eigvecs * jnp.sqrt(jnp.abs(eigvals))[:, None, :]
        signs = jnp.sign(eigvals)
    blocks, block_signs = block_diagonal_factor(factor, signs, z.shape, mean=False)
    assert block_signs is not None
    return blocks, block_signs


def _input_error(layer: Any, params: Any, cache: Any, error: Array) -> Array:
    """``∂C/∂x`` of the layer's input from the error it records (``δ`` if weighted, else ``dy``)."""
    if isinstance(layer, _WEIGHTED):
        return layer.backward_delta(params, cache, error)[1]
    return layer.backward(params, cache, error)[1]


def _columns(factor: Array) -> Array:
    """A factor ``(batch, ..., k)`` as ``k`` errors ``(k, batch, ...)``."""
    return jnp.moveaxis(factor, -1, 0)


def _hessian_sums(net: Any, params: Params, x: Array, y: Array, per_example: bool) -> Grads:
    layers = check_hessian_net(net)
    fwd = forward(net, params, x, y)
    cache = fwd.cache
    batch = cache.out.shape[0]
    dtype = cache.out.dtype
    records = rules.records(net, params, cache)
    rule = rules.example_square_sums if per_example else rules.square_sum

    factor, signs = loss_hessian_factor(net, output_variable(net, cache), fwd.y, minimal=True)
    columns = _columns(factor)
    weights = column_weights(signs, columns.shape[0], batch, dtype)
    start = net.output_error(cache, fwd.y, weights=jnp.ones(batch, dtype))
    at_z = curvature_at_z(net)
    # g: the per-example gradient at the current layer's output (its δ for a fused output).
    g = start.output_delta if start.output_delta is not None else start.output_error

    out: list[Any] = [None] * len(layers)
    for i in reversed(range(len(layers))):
        layer, p, c = layers[i], params[i], cache.layers[i]
        if isinstance(layer, _WEIGHTED):
            if i == len(layers) - 1 and at_z:  # the loss factor is already at z^L
                delta = g if start.output_delta is not None else layer.delta(c, g)
            else:
                delta = layer.delta(c, g)
                columns = jax.vmap(layer.delta, in_axes=(None, 0))(c, columns)
                if layer.activation not in _PIECEWISE_LINEAR_ACTIVATIONS:
                    r_factor, r_signs = _activation_factor(layer.activation, c.z, g)
                    columns = jnp.concatenate([columns, _columns(r_factor)])
                    weights = jnp.concatenate([weights, r_signs.T.astype(dtype) / batch])
            out[i] = rule(records[i], columns, weights)
            g = delta
        else:
            out[i] = rule(records[i], columns, weights)
        if i > 0:
            down = functools.partial(_input_error, layer, p, c)
            g, columns = down(g), jax.vmap(down)(columns)
    return out


@compiled()
def _diag_hessian(net: Any, params: Params, x: Array, y: Array) -> Grads:
    return _hessian_sums(net, params, x, y, per_example=False)


@compiled()
def _batch_diag_hessian(net: Any, params: Params, x: Array, y: Array) -> Grads:
    return _hessian_sums(net, params, x, y, per_example=True)


def diag_hessian(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The exact diagonal of the loss Hessian ``∇²_θ C``, ``C = (1/B) Σ_n C_n``.

    The loss Hessian's factor and each hidden activation's curvature
    ``R^l = diag(f''(z^l) ∘ ∂C_n/∂a^l)`` go down the δ-recursion as signed columns (the module
    docstring of :mod:`bpjax.extend.diag_hessian` gives the recursion), and each layer's
    ``square_sum`` rule adds ``(1/B) Σ_n Σ_c d_{n,c} (g_{n,c})²``. For a Dense layer on vectors
    ``g_{n,c} = δ^l_{n,c} (a^{l-1}_n)ᵀ``, so ``diag(∇²C)_{W^l} = (1/B) Σ_n Σ_c d_{n,c}
    (δ^l_{n,c})² (a^{l-1}_n)²ᵀ`` — :func:`~bpjax.extend.diag_ggn`'s formula with the extra
    columns. Where every hidden activation is piecewise linear (ReLU) the two agree.

    Args:
      net: a :class:`bpjax.MLP`, or a :func:`bpjax.serial` network of Dense and Conv2D layers
        (any activation), Flatten, MaxPool2D, AvgPool2D, Dropout, and an Embedding first.
      params, x, y: as for :func:`~bpjax.extend.batch_grad`.

    Returns:
      Like params.

    Raises:
      TypeError: a layer without a second-derivative rule, named (:func:`check_hessian_net`).

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "identity"), "squared_error")
      >>> params = net.init(jax.random.key(0))
      >>> d = diag_hessian(net, params, jnp.ones((5, 3)), jnp.zeros((5, 2)))
      >>> bool(d[1]["b"][0] == 1.0)  # ½‖y − z‖² is quadratic in b^L: ∂²C/∂b² = 1
      True
    """
    check_hessian_net(net)  # before any tracing: the message, not a traceback through jit
    return _diag_hessian(net, params, x, y)


def batch_diag_hessian(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Each example's share of :func:`diag_hessian`: the diagonal of ``(1/B) ∇²_θ C_n``.

    BackPACK's ``BatchDiagHessian`` convention: the sum over the batch axis is
    :func:`diag_hessian`.

    Args:
      net, params, x, y: as for :func:`diag_hessian`.

    Returns:
      Like params, every leaf with a leading batch axis ``(batch, *leaf)``.
    """
    check_hessian_net(net)
    return _batch_diag_hessian(net, params, x, y)
