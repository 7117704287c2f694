"""The multilayer perceptron: a frozen spec with a cached forward and the explicit δ-recursion.

In the batch-row notation of the README, with ``a^0 = x`` of shape ``(batch, n_0)``::

    z^l = a^{l-1} (W^l)ᵀ + b^l                  (batch, n_l)
    a^l = f^l(z^l)                               (batch, n_l)
    C   = (1/B) Σ_n C_n(y_n, a^L_n)

    δ^L       = J_{f^L}(z^L)ᵀ ∇_{a^L} C_n        (a^L − y for the canonical pairs)
    δ^{l-1}   = (δ^l W^l) ∘ (f^{l-1})'(z^{l-1})
    ∇_{W^l} C = (1/B) (δ^l)ᵀ a^{l-1}
    ∇_{b^l} C = (1/B) Σ_n δ^l_n
    ∇_x C     = (1/B) δ^1 W^1

The network is a serial composition of :class:`bpjax.layers.Dense` layers, and its backward is
:func:`bpjax.layers.backprop`, the one reversed loop over layers that any serial network uses:
each Dense step hands ``∂C/∂a^{l-1} = δ^l W^l`` to the layer below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpjax import activations as _act
from bpjax import losses as _losses
from bpjax._types import Array, Grads, Params, PRNGKey
from bpjax.layers import Dense, DenseCache, backprop
from bpjax.layers._dense import _INIT_SCALING

__all__ = ["MLP", "Backward", "Cache"]

_PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Cache(NamedTuple):
    """What the forward pass keeps for the backward pass.

    ``z[l]`` and ``a[l]`` belong to layer ``l + 1`` of the maths (``z^{l+1}``, ``a^{l+1}``), the
    same indexing as ``params[l]`` and ``deltas[l]``.
    """

    x: Array  # (batch, n_0): a^0, the input cast to the params' dtype
    z: list[Array]  # L × (batch, n_l): weighted inputs z^l
    a: list[Array]  # L × (batch, n_l): activations a^l; a[-1] is the output


class Backward(NamedTuple):
    """The result of the δ-recursion.

    ``grads`` is ``∇_θ C`` of the batch-mean loss; ``deltas`` are per-example and unscaled.
    """

    grads: Grads  # like params: [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]
    deltas: list[Array]  # L × (batch, n_l): δ^l_n = ∂C_n/∂z^l_n
    input_grad: Array | None  # (batch, n_0): ∂C/∂x of the batch-mean loss; None for indices


@dataclasses.dataclass(frozen=True, init=False)
class MLP:
    """A multilayer perceptron spec: layer sizes, activations and loss, frozen and hashable.

    Only arrays go into params and caches, so ``jax.jit(net.value_and_grad)`` needs no static
    arguments, and ``net`` itself can be a static argument or a dict key.

    Args:
      sizes: ``(n_0, n_1, ..., n_L)``, the input width then each layer's width; ``L ≥ 1``.
      activations: ``L`` activations (names from :data:`bpjax.ACTIVATIONS` or
        :class:`bpjax.Activation` objects), one per layer, the last one the output's.
      loss: the loss name (from :data:`bpjax.LOSSES`) or a :class:`bpjax.Loss`. Because
        ``net.loss(...)`` is the loss *method*, the resolved :class:`~bpjax.Loss` is kept as
        ``net.objective``.
      fuse_output: use the fused ``δ^L = a^L − y`` and the loss from logits for the canonical
        pairs (softmax + cross_entropy, sigmoid + binary_cross_entropy, identity +
        squared_error). ``False`` sends them through the generic path
        ``δ^L = J_f(z^L)ᵀ ∇_a C_n``, as every other pair goes.

    Raises:
      ValueError: sizes not positive integers or fewer than two; the number of activations is not
        ``len(sizes) − 1``; an unknown activation or loss name; an output activation the loss is
        not defined on (cross_entropy needs probabilities: a softmax output).
      TypeError: an activation or loss that is neither a name nor the bpjax type.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> net = MLP(sizes=(3, 4, 2), activations=("tanh", "softmax"), loss="cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> [p["W"].shape for p in params]
      [(4, 3), (2, 4)]
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
      >>> loss, grads = jax.jit(net.value_and_grad)(params, x, y)
      >>> bool(jnp.allclose(loss, net.loss(params, x, y)))
      True
    """

    sizes: tuple[int, ...]
    activations: tuple[_act.Activation, ...]
    objective: _losses.Loss
    fuse_output: bool

    def __init__(
        self,
        sizes: Sequence[int],
        activations: Sequence[str | _act.Activation],
        loss: str | _losses.Loss,
        *,
        fuse_output: bool = True,
    ) -> None:
        sizes_t = _check_sizes(sizes)
        if isinstance(activations, (str, _act.Activation)):
            raise TypeError(
                f"activations: expected a sequence of {len(sizes_t) - 1} activations (one per "
                f"layer), got a single {activations!r}; write activations=({activations!r},)."
            )
        acts = tuple(
            _act.get_activation(a, argname=f"activations[{i}]") for i, a in enumerate(activations)
        )
        if len(acts) != len(sizes_t) - 1:
            raise ValueError(
                f"activations: expected {len(sizes_t) - 1} activations, one per layer of "
                f"sizes={sizes_t}, got {len(acts)}: {tuple(a.name for a in acts)}."
            )
        for i, act in enumerate(acts):
            if act.init not in _INIT_SCALING:
                raise ValueError(
                    f"activations[{i}]: {act.name!r} has init={act.init!r}; expected one of "
                    f"{', '.join(sorted(_INIT_SCALING))}."
                )
        objective = _losses.get_loss(loss)
        out = acts[-1]
        if objective.accepts is not None and out.output not in objective.accepts:
            raise ValueError(
                f"activations[-1]: the loss {objective.name!r} is defined on outputs that are "
                f"{' or '.join(sorted(objective.accepts))} but the output activation "
                f"{out.name!r} gives {out.output} values"
                + (
                    "; cross_entropy needs probabilities: use a 'softmax' output."
                    if objective.name == "cross_entropy"
                    else "; use a 'sigmoid' output."
                    if objective.name == "binary_cross_entropy"
                    else "."
                )
            )
        object.__setattr__(self, "sizes", sizes_t)
        object.__setattr__(self, "activations", acts)
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "fuse_output", bool(fuse_output))

    def __repr__(self) -> str:
        acts = repr(tuple(a.name for a in self.activations))
        return (
            f"MLP(sizes={self.sizes}, activations={acts}, loss={self.objective.name!r}"
            + ("" if self.fuse_output else ", fuse_output=False")
            + ")"
        )

    @property
    def num_layers(self) -> int:
        """``L``, the number of Dense layers."""
        return len(self.activations)

    @property
    def layers(self) -> tuple[Dense, ...]:
        """The network as :class:`bpjax.layers.Dense` layers; the backward is their δ-recursion."""
        return tuple(
            Dense(n_out, act) for n_out, act in zip(self.sizes[1:], self.activations, strict=True)
        )

    @property
    def fused(self) -> _losses.FusedOutput | None:
        """The fused output pair in use, or ``None`` when the generic path runs."""
        if not self.fuse_output:
            return None
        return _losses.fused_output(self.activations[-1], self.objective)

    # -- init ------------------------------------------------------------------------------

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
        """Initial params: Glorot or He truncated-normal weights by activation, zero biases.

        Layer ``l`` gets ``W^l`` of shape ``(n_l, n_{l-1})`` with variance ``2/(n_{l-1} + n_l)``
        (Glorot, for tanh, sigmoid, softmax, identity, softplus) or ``2/n_{l-1}`` (He, for the
        ReLU family), and ``b^l = 0`` of shape ``(n_l,)``.

        Args:
          key: a ``jax.random.key`` (or legacy ``PRNGKey``).
          dtype: float16, bfloat16, float32 or float64.

        Returns:
          A list with one ``{"W": (n_l, n_{l-1}), "b": (n_l,)}`` dict per layer.
        """
        dtype = jnp.dtype(dtype)
        if dtype.name not in _PARAM_DTYPES:
            raise TypeError(
                f"dtype: expected a floating dtype ({', '.join(_PARAM_DTYPES)}), got {dtype}."
            )
        keys = jax.random.split(key, self.num_layers)
        params = []
        for k, layer, n_in in zip(keys, self.layers, self.sizes[:-1], strict=True):
            layer_params, _ = layer.init(k, (n_in,), dtype)
            params.append(layer_params)
        return params

    # -- forward ---------------------------------------------------------------------------

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        """The forward pass, keeping every ``z^l`` and ``a^l``.

        Args:
          params: as from :meth:`init`.
          x: inputs of shape ``(batch, n_0)``, floating; cast to the params' dtype.

        Returns:
          ``(out, cache)``: ``out = a^L`` of shape ``(batch, n_L)`` and a :class:`Cache`.
        """
        x = self._check_inputs(params, x)
        zs, as_ = [], []
        a = x
        for layer_params, layer in zip(params, self.layers, strict=True):
            a, layer_cache = layer.forward(layer_params, a)
            zs.append(layer_cache.z)
            as_.append(a)
        return a, Cache(x=x, z=zs, a=as_)

    def __call__(self, params: Params, x: Array) -> Array:
        """The network's output ``a^L``, shape ``(batch, n_L)``."""
        return self.forward(params, x)[0]

    def per_example_loss(self, params: Params, x: Array, y: Array) -> Array:
        """``C_n`` for each example, shape ``(batch,)``: plain JAX, from the forward maths."""
        _, cache = self.forward(params, x)
        y = self._check_targets(y, cache)
        return self._per_example_loss(cache, y)

    def loss(self, params: Params, x: Array, y: Array) -> Array:
        """The batch-mean loss ``C = (1/B) Σ_n C_n``: the plain-JAX reference for autodiff.

        Args:
          params: as from :meth:`init`.
          x: inputs of shape ``(batch, n_0)``.
          y: targets: ``(batch, n_L)``, or integer labels ``(batch,)`` for cross_entropy.

        Returns:
          A scalar of the params' dtype.
        """
        return jnp.mean(self.per_example_loss(params, x, y))

    def _per_example_loss(self, cache: Cache, y: Array) -> Array:
        return self.output_loss(cache.z[-1], cache.a[-1], y)

    def output_loss(self, z: Array, a: Array, y: Array) -> Array:
        """``C_n``, shape ``(batch,)``, from the output's ``z^L`` and ``a^L`` (``(batch, n_L)``).

        From the logits for the fused canonical pairs, else ``objective.value(z, a, y)``; ``y`` as
        returned by the loss's target check.
        """
        fused = self.fused
        if fused is not None:
            return fused.value(z, y)
        return self.objective.value(z, a, y)

    # -- backward --------------------------------------------------------------------------

    def backward(self, params: Params, cache: Cache, y: Array) -> Backward:
        """The δ-recursion from the output back to the input.

        Args:
          params: as from :meth:`init`.
          cache: from :meth:`forward` on the same params.
          y: targets: ``(batch, n_L)``, or integer labels ``(batch,)`` for cross_entropy.

        Returns:
          A :class:`Backward` with the batch-mean ``grads`` (params' structure), the per-example
          ``deltas`` (``deltas[l]`` is ``δ^{l+1}``, shape ``(batch, n_{l+1})``) and ``input_grad``
          (``∂C/∂x``, shape ``(batch, n_0)``).
        """
        self._check_params(params)
        y = self._check_targets(y, cache)
        grads, deltas, input_grad = self._backprop(params, cache, y)
        batch = cache.x.shape[0]
        # the recursion carries δ/B (see _backprop); report the per-example δ
        return Backward(grads, [d * batch for d in deltas], input_grad)

    def value_and_grad(self, params: Params, x: Array, y: Array) -> tuple[Array, Grads]:
        """The batch-mean loss and its gradient, by the forward pass and the δ-recursion.

        Args:
          params: as from :meth:`init`.
          x: inputs of shape ``(batch, n_0)``.
          y: targets: ``(batch, n_L)``, or integer labels ``(batch,)`` for cross_entropy.

        Returns:
          ``(loss, grads)``: the scalar ``C`` and ``∇_θ C`` with the params' structure.
        """
        _, cache = self.forward(params, x)
        y = self._check_targets(y, cache)
        loss = jnp.mean(self._per_example_loss(cache, y))
        # input_grad is not returned, so under jit its matmul is dead code and never runs
        grads, _, _ = self._backprop(params, cache, y)
        return loss, grads

    def output_delta(self, cache: Cache, y: Array) -> Array:
        """``δ^L_n = ∂C_n/∂z^L_n``, shape ``(batch, n_L)``: fused or ``J_fᵀ ∇_a C_n``."""
        y = self._check_targets(y, cache)
        z, a = cache.z[-1], cache.a[-1]
        fused = self.fused
        if fused is not None:
            return fused.delta(z, a, y)
        return self.activations[-1].backward(z, a, self.objective.grad(z, a, y))

    def _backprop(self, params: Params, cache: Cache, y: Array) -> tuple[Grads, list[Array], Array]:
        """The reversed loop. Returns grads, the *scaled* errors δ^l/B, and ∂C/∂x.

        The 1/B of the batch mean is applied once, to the (batch, n_L) output error, rather than to
        every ∇W: the same linear algebra, and the cheapest place for it (as reverse-mode autodiff
        does when it seeds the mean's cotangent).
        """
        scale = 1.0 / cache.x.shape[0]
        z, a = cache.z[-1], cache.a[-1]
        layer_caches = [
            DenseCache(x, z_l, a_l)
            for x, z_l, a_l in zip([cache.x, *cache.a[:-1]], cache.z, cache.a, strict=True)
        ]
        fused = self.fused
        if fused is not None:
            grads, errors, input_grad = backprop(
                self.layers, params, layer_caches, output_delta=fused.delta(z, a, y) * scale
            )
        else:
            output_error = self.objective.grad(z, a, y) * scale
            grads, errors, input_grad = backprop(
                self.layers, params, layer_caches, output_error=output_error
            )
        assert input_grad is not None  # Dense layers take floating inputs
        return grads, errors, input_grad

    # -- checks at trace time --------------------------------------------------------------

    def _check_params(self, params: Params) -> None:
        problems = _param_problems(self, params)
        if problems:
            raise ValueError(
                "params: do not match "
                + repr(self)
                + ":\n  "
                + "\n  ".join(problems)
                + "\nBuild them with net.init(key) or match its shapes."
            )

    def _check_inputs(self, params: Params, x: Array) -> Array:
        self._check_params(params)
        dtype = jnp.result_type(params[0]["W"])
        x_dtype = jnp.result_type(x)
        if not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(
                f"x: expected floating inputs, got dtype {x_dtype}; cast them first, e.g. "
                f"x.astype(jnp.{dtype.name})."
            )
        shape = jnp.shape(x)
        if len(shape) != 2 or shape[1] != self.sizes[0]:
            raise ValueError(
                f"x: expected shape (batch, n_0) = (batch, {self.sizes[0]}), got {shape}."
                + (" For vmap over batches use jax.vmap(...)." if len(shape) == 3 else "")
            )
        if shape[0] == 0:
            raise ValueError("x: the batch is empty (shape (0, n_0)); the mean loss is undefined.")
        return jnp.asarray(x).astype(dtype)

    def _check_targets(self, y: Array, cache: Cache) -> Array:
        batch, n_out = cache.x.shape[0], self.sizes[-1]
        targets = self.objective.targets
        if targets is None:
            return jnp.asarray(y)
        return targets(y, batch, n_out, cache.x.dtype)


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        sizes_t = tuple(sizes)
    except TypeError:
        raise TypeError(
            f"sizes: expected a sequence of layer widths (n_0, ..., n_L), got {sizes!r}."
        ) from None
    if len(sizes_t) < 2:
        raise ValueError(
            f"sizes: expected at least two widths (n_0, n_1) for one layer, got {sizes_t}."
        )
    bad = [s for s in sizes_t if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f"sizes: expected positive integers, got {sizes_t} (bad: {bad}).")
    return sizes_t


def _param_problems(net: MLP, params: Any) -> list[str]:
    """Every way ``params`` differs from what ``net`` expects, one line each (empty if none)."""
    if not isinstance(params, (list, tuple)):
        return [f"expected a list of {net.num_layers} layer dicts, got {type(params).__name__}."]
    if len(params) != net.num_layers:
        return [f"expected {net.num_layers} layers (one per activation), got {len(params)}."]
    problems = []
    dtypes = set()
    for l, (layer, n_in, n_out) in enumerate(
        zip(params, net.sizes[:-1], net.sizes[1:], strict=True)
    ):
        if not isinstance(layer, dict) or set(layer) != {"W", "b"}:
            keys = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            problems.append(f"params[{l}]: expected a dict with keys 'W' and 'b', got {keys}.")
            continue
        for name, expected in (("W", (n_out, n_in)), ("b", (n_out,))):
            leaf = layer[name]
            shape = jnp.shape(leaf)
            if shape != expected:
                problems.append(f"params[{l}][{name!r}]: expected shape {expected}, got {shape}.")
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                problems.append(f"params[{l}][{name!r}]: expected a floating dtype, got {dtype}.")
            dtypes.add(dtype)
    if len(dtypes) > 1:
        problems.append(f"all leaves must share one dtype, got {sorted(d.name for d in dtypes)}.")
    return problems
