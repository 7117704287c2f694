"""Layers with hand-written backward passes, and the one δ-recursion that chains them.

A layer is any object with three pure functions (the contract of the README; :class:`Layer` builds
one from plain functions)::

    init(key, in_shape, dtype) -> (params, out_shape)     shapes without the batch axis
    forward(params, x)         -> (y, cache)               x: (batch, *in_shape)
    backward(params, cache, dy) -> (grads, dx)             dy = ∂C/∂y, dx = ∂C/∂x

``backward`` is the layer's VJP: ``grads`` are ``Σ`` over the batch of ``dyᵀ ∂y/∂θ`` (the ``1/B``
of the batch mean is already in ``dy``), with the params' tree structure (``{}`` for a layer
without params). Optional parts of the contract:

- ``delta(cache, dy) -> δ`` and ``backward_delta(params, cache, δ) -> (grads, dx)``: a layer whose
  output is an activation of a weighted input, ``y = f(z)``, splits its backward at ``δ = ∂C/∂z``,
  so that :func:`backprop` records ``δ`` and can start from a fused output error.
- ``forward_shifted(params, x, dz=None) -> (y, z)``, with ``delta``: the forward with ``dz`` (the
  shape of ``δ``; ``None``: no shift) added to the weighted input ``z``, written from the forward
  maths alone, returning the output and the shifted ``z``; ``∂C/∂dz`` at ``dz = 0`` is exactly
  the recorded ``δ``. For a layer whose ``δ`` is not ``J_fᵀ dy`` at its own output (:class:`Elman`
  and :class:`LSTM`: ``δ_t`` also flows through the later steps); :func:`bpjax.check_network`
  differentiates it for the reference ``δ`` (else ``activation.forward`` of the cached ``z``).
- ``needs_key = True``: ``forward(params, x, key=...)`` takes a PRNG key (:class:`Dropout`);
  networks pass ``None`` in evaluation mode.
- ``integer_input = True``: the layer takes integer inputs (:class:`Embedding`); its ``dx`` is
  ``None``.

:func:`backprop` is the reversed loop over a serial composition: the ``dx`` of layer ``i`` is the
``dy`` of layer ``i − 1``. :class:`bpjax.MLP` is this loop over :class:`Dense` layers, and
:func:`bpjax.serial` over any layers.

The layers: :class:`Dense`, :class:`Conv2D`, :class:`MaxPool2D`, :class:`AvgPool2D`,
:class:`Flatten`, :class:`Dropout`, :class:`Embedding`, :class:`LayerNorm`, :class:`Residual`,
and the recurrent :class:`Elman`, :class:`LSTM` and :class:`LastStep` (backpropagation through
time; also importable from :mod:`bpjax.rnn`). :class:`Sequential` is layers in series as one layer
(what :func:`bpjax.serial` returns without a loss), so blocks nest; :func:`chain_init`,
:func:`chain_forward`, :func:`layer_forward`, :func:`split_key` and :func:`check_layers` are the
pieces a layer made of layers is built from (:class:`Residual`, :class:`Sequential` and networks
use them). :func:`weight_grad` is ``∇W = δᵀ a`` for Dense and the recurrent layers, its dot
layout measured once per shape on the CPU that runs it (:func:`weight_grad_layout`; pin it with
the environment variable ``BPJAX_WEIGHT_GRAD_LAYOUT=fold|materialise``); :func:`conv_kernel_grad`
is Conv2D's ``∂C/∂W``, one convolution or one dot per kernel tap, whichever was measured faster
for the shape on this CPU (:func:`kernel_grad_method`; pin it with
``BPJAX_CONV_KERNEL_GRAD=conv|taps``). The protocol and the maths: docs/design.md.
"""

from bpjax.layers._conv import Conv2D, Conv2DCache
from bpjax.layers._conv_method import KERNEL_GRAD_ENV, conv_kernel_grad, kernel_grad_method
from bpjax.layers._core import (
    Layer,
    backprop,
    chain_forward,
    chain_init,
    check_layers,
    layer_forward,
    split_key,
)
from bpjax.layers._dense import Dense, DenseCache
from bpjax.layers._dropout import Dropout, DropoutCache
from bpjax.layers._elman import Elman, ElmanCache
from bpjax.layers._embedding import Embedding, EmbeddingCache
from bpjax.layers._layout import LAYOUT_ENV, weight_grad, weight_grad_layout
from bpjax.layers._lstm import LSTM, LSTMCache
from bpjax.layers._norm import LayerNorm, LayerNormCache
from bpjax.layers._outer import column_sum
from bpjax.layers._pool import AvgPool2D, MaxPool2D, PoolCache
from bpjax.layers._recurrent import LastStep, LastStepCache
from bpjax.layers._reshape import Flatten
from bpjax.layers._residual import Residual, ResidualCache
from bpjax.layers._sequential import Sequential, SequentialCache

__all__ = [
    "KERNEL_GRAD_ENV",
    "LAYOUT_ENV",
    "LSTM",
    "AvgPool2D",
    "Conv2D",
    "Conv2DCache",
    "Dense",
    "DenseCache",
    "Dropout",
    "DropoutCache",
    "Elman",
    "ElmanCache",
    "Embedding",
    "EmbeddingCache",
    "Flatten",
    "LSTMCache",
    "LastStep",
    "LastStepCache",
    "Layer",
    "LayerNorm",
    "LayerNormCache",
    "MaxPool2D",
    "PoolCache",
    "Residual",
    "ResidualCache",
    "Sequential",
    "SequentialCache",
    "backprop",
    "chain_forward",
    "chain_init",
    "check_layers",
    "column_sum",
    "conv_kernel_grad",
    "kernel_grad_method",
    "layer_forward",
    "split_key",
    "weight_grad",
    "weight_grad_layout",
]
