"""Curvature and second order: the loss-Hessian factor sent down the δ-recursion, and forward mode.

With ``H_n = S_n D_n S_nᵀ`` (:func:`loss_hessian_factor`), each column of ``S_n`` handed to the
δ-recursion as the output error gives the ``δ^l_{n,c}`` from which :func:`diag_ggn` and
:func:`diag_ggn_mc` contract the GGN (see :mod:`bpjax.extend` for the maths), and
:mod:`bpjax.extend.kfac` its Kronecker factors; :func:`hvp` is forward mode over the
hand-written backward and :func:`levenberg_marquardt_step` solves the damped Gauss-Newton system.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bpjax._types import Array, Grads, Params, PRNGKey, is_int
from bpjax._validate import check_key
from bpjax.activations import identity, sigmoid, softmax
from bpjax.extend import rules
from bpjax.extend.passes import (
    ForwardPass,
    block_diagonal_factor,
    check_like_params,
    check_net,
    check_positive,
    compiled,
    curvature_at_z,
    example_deltas,
    factor_deltas,
    forward,
    loss_from_output,
    output_variable,
    positive_poison,
)
from bpjax.losses import (
    binary_cross_entropy,
    cross_entropy,
    label_poison,
    squared_error,
)

__all__ = [
    "batch_diag_ggn",
    "column_weights",
    "curvature_deltas",
    "diag_ggn",
    "diag_ggn_mc",
    "hvp",
    "levenberg_marquardt_step",
    "loss_hessian_factor",
    "sampled_loss_factor",
    "signed_square_sum",
]


def _row_factor(
    net: Any, v: Array, y: Array, *, minimal: bool = False
) -> tuple[Array, Array | None]:
    """A factor of each row's loss Hessian: ``v`` ``(rows, n)``, ``y`` the rows of the targets.

    ``minimal``: softmax cross-entropy's with ``n − 1`` columns (:func:`loss_hessian_factor`).
    """
    n = v.shape[-1]
    eye = jnp.eye(n, dtype=v.dtype)
    pair = (net.layers[-1].activation, net.objective) if curvature_at_z(net) else None
    if pair == (identity, squared_error):
        return jnp.broadcast_to(eye, (v.shape[0], n, n)), None
    if pair == (sigmoid, binary_cross_entropy):
        p = jax.nn.sigmoid(v)
        return jnp.sqrt(p * (1 - p))[:, :, None] * eye, None
    if pair == (softmax, cross_entropy):
        p = jax.nn.softmax(v, axis=-1)
        sqrt_p = jnp.sqrt(p)
        factor = sqrt_p[:, :, None] * eye - p[:, :, None] * sqrt_p[:, None, :]
        if y.ndim == 2:  # H = (Σ_j y_j)(diag p − p pᵀ) for a target vector
            factor = factor * jnp.sqrt(jnp.sum(y, axis=-1))[:, None, None]
        else:  # H does not depend on a label, but C_n is undefined for one out of range: NaN
            factor = factor * label_poison(y, n, v.dtype)[:, None, None]
        if minimal and n > 1:
            # S R with R the first n − 1 columns of the reflection I − u uᵀ/(1 + √p_n),
            # u = √p + e_n, which takes √p to −e_n: R spans √p⊥ ⊇ S's row space (S √p = 0),
            # so (S R)(S R)ᵀ = S Sᵀ. S u = S e_n, the last column: no product needed.
            scale = sqrt_p[:, None, :-1] / (1 + sqrt_p[:, None, -1:])
            factor = factor[:, :, :-1] - factor[:, :, -1:] * scale
        return factor, None

    def one(v_r: Array, y_r: Array) -> Array:
        return loss_from_output(net, v_r[None], y_r[None])[0]

    hess = jax.vmap(jax.hessian(one))(v, y)
    hess = 0.5 * (hess + jnp.swapaxes(hess, 1, 2))
    eigvals, eigvecs = jnp.linalg.eigh(hess)
    return eigvecs * jnp.sqrt(jnp.abs(eigvals))[:, None, :], jnp.sign(eigvals)


def loss_hessian_factor(
    net: Any, z: Array, y: Array, *, minimal: bool = False
) -> tuple[Array, Array | None]:
    """A factor ``S_n D_n S_nᵀ = H_n`` of the loss Hessian at the output.

    ``H_n = ∂²C_n/∂v_n²`` at the output variable ``v`` (:func:`~bpjax.extend.passes.
    output_variable`: ``z^L`` after a Dense or Conv2D layer, else the network's output).
    Closed form for the canonical pairs (the table of :mod:`bpjax.extend`); every other pair by
    ``jax.hessian`` of the loss of each output position and its eigendecomposition. Outputs with
    ``P`` positions (``(batch, ..., n_L)``) get a block-diagonal factor with ``P·n_L`` columns.

    Args:
      net: a :class:`bpjax.MLP` or a :func:`bpjax.serial` network.
      z: the output variable, shape ``(batch, ..., n_L)`` (``(batch, n_L)`` for an MLP).
      y: targets as ``net.check_targets`` returns them (one row per output position).
      minimal: for softmax + cross_entropy, whose ``H_n = σ (diag(p) − p pᵀ)`` has rank
        ``n_L − 1`` (``H_n 1 = 0``), a factor with ``n_L − 1`` columns per position instead of
        ``n_L``: ``S_n R_n``, where ``R_n`` is the first ``n_L − 1`` columns of the Householder
        reflection ``I − u uᵀ/(1 + √p_{n_L})``, ``u = √p + e_{n_L}``, which takes ``√p`` to
        ``−e_{n_L}``. ``S_n √p = 0``, so ``R_n R_nᵀ = I − √p √pᵀ`` leaves ``S_n`` unchanged and
        ``(S_n R_n)(S_n R_n)ᵀ = H_n``; elementwise, ``S_n R_n`` is ``S_n``'s first ``n_L − 1``
        columns minus its last times ``√p_j / (1 + √p_{n_L})``. The sums over columns sent down
        the recursion (:func:`diag_ggn`, :func:`batch_diag_ggn`,
        :func:`~bpjax.extend.kfac_factors`, :func:`~bpjax.extend.diag_hessian`) take it: one
        column fewer, 10% less work for 10 classes. Other pairs are unchanged.

    Returns:
      ``(S, signs)``: ``S`` of shape ``(batch, ..., n_L, k)`` and ``signs`` of shape
      ``(batch, k)`` with the ±1 of ``D_n``, or ``None`` when ``D_n = I`` (the canonical pairs).

    Raises:
      ValueError, TypeError: ``z`` not ``(batch, ..., n_L)`` for the network's ``n_L``, or ``y``
        not one target per row of ``z`` as the loss takes them (concrete labels out of range
        included; traced ones make their rows NaN).
    """
    check_net(net)
    n_out = net.output_shape[-1]
    if jnp.ndim(z) < 2 or jnp.shape(z)[-1] != n_out:
        raise ValueError(
            f"z: expected the network's output variable, (batch, ..., {n_out}), got shape "
            f"{jnp.shape(z)}."
        )
    rows = math.prod(jnp.shape(z)[:-1])
    if net.objective.targets is not None:  # one row per output position, as check_targets gives
        y = net.objective.targets(y, rows, n_out, jnp.result_type(z))
    factor, signs = _row_factor(net, z.reshape(-1, z.shape[-1]), y, minimal=minimal)
    return block_diagonal_factor(factor, signs, z.shape, mean=True)


def curvature_deltas(
    net: Any, params: Params, fwd: ForwardPass
) -> tuple[list[Array], Array | None]:
    """The loss-Hessian factor's columns sent down the δ-recursion, and its signs.

    Returns:
      ``(deltas, signs)``: per layer the error it records from each column, ``(k, batch, ...)``,
      and ``signs`` as :func:`loss_hessian_factor` returns them.
    """
    factor, signs = loss_hessian_factor(net, output_variable(net, fwd.cache), fwd.y, minimal=True)
    return factor_deltas(net, params, fwd.cache, factor), signs


def signed_square_sum(deltas_c: Array, signs: Array | None) -> Array:
    """``Σ_c d_{n,c} (δ_{n,c})²``, shape ``(batch, n_l)``, from ``(k, batch, n_l)``."""
    sq = deltas_c * deltas_c
    if signs is not None:
        sq = sq * signs.T[:, :, None]
    return jnp.sum(sq, axis=0)


def column_weights(signs: Array | None, k: int, batch: int, dtype: Any) -> Array:
    """``w_{c,n} = d_{n,c} / B``, shape ``(k, batch)``: the GGN's weights of the squared columns."""
    if signs is None:
        return jnp.full((k, batch), 1 / batch, dtype)
    return signs.T.astype(dtype) / batch


def _ggn_sums(
    net: Any, params: Params, fwd: ForwardPass, per_example: bool, factor: Any = None
) -> Grads:
    records = rules.records(net, params, fwd.cache)
    if factor is None:
        column_deltas, signs = curvature_deltas(net, params, fwd)
    else:
        column_deltas, signs = factor_deltas(net, params, fwd.cache, factor), None
    k, batch = column_deltas[0].shape[:2]
    weights = column_weights(signs, k, batch, column_deltas[0].dtype)
    rule = rules.example_square_sums if per_example else rules.square_sum
    return [rule(r, d, weights) for r, d in zip(records, column_deltas, strict=True)]


@compiled()
def diag_ggn(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """The exact diagonal of the generalised Gauss-Newton matrix ``(1/B) Σ_n J_nᵀ H_n J_n``.

    ``J_n = ∂v_n/∂θ`` and ``H_n = ∂²C_n/∂v_n²`` at the output variable ``v`` (``z^L`` after a
    Dense or Conv2D layer, else the output). With ``H_n = S_n D_n S_nᵀ``
    (:func:`loss_hessian_factor`), each column ``s_{n,c}`` goes down the δ-recursion as an output
    error, and each layer's rule (:mod:`bpjax.extend.rules`) squares the gradient it gives::

        diag(GGN) = (1/B) Σ_n Σ_c d_{n,c} (g_{n,c})²,   g_{n,c} = J_nᵀ s_{n,c}

    For a Dense layer on vectors ``g_{n,c} = δ^l_{n,c} (a^{l-1}_n)ᵀ``, so
    ``diag(GGN)_{W^l} = (1/B) Σ_n Σ_c d_{n,c} (δ^l_{n,c} ∘ δ^l_{n,c}) (a^{l-1}_n ∘ a^{l-1}_n)ᵀ``.
    One recursion per column of ``S`` (``k = n_L`` per output position).

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.

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
    return _ggn_sums(net, params, forward(net, params, x, y), per_example=False)


@compiled()
def batch_diag_ggn(net: Any, params: Params, x: Array, y: Array) -> Grads:
    """Each example's share of :func:`diag_ggn`: ``(1/B) Σ_c d_{n,c} (g_{n,c})²`` per example.

    The diagonal of ``(1/B) J_nᵀ H_n J_n``, BackPACK's ``BatchDiagGGNExact`` convention: the
    sum over the batch axis is :func:`diag_ggn`. No per-example gradient is materialised for a
    Dense layer on vectors (``(Σ_c d δ_c²) ⊗ a²`` per example).

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.

    Returns:
      Like params, every leaf with a leading batch axis ``(batch, *leaf)``.
    """
    return _ggn_sums(net, params, forward(net, params, x, y), per_example=True)


def _sampled_factor(net: Any, v: Array, y: Array, key: PRNGKey, samples: int) -> Array:
    """``(rows, n_L, samples)``: ``∂ℓ(ŷ, v)/∂v`` for targets ``ŷ`` drawn from the model."""
    pair = (net.layers[-1].activation, net.objective) if curvature_at_z(net) else None
    rows, n = v.shape
    shape = (samples, rows, n)
    if pair == (identity, squared_error):
        g = jax.random.normal(key, shape, v.dtype)  # ŷ ~ N(z, I): z − ŷ = −ε
    elif pair == (sigmoid, binary_cross_entropy):
        p = jax.nn.sigmoid(v)
        g = p - jax.random.bernoulli(key, p, shape).astype(v.dtype)
    elif pair == (softmax, cross_entropy):
        p = jax.nn.softmax(v, axis=-1)
        labels = jax.random.categorical(key, v, axis=-1, shape=(samples, rows))
        g = p - jax.nn.one_hot(labels, n, dtype=v.dtype)
        if y.ndim == 2:
            g = g * jnp.sqrt(jnp.sum(y, axis=-1))[:, None]
        else:  # as in loss_hessian_factor: NaN for an example whose label is out of range
            g = g * label_poison(y, n, v.dtype)[:, None]
    else:
        act = getattr(net.layers[-1], "activation", None)
        got = f"{act.name!r} + " if act is not None else f"a {type(net.layers[-1]).__name__} + "
        raise ValueError(
            f"net: diag_ggn_mc samples targets from the model's likelihood, which only the "
            f"canonical pairs after a Dense or Conv2D layer define (softmax + cross_entropy, "
            f"sigmoid + binary_cross_entropy, identity + squared_error); got {got}"
            f"{net.objective.name!r}. Use diag_ggn."
        )
    return jnp.moveaxis(g, 0, 2) / jnp.sqrt(jnp.asarray(samples, v.dtype))


@compiled(static_argnames=("mc_samples",))
def diag_ggn_mc(
    net: Any, params: Params, x: Array, y: Array, key: PRNGKey, *, mc_samples: int = 1
) -> Grads:
    """A Monte-Carlo estimate of :func:`diag_ggn` with targets sampled from the model.

    For a canonical pair ``H_n = E_{ŷ ~ p(·|z^L_n)}[g gᵀ]`` with ``g = ∂C_n(ŷ, z)/∂z^L_n``
    (``p − onehot(ŷ)``, ``ŷ ~ Categorical(p)``; ``p − ŷ``, ``ŷ ~ Bernoulli(p)``; ``z − ŷ``,
    ``ŷ ~ N(z, I)``), so ``S_n = [g_1 … g_M] / √M`` is an unbiased factor (the empirical Fisher
    would use the true ``y`` instead). The rest is :func:`diag_ggn` with ``k = M`` columns (per
    output position).

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`; ``y`` is only checked (and
        scales the cross-entropy Hessian for target vectors that do not sum to 1).
      key: a ``jax.random.key``.
      mc_samples: ``M ≥ 1``, the number of sampled targets per example.

    Returns:
      Like params.

    Raises:
      ValueError: a non-canonical (output activation, loss) pair, or ``mc_samples < 1``.
      TypeError: ``key`` not one PRNG key.
    """
    if not is_int(mc_samples) or mc_samples < 1:
        raise ValueError(f"mc_samples: expected a positive integer, got {mc_samples!r}.")
    check_key(key)
    fwd = forward(net, params, x, y)
    factor = sampled_loss_factor(net, fwd, key, mc_samples)
    return _ggn_sums(net, params, fwd, per_example=False, factor=factor)


def sampled_loss_factor(net: Any, fwd: ForwardPass, key: PRNGKey, samples: int) -> Array:
    """:func:`diag_ggn_mc`'s factor ``[g_1 … g_M] / √M`` per example, ``(batch, ..., n_L, k)``
    (``k = M`` per output position, block-diagonal as :func:`loss_hessian_factor`'s).

    Raises:
      ValueError: a non-canonical (output activation, loss) pair.
    """
    v = output_variable(net, fwd.cache)
    rows = _sampled_factor(net, v.reshape(-1, v.shape[-1]), fwd.y, key, samples)
    return block_diagonal_factor(rows, None, v.shape, mean=True)[0]


# -- second order --------------------------------------------------------------------------------


@compiled()
def hvp(net: Any, params: Params, x: Array, y: Array, v: Params) -> Grads:
    """The Hessian-vector product ``∇²_θ C v``: forward mode over the hand-written backward.

    ``jax.jvp`` of ``θ ↦ ∇_θ C`` (the forward pass and the δ-recursion) along ``v``: the exact
    Hessian of the batch-mean loss (not the GGN) times ``v``, about the cost of two backward
    passes, with no Hessian formed.

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.
      v: the direction, with the params' tree and shapes (cast to their dtype).

    Returns:
      Like params.

    Raises:
      ValueError: ``v`` does not match the params' tree or shapes.
    """
    check_net(net)
    v = check_like_params(v, params, "v")

    def grad(p: Params) -> Grads:
        return net.value_and_grad(p, x, y)[1]

    return jax.jvp(grad, (params,), (v,))[1]


def _jacobian_factor(
    net: Any, params: Params, x: Array, y: Array
) -> tuple[Array, Array | None, Array]:
    """``(M, signs, g)``: ``M = S_nᵀ J_n`` rows of shape ``(k·batch, P)`` and the flat gradient."""
    fwd = forward(net, params, x, y)
    records = rules.records(net, params, fwd.cache)
    column_deltas, signs = curvature_deltas(net, params, fwd)
    k, batch = column_deltas[0].shape[:2]
    blocks = []
    for r, d in zip(records, column_deltas, strict=True):
        # per (column, example) the gradient rows in ravel_pytree's order (the params' leaves)
        grads = jax.vmap(lambda e, r=r: rules.example_grads(r, e))(d)
        blocks += [leaf.reshape(k * batch, -1) for leaf in jax.tree.leaves(grads)]
    deltas = example_deltas(net, params, fwd)
    mean = jnp.full(batch, 1 / batch, deltas[0].dtype)
    grads = [rules.weighted_grads(r, e, mean) for r, e in zip(records, deltas, strict=True)]
    flat_signs = None if signs is None else signs.T.reshape(k * batch)
    return jnp.concatenate(blocks, axis=1), flat_signs, ravel_pytree(grads)[0]


@compiled(positive=("damping",))
def levenberg_marquardt_step(
    net: Any, params: Params, x: Array, y: Array, damping: float
) -> Params:
    """One damped Gauss-Newton (Levenberg–Marquardt) step: ``θ + Δ``, ``(GGN + λI) Δ = −∇_θ C``.

    ``GGN = (1/B) Σ_n J_nᵀ H_n J_n = (1/B) Mᵀ D M`` with the rows of ``M`` the per-example,
    per-column ``s_{n,c}ᵀ J_n`` (for a Dense layer ``[vec(δ^l_{n,c} (a^{l-1}_n)ᵀ), δ^l_{n,c}]_l``;
    any layer by its ``example_grads`` rule), built by the δ-recursion (:func:`diag_ggn`'s
    backpropagated loss-Hessian factor). For identity + squared error this is the classical
    Gauss-Newton ``JᵀJ/B``. The ``P × P`` system (``P`` the number of parameters) is formed and
    solved densely: for small networks (``P`` up to a few thousand). For a non-canonical output
    pair the GGN may be indefinite; ``λ`` must then exceed its most negative eigenvalue.

    Args:
      net, params, x, y: as for :func:`~bpjax.extend.batch_grad`.
      damping: ``λ > 0``.

    Returns:
      The updated params.

    Raises:
      ValueError: ``damping`` not positive.
    """
    check_positive(damping, "damping")
    m, signs, g = _jacobian_factor(net, params, x, y)
    batch = jnp.shape(x)[0]
    dm = m if signs is None else m * signs[:, None]
    ggn = dm.T @ m / batch
    dtype = ggn.dtype
    wide = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32  # LAPACK: float32 and wider
    system = ggn.astype(wide) + jnp.asarray(damping, wide) * jnp.eye(ggn.shape[0], dtype=wide)
    step = jnp.linalg.solve(system, -g.astype(wide)).astype(dtype)
    step = step * positive_poison(damping, dtype)  # a traced λ ≤ 0 or NaN: NaN
    flat, unravel = ravel_pytree(params)
    return unravel(flat + step)


# KFAC moved to bpjax.extend.kfac; code written before the move finds the names here.
_MOVED_TO_KFAC = (
    "KFACFactors",
    "check_kfac_net",
    "kfac_factors",
    "kfac_precondition",
    "kfac_preconditioner",
    "layer_kfac_factors",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_KFAC:
        from bpjax.extend import kfac

        return getattr(kfac, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
