"""Network checks: every gradient leaf, every layer's recorded error δ, and ∂C/∂x.

:func:`check_mlp` and :func:`check_network` run :func:`~bpjax.check_grads` with the network's loss
as the reference, then compare each layer's recorded error with ``jax.vjp`` of the network *above*
it, and the input gradient with ``jax.grad`` of the loss in ``x``. Every row is judged by the one
tolerance engine (:mod:`bpjax.check.tolerance`): against its float64 truth, within an allowance
measured from the same quantity computed in the working dtype. The summary walks the recursion
from the output down and names the layer whose backward is at fault: its params gradient, or the
error it passes down (its ``dx``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._cache import jit_wrapper, memoized
from bpjax._types import Array, ArrayTree
from bpjax.check.curvature import check_curvature
from bpjax.check.grads import check_grads, least_precise
from bpjax.check.report import CheckRow, GradCheckReport
from bpjax.check.tolerance import Measured, compare, explicit_tolerance, measure
from bpjax.layers import layer_forward, split_key
from bpjax.mlp import MLP
from bpjax.network import Cache, Serial

__all__ = ["check_mlp", "check_network", "layer_name"]


def layer_name(layer: Any) -> str:
    """A layer's name in reports: the ``name`` it was given, else its type's name."""
    name = getattr(layer, "name", None)
    return name if isinstance(name, str) and name else type(layer).__name__


def check_mlp(
    net: Any,
    params: ArrayTree,
    x: Array,
    y: Array,
    *,
    backward: Callable[..., Any] | None = None,
    order: int = 1,
    **kwargs: Any,
) -> GradCheckReport:
    """:func:`check_grads` for an :class:`~bpjax.MLP`, plus every layer's δ and ``∂C/∂x``.

    The name under which :func:`check_network` checks an MLP (an MLP is a serial network of
    Dense layers; any other network is checked the same way).

    Besides the leaf rows of :func:`check_grads` (``net.loss`` is the reference), each per-example
    error ``δ^l`` of the backward is compared with ``jax.vjp`` of the sub-network *above* layer
    ``l``: ``z^l ↦ (C_n)_n``, pulled back with a cotangent of ones, is exactly ``∂C_n/∂z^l_n``.
    Rows ``δ^l (deltas[l-1])`` name the layer; :attr:`GradCheckReport.first_bad_layer` is the
    first one, from the output down, that disagrees, and :meth:`GradCheckReport.summary` says which
    step of the recursion that points to. ``input_grad`` is compared with ``jax.grad`` of
    ``net.loss`` with respect to ``x``.

    Args:
      net: the :class:`~bpjax.MLP`.
      params: its params.
      x: inputs ``(batch, n_0)``.
      y: targets as ``net.loss`` takes them.
      backward: ``backward(params, cache, y) -> Backward`` to check instead of ``net.backward``
        (your own, or a deliberately broken copy).
      order: ``2`` adds the second-order rows of :func:`bpjax.check.check_curvature`: the
        Hessian-vector product over the manual backward against ``jax.hessian`` of ``net.loss``,
        the exact GGN diagonal against ``(1/B) Σ_n J_nᵀ H_n J_n`` from ``jax.jacobian`` and
        ``jax.hessian``, and the exact Hessian diagonal against that of ``jax.hessian`` where
        :func:`~bpjax.extend.diag_hessian` takes the network (``P × P`` matrices: for small
        networks).
      **kwargs: passed on to :func:`check_grads` (``rtol``, ``atol``, ``directions``, ``seed``,
        ``jit``, ``references``).

    Returns:
      A :class:`GradCheckReport` with ``deltas_checked=True``.

    Raises:
      ValueError: ``order`` is not 1 or 2.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> report = check_mlp(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> report.ok, report.first_bad_layer
      (True, None)
    """
    return check_network(net, params, x, y, backward=backward, order=order, **kwargs)


def _measure(
    references: Callable[..., Any],
    params: ArrayTree,
    fixed: tuple[Any, ...],
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    kwargs: dict[str, Any],
) -> Measured:
    """The float64 truth of each layer's error and of ``∂C/∂x``, and their allowances."""
    rtol, atol = kwargs.get("rtol"), kwargs.get("atol")
    explicit = None if rtol is None and atol is None else explicit_tolerance(rtol, atol)
    dtype = least_precise(jax.tree.leaves(params))
    return measure(
        references, params, fixed, dtype=dtype, wrap=wrap, seed=kwargs.get("seed", 0),
        explicit=explicit,
    )  # fmt: skip


def _error_rows(manual: Any, measured: Measured, n: int) -> list[CheckRow]:
    """``δ^l (deltas[l-1])`` rows, from the output layer down."""
    truth, tols = measured.truth["errors"], measured.tolerances["errors"]
    rows = []
    for l in reversed(range(n)):
        got = (
            manual[l] if manual is not None and l < len(manual) and manual[l] is not None else None
        )
        path = f"δ^{l + 1} (deltas[{l}])"
        if got is None:
            rows.append(CheckRow(path, "jax.vjp (layers above)", float("nan"), float("nan"), None,
                                 False, note="the backward recorded no error here"))  # fmt: skip
            continue
        rows.append(compare(path, "jax.vjp (layers above)", got, truth[l], tols[l]))
    return rows


def _input_rows(manual: Any, measured: Measured) -> list[CheckRow]:
    if "input_grad" not in measured.truth:
        return []
    truth, tol = measured.truth["input_grad"][0], measured.tolerances["input_grad"][0]
    if manual is None:
        return [CheckRow("input_grad", "jax.grad (x)", float("nan"), float("nan"), None, False,
                         note="the backward returned no input_grad for a floating x")]  # fmt: skip
    return [compare("input_grad", "jax.grad (x)", manual, truth, tol)]


def _check_order(order: Any) -> None:
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(
            "order: expected 1 (gradients) or 2 (also hvp and the GGN and Hessian diagonals), "
            f"got {order!r}."
        )


def _second_order_rows(
    order: int, net: Any, params: ArrayTree, x: Array, y: Array, kwargs: Any
) -> list[CheckRow]:
    """The rows of :func:`bpjax.check.check_curvature` when ``order == 2``, else none."""
    if order == 1:
        return []
    report = check_curvature(
        net, params, x, y, rtol=kwargs.get("rtol"), seed=kwargs.get("seed", 0),
        jit=kwargs.get("jit", True),
    )  # fmt: skip
    return list(report.rows)


def check_network(
    net: Any,
    params: ArrayTree,
    x: Array,
    y: Array,
    *,
    backward: Callable[..., Any] | None = None,
    key: Array | None = None,
    order: int = 1,
    **kwargs: Any,
) -> GradCheckReport:
    """:func:`check_grads` for any network, plus each layer's error and ``∂C/∂x``.

    Each layer's recorded error (``Backward.deltas[i]``: ``δ = ∂C_n/∂z`` for a layer with a
    weighted input, such as Dense or Conv2D, else ``∂C_n/∂y`` at its output) is compared with
    ``jax.vjp`` of the network *above* it, built from the layers' ``forward`` functions alone (and
    the layer's own ``activation.forward`` between ``z`` and its output, or, for a layer with
    ``forward_shifted`` such as Elman and LSTM, that forward in a shift of ``z`` at zero): a
    cotangent of ones on ``(C_n)_n`` pulls back exactly ``∂C_n/∂(·)_n``. These are the loss's
    true derivatives, so a recurrent layer with ``truncate=k`` (truncated BPTT, not the
    gradient of the loss) fails its rows. Rows ``δ^l (deltas[l-1])`` name the layer;
    :attr:`GradCheckReport.first_bad_layer` is the first one, from the output down, that
    disagrees, and :meth:`GradCheckReport.summary` names its type and which backward to look at.

    Args:
      net: a network: :func:`bpjax.serial` or :class:`~bpjax.MLP` (its Dense stack).
      params: its params.
      x: inputs ``(batch, *input_shape)``.
      y: targets as ``net.loss`` takes them.
      backward: ``backward(params, cache, y) -> Backward`` to check instead of ``net.backward``.
      key: the PRNG key of a training-mode forward (layers with ``needs_key``, such as Dropout);
        the manual and the reference passes draw the same randomness from it.
      order: ``2`` adds the second-order rows (hvp, the GGN and Hessian diagonals, as in
        :func:`check_mlp`), for any network (:mod:`bpjax.extend` covers every layer), in
        evaluation mode.
        An MLP takes no ``key``.
      **kwargs: passed on to :func:`check_grads` (``rtol``, ``atol``, ``directions``, ``seed``,
        ``jit``, ``references``).

    Returns:
      A :class:`GradCheckReport` with ``deltas_checked=True`` and ``layer_names`` (empty for an
      MLP, whose report numbers its Dense layers as the maths does).

    Raises:
      TypeError: ``net`` is not a network, an MLP is given a ``key``, ``order=2`` with a
        ``key`` (the curvature is checked in evaluation mode), ``backward`` is not callable,
        or ``manual`` or
        ``reference`` is given (this check builds both from ``net``).
      ValueError: ``order`` is not 1 or 2.

    Example:
      >>> import jax, jax.numpy as jnp, bpjax as bp
      >>> from bpjax.layers import Dense
      >>> net = bp.serial(Dense(4, "tanh"), Dense(2, "softmax"), loss="cross_entropy",
      ...                 input_shape=(3,))
      >>> params = net.init(jax.random.key(0))
      >>> report = check_network(net, params, jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1]))
      >>> report.ok, report.layer_names
      (True, ('Dense', 'Dense'))
    """
    _check_order(order)
    for name in ("manual", "reference"):
        if name in kwargs:
            raise TypeError(
                f"{name}: check_network builds the manual and reference functions from net; "
                "pass backward=fn to check another backward(params, cache, y), or call "
                "bpjax.check_grads for functions of your own."
            )
    if backward is not None and not callable(backward):
        raise TypeError(
            "backward: expected a function backward(params, cache, y) -> Backward, got "
            f"{type(backward).__name__}."
        )
    if not isinstance(net, Serial):
        raise TypeError(
            f"net: expected a bpjax network (bpjax.serial(...) or bpjax.MLP), got "
            f"{type(net).__name__}."
        )
    if order == 2 and key is not None:
        raise TypeError(
            "key: order=2 checks the curvature in evaluation mode (no dropout); call "
            "check_network without key, or with order=1 to check the training-mode gradients."
        )
    if key is not None and isinstance(net, MLP):
        raise TypeError("key: an MLP draws no randomness; call check_network without key.")
    # while concrete: the checks below jit, and traced bad labels are NaN, which judges nothing
    net.check_labels(y)
    # order 2 first: what it refuses (params, x, y) is reported before the first-order work
    second_order = _second_order_rows(order, net, params, x, y, kwargs)
    backward = net.backward if backward is None else backward
    wrap = jit_wrapper(kwargs.get("jit", True))
    float_x = bool(jnp.issubdtype(jnp.result_type(x), jnp.floating))
    fns = _network_fns(net, backward, float_x)
    report = check_grads(fns.manual, fns.reference, params, x, y, key, **kwargs)
    _, bw = wrap(fns.run_backward)(params, x, y, key)
    measured = _measure(fns.references, params, (x, y, key), wrap, kwargs)
    rows = list(report.rows)
    rows += _error_rows(bw.deltas, measured, len(net.layers))
    if float_x or bw.input_grad is not None:
        rows += _input_rows(bw.input_grad, measured)
    rows += second_order
    # an MLP's report numbers its layers as the maths does and words its hints in the Dense
    # formulas (∇W = (1/B) δᵀ a, the product with W^{l+1}); other networks name each layer
    names = () if isinstance(net, MLP) else tuple(layer_name(layer) for layer in net.layers)
    return dataclasses.replace(report, rows=tuple(rows), deltas_checked=True, layer_names=names)


class _NetworkFns(NamedTuple):
    """The functions :func:`check_network` runs, built once per (net, backward)."""

    run_backward: Callable[..., Any]  # (params, x, y, key) -> (cache, Backward)
    manual: Callable[..., Any]  # (params, x, y, key) -> (loss, grads) by the backward under test
    reference: Callable[..., Any]  # (params, x, y, key) -> C, plain JAX
    references: Callable[..., Any]  # (params, x, y, key) -> {"errors": [...], "input_grad": [...]}


@memoized
def _network_fns(net: Any, backward: Callable[..., Any], float_x: bool) -> _NetworkFns:
    def run_backward(p: ArrayTree, xs: Array, ys: Array, key: Any) -> Any:
        _, cache = net.forward(p, xs, key=key)
        return cache, backward(p, cache, ys)

    def manual(p: ArrayTree, xs: Array, ys: Array, key: Any) -> tuple[Array, ArrayTree]:
        cache, bw = run_backward(p, xs, ys, key)
        return jnp.mean(net.example_losses(cache, net.check_targets(ys, cache.out))), bw.grads

    def reference(p: ArrayTree, xs: Array, ys: Array, key: Any) -> Array:
        return net.loss(p, xs, ys, key=key)

    def references(p: ArrayTree, xs: Array, ys: Array, key: Any) -> dict[str, Any]:
        out = {"errors": _reference_errors(net, p, xs, ys, key)}
        if float_x:
            out["input_grad"] = [jax.grad(reference, argnums=1)(p, xs, ys, key)]
        return out

    return _NetworkFns(run_backward, manual, reference, references)


def _reference_errors(net: Any, params: ArrayTree, x: Array, y: Array, key: Any) -> list[Array]:
    """Each layer's per-example error by ``jax.vjp`` of the layers' forwards above it.

    For a layer with a weighted input (``backward_delta``) the error is ``∂C_n/∂z``: with the
    optional ``forward_shifted(params, x, dz) -> (y, z)`` of the layer protocol (the recurrent
    layers, whose ``δ_t`` also flows through the later steps), by ``jax.vjp`` in the shift ``dz``
    at zero, its shape that of the ``z`` the layer returns (:func:`jax.eval_shape`); without it,
    at the cached ``z`` with the output ``activation.forward(z)`` (Dense, Conv2D). Any other
    layer's error is at its output. Uses only forward functions and the loss value (from the last
    layer's ``z`` for a fused output pair, as the network computes it). These are the loss's true
    derivatives: a recurrent layer with ``truncate=k`` records the truncated BPTT error, which is
    not one, and its rows report the difference.
    """
    layers, n = net.layers, len(net.layers)
    keys = split_key(key, n)
    net.check_labels(y)  # concrete labels, before the checks trace them (then they are NaN)
    x = net.check_inputs(params, x)
    h, ins, outs, layer_caches = x, [], [], []
    for layer, layer_params, layer_key in zip(layers, params, keys, strict=True):
        ins.append(h)
        h, layer_cache = layer_forward(layer, layer_params, h, layer_key)
        outs.append(h)
        layer_caches.append(layer_cache)
    out = outs[-1]
    cache = Cache(x, layer_caches, out)
    targets = net.check_targets(y, out)

    def loss_at(last_z: Array | None, out: Array) -> Array:
        caches = list(cache.layers)
        if last_z is not None and hasattr(caches[-1], "z"):
            caches[-1] = caches[-1]._replace(z=last_z)
        return net.example_losses(cache._replace(layers=caches, out=out), targets)

    def above(i: int, h: Array) -> Array:
        last_cache = None
        for j in range(i + 1, n):
            h, last_cache = layer_forward(layers[j], params[j], h, keys[j])
        if last_cache is None or not hasattr(layers[-1], "backward_delta"):
            return loss_at(None, h)
        return loss_at(getattr(last_cache, "z", None), h)

    def from_z(i: int, z: Array) -> Array:
        a = layers[i].activation.forward(z)
        return loss_at(z, a) if i == n - 1 else above(i, a)

    def from_shift(i: int, dz: Array) -> Array:
        a, z = _forward_shifted(layers[i], params[i], ins[i], dz, keys[i])
        return loss_at(z, a) if i == n - 1 else above(i, a)

    errors = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "backward_delta") and hasattr(layer, "forward_shifted"):
            zero = _zero_shift(layer, params[i], ins[i], keys[i])
            losses, pullback = jax.vjp(lambda dz, i=i: from_shift(i, dz), zero)
        elif hasattr(layer, "backward_delta"):
            losses, pullback = jax.vjp(lambda z, i=i: from_z(i, z), cache.layers[i].z)
        else:
            losses, pullback = jax.vjp(lambda h, i=i: above(i, h), outs[i])
        errors.append(pullback(jnp.ones_like(losses))[0])
    return errors


def _forward_shifted(
    layer: Any, params: ArrayTree, x: Array, dz: Array | None, key: Any
) -> tuple[Array, Array]:
    """``layer.forward_shifted(params, x, dz) -> (y, z)``, and ``key=`` for a ``needs_key`` one."""
    if getattr(layer, "needs_key", False):
        return layer.forward_shifted(params, x, dz, key=key)
    return layer.forward_shifted(params, x, dz)


def _zero_shift(layer: Any, params: ArrayTree, x: Array, key: Any) -> Array:
    """Zeros shaped as the layer's weighted input ``z`` (the shape of its ``δ``), from the shapes
    its ``forward_shifted`` returns unshifted: traced, never run, and no use of the manual ``δ``."""
    z = jax.eval_shape(lambda p, x: _forward_shifted(layer, p, x, None, key)[1], params, x)
    return jnp.zeros(z.shape, z.dtype)
