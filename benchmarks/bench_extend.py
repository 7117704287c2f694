"""Time bpjax.extend's per-example and curvature quantities against vmap(grad) and BackPACK.

The networks: MLPs (ReLU hidden layers) and a CNN (``cnn``: Conv2D(32, 3×3, SAME, relu) →
MaxPool2D(2) → Conv2D(64, 3×3, SAME, relu) → MaxPool2D(2) → Flatten → Dense(10) on 32×32×3
images, batch 128), all ending in softmax + cross-entropy, float32, with the same params and data
for all three implementations (BackPACK's CNN takes NCHW images, OIHW kernels, and a Dense weight
whose columns are permuted from bpjax's H,W,C flattening order to torch's C,H,W; the two losses
are checked to agree before anything is timed). For each network and each quantity this times:

* ``bpjax``: the :mod:`bpjax.extend` function, jitted: one forward and one δ-recursion (the
  curvature ones push the ``n_L`` columns of the loss-Hessian factor down the recursion);
* ``vmap(grad)``: the same quantity from JAX autodiff per example, jitted:
  ``vmap(grad(loss of one example))`` (and per example and Hessian-factor column for the GGN
  diagonal, ``jax.jvp(jax.grad(loss))`` for ``hvp``, and for the Hessian diagonal one such
  product per unit vector, run only up to ``HESSIAN_VMAP_MAX_PARAMS`` params), chunked over the
  batch with ``lax.map`` /
  ``lax.scan`` so that no more than ``--chunk-gib`` of per-example gradients live at once (no
  loop when the whole batch fits: XLA:CPU runs a vmapped convolution's weight gradient an order
  of magnitude slower inside a loop, which would flatter bpjax on the CNN);
* ``BackPACK``: the matching ``backpack.extensions`` extension on the equivalent
  ``torch.nn.Sequential`` (BatchGrad, BatchL2Grad, SumGradSquared, Variance, DiagGGNExact,
  BatchDiagGGNExact, DiagHessian, BatchDiagHessian, DiagGGNMC, KFLR, and BatchGrad plus clipping
  for DP-SGD; none for ``hvp``).
  Skipped, with a line saying so, when torch or backpack-for-pytorch is not installed
  (``pip install ".[bench]"``). Its outputs, brought to bpjax's layout and scaling (BackPACK's
  per-example gradients are those of ``C_n / B``), are compared with bpjax's.

On the CNN ``kfac_factors`` (Kronecker factors over the convolutions' unfolded patches) is timed
against BackPACK's KFLR only: the vmap(grad) reference here perturbs each Dense layer's ``z`` of an
MLP, and KFLR's factors are laid out differently, so no output is compared. A quantity bpjax
rejects for a network with a TypeError gets a row saying so, and nothing is timed.

Each function is run once to compile and warm up, then the three are called in interleaved
rounds, the order varied by round (``bench_mlp.time_interleaved``); the table gives medians and
the speed-ups ``vmap(grad) / bpjax`` and ``BackPACK / bpjax`` (medians of the per-round paired
ratios). A quantity
whose output or per-example gradients would not fit in ``--max-gib`` (``batch_grad`` of the large
network is 21 GB) is skipped for every implementation, with a line saying so.

The CNN is not in the default run (its GGN diagonals by vmap(grad) take ~20 s a call on 2 cores);
``--sizes cnn`` runs it. Usage::

    python benchmarks/bench_extend.py                               # medium and large
    python benchmarks/bench_extend.py --sizes medium --json benchmarks/results/bench_extend_cpu.json
    python benchmarks/bench_extend.py --sizes 64,128,10@64 --quantities batch_l2_grad diag_ggn
    python benchmarks/bench_extend.py --sizes cnn --budget 5 --json bench_extend_cnn_cpu.json
    python benchmarks/bench_extend.py --sizes cnn:16@32      # the CNN on 16×16×3 images, batch 32
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from rich.console import Console
from rich.table import Table

# Before bpjax: run as a script from a checkout (a git worktree), this checkout's bpjax is the one
# imported and timed, not an editable install of another
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpjax as bp
from benchmarks.bench_mlp import Case, Stats, parse_case, time_interleaved
from benchmarks.machine import describe as describe_machine
from benchmarks.machine import machine_info
from bpjax import MLP
from bpjax import extend as bx
from bpjax._types import Array, Params
from bpjax.layers import Conv2D, Dense, Flatten, MaxPool2D

DTYPE = jnp.float32


class ConvCase(NamedTuple):
    """A CNN: per entry of ``channels`` Conv2D(c, 3×3, SAME, relu) → MaxPool2D(2), then Flatten →
    Dense(n_out, softmax), cross-entropy; NHWC images of shape ``image``."""

    name: str
    image: tuple[int, int, int]  # (H, W, C) of one example
    channels: tuple[int, ...]
    n_out: int
    batch: int


AnyCase = Case | ConvCase

CNN = ConvCase("cnn", (32, 32, 3), (32, 64), 10, 128)
CASES: dict[str, AnyCase] = {
    "medium": Case("medium", (784, 512, 512, 10), 256),
    "large": Case("large", (1024, 2048, 2048, 2048, 10), 512),
    "cnn": CNN,
}
"""The issue's sizes, by name: two MLPs and a CNN."""

QUANTITIES = (
    "batch_grad",
    "batch_l2_grad",
    "sum_grad_squared",
    "variance",
    "clipped_grad",
    "diag_ggn",
    "batch_diag_ggn",
    "diag_hessian",
    "batch_diag_hessian",
    "diag_ggn_mc",
    "kfac_factors",
    "hvp",
)
"""Every quantity timed, in table order."""

HESSIAN_VMAP_MAX_PARAMS = 10_000
"""The most params for which ``diag_hessian``'s autodiff reference runs: it takes one
Hessian-vector product per parameter (per example, for ``batch_diag_hessian``)."""

PER_EXAMPLE = ("batch_grad", "clipped_grad", "batch_diag_ggn", "batch_diag_hessian")
"""Quantities with a per-example output in some implementation (BackPACK clips via BatchGrad)."""

IMPLEMENTATIONS = ("bpjax", "vmap(grad)", "BackPACK")
MAX_NORM = 1.0


# -- the problem ---------------------------------------------------------------------------------


def parse_extend_case(spec: str) -> AnyCase:
    """A case by name (``medium``, ``large``, ``cnn``), ``cnn@B``, ``cnn:S@B`` (the CNN on
    ``S×S×3`` images, batch ``B``) or an MLP as ``n_0,...,n_L@B``.

    Raises:
      argparse.ArgumentTypeError: for anything else.

    Example:
      >>> parse_extend_case("cnn:16@32")
      ConvCase(name='cnn', image=(16, 16, 3), channels=(32, 64), n_out=10, batch=32)
    """
    if spec in CASES:
        return CASES[spec]
    match = re.fullmatch(r"cnn(?::(\d+))?@(\d+)", spec)
    if match is None:
        return parse_case(spec)
    side, batch = int(match[1] or 32), int(match[2])
    if side < 4 or batch < 1:
        raise argparse.ArgumentTypeError(
            f"expected an image side of at least 4 (two 2×2 poolings) and a positive batch, got "
            f"{spec!r}."
        )
    return CNN._replace(image=(side, side, 3), batch=batch)


def describe(case: AnyCase) -> str:
    """The network in a few characters: the MLP's widths, or the CNN's layers and image."""
    if isinstance(case, ConvCase):
        convs = "-".join(f"Conv{c}-Pool" for c in case.channels)
        return f"{convs}-Dense{case.n_out}, {'×'.join(map(str, case.image))}"
    return ",".join(map(str, case.sizes))


def build_net(case: AnyCase) -> Any:
    """ReLU hidden layers, a softmax output and cross-entropy."""
    if isinstance(case, ConvCase):
        layers: list[Any] = []
        for c in case.channels:
            layers += [Conv2D(c, 3, padding="SAME", activation="relu"), MaxPool2D(2)]
        return bp.serial(
            *layers,
            Flatten(),
            Dense(case.n_out, "softmax"),
            loss="cross_entropy",
            input_shape=case.image,
        )
    return MLP(case.sizes, ("relu",) * (len(case.sizes) - 2) + ("softmax",), "cross_entropy")


def make_problem(net: Any, batch: int, seed: int) -> tuple[Params, Array, Array]:
    """``(params, x, y)``: the net's init, standard normal ``x``, uniform integer labels ``y``."""
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = net.init(k_p, DTYPE)
    x = jax.random.normal(k_x, (batch, *net.input_shape), DTYPE)
    y = jax.random.randint(k_y, (batch,), 0, net.output_shape[-1])
    return jax.block_until_ready((params, x, y))


def num_params(sizes: Sequence[int]) -> int:
    """The number of params of an MLP of widths ``sizes``."""
    return sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(sizes))


def param_count(net: Any) -> int:
    """The number of params of any network, from the shapes of its init."""
    shapes = jax.eval_shape(net.init, jax.random.key(0))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def output_gib(quantity: str, n_params: int, batch: int) -> float:
    """GiB of the largest array a quantity materialises in any implementation (in float32)."""
    return 4 * n_params * (batch if quantity in PER_EXAMPLE else 2) / 2**30


# -- bpjax ---------------------------------------------------------------------------------------


def bpjax_functions(net: Any) -> dict[str, Callable[..., Any]]:
    """Each quantity by :mod:`bpjax.extend`, jitted, as ``f(params, x, y, key, v)``."""
    return {
        "batch_grad": lambda p, x, y, k, v: bx.batch_grad(net, p, x, y),
        "batch_l2_grad": lambda p, x, y, k, v: bx.batch_l2_grad(net, p, x, y),
        "sum_grad_squared": lambda p, x, y, k, v: bx.sum_grad_squared(net, p, x, y),
        "variance": lambda p, x, y, k, v: bx.variance(net, p, x, y),
        "clipped_grad": lambda p, x, y, k, v: bx.clipped_grad(net, p, x, y, MAX_NORM),
        "diag_ggn": lambda p, x, y, k, v: bx.diag_ggn(net, p, x, y),
        "batch_diag_ggn": lambda p, x, y, k, v: bx.batch_diag_ggn(net, p, x, y),
        "diag_hessian": lambda p, x, y, k, v: bx.diag_hessian(net, p, x, y),
        "batch_diag_hessian": lambda p, x, y, k, v: bx.batch_diag_hessian(net, p, x, y),
        "diag_ggn_mc": lambda p, x, y, k, v: bx.diag_ggn_mc(net, p, x, y, k),
        "kfac_factors": lambda p, x, y, k, v: bx.kfac_factors(net, p, x, y),
        "hvp": lambda p, x, y, k, v: bx.hvp(net, p, x, y, v),
    }


# -- JAX autodiff per example (vmap(grad)), chunked ----------------------------------------------


def _chunks(batch: int, bytes_per_example: int, budget_gib: float) -> int:
    """The largest divisor of ``batch`` whose chunk of per-example arrays fits the budget."""
    most = max(1, int(budget_gib * 2**30 // max(bytes_per_example, 1)))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= most)


def autodiff_functions(net: Any, batch: int, chunk_gib: float) -> dict[str, Callable[..., Any]]:
    """Each quantity from JAX autodiff per example, as ``f(params, x, y, key, v)``.

    ``kfac_factors`` only for an :class:`~bpjax.MLP` (it perturbs each Dense layer's ``z``).
    """
    n_out = net.output_shape[-1]
    bytes_grad = 4 * param_count(net)
    chunk = _chunks(batch, bytes_grad, chunk_gib)
    chunk_k = _chunks(batch, bytes_grad * n_out, chunk_gib)

    def one_loss(p: Params, xn: Array, yn: Array) -> Array:
        return net.loss(p, xn[None], yn[None])

    per_example = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))

    def split(a: Array, size: int) -> Array:
        return a.reshape(a.shape[0] // size, size, *a.shape[1:])

    def scan_sum(fn: Callable[..., Any], size: int, p: Params, *batched: Array) -> Any:
        """``Σ`` over chunks of ``fn(p, *chunk)`` by lax.scan."""
        if size == batched[0].shape[0]:  # one chunk: no loop
            return fn(p, *batched)
        parts = [split(a, size) for a in batched]
        first = jax.eval_shape(fn, p, *(a[0] for a in parts))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

        def body(acc: Any, xs: Any) -> tuple[Any, None]:
            return jax.tree.map(jnp.add, acc, fn(p, *xs)), None

        return jax.lax.scan(body, zero, parts)[0]

    def map_cat(fn: Callable[..., Any], size: int, p: Params, *batched: Array) -> Any:
        """``fn(p, *chunk)`` over chunks by lax.map, concatenated along the batch.

        One chunk runs without the loop: XLA:CPU lays out a vmapped convolution's weight
        gradient inside a while loop as a convolution it runs ~10× slower (seen on the CNN).
        """
        if size == batched[0].shape[0]:
            return fn(p, *batched)
        out = jax.lax.map(lambda xs: fn(p, *xs), [split(a, size) for a in batched])
        return jax.tree.map(lambda t: t.reshape(batch, *t.shape[2:]), out)

    def batch_grad(p, x, y, k, v):
        return map_cat(per_example, chunk, p, x, y)

    def batch_l2_grad(p, x, y, k, v):
        def norms(p, xc, yc):
            g = per_example(p, xc, yc)
            return jax.tree.map(lambda t: jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1), g)

        return map_cat(norms, chunk, p, x, y)

    def sums(p, xc, yc):
        g = per_example(p, xc, yc)
        return jax.tree.map(lambda t: jnp.sum(t**2, axis=0), g), jax.tree.map(
            lambda t: jnp.sum(t, axis=0), g
        )

    def sum_grad_squared(p, x, y, k, v):
        return scan_sum(lambda p, xc, yc: sums(p, xc, yc)[0], chunk, p, x, y)

    def variance(p, x, y, k, v):
        sq, s = scan_sum(sums, chunk, p, x, y)
        return jax.tree.map(lambda a, b: a / batch - (b / batch) ** 2, sq, s)

    def clipped_grad(p, x, y, k, v):
        def clipped_sum(p, xc, yc):
            g = per_example(p, xc, yc)
            sq = sum(jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1) for t in jax.tree.leaves(g))
            scale = jnp.minimum(1.0, MAX_NORM / jnp.sqrt(sq))
            return jax.tree.map(lambda t: jnp.tensordot(scale, t, axes=1), g)

        total = scan_sum(clipped_sum, chunk, p, x, y)
        return jax.tree.map(lambda t: t / batch, total)

    def logits(p: Params, xn: Array) -> Array:
        return net.forward(p, xn[None])[1].layers[-1].z[0]  # the last Dense layer's z

    def loss_of_z(zn: Array, yn: Array) -> Array:
        return net.output_loss(zn[None], jax.nn.softmax(zn)[None], yn[None])[0]

    def ggn_columns(p, xn, columns):
        """``Σ_c (J_nᵀ s_c)²`` over the columns ``(n_out, k)``, by vjp of ``z^L_n``."""
        _, pullback = jax.vjp(lambda q: logits(q, xn), p)
        g = jax.vmap(lambda s: pullback(s)[0], in_axes=1)(columns)
        return jax.tree.map(lambda t: jnp.sum(t**2, axis=0), g)

    def ggn_example(p, xn, yn):
        """``diag(J_nᵀ H_n J_n)`` from ``H_n``'s eigendecomposition."""
        hess = jax.hessian(loss_of_z)(logits(p, xn), yn)
        lam, q = jnp.linalg.eigh(hess)
        return ggn_columns(p, xn, q * jnp.sqrt(jnp.maximum(lam, 0.0)))

    def diag_ggn(p, x, y, k, v):
        def chunk_sum(p, xc, yc):
            each = jax.vmap(ggn_example, in_axes=(None, 0, 0))(p, xc, yc)
            return jax.tree.map(lambda t: jnp.sum(t, axis=0), each)

        total = scan_sum(chunk_sum, chunk_k, p, x, y)
        return jax.tree.map(lambda t: t / batch, total)

    def batch_diag_ggn(p, x, y, k, v):
        each = jax.vmap(ggn_example, in_axes=(None, 0, 0))
        return jax.tree.map(lambda t: t / batch, map_cat(each, chunk_k, p, x, y))

    def hessian_diagonal(loss: Callable[[Params], Array], p: Params) -> Params:
        """``diag(∇² loss)`` like ``p``: ``e_iᵀ (∇² loss) e_i`` by forward over reverse mode,
        one Hessian-vector product per unit vector ``e_i``."""
        flat, unflatten = ravel_pytree(p)
        grad = jax.grad(lambda q: loss(unflatten(q)))
        hvp_of = jax.vmap(lambda e: jnp.vdot(e, jax.jvp(grad, (flat,), (e,))[1]))
        return unflatten(hvp_of(jnp.eye(flat.size, dtype=flat.dtype)))

    def diag_hessian(p, x, y, k, v):
        return hessian_diagonal(lambda q: net.loss(q, x, y), p)

    def batch_diag_hessian(p, x, y, k, v):
        def one(xn, yn):  # the diagonal of (1/B) ∇²C_n
            return hessian_diagonal(lambda q: one_loss(q, xn, yn) / batch, p)

        return jax.vmap(one)(x, y)

    def diag_ggn_mc(p, x, y, k, v):
        keys = jax.random.split(k, batch)

        def chunk_sum(p, xc, yc, kc):
            def one(xn, yn, kn):
                zn = logits(p, xn)
                sample = jax.random.categorical(kn, zn)
                g = jax.grad(loss_of_z)(zn, sample)
                return ggn_columns(p, xn, g[:, None])

            return jax.tree.map(lambda t: jnp.sum(t, axis=0), jax.vmap(one)(xc, yc, kc))

        total = scan_sum(chunk_sum, chunk, p, x, y, keys)
        return jax.tree.map(lambda t: t / batch, total)

    def kfac_factors(p, x, y, k, v):
        """``A`` from the inputs; ``G`` from vjp's of ``S_nᵀ z^L`` in perturbations of every z^l."""
        _, cache = net.forward(p, x)
        inputs = [cache.x, *cache.a[:-1]]
        eps = [jnp.zeros_like(z) for z in cache.z]

        def logits_eps(e):
            a = cache.x
            for layer, act, e_l in zip(p, net.activations, e, strict=True):
                z = a @ layer["W"].T + layer["b"] + e_l
                a = act.forward(z)
            return z

        z_out, pullback = jax.vjp(logits_eps, eps)

        def factor(zn, yn):
            lam, q = jnp.linalg.eigh(jax.hessian(loss_of_z)(zn, yn))
            return q * jnp.sqrt(jnp.maximum(lam, 0.0))

        s = jax.vmap(factor)(z_out, y)  # (batch, n_out, k)
        deltas = jax.vmap(lambda c: pullback(c)[0], in_axes=2)(s)  # L × (k, batch, n_l)
        out = []
        for d, a in zip(deltas, inputs, strict=True):
            a_bar = jnp.concatenate([a, jnp.ones((batch, 1), a.dtype)], axis=1)
            flat = d.reshape(-1, d.shape[-1])
            out.append(bx.KFACFactors(a_bar.T @ a_bar / batch, flat.T @ flat / batch))
        return out

    def hvp(p, x, y, k, v):
        return jax.jvp(lambda q: jax.grad(net.loss)(q, x, y), (p,), (v,))[1]

    fns = {
        "batch_grad": batch_grad,
        "batch_l2_grad": batch_l2_grad,
        "sum_grad_squared": sum_grad_squared,
        "variance": variance,
        "clipped_grad": clipped_grad,
        "diag_ggn": diag_ggn,
        "batch_diag_ggn": batch_diag_ggn,
        "diag_hessian": diag_hessian,
        "batch_diag_hessian": batch_diag_hessian,
        "diag_ggn_mc": diag_ggn_mc,
        "kfac_factors": kfac_factors,
        "hvp": hvp,
    }
    if not isinstance(net, MLP):
        del fns["kfac_factors"]
    if param_count(net) > HESSIAN_VMAP_MAX_PARAMS:
        del fns["diag_hessian"], fns["batch_diag_hessian"]
    return fns


# -- BackPACK ------------------------------------------------------------------------------------

_TORCH_ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}

BACKPACK_SCALE = {
    "batch_grad": 1,  # BackPACK: ∇(C_n / B); bpjax: ∇C_n
    "batch_l2_grad": 2,  # ‖∇C_n / B‖²
    "sum_grad_squared": 2,  # Σ_n (∇C_n / B)²
    "variance": 2,  # the variance of ∇C_n / B over the batch
}
"""The power of ``B`` that takes BackPACK's output to bpjax's (others: the same convention)."""


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    lead = tuple(range(a.ndim - 4))
    return a.transpose(*lead, a.ndim - 2, a.ndim - 1, a.ndim - 3, a.ndim - 4)


def _chw_to_hwc_columns(a: np.ndarray, hwc: tuple[int, ...]) -> np.ndarray:
    """A Dense weight's columns from torch's C,H,W flattening order back to bpjax's H,W,C."""
    h, w, c = hwc
    cols = a.reshape(*a.shape[:-1], c, h, w)
    return np.moveaxis(cols, -3, -1).reshape(a.shape)


def torch_model(net: Any, params: Params) -> tuple[Any, list[tuple[int, str, Callable]]]:
    """``net`` as ``torch.nn.Sequential`` holding copies of ``params``, and how to map back.

    Dense → ``Linear``; Conv2D (symmetric pads) → ``Conv2d`` with the HWIO kernel as OIHW;
    MaxPool2D (unpadded) → ``MaxPool2d``; Flatten → ``Flatten``, and the next Dense weight's
    columns permuted from bpjax's H,W,C order of an NHWC image to torch's C,H,W of an NCHW one;
    ReLU, tanh, sigmoid hidden activations; a softmax output is left to ``CrossEntropyLoss``.

    Returns:
      ``(model, back)``: ``back[j] = (layer, key, to_bpjax)`` for the model's ``j``-th
      parameter: the bpjax layer index and leaf key, and a function taking an array of the
      parameter's torch layout (with any leading axes) to bpjax's layout.

    Raises:
      ValueError: a layer, activation or loss not translated.
    """
    import torch

    if net.objective.name != "cross_entropy" or net.layers[-1].activation.name != "softmax":
        raise ValueError("torch_model: the networks here end in softmax + cross_entropy.")
    shape = tuple(net.input_shape)
    flattened: tuple[int, ...] | None = None  # the (H, W, C) a Flatten flattened
    modules: list[Any] = []
    back: list[tuple[int, str, Callable]] = []
    same: Callable[[np.ndarray], np.ndarray] = lambda a: a  # noqa: E731
    for i, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
        out_shape = tuple(layer.init(jax.random.key(0), shape)[1])
        if isinstance(layer, Conv2D):
            pads = layer.padding
            if isinstance(pads, str):
                pads = jax.lax.padtype_to_pads(shape[:2], layer.kernel_size, layer.strides, pads)
            (top, bottom), (left, right) = pads
            if top != bottom or left != right:
                raise ValueError(f"torch_model: layer {i} has asymmetric pads {pads}.")
            module = torch.nn.Conv2d(
                shape[2], layer.features, layer.kernel_size, layer.strides, (top, left)
            )
            weight = np.array(p["W"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
            back += [(i, "W", _oihw_to_hwio), (i, "b", same)]
        elif isinstance(layer, Dense):
            if len(shape) != 1:
                raise ValueError(f"torch_model: layer {i} is a Dense layer on {shape}.")
            module = torch.nn.Linear(shape[0], layer.n_out)
            weight = np.array(p["W"])
            if flattened is not None:  # torch flattens NCHW: columns in C,H,W order
                h, w, c = flattened
                weight = weight.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(weight.shape)
                hwc = flattened
                back += [(i, "W", lambda a, hwc=hwc: _chw_to_hwc_columns(a, hwc)), (i, "b", same)]
            else:
                back += [(i, "W", same), (i, "b", same)]
            flattened = None
        elif isinstance(layer, MaxPool2D):
            if layer.padding not in ("VALID", ((0, 0), (0, 0))):
                raise ValueError(f"torch_model: layer {i} is a padded MaxPool2D.")
            modules.append(torch.nn.MaxPool2d(layer.window, layer.strides))
        elif isinstance(layer, Flatten):
            modules.append(torch.nn.Flatten())
            flattened = shape if len(shape) == 3 else None
        else:
            raise ValueError(f"torch_model: layer {i} ({type(layer).__name__}) not translated.")
        if isinstance(layer, Conv2D | Dense):
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
                module.bias.copy_(torch.from_numpy(np.array(p["b"])))
            modules.append(module)
            name = layer.activation.name
            if i < len(net.layers) - 1 and name != "identity":
                if name not in _TORCH_ACTIVATIONS:
                    raise ValueError(f"torch_model: layer {i}'s activation {name!r}.")
                modules.append(getattr(torch.nn, _TORCH_ACTIVATIONS[name])())
        shape = out_shape
    return torch.nn.Sequential(*modules), back


def backpack_functions(
    net: Any, params: Params, x: Array, y: Array
) -> tuple[dict[str, Callable[[], Any]], Callable[[str, Any], Any], str]:
    """Each quantity by BackPACK on the same architecture, params and data, as ``f()``.

    Checks first that the torch model's loss is bpjax's (``ValueError`` if not).

    Returns:
      ``(fns, to_bpjax, why)``: ``to_bpjax(quantity, output)`` takes what ``fns[quantity]()``
      returns to bpjax's params structure, layout and scaling; ``({}, None, why)`` when torch
      or backpack-for-pytorch is missing.
    """
    try:
        import torch
        from backpack import backpack, extend
        from backpack import extensions as ext
    except ImportError as err:
        return {}, None, f"BackPACK skipped: {err} (pip install '.[bench]')"
    # BackPACK's hooks fire on module outputs when the inputs need no gradient: expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    plain, back = torch_model(net, params)
    model = extend(plain)
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    xs = np.array(x)
    tx = torch.from_numpy(np.ascontiguousarray(xs.transpose(0, 3, 1, 2) if xs.ndim == 4 else xs))
    ty = torch.from_numpy(np.array(y)).long()
    with torch.no_grad():
        theirs = float(lossfunc(model(tx), ty))
    ours = float(net.loss(params, x, y))
    if not math.isclose(theirs, ours, rel_tol=1e-5, abs_tol=1e-6):
        raise ValueError(f"the torch model's loss {theirs} is not bpjax's {ours}.")

    def run(extension: Any, attribute: str) -> list[Any]:
        model.zero_grad()
        loss = lossfunc(model(tx), ty)
        with backpack(extension):
            loss.backward()
        return [getattr(q, attribute) for q in model.parameters()]

    def clipped() -> list[Any]:
        # DP-SGD with BackPACK: per-example gradients (of the mean loss: ∇C_n / B), clip, sum
        grads = run(ext.BatchGrad(), "grad_batch")
        batch = grads[0].shape[0]
        sq = sum(((g.reshape(batch, -1) * batch) ** 2).sum(dim=1) for g in grads)
        scale = torch.clamp(MAX_NORM / sq.sqrt(), max=1.0)
        return [torch.einsum("n,n...->...", scale, g) for g in grads]

    batch = xs.shape[0]

    def to_bpjax(quantity: str, output: Sequence[Any]) -> Params:
        out: list[dict[str, Any]] = [{} for _ in net.layers]
        scale = batch ** BACKPACK_SCALE.get(quantity, 0)
        for (i, key, layout), t in zip(back, output, strict=True):
            a = t.detach().numpy() * scale
            out[i][key] = jnp.asarray(a if quantity == "batch_l2_grad" else layout(a))
        return out

    return (
        {
            "batch_grad": lambda: run(ext.BatchGrad(), "grad_batch"),
            "batch_l2_grad": lambda: run(ext.BatchL2Grad(), "batch_l2"),
            "sum_grad_squared": lambda: run(ext.SumGradSquared(), "sum_grad_squared"),
            "variance": lambda: run(ext.Variance(), "variance"),
            "clipped_grad": clipped,
            "diag_ggn": lambda: run(ext.DiagGGNExact(), "diag_ggn_exact"),
            "batch_diag_ggn": lambda: run(ext.BatchDiagGGNExact(), "diag_ggn_exact_batch"),
            "diag_hessian": lambda: run(ext.DiagHessian(), "diag_h"),
            "batch_diag_hessian": lambda: run(ext.BatchDiagHessian(), "diag_h_batch"),
            "diag_ggn_mc": lambda: run(ext.DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
            "kfac_factors": lambda: run(ext.KFLR(), "kflr"),
        },
        to_bpjax,
        "",
    )


# -- timing --------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One quantity on one case."""

    quantity: str
    times: dict[str, Stats]  # by implementation
    speedup: dict[str, Stats]  # "vmap(grad)", "BackPACK": other / bpjax (paired per round)
    repeats: int
    mismatch: float | None  # max |bpjax − vmap(grad)| / max |vmap(grad)|
    note: str = ""
    mismatch_backpack: float | None = None  # max |bpjax − BackPACK| / max |BackPACK|


COMPARED_WITH_BACKPACK = (
    "batch_grad",
    "batch_l2_grad",
    "sum_grad_squared",
    "variance",
    "clipped_grad",
    "diag_ggn",
    "batch_diag_ggn",
    "diag_hessian",
    "batch_diag_hessian",
)
"""The quantities whose BackPACK output is compared with bpjax's (not the sampled diag_ggn_mc,
nor KFLR, whose factors are laid out differently)."""


def mismatch(got: Any, want: Any) -> float:
    """``max |got − want|`` over every leaf, relative to ``max |want|``."""
    diffs = [
        float(jnp.max(jnp.abs(g - w)))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    return max(diffs) / max(scale, 1e-30)


def bench_case(
    case: AnyCase,
    quantities: Sequence[str],
    *,
    budget: float,
    min_repeats: int,
    max_gib: float,
    skip_vmap: Sequence[str],
    warm_runs: int,
    chunk_gib: float,
    seed: int,
    console: Console,
    pause: float | None = None,
) -> list[Row]:
    """Checks and times ``quantities`` on ``case``; one :class:`Row` each.

    With ``pause=None`` the implementations run in the same interleaved rounds and every
    speed-up is the median of per-round paired ratios. With ``pause`` (seconds) the JAX ones
    (bpjax and vmap(grad)) run their interleaved rounds first, then, after the pause, BackPACK
    runs its rounds alone and the pause follows again, so that PyTorch's CPU thread pool and
    XLA's do not take cores from each other; BackPACK's speed-up is then each of its times over
    the median bpjax time.

    A quantity bpjax rejects for this network with a ``TypeError`` gets a row saying so and no
    times.
    """
    net = build_net(case)
    params, x, y = make_problem(net, case.batch, seed)
    n_params = param_count(net)
    key = jax.random.key(seed + 1)
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(seed + 2), flat.shape, DTYPE))
    args = (params, x, y, key, v)
    ours = bpjax_functions(net)
    theirs = autodiff_functions(net, case.batch, chunk_gib)
    peers, to_bpjax, why = backpack_functions(net, params, x, y)
    if why:
        console.print(why)
    rows = []
    for q in quantities:
        gib = output_gib(q, n_params, case.batch)
        if gib > max_gib and q != "clipped_grad":  # only BackPACK's clipping uses BatchGrad
            note = f"skipped: materialises {gib:.1f} GiB of per-example gradients (> --max-gib)"
            console.print(f"{case.name} {q}: {note}")
            rows.append(Row(q, {}, {}, 0, None, note))
            continue
        fns: dict[str, Callable[[], Any]] = {"bpjax": functools.partial(jax.jit(ours[q]), *args)}
        try:
            first_out = jax.block_until_ready(fns["bpjax"]())  # compile
        except TypeError as err:
            note = "skipped (bpjax: TypeError)"
            console.print(f"{case.name} {q}: {note}: {err}")
            rows.append(Row(q, {}, {}, 0, None, note))
            continue
        if q not in skip_vmap and q in theirs:
            fns["vmap(grad)"] = functools.partial(jax.jit(theirs[q]), *args)
        if q in peers and not (q == "clipped_grad" and gib > max_gib):
            fns["BackPACK"] = peers[q]
        once = {}
        outputs = {"bpjax": first_out}
        del first_out
        for name, fn in fns.items():
            if name != "bpjax":
                outputs[name] = jax.block_until_ready(fn())  # compile
            if warm_runs:
                start = time.perf_counter()
                for _ in range(warm_runs):
                    outputs[name] = jax.block_until_ready(fn())
                once[name] = (time.perf_counter() - start) / warm_runs
            else:
                once[name] = math.nan
        diff = (
            mismatch(outputs["bpjax"], outputs["vmap(grad)"])
            if "vmap(grad)" in outputs and q != "diag_ggn_mc"
            else None
        )
        diff_backpack = (
            mismatch(outputs["bpjax"], to_bpjax(q, outputs["BackPACK"]))
            if "BackPACK" in outputs and q in COMPARED_WITH_BACKPACK and to_bpjax is not None
            else None
        )
        del outputs
        round_s = sum(once.values())
        repeats = min_repeats if math.isnan(round_s) else int(budget / max(round_s, 1e-9))
        repeats = max(min_repeats, min(51, repeats)) | 1
        first = ", ".join(f"{n} {t * 1e3:.4g} ms" for n, t in once.items() if t == t)
        console.log(f"{case.name} {q}: {first or 'compiled'}; {repeats} rounds")
        if pause is None:
            samples = time_interleaved(fns, (), repeats=repeats)
        else:
            jax_fns = {n: f for n, f in fns.items() if n != "BackPACK"}
            samples = time_interleaved(jax_fns, (), repeats=repeats)
            if "BackPACK" in fns:
                time.sleep(pause)
                samples |= time_interleaved({"BackPACK": fns["BackPACK"]}, (), repeats=repeats)
                time.sleep(pause)
        times = {n: Stats.of(s) for n, s in samples.items()}
        ours_s = samples["bpjax"]  # paired per round with what ran in the same rounds
        speedup = {
            n: Stats.of(samples[n] / (np.median(ours_s) if apart else ours_s))
            for n in samples
            if n != "bpjax"
            for apart in [pause is not None and n == "BackPACK"]
        }
        notes = []
        if q in skip_vmap:
            notes.append("vmap(grad) not run (--skip-vmap)")
        elif q not in theirs:
            notes.append("no vmap(grad) version for this network")
        if q == "clipped_grad" and gib > max_gib:
            notes.append(f"BackPACK not run: its BatchGrad would materialise {gib:.1f} GiB")
        rows.append(Row(q, times, speedup, repeats, diff, "; ".join(notes), diff_backpack))
        medians = ", ".join(f"{n} {t.median * 1e3:.4g} ms" for n, t in times.items())
        console.log(f"{case.name} {q}: medians {medians}")
    return rows


# -- reporting -----------------------------------------------------------------------------------


def _ms(stats: Stats | None) -> str:
    if stats is None:
        return "—"
    return f"{stats.median * 1e3:.3g}" if stats.median < 1 else f"{stats.median * 1e3:.0f}"


def _x(stats: Stats | None) -> str:
    return "—" if stats is None else f"{stats.median:.3g}×"


def _e(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def render(case: AnyCase, rows: Sequence[Row]) -> Table:
    table = Table(title=f"{case.name}: {describe(case)} @ B={case.batch}, float32")
    table.add_column("quantity", no_wrap=True)
    for header in (
        "bpjax ms",
        "vmap(grad) ms",
        "vmap / bpjax",
        "BackPACK ms",
        "BackPACK / bpjax",
        "rounds",
        "max|Δ| vs vmap",
        "max|Δ| vs BackPACK",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        if not r.times:
            table.add_row(r.quantity, r.note, "", "", "", "", "", "", "")
            continue
        table.add_row(
            r.quantity,
            _ms(r.times.get("bpjax")),
            _ms(r.times.get("vmap(grad)")),
            _x(r.speedup.get("vmap(grad)")),
            _ms(r.times.get("BackPACK")),
            _x(r.speedup.get("BackPACK")),
            str(r.repeats),
            _e(r.mismatch),
            _e(r.mismatch_backpack),
        )
    return table


def markdown(case: AnyCase, rows: Sequence[Row]) -> str:
    """The table as GitHub markdown (for the README)."""
    lines = [
        f"{case.name} `{describe(case)}` @ B={case.batch}:",
        "",
        "| quantity | bpjax ms | vmap(grad) ms | vmap / bpjax | BackPACK ms | BackPACK / bpjax |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if not r.times:
            lines.append(f"| {r.quantity} | {r.note} | | | | |")
            continue
        lines.append(
            f"| {r.quantity} | {_ms(r.times.get('bpjax'))} | {_ms(r.times.get('vmap(grad)'))} | "
            f"{_x(r.speedup.get('vmap(grad)'))} | {_ms(r.times.get('BackPACK'))} | "
            f"{_x(r.speedup.get('BackPACK'))} |"
        )
    return "\n".join(lines)


def row_to_json(r: Row) -> dict[str, Any]:
    return {
        "quantity": r.quantity,
        "times_s": {n: s._asdict() for n, s in r.times.items()},
        "speedup_over_bpjax": {n: s._asdict() for n, s in r.speedup.items()},
        "repeats": r.repeats,
        "mismatch_vs_vmap": r.mismatch,
        "mismatch_vs_backpack": r.mismatch_backpack,
        "note": r.note,
    }


def case_to_json(case: AnyCase, rows: Sequence[Row]) -> dict[str, Any]:
    """One case's results: what the network is, and its rows."""
    net = {"sizes": list(case.sizes)} if isinstance(case, Case) else {}
    if isinstance(case, ConvCase):
        net = {"image": list(case.image), "channels": list(case.channels), "n_out": case.n_out}
    return {
        "case": case.name,
        "network": describe(case),
        **net,
        "batch": case.batch,
        "params": param_count(build_net(case)),
        "rows": [row_to_json(r) for r in rows],
    }


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["medium", "large"],
        metavar="CASE",
        help="medium, large, cnn (the CNN on 32×32×3 at B=128), cnn:S@B (on S×S×3 images at "
        "batch B) or an MLP as 'n0,n1,...,nL@B' (default: medium large)",
    )
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per quantity")
    parser.add_argument("--min-repeats", type=int, default=5, help="rounds at least (default 5)")
    parser.add_argument(
        "--max-gib", type=float, default=8.0, help="skip larger per-example outputs"
    )
    parser.add_argument(
        "--chunk-gib", type=float, default=1.0, help="per-example gradients per vmap(grad) chunk"
    )
    parser.add_argument(
        "--skip-vmap",
        nargs="*",
        default=[],
        choices=QUANTITIES,
        metavar="QUANTITY",
        help="quantities whose vmap(grad) version is not run (too slow at the large size)",
    )
    parser.add_argument(
        "--warm-runs",
        type=int,
        default=1,
        help="timed runs after the compiling one, to size the rounds (0: just --min-repeats)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        metavar="SECONDS",
        help="time BackPACK apart from the JAX functions, pausing this long between "
        "(default: all three in the same interleaved rounds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_extend_case(s) for s in args.sizes]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--sizes: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    m = machine_info()
    console.print(
        f"jax {m['jax']}, backend {m['backend']}, {describe_machine(m)}, {m['machine']}; "
        f"bpjax from {Path(bp.__file__).parent}; relu hidden, softmax + cross_entropy, float32"
    )
    results = []
    for case in args.sizes:
        start = time.perf_counter()
        rows = bench_case(
            case,
            args.quantities,
            budget=args.budget,
            min_repeats=args.min_repeats,
            max_gib=args.max_gib,
            skip_vmap=args.skip_vmap,
            warm_runs=args.warm_runs,
            chunk_gib=args.chunk_gib,
            seed=args.seed,
            console=console,
            pause=args.pause,
        )
        console.print(render(case, rows))
        console.print(markdown(case, rows), markup=False, highlight=False)
        console.print(f"({time.perf_counter() - start:.0f} s)")
        results.append((case, rows))
    if args.json is not None:
        payload = {
            "machine": m,
            "settings": {k: v for k, v in vars(args).items() if k not in ("sizes", "json")},
            "results": [case_to_json(c, rows) for c, rows in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
