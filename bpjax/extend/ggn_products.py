"""The GGN without forming it: products ``GGN v`` and its symmetric factor, exact and sampled.

``GGN = (1/B) Σ_n J_nᵀ H_n J_n`` with ``J_n = ∂v_n/∂θ`` at the output variable ``v`` (``z^L``
after a Dense or Conv2D output layer, else the output) and ``H_n = S_n D_n S_nᵀ``
(:func:`~bpjax.extend.loss_hessian_factor`):

- :func:`ggn_vp`: ``GGN v = (1/B) Σ_n J_nᵀ (H_n (J_n v))``: ``J_n v`` by forward mode through
  the network's forward (``jax.jvp``), ``H_n`` by its factor, and ``J_nᵀ`` by the δ-recursion
  from that error: about one forward and one backward pass, no ``P × P`` matrix.
- :func:`sqrt_ggn`: the factor ``F`` with ``GGN = Σ_{c,n} d_{n,c} vec(F_{c,n}) vec(F_{c,n})ᵀ``,
  ``F_{c,n} = J_nᵀ s_{n,c} / √B``: each column of ``S_n`` down the recursion and each layer's
  ``example_grads`` rule, as BackPACK's ``SqrtGGNExact`` (leaves ``(k, batch, *leaf)``), for
  low-rank curvature (``k·B`` columns).
- :func:`sqrt_ggn_mc`: the same with ``S_n`` the ``M`` sampled columns of
  :func:`~bpjax.extend.diag_ggn_mc` (BackPACK's ``SqrtGGNMC``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array, Grads, Params, PRNGKey, is_int
from bpjax._validate import check_key
from bpjax.extend import rules
from bpjax.extend.passes import (
    ForwardPass,
    check_like_params,
    compiled,
    curvature_at_z,
    factor_deltas,
    forward,
    output_variable,
)
from bpjax.extend.second_order import loss_hessian_factor, sampled_loss_factor
from bpjax.network import OutputError

__all__ = ["SqrtGGN", "ggn_vp", "sqrt_ggn", "sqrt_ggn_mc"]


class SqrtGGN(NamedTuple):
    """A symmetric factor of the GGN: ``GGN = Σ_{c,n} d_{n,c} vec(F_{c,n}) vec(F_{c,n})ᵀ``."""

    factor: Grads  # like params, leaves (k, batch, *leaf): F_{c,n} = J_nᵀ s_{n,c} / √B
    signs: Array | None  # (batch, k): d_{n,c} = ±1, or None when every d is 1 (a PSD H_n)


@compiled()
def ggn_vp(net: Any, params: Params, x: Array, y: Array, v: Params) -> Grads:
    """The GGN-vector product ``(1/B) Σ_n J_nᵀ H_n J_n v``, without forming the GGN.

    ``u = J v`` by ``jax.jvp`` of the forward (the output variable as a function of the params),
    ``h_n = S_n D_n S_nᵀ u_n`` by the loss-Hessian factor, and ``Jᵀ h / B`` by the δ-recursion
    started from ``h / B`` at the output variable.

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.
      v: the direction, with the params' tree and shapes (cast to their dtype).

    Returns:
      Like params.

    Raises:
      ValueError: ``v`` does not match the params' tree or shapes.
    """
    v = check_like_params(v, params, "v")
    fwd = forward(net, params, x, y)

    def outputs(p: Params) -> Array:
        return output_variable(net, net.forward(p, x)[1])

    u = jax.jvp(outputs, (params,), (v,))[1]  # J v, shaped like the output variable
    factor, signs = loss_hessian_factor(net, output_variable(net, fwd.cache), fwd.y)
    lead = "".join(chr(ord("p") + i) for i in range(u.ndim - 2))  # the positions' axes
    coeff = jnp.einsum(f"b{lead}nk,b{lead}n->bk", factor, u)  # S_nᵀ u_n
    if signs is not None:
        coeff = coeff * signs
    h = jnp.einsum(f"b{lead}nk,bk->b{lead}n", factor, coeff) / u.shape[0]  # H_n u_n / B
    start = OutputError(None, h) if curvature_at_z(net) else OutputError(h, None)
    return net.backprop(params, fwd.cache, start)[0]


def _factor_grads(net: Any, params: Params, fwd: ForwardPass, factor: Array) -> Grads:
    column_deltas = factor_deltas(net, params, fwd.cache, factor)
    records = rules.records(net, params, fwd.cache)
    scale = 1 / jnp.sqrt(jnp.asarray(column_deltas[0].shape[1], column_deltas[0].dtype))
    return [
        jax.tree.map(lambda g: g * scale, jax.vmap(lambda e, r=r: rules.example_grads(r, e))(d))
        for r, d in zip(records, column_deltas, strict=True)
    ]


@compiled()
def sqrt_ggn(net: Any, params: Params, x: Array, y: Array) -> SqrtGGN:
    """The exact symmetric factor of the GGN, ``F_{c,n} = J_nᵀ s_{n,c} / √B`` (k columns each).

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.

    Returns:
      A :class:`SqrtGGN`: leaves ``(k, batch, *leaf)`` with ``k = n_L`` per output position,
      and the signs of an indefinite ``H_n`` (``None`` for the canonical pairs).
    """
    fwd = forward(net, params, x, y)
    factor, signs = loss_hessian_factor(net, output_variable(net, fwd.cache), fwd.y)
    return SqrtGGN(_factor_grads(net, params, fwd, factor), signs)


@compiled(static_argnames=("mc_samples",))
def sqrt_ggn_mc(
    net: Any, params: Params, x: Array, y: Array, key: PRNGKey, *, mc_samples: int = 1
) -> SqrtGGN:
    """A sampled symmetric factor: :func:`sqrt_ggn` with the columns of
    :func:`~bpjax.extend.diag_ggn_mc` (``k = M`` per output position), unbiased for the GGN.

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.
      key: a ``jax.random.key``.
      mc_samples: ``M ≥ 1``.

    Returns:
      A :class:`SqrtGGN` with ``signs = None``.

    Raises:
      ValueError: a non-canonical output pair, or ``mc_samples < 1``.
      TypeError: ``key`` not one PRNG key.
    """
    if not is_int(mc_samples) or mc_samples < 1:
        raise ValueError(f"mc_samples: expected a positive integer, got {mc_samples!r}.")
    check_key(key)
    fwd = forward(net, params, x, y)
    factor = sampled_loss_factor(net, fwd, key, mc_samples)
    return SqrtGGN(_factor_grads(net, params, fwd, factor), None)
