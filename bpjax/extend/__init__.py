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

(``σ = Σ_j y_j``, 1 for labels and probability targets.) ``diag(p) − p pᵀ`` has rank ``n_L − 1``
(it sends ``1`` to 0), and the quantities that send the columns down the recursion
(:func:`diag_ggn`, :func:`batch_diag_ggn`, :func:`kfac_factors`, :func:`diag_hessian`) take the
factor with ``n_L − 1`` columns, rotated off its null direction ``√p`` by a Householder reflection
(``loss_hessian_factor(..., minimal=True)``): the same ``S Sᵀ``, one column fewer. Every other
(output activation, loss) pair takes the general route: ``H_n`` by ``jax.hessian`` of the
per-example loss as a function of ``z^L_n``, then its eigendecomposition ``H_n = Q Λ Qᵀ``,
``S_n = Q |Λ|^{1/2}``, ``D_n = sign(Λ)``. There ``H_n`` (and so the GGN) may be indefinite, e.g. a
tanh output under squared error; the formulas stay exact. :func:`diag_ggn_mc` samples targets
from the model's predictive distribution and so needs a canonical pair (a likelihood); it raises
otherwise.

The exact diagonal Hessian, :func:`diag_hessian` (and each example's share,
:func:`batch_diag_hessian`), adds what the GGN drops: at every hidden activation the curvature
``R^l = diag(f''(z^l) ∘ ∂C_n/∂a^l)`` enters the recursion as further signed columns, so
``diag(∇²C) = diag(GGN) + the R terms sent down``; Dense and Conv2D layers with any activation,
the pools, Flatten, Dropout and a first Embedding (:mod:`bpjax.extend.diag_hessian`).

Second order: :func:`hvp` is forward mode (``jax.jvp``) over the hand-written backward, so
``∇²C v`` costs about two backward passes; :func:`levenberg_marquardt_step` solves the damped
Gauss-Newton system with the per-example Jacobian built by the same recursion.

Every layer, not only Dense. The tables above write the Dense layer's closed forms; every
quantity is built from four per-layer **extension rules** (:mod:`bpjax.extend.rules`):
per-example gradients ``g_n``, their squared norms, and the weighted sums of their squares over
examples and loss-Hessian columns, with and without the sum over examples. ``Dense``, ``Conv2D``
(a Dense layer on unfolded patches), ``Elman``, ``LSTM``, ``Embedding`` and ``LayerNorm`` define
them in closed form beside their backward; any other layer, a user's
:class:`~bpjax.layers.Layer` included, gets its own backward under ``jax.vmap`` over the batch.
The curvature is taken at ``z^L`` after a Dense or Conv2D output layer and at the network's
output otherwise; an output with ``P`` positions has a block-diagonal ``H_n`` (``C_n`` is the mean
over them) with ``P·n_L`` factor columns. :func:`batch_diag_ggn` is each example's share of
:func:`diag_ggn`. :func:`kfac_factors` has Kronecker factors for Dense and Conv2D layers (KFC,
over the unfolded patches); every other layer with params gets :class:`KFACDiagonal`, its exact
GGN diagonal (kfac-jax's diagonal block), which :func:`kfac_precondition` divides by.

Every function takes ``(net, params, x, y, ...)``: ``net`` a :class:`bpjax.MLP` or a
:func:`bpjax.serial` network of any layers (it is hashable: pass it as a static argument,
``jax.jit(batch_grad, static_argnums=0)``, or close over it), params as from ``net.init``,
``x`` of shape ``(batch, *input_shape)`` and ``y`` as ``net.loss`` takes it. All of them run
under ``jax.jit`` and ``jax.vmap``, in evaluation mode (no dropout key).

The modules: :mod:`bpjax.extend.rules` (the per-layer rules and the generic one),
:mod:`bpjax.extend.first_order` (the per-example quantities of the first table),
:mod:`bpjax.extend.second_order` (the curvature and second order),
:mod:`bpjax.extend.kfac` (Kronecker factors and the preconditioner),
:mod:`bpjax.extend.diag_hessian` (the exact Hessian diagonal),
:mod:`bpjax.extend.ggn_products` (:func:`ggn_vp`, :func:`sqrt_ggn`, :func:`sqrt_ggn_mc`: the GGN
without forming it) and :mod:`bpjax.extend.passes` (the forward pass and δ-recursions they
share). The order-2 harness that checks :func:`hvp`, :func:`diag_ggn` and
:func:`diag_hessian` against explicit matrices is :func:`bpjax.check.curvature.check_curvature`.
"""

from __future__ import annotations

from typing import Any

from bpjax.extend.diag_hessian import batch_diag_hessian, diag_hessian
from bpjax.extend.first_order import (
    batch_grad,
    batch_l2_grad,
    clipped_grad,
    sum_grad_squared,
    variance,
)
from bpjax.extend.ggn_products import SqrtGGN, ggn_vp, sqrt_ggn, sqrt_ggn_mc
from bpjax.extend.kfac import (
    KFACDiagonal,
    KFACFactors,
    kfac_factors,
    kfac_precondition,
    kfac_preconditioner,
)
from bpjax.extend.second_order import (
    batch_diag_ggn,
    diag_ggn,
    diag_ggn_mc,
    hvp,
    levenberg_marquardt_step,
    loss_hessian_factor,
)

__all__ = [
    "CURVATURE_REFERENCES",
    "KFACDiagonal",
    "KFACFactors",
    "SqrtGGN",
    "batch_diag_ggn",
    "batch_diag_hessian",
    "batch_grad",
    "batch_l2_grad",
    "check_curvature",
    "clipped_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "diag_hessian",
    "ggn_vp",
    "hvp",
    "kfac_factors",
    "kfac_precondition",
    "kfac_preconditioner",
    "levenberg_marquardt_step",
    "loss_hessian_factor",
    "sqrt_ggn",
    "sqrt_ggn_mc",
    "sum_grad_squared",
    "variance",
]

# The order-2 harness lives in bpjax.check.curvature (the checks build on extend, not the reverse).
# These names are kept where code written before the move finds it, imported on first use.
_MOVED_TO_CHECK = ("CURVATURE_REFERENCES", "check_curvature")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_CHECK:
        from bpjax.check import curvature

        return getattr(curvature, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED_TO_CHECK})
