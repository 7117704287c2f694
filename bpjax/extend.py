"""Per-example gradients and curvature from one backward pass: BackPACK's quantities, under ``jit``.

The δ-recursion keeps the per-example errors ``δ^l_n = ∂C_n/∂z^l_n`` (unscaled by ``1/B``) and the
forward keeps every layer's input ``a^{l-1}_n``. Because ``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ`` and
``∇_{b^l} C_n = δ^l_n``, every quantity below is a cheap contraction of the two, computed with no
``vmap(grad)``:

==================  ==========================================================================
function            per leaf, for ``W^l`` (``b^l``: drop the ``a`` factor)
==================  ==========================================================================
batch_grad          ``∇C_n = δ_n a_nᵀ``, shape ``(batch, n_l, n_{l-1})``
batch_l2_grad       ``‖δ_n a_nᵀ‖² = ‖δ_n‖² ‖a_n‖²``, shape ``(batch,)``
sum_grad_squared    ``Σ_n (δ_n a_nᵀ)² = (δ ∘ δ)ᵀ (a ∘ a)``
variance            ``(1/B) Σ_n (∇C_n)² − ((1/B) Σ_n ∇C_n)²``
clipped_grad        ``(1/B) Σ_n s_n ∇C_n``, ``s_n = min(1, c / ‖∇_θ C_n‖)`` (DP-SGD clipping)
==================  ==========================================================================

Curvature. Let ``H_n = ∂²C_n/∂(z^L_n)²`` be the Hessian of the per-example loss with respect to
the output weighted input ``z^L`` and ``J_n = ∂z^L_n/∂θ``. The generalised Gauss-Newton matrix is
``GGN = (1/B) Σ_n J_nᵀ H_n J_n``. Write ``H_n = S_n D_n S_nᵀ`` with ``S_n`` of shape ``(n_L, k)``
and ``D_n = diag(±1)`` (``D = I`` when ``H_n`` is positive semi-definite, as for every canonical
pair). Each column ``s_{n,c}`` of ``S_n``, handed to the δ-recursion as the output error
``δ^L``, comes back at layer ``l`` as ``δ^l_{n,c} = (∂z^L_n/∂z^l_n)ᵀ s_{n,c}``, and

    diag(GGN) for W^l  = (1/B) Σ_n Σ_c d_{n,c} (δ^l_{n,c})² (a^{l-1}_n)²ᵀ
    KFAC               A^l = (1/B) Σ_n ā_n ā_nᵀ,  G^l = (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} (δ^l_{n,c})ᵀ

with ``ā = [a^{l-1}; 1]``. The factor ``S_n`` is closed-form for the canonical output pairs:

=========================  ================================  =====================================
pair                       ``H_n`` (``p = a^L_n``)             factor ``S_n`` (``k = n_L``)
=========================  ================================  =====================================
softmax + cross_entropy    ``σ (diag(p) − p pᵀ)``              ``√σ (diag(√p) − p √pᵀ)``
sigmoid + binary c.-e.     ``diag(p ∘ (1 − p))``               ``diag(√(p ∘ (1 − p)))``
identity + squared_error   ``I`` (the loss is ``½‖y − z‖²``)   ``I``
=========================  ================================  =====================================

(``σ = Σ_j y_j``, 1 for labels and probability targets.) Every other (output activation, loss)
pair takes the general route: ``H_n`` by ``jax.hessian`` of the per-example loss as a function of
``z^L_n``, then its eigendecomposition ``H_n = Q Λ Qᵀ``, ``S_n = Q |Λ|^{1/2}``,
``D_n = sign(Λ)``. There ``H_n`` (and so the GGN) may be indefinite, e.g. a tanh output under
squared error; the formulas stay exact. :func:`diag_ggn_mc` samples targets from the model's
predictive distribution and so needs a canonical pair (a likelihood); it raises otherwise.

Second order: :func:`hvp` is forward mode (``jax.jvp``) over the hand-written backward, so
``∇²C v`` costs about two backward passes; :func:`levenberg_marquardt_step` solves the damped
Gauss-Newton system with the per-example Jacobian built by the same recursion.

Every function takes ``(net, params, x, y, ...)``: ``net`` a :class:`bpjax.MLP` or a
:func:`bpjax.serial` network made only of :class:`bpjax.layers.Dense` layers (it is hashable: pass
it as a static argument, ``jax.jit(batch_grad, static_argnums=0)``, or close over it), params a list
with one ``{"W": (n_l, n_{l-1}), "b": (n_l,)}`` per layer, ``x`` of shape ``(batch, n_0)`` and ``y``
as ``net.loss`` takes it. All of them run under ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bpjax import activations as _act
from bpjax import losses as _losses
from bpjax._cache import jit_wrapper, memoized
from bpjax._types import Array, Grads, Params, PRNGKey
from bpjax.check import CheckRow, GradCheckReport
from bpjax.check.grads import least_precise
from bpjax.check.tolerance import compare, explicit_tolerance, measure
from bpjax.layers import Dense, DenseCache, backprop
from bpjax.mlp import Cache

__all__ = [
    "CURVATURE_REFERENCES",
    "KFACFactors",
    "batch_grad",
    "batch_l2_grad",
    "check_curvature",
    "clipped_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "hvp",
    "kfac_factors",
    "kfac_precondition",
    "kfac_preconditioner",
    "levenberg_marquardt_step",
    "loss_hessian_factor",
    "sum_grad_squared",
    "variance",
]

CURVATURE_REFERENCES = ("hvp", "diag_ggn")
"""The quantities :func:`check_curvature` compares with ``jax.hessian``/``jax.jacobian``."""


class KFACFactors(NamedTuple):
    """One layer's Kronecker factors; ``A ⊗ G`` approximates its GGN block (see kfac_factors)."""

    A: Array  # (n_{l-1} + 1, n_{l-1} + 1): (1/B) Σ_n ā_n ā_nᵀ, ā = [a^{l-1}; 1]
    G: Array  # (n_l, n_l): (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} (δ^l_{n,c})ᵀ


class _Pass(NamedTuple):
    """The forward pass in per-layer form, and the checked targets."""

    caches: list[DenseCache]  # L × DenseCache(x: (batch, n_{l-1}), z, a: (batch, n_l))
    y: Array  # targets as the loss takes them


# -- the network, checked ------------------------------------------------------------------------


def _check_net(net: Any, *, purpose: str = "bpjax.extend works on") -> tuple[Dense, ...]:
    """``net``'s layers, or a ``TypeError`` unless it is a network of Dense layers on vectors."""
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


def _compiled(
    *, static_argnames: tuple[str, ...] = (), positive: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs a public ``f(net, ...)`` under ``jax.jit`` with ``net`` static, after checks in Python.

    ``net`` is checked first (a clear TypeError, not jit's "unhashable static argument"), and the
    arguments named in ``positive`` while they are still concrete. Called eagerly, the function
    compiles once per net and shapes instead of dispatching op by op; inside a caller's ``jit`` it
    is inlined.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        jitted = jax.jit(fn, static_argnums=0, static_argnames=static_argnames)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(net: Any, *args: Any, **kwargs: Any) -> Any:
            _check_net(net)
            if positive:
                bound = signature.bind(net, *args, **kwargs)
                for name in positive:
                    _check_positive(bound.arguments[name], name)
            return jitted(net, *args, **kwargs)

        return wrapper

    return decorate


def _forward(net: Any, params: Params, x: Array, y: Array) -> _Pass:
    """``net.forward`` (which checks params and x), as one :class:`DenseCache` per layer."""
    _check_net(net)
    out, cache = net.forward(params, x)
    if isinstance(cache, Cache):
        caches = [
            DenseCache(a_prev, z, a)
            for a_prev, z, a in zip([cache.x, *cache.a[:-1]], cache.z, cache.a, strict=True)
        ]
    else:
        caches = list(cache.layers)
    targets = net.objective.targets
    y = jnp.asarray(y) if targets is None else targets(y, out.shape[0], out.shape[1], out.dtype)
    return _Pass(caches, y)


def _output_activation(net: Any) -> _act.Activation:
    return net.layers[-1].activation


def _output_loss(net: Any, z: Array, y: Array) -> Array:
    """``C_n`` of shape ``(batch,)`` from ``z^L``, as ``net.loss`` computes it."""
    fused = net.fused
    if fused is not None:
        return fused.value(z, y)
    return net.objective.value(z, _output_activation(net).forward(z), y)


def _deltas(net: Any, params: Params, fwd: _Pass) -> list[Array]:
    """The per-example, unscaled ``δ^l_n`` of every layer by the δ-recursion."""
    last = fwd.caches[-1]
    fused = net.fused
    if fused is not None:
        delta = fused.delta(last.z, last.a, fwd.y)
    else:
        delta = net.layers[-1].delta(last, net.objective.grad(last.z, last.a, fwd.y))
    _, errors, _ = backprop(net.layers, params, fwd.caches, output_delta=delta)
    return errors


def _factor_deltas(
    net: Any, params: Params, caches: list[DenseCache], factor: Array
) -> list[Array]:
    """Each column of ``factor`` (batch, n_L, k) sent down the δ-recursion: L × (k, batch, n_l)."""

    def down(column: Array) -> list[Array]:
        return backprop(net.layers, params, caches, output_delta=column)[1]

    return jax.vmap(down, in_axes=2)(factor)


# -- per-example first-order quantities ----------------------------------------------------------


@_compiled()
def batch_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example gradients ``∇_θ C_n``, each leaf with a leading batch axis.

    ``∇_{W^l} C_n = δ^l_n (a^{l-1}_n)ᵀ`` and ``∇_{b^l} C_n = δ^l_n``, unscaled: their mean over
    the batch is the gradient of the batch-mean loss.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers.
      params: a list with one ``{"W": (n_l, n_{l-1}), "b": (n_l,)}`` per layer.
      x: inputs of shape ``(batch, n_0)``.
      y: targets as ``net.loss`` takes them.

    Returns:
      Like params, with leaves ``(batch, n_l, n_{l-1})`` and ``(batch, n_l)``.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> g = batch_grad(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> g[0]["W"].shape, g[1]["b"].shape
      ((5, 4, 3), (5, 2))
    """
    fwd = _forward(net, params, x, y)
    deltas = _deltas(net, params, fwd)
    return [
        {"W": d[:, :, None] * c.x[:, None, :], "b": d}
        for d, c in zip(deltas, fwd.caches, strict=True)
    ]


@_compiled()
def batch_l2_grad(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Per-example squared L2 norms of each leaf's gradient, shape ``(batch,)`` per leaf.

    ``‖∇_{W^l} C_n‖² = ‖δ^l_n (a^{l-1}_n)ᵀ‖²_F = ‖δ^l_n‖² ‖a^{l-1}_n‖²`` and
    ``‖∇_{b^l} C_n‖² = ‖δ^l_n‖²``: O(batch · n_l) work, no per-example gradient materialised.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params, every leaf of shape ``(batch,)``; the total ``‖∇_θ C_n‖²`` is the sum of the
      leaves.
    """
    fwd = _forward(net, params, x, y)
    deltas = _deltas(net, params, fwd)
    out = []
    for d, c in zip(deltas, fwd.caches, strict=True):
        d2 = jnp.sum(d * d, axis=1)
        out.append({"W": d2 * jnp.sum(c.x * c.x, axis=1), "b": d2})
    return out


def _sum_grad_squared(deltas: Sequence[Array], caches: Sequence[DenseCache]) -> Grads:
    out = []
    for d, c in zip(deltas, caches, strict=True):
        d2 = d * d
        out.append({"W": d2.T @ (c.x * c.x), "b": jnp.sum(d2, axis=0)})
    return out


@_compiled()
def sum_grad_squared(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """``Σ_n (∇_θ C_n)²``, elementwise per leaf.

    ``Σ_n (δ^l_n (a^{l-1}_n)ᵀ)² = (δ^l ∘ δ^l)ᵀ (a^{l-1} ∘ a^{l-1})`` for ``W^l`` and
    ``Σ_n (δ^l_n)²`` for ``b^l``: one matrix product per layer.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    fwd = _forward(net, params, x, y)
    return _sum_grad_squared(_deltas(net, params, fwd), fwd.caches)


@_compiled()
def variance(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The per-element variance of the per-example gradients over the batch.

    ``(1/B) Σ_n (∇C_n)² − ((1/B) Σ_n ∇C_n)²`` (the population variance, as BackPACK's), from
    :func:`sum_grad_squared` and the batch gradient ``(1/B) (δ^l)ᵀ a^{l-1}``.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.
    """
    fwd = _forward(net, params, x, y)
    deltas = _deltas(net, params, fwd)
    batch = deltas[0].shape[0]
    sgs = _sum_grad_squared(deltas, fwd.caches)
    out = []
    for s, d, c in zip(sgs, deltas, fwd.caches, strict=True):
        mean = {"W": d.T @ c.x / batch, "b": jnp.sum(d, axis=0) / batch}
        out.append({k: s[k] / batch - mean[k] ** 2 for k in ("W", "b")})
    return out


def _is_concrete_number(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "dtype")):
        raise TypeError(
            f"{name}: expected a positive number, got {type(value).__name__}: {value!r}."
        )
    if np.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}.")
    if _is_concrete_number(value) and not float(value) > 0:
        raise ValueError(f"{name}: expected a positive number, got {float(value)!r}.")


@_compiled(positive=("max_norm",))
def clipped_grad(net: Any, params: Params, x: Array, y: Array, max_norm: float) -> Grads:
    """The mean of per-example gradients clipped to norm ``max_norm`` (DP-SGD's clipping).

    ``(1/B) Σ_n s_n ∇_θ C_n`` with ``s_n = min(1, c / ‖∇_θ C_n‖)``, ``‖∇_θ C_n‖²`` summed over
    every leaf by :func:`batch_l2_grad`'s ``‖δ_n‖² (‖a_n‖² + 1)``. The clipped sum is the
    δ-recursion's own weight gradient with scaled errors, ``(s ∘ δ^l)ᵀ a^{l-1}``: no per-example
    gradient is materialised. (Add the noise and rescale as your DP-SGD variant prescribes.)

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      max_norm: the clipping norm ``c > 0`` (a Python number or a scalar array).

    Returns:
      Like params.

    Raises:
      ValueError: ``max_norm`` not a positive scalar (checked when it is concrete).
    """
    _check_positive(max_norm, "max_norm")
    fwd = _forward(net, params, x, y)
    deltas = _deltas(net, params, fwd)
    dtype = deltas[0].dtype
    batch = deltas[0].shape[0]
    sq = sum(
        jnp.sum(d * d, axis=1) * (jnp.sum(c.x * c.x, axis=1) + 1)
        for d, c in zip(deltas, fwd.caches, strict=True)
    )
    c = jnp.asarray(max_norm, dtype)
    # s_n = min(1, c/‖g_n‖); ‖g_n‖ = 0 gives s_n = 1 (nothing to clip)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > c, c / jnp.where(norm > c, norm, c), jnp.ones_like(norm)) / batch
    out = []
    for d, cache in zip(deltas, fwd.caches, strict=True):
        sd = d * scale[:, None]
        out.append({"W": sd.T @ cache.x, "b": jnp.sum(sd, axis=0)})
    return out


# -- curvature -----------------------------------------------------------------------------------


def loss_hessian_factor(net: Any, z: Array, y: Array) -> tuple[Array, Array | None]:
    """A factor ``S_n D_n S_nᵀ = H_n = ∂²C_n/∂(z^L_n)²`` of the loss Hessian at the output.

    Closed form for the canonical pairs (see the module docstring); every other pair by
    ``jax.hessian`` of the per-example loss in ``z^L_n`` and its eigendecomposition.

    Args:
      net: a :class:`bpjax.MLP` or a serial network of Dense layers.
      z: the output weighted input ``z^L``, shape ``(batch, n_L)``.
      y: targets as the loss takes them (checked ones: integer labels or ``(batch, n_L)``).

    Returns:
      ``(S, signs)``: ``S`` of shape ``(batch, n_L, k)`` and ``signs`` of shape ``(batch, k)``
      with the ±1 of ``D_n``, or ``None`` when ``D_n = I`` (the canonical pairs).
    """
    _check_net(net)
    act, loss = _output_activation(net), net.objective
    n = z.shape[-1]
    eye = jnp.eye(n, dtype=z.dtype)
    if (act, loss) == (_act.identity, _losses.squared_error):
        return jnp.broadcast_to(eye, (z.shape[0], n, n)), None
    if (act, loss) == (_act.sigmoid, _losses.binary_cross_entropy):
        p = jax.nn.sigmoid(z)
        return jnp.sqrt(p * (1 - p))[:, :, None] * eye, None
    if (act, loss) == (_act.softmax, _losses.cross_entropy):
        p = jax.nn.softmax(z, axis=-1)
        sqrt_p = jnp.sqrt(p)
        factor = sqrt_p[:, :, None] * eye - p[:, :, None] * sqrt_p[:, None, :]
        if y.ndim == 2:  # H = (Σ_j y_j)(diag p − p pᵀ) for a target vector
            factor = factor * jnp.sqrt(jnp.sum(y, axis=-1))[:, None, None]
        return factor, None

    def one(z_n: Array, y_n: Array) -> Array:
        return _output_loss(net, z_n[None], y_n[None])[0]

    hess = jax.vmap(jax.hessian(one))(z, y)
    hess = 0.5 * (hess + jnp.swapaxes(hess, 1, 2))
    eigvals, eigvecs = jnp.linalg.eigh(hess)
    return eigvecs * jnp.sqrt(jnp.abs(eigvals))[:, None, :], jnp.sign(eigvals)


def _curvature_deltas(net: Any, params: Params, fwd: _Pass) -> tuple[list[Array], Array | None]:
    factor, signs = loss_hessian_factor(net, fwd.caches[-1].z, fwd.y)
    return _factor_deltas(net, params, fwd.caches, factor), signs


def _signed_square_sum(deltas_c: Array, signs: Array | None) -> Array:
    """``Σ_c d_{n,c} (δ_{n,c})²``, shape ``(batch, n_l)``, from ``(k, batch, n_l)``."""
    sq = deltas_c * deltas_c
    if signs is not None:
        sq = sq * signs.T[:, :, None]
    return jnp.sum(sq, axis=0)


def _diag_from_factor_deltas(
    factor_deltas: Sequence[Array], signs: Array | None, caches: Sequence[DenseCache]
) -> Grads:
    out = []
    for d, c in zip(factor_deltas, caches, strict=True):
        batch = c.x.shape[0]
        d2 = _signed_square_sum(d, signs)
        out.append({"W": d2.T @ (c.x * c.x) / batch, "b": jnp.sum(d2, axis=0) / batch})
    return out


@_compiled()
def diag_ggn(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The exact diagonal of the generalised Gauss-Newton matrix ``(1/B) Σ_n J_nᵀ H_n J_n``.

    ``J_n = ∂z^L_n/∂θ`` and ``H_n = ∂²C_n/∂(z^L_n)²``. With ``H_n = S_n D_n S_nᵀ``
    (:func:`loss_hessian_factor`), each column ``s_{n,c}`` goes down the δ-recursion as an output
    error, giving ``δ^l_{n,c}``, and

        diag(GGN)_{W^l} = (1/B) Σ_n Σ_c d_{n,c} (δ^l_{n,c} ∘ δ^l_{n,c}) (a^{l-1}_n ∘ a^{l-1}_n)ᵀ
        diag(GGN)_{b^l} = (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} ∘ δ^l_{n,c}

    One recursion per column of ``S`` (``k = n_L``), without the weight-gradient products.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      Like params.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "identity"), "squared_error")
      >>> params = net.init(jax.random.key(0))
      >>> d = diag_ggn(net, params, jnp.ones((5, 3)), jnp.zeros((5, 2)))
      >>> bool(d[1]["b"][0] == 1.0)  # identity + ½‖y − z‖²: ∂z^L/∂b^L = I, H = I
      True
    """
    fwd = _forward(net, params, x, y)
    factor_deltas, signs = _curvature_deltas(net, params, fwd)
    return _diag_from_factor_deltas(factor_deltas, signs, fwd.caches)


def _sampled_factor(net: Any, z: Array, y: Array, key: PRNGKey, samples: int) -> Array:
    """``(batch, n_L, samples)``: ``∂C_n(ŷ, z)/∂z`` for targets ``ŷ`` drawn from the model."""
    act, loss = _output_activation(net), net.objective
    batch, n = z.shape
    shape = (samples, batch, n)
    if (act, loss) == (_act.identity, _losses.squared_error):
        g = jax.random.normal(key, shape, z.dtype)  # ŷ ~ N(z, I): z − ŷ = −ε
    elif (act, loss) == (_act.sigmoid, _losses.binary_cross_entropy):
        p = jax.nn.sigmoid(z)
        g = p - jax.random.bernoulli(key, p, shape).astype(z.dtype)
    elif (act, loss) == (_act.softmax, _losses.cross_entropy):
        p = jax.nn.softmax(z, axis=-1)
        labels = jax.random.categorical(key, z, axis=-1, shape=(samples, batch))
        g = p - jax.nn.one_hot(labels, n, dtype=z.dtype)
        if y.ndim == 2:
            g = g * jnp.sqrt(jnp.sum(y, axis=-1))[:, None]
    else:
        raise ValueError(
            f"net: diag_ggn_mc samples targets from the model's likelihood, which only the "
            f"canonical pairs define (softmax + cross_entropy, sigmoid + binary_cross_entropy, "
            f"identity + squared_error); got {act.name!r} + {loss.name!r}. Use diag_ggn."
        )
    return jnp.moveaxis(g, 0, 2) / jnp.sqrt(jnp.asarray(samples, z.dtype))


@_compiled(static_argnames=("mc_samples",))
def diag_ggn_mc(
    net: Any, params: Params, x: Array, y: Array, key: PRNGKey, *, mc_samples: int = 1
) -> Grads:
    """A Monte-Carlo estimate of :func:`diag_ggn` with targets sampled from the model.

    For a canonical pair ``H_n = E_{ŷ ~ p(·|z^L_n)}[g gᵀ]`` with ``g = ∂C_n(ŷ, z)/∂z^L_n``
    (``p − onehot(ŷ)``, ``ŷ ~ Categorical(p)``; ``p − ŷ``, ``ŷ ~ Bernoulli(p)``; ``z − ŷ``,
    ``ŷ ~ N(z, I)``), so ``S_n = [g_1 … g_M] / √M`` is an unbiased factor (the empirical Fisher
    would use the true ``y`` instead). The rest is :func:`diag_ggn` with ``k = M`` columns.

    Args:
      net, params, x, y: as for :func:`batch_grad`; ``y`` is only checked (and scales the
        cross-entropy Hessian for target vectors that do not sum to 1).
      key: a ``jax.random.key``.
      mc_samples: ``M ≥ 1``, the number of sampled targets per example.

    Returns:
      Like params.

    Raises:
      ValueError: a non-canonical (output activation, loss) pair, or ``mc_samples < 1``.
    """
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples: expected a positive integer, got {mc_samples!r}.")
    fwd = _forward(net, params, x, y)
    factor = _sampled_factor(net, fwd.caches[-1].z, fwd.y, key, mc_samples)
    factor_deltas = _factor_deltas(net, params, fwd.caches, factor)
    return _diag_from_factor_deltas(factor_deltas, None, fwd.caches)


@_compiled()
def kfac_factors(net: Any, params: Params, x: Array, y: Array) -> list[KFACFactors]:
    """Per layer the Kronecker factors ``A^l`` and ``G^l`` of the KFAC approximation of the GGN.

    ``A^l = (1/B) Σ_n ā_n ā_nᵀ`` with ``ā_n = [a^{l-1}_n; 1]`` and
    ``G^l = (1/B) Σ_n Σ_c d_{n,c} δ^l_{n,c} (δ^l_{n,c})ᵀ`` from the backpropagated loss-Hessian
    factor (as in :func:`diag_ggn`). For the layer's parameters ``W̄ = [W | b]`` of shape
    ``(n_l, n_{l-1} + 1)``, flattened row-major (``W̄.ravel()``), the GGN block is approximated by
    ``G ⊗ A`` (``A ⊗ G`` for the column-major ``vec``); exact for a batch of one example.

    Args:
      net, params, x, y: as for :func:`batch_grad`.

    Returns:
      One :class:`KFACFactors` per layer.
    """
    fwd = _forward(net, params, x, y)
    factor_deltas, signs = _curvature_deltas(net, params, fwd)
    out = []
    for d, c in zip(factor_deltas, fwd.caches, strict=True):
        batch = c.x.shape[0]
        a_bar = jnp.concatenate([c.x, jnp.ones((batch, 1), c.x.dtype)], axis=1)
        weighted = d if signs is None else d * signs.T[:, :, None]
        k = d.shape[0]
        g = weighted.reshape(k * batch, -1).T @ d.reshape(k * batch, -1) / batch
        out.append(KFACFactors(A=a_bar.T @ a_bar / batch, G=g))
    return out


def _damped_cholesky(m: Array, damping: Any) -> tuple[Array, bool]:
    """``(m + λI)^{-1}`` as a Cholesky factor, for symmetric PSD ``m``."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return jax.scipy.linalg.cho_factor(m + jnp.asarray(damping, m.dtype) * eye, lower=True)


def kfac_precondition(grads: Grads, factors: Sequence[KFACFactors], *, damping: float) -> Grads:
    """``(G + λI)^{-1} ∇W̄ (A + λI)^{-1}`` per layer, ``∇W̄ = [∇W | ∇b]`` (``(n_l, n_{l-1} + 1)``).

    The inverse of the damped KFAC approximation ``(G + λI) ⊗ (A + λI)`` applied to the gradient.

    Args:
      grads: like params (e.g. from ``net.value_and_grad``).
      factors: from :func:`kfac_factors`, one per layer.
      damping: ``λ > 0``, added to both factors.

    Returns:
      Like params: the preconditioned gradient.

    Raises:
      ValueError: ``damping`` not positive, or ``factors`` not one per layer of ``grads``.
    """
    _check_positive(damping, "damping")
    if len(factors) != len(grads):
        raise ValueError(
            f"factors: expected one KFACFactors per layer ({len(grads)}), got {len(factors)}."
        )
    return _kfac_precondition(grads, list(factors), damping)


@jax.jit
def _kfac_precondition(grads: Grads, factors: list[KFACFactors], damping: Array) -> Grads:
    out = []
    for g, f in zip(grads, factors, strict=True):
        w_bar = jnp.concatenate([g["W"], g["b"][:, None]], axis=1)
        left = jax.scipy.linalg.cho_solve(_damped_cholesky(f.G, damping), w_bar)
        right = jax.scipy.linalg.cho_solve(_damped_cholesky(f.A, damping), left.T).T
        out.append({"W": right[:, :-1], "b": right[:, -1]})
    return out


def kfac_preconditioner(*, damping: float) -> optax.GradientTransformationExtraArgs:
    """An optax transformation applying :func:`kfac_precondition` to the updates.

    Its ``update(updates, state, params=None, *, kfac_factors)`` takes the factors as an extra
    argument; chain it before a learning rate, e.g.
    ``optax.chain(kfac_preconditioner(damping=1e-3), optax.sgd(0.1))`` and call
    ``opt.update(grads, state, params, kfac_factors=kfac_factors(net, params, x, y))``.

    Args:
      damping: ``λ > 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.
    """
    _check_positive(damping, "damping")

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(
        updates: Grads,
        state: optax.EmptyState,
        params: Any = None,
        *,
        kfac_factors: Sequence[KFACFactors] | None = None,
        **extra: Any,
    ) -> tuple[Grads, optax.EmptyState]:
        del params, extra
        if kfac_factors is None:
            raise ValueError(
                "kfac_factors: kfac_preconditioner's update needs "
                "kfac_factors=bpjax.extend.kfac_factors(net, params, x, y)."
            )
        return kfac_precondition(updates, kfac_factors, damping=damping), state

    return optax.GradientTransformationExtraArgs(init, update)


# -- second order --------------------------------------------------------------------------------


def _check_like_params(v: Any, params: Params, name: str) -> Any:
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


@_compiled()
def hvp(net: Any, params: Params, x: Array, y: Array, v: Params) -> Grads:
    """The Hessian-vector product ``∇²_θ C v``: forward mode over the hand-written backward.

    ``jax.jvp`` of ``θ ↦ ∇_θ C`` (the forward pass and the δ-recursion) along ``v``: the exact
    Hessian of the batch-mean loss (not the GGN) times ``v``, about the cost of two backward
    passes, with no Hessian formed.

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      v: the direction, with the params' tree and shapes (cast to their dtype).

    Returns:
      Like params.

    Raises:
      ValueError: ``v`` does not match the params' tree or shapes.
    """
    _check_net(net)
    v = _check_like_params(v, params, "v")

    def grad(p: Params) -> Grads:
        return net.value_and_grad(p, x, y)[1]

    return jax.jvp(grad, (params,), (v,))[1]


def _jacobian_factor(
    net: Any, params: Params, x: Array, y: Array
) -> tuple[Array, Array | None, Array]:
    """``(M, signs, g)``: ``M = S_nᵀ J_n`` rows of shape ``(batch·k, P)`` and the flat gradient."""
    fwd = _forward(net, params, x, y)
    factor_deltas, signs = _curvature_deltas(net, params, fwd)
    k, batch = factor_deltas[0].shape[:2]
    blocks = []
    for d, c in zip(factor_deltas, fwd.caches, strict=True):
        # per (column, example) the gradient rows in ravel_pytree's order: W (row-major), then b
        w = d[:, :, :, None] * c.x[None, :, None, :]
        blocks += [w.reshape(k * batch, -1), d.reshape(k * batch, -1)]
    deltas = _deltas(net, params, fwd)
    grads = [
        {"W": d.T @ c.x / batch, "b": jnp.sum(d, axis=0) / batch}
        for d, c in zip(deltas, fwd.caches, strict=True)
    ]
    flat_signs = None if signs is None else signs.T.reshape(k * batch)
    return jnp.concatenate(blocks, axis=1), flat_signs, ravel_pytree(grads)[0]


@_compiled(positive=("damping",))
def levenberg_marquardt_step(
    net: Any, params: Params, x: Array, y: Array, damping: float
) -> Params:
    """One damped Gauss-Newton (Levenberg–Marquardt) step: ``θ + Δ``, ``(GGN + λI) Δ = −∇_θ C``.

    ``GGN = (1/B) Σ_n J_nᵀ H_n J_n = (1/B) Mᵀ D M`` with the rows of ``M`` the per-example,
    per-column ``s_{n,c}ᵀ J_n = [vec(δ^l_{n,c} (a^{l-1}_n)ᵀ), δ^l_{n,c}]_l``, built by the
    δ-recursion (:func:`diag_ggn`'s backpropagated loss-Hessian factor). For identity + squared
    error this is the classical Gauss-Newton ``JᵀJ/B``. The ``P × P`` system (``P`` the number of
    parameters) is formed and solved densely: for small networks (``P`` up to a few thousand).
    For a non-canonical output pair the GGN may be indefinite; ``λ`` must then exceed its most
    negative eigenvalue.

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      damping: ``λ > 0``.

    Returns:
      The updated params.

    Raises:
      ValueError: ``damping`` not positive.
    """
    _check_positive(damping, "damping")
    m, signs, g = _jacobian_factor(net, params, x, y)
    batch = jnp.shape(x)[0]
    dm = m if signs is None else m * signs[:, None]
    ggn = dm.T @ m / batch
    system = ggn + jnp.asarray(damping, ggn.dtype) * jnp.eye(ggn.shape[0], dtype=ggn.dtype)
    step = jnp.linalg.solve(system, -g)
    flat, unravel = ravel_pytree(params)
    return unravel(flat + step)


# -- the second-order harness --------------------------------------------------------------------


def _reference_curvature(
    net: Any, params: Params, x: Array, y: Array, v: Params, which: tuple[str, ...]
) -> dict[str, Any]:
    """``∇²C v`` by ``jax.hessian`` and ``diag(GGN)`` by ``jax.jacobian``/``jax.hessian``.

    Plain JAX from the forward maths (``net.forward``'s ``z^L`` and the loss value), never the
    hand-written backward.
    """
    flat, unravel = ravel_pytree(params)
    out: dict[str, Any] = {}
    if "hvp" in which:

        def loss(theta: Array) -> Array:
            return net.loss(unravel(theta), x, y)

        out["hvp"] = unravel(jax.hessian(loss)(flat) @ ravel_pytree(v)[0])
    if "diag_ggn" in which:
        fwd = _forward(net, params, x, y)
        y_checked = fwd.y

        def logits(theta: Array) -> Array:
            _, cache = net.forward(unravel(theta), x)
            return cache.z[-1] if isinstance(cache, Cache) else cache.layers[-1].z

        def per_example(z_n: Array, y_n: Array) -> Array:
            return _output_loss(net, z_n[None], y_n[None])[0]

        jac = jax.jacobian(logits)(flat)  # (batch, n_L, P)
        hess = jax.vmap(jax.hessian(per_example))(logits(flat), y_checked)  # (batch, n_L, n_L)
        ggn = jnp.einsum("bkp,bkl,blq->pq", jac, hess, jac) / jnp.shape(x)[0]
        out["diag_ggn"] = unravel(jnp.diagonal(ggn))
    return out


def check_curvature(
    net: Any,
    params: Params,
    x: Array,
    y: Array,
    *,
    v: Params | None = None,
    quantities: Sequence[str] = CURVATURE_REFERENCES,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    jit: bool = True,
) -> GradCheckReport:
    """The harness at order 2: :func:`hvp` and :func:`diag_ggn` against explicit matrices.

    ``hvp`` is compared with ``jax.hessian`` of ``net.loss`` in the flattened params times ``v``;
    ``diag_ggn`` with the diagonal of ``(1/B) Σ_n J_nᵀ H_n J_n``, ``J_n`` by ``jax.jacobian`` of
    ``z^L`` and ``H_n`` by ``jax.hessian`` of the per-example loss in ``z^L_n``. Both references
    form ``P × P`` matrices: for small networks.

    Args:
      net, params, x, y: as for :func:`batch_grad`.
      v: the direction for ``hvp``; by default a random unit direction (from ``seed``).
      quantities: which of :data:`CURVATURE_REFERENCES` to check.
      rtol: an explicit norm-relative tolerance per leaf, replacing the derived allowances
        (:mod:`bpjax.check.tolerance`: each leaf against its float64 truth, within the roundoff
        measured for the reference in the working dtype).
      atol: an explicit largest-element tolerance per leaf (either explicit bound passes).
      seed: seeds the default ``v`` and the roundoff measurement.
      jit: run both sides under ``jax.jit``.

    Returns:
      A ``bpjax.GradCheckReport`` with one row per quantity and leaf; the reference column names
      the quantity (``"jax.hessian (hvp)"``, ``"jax.jacobian GGN (diag_ggn)"``).

    Raises:
      ValueError: an unknown name in ``quantities``.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> check_curvature(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])).ok
      True
    """
    unknown = sorted(set(quantities) - set(CURVATURE_REFERENCES))
    if unknown:
        raise ValueError(
            f"quantities: unknown {unknown}; expected names from {', '.join(CURVATURE_REFERENCES)}."
        )
    _check_net(net)
    which = tuple(q for q in CURVATURE_REFERENCES if q in quantities)
    leaves = jax.tree.leaves(params)
    dtype = least_precise(leaves)
    if v is None:
        flat, unravel = ravel_pytree(params)
        direction = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
        v = unravel(direction / jnp.linalg.norm(direction))
    else:
        v = _check_like_params(v, params, "v")
    wrap = jit_wrapper(jit)
    fns = _curvature_fns(net, which)
    got = wrap(fns[0])(params, x, y, v)
    explicit = None if rtol is None and atol is None else explicit_tolerance(rtol, atol)
    measured = measure(
        fns[1], params, (x, y, v), dtype=dtype, wrap=wrap, seed=seed, explicit=explicit
    )
    names = {"hvp": "jax.hessian (hvp)", "diag_ggn": "jax.jacobian GGN (diag_ggn)"}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rows: list[CheckRow] = []
    for q in which:
        truth, tols = measured.truth[q], measured.tolerances[q]
        for path, m, t, tol in zip(paths, jax.tree.leaves(got[q]), truth, tols, strict=True):
            rows.append(compare(path, names[q], m, t, tol))
    allowed = [t.max_abs for q in which for t in measured.tolerances[q] if math.isfinite(t.max_abs)]
    return GradCheckReport(
        tuple(rows), jnp.dtype(dtype).name, 0.0 if rtol is None else float(rtol),
        max(allowed, default=0.0) if atol is None else float(atol), derived=explicit is None,
    )  # fmt: skip


@memoized
def _curvature_fns(net: Any, which: tuple[str, ...]) -> tuple[Callable[..., Any], ...]:
    """The manual quantities and their references, built once per (net, quantities)."""

    def manual(p: Params, xs: Array, ys: Array, vs: Params) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "hvp" in which:
            out["hvp"] = hvp(net, p, xs, ys, vs)
        if "diag_ggn" in which:
            out["diag_ggn"] = diag_ggn(net, p, xs, ys)
        return out

    def reference(p: Params, xs: Array, ys: Array, vs: Params) -> dict[str, Any]:
        return _reference_curvature(net, p, xs, ys, vs, which)

    return manual, reference
