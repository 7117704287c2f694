"""The one network type, :class:`Serial`: layers in series ending in a loss, and its protocol.

A network ``serial(L_1, ..., L_k, loss=..., input_shape=...)`` (and :class:`bpjax.MLP`, its
constructor for a stack of Dense layers) has the user methods ``init``, ``forward``, ``loss``,
``per_example_loss``, ``backward`` and ``value_and_grad``; its backward is
:func:`bpjax.layers.backprop`, the one δ-recursion. Any object with the layer contract of
:mod:`bpjax.layers` can be a layer, a user's own included. ``serial(...)`` without a loss is a
layer, :class:`bpjax.layers.Sequential`, so blocks nest.

The **network protocol** is what the tools built on a network (checks, :mod:`bpjax.extend`,
:mod:`bpjax.parallel`, :func:`bpjax.custom_vjp`, :mod:`bpjax.train`) use, all public:

- ``check_params(params)``, ``check_inputs(params, x) -> x`` and ``check_targets(y, out) -> y``:
  trace-time checks with one message format, the targets as one row per output position;
  ``check_labels(y)``: the range of concrete class labels, for a caller about to trace them;
- ``example_losses(cache, y) -> C_n`` from a forward's :class:`Cache`;
- ``output_error(cache, y, weights=None) -> OutputError``: where the recursion starts, with
  per-example weights ``w_n`` (``1/B`` by default, the batch mean);
- ``backprop(params, cache, error) -> (grads, errors, input_grad)``: the recursion from it.

In batch-row form (docs/design.md), for example weights ``w_n``: ``C = Σ_n w_n C_n``, the error
at the output is ``w_n ∂C_n/∂y_n`` (or ``w_n δ^L_n`` for a fused output pair), and every
gradient the recursion returns is ``Σ_n w_n ∇_θ C_n``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import losses
from bpjax._types import Array, Grads, PRNGKey
from bpjax._validate import check_key, check_output, describe, param_dtype
from bpjax._validate import input_shape as checked_input_shape
from bpjax.layers import Dense, Sequential, backprop, chain_forward, chain_init, check_layers

__all__ = ["Backward", "Cache", "OutputError", "Serial", "SerialCache", "serial"]


class Cache(NamedTuple):
    """What a network's forward keeps for the backward pass.

    ``layers[i]`` is layer ``i``'s own cache (``layers[l-1]`` belongs to layer ``l`` of the maths,
    the indexing of ``params`` and ``Backward.deltas``). For networks of layers with a weighted
    input (an :class:`~bpjax.MLP`), :attr:`z` and :attr:`a` list every ``z^l`` and ``a^l``.
    """

    x: Array  # (batch, *input_shape): a^0, the input as the first layer takes it
    layers: list[Any]  # one cache per layer, from its forward
    out: Array  # (batch, *out_shape): the network's output

    @property
    def z(self) -> list[Array]:
        """``z^l`` of every layer, ``(batch, ..., n_l)`` each (layers with a weighted input)."""
        return [_field(cache, "z", i) for i, cache in enumerate(self.layers)]

    @property
    def a(self) -> list[Array]:
        """``a^l`` of every layer, ``(batch, ..., n_l)`` each; ``a[-1]`` is the output."""
        return [_field(cache, "a", i) for i, cache in enumerate(self.layers)]


SerialCache = Cache  # the name this type had when serial networks had a cache of their own


def _field(cache: Any, name: str, i: int) -> Array:
    if not hasattr(cache, name):
        raise AttributeError(
            f"cache.{name}: layer {i + 1}'s cache ({type(cache).__name__}) has no {name!r}; "
            f"read cache.layers[{i}] instead."
        )
    return getattr(cache, name)


class Backward(NamedTuple):
    """The result of the δ-recursion.

    ``grads`` is ``∇_θ C`` of the batch-mean loss; ``deltas`` are per-example and unscaled.
    """

    grads: Grads  # like params: [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...] for an MLP
    deltas: list[Array]  # one per layer: δ^l_n = ∂C_n/∂z^l_n, or ∂C_n/∂y at a layer without z
    input_grad: Array | None  # (batch, *input_shape): ∂C/∂x of the mean loss; None for indices


class OutputError(NamedTuple):
    """Where the δ-recursion starts: exactly one field is an array, the other ``None``.

    The arguments of :func:`bpjax.layers.backprop` of the same names, shaped like the output.
    """

    output_error: Array | None  # (batch, ..., n_out): w_n ∂C_n/∂y at the last layer's output
    output_delta: Array | None  # (batch, ..., n_out): w_n δ^L_n at its weighted input (fused)


@dataclasses.dataclass(frozen=True)
class Serial:
    """A network spec: layers in series, a loss and the input shape, frozen and hashable.

    Build it with :func:`serial` (or :class:`bpjax.MLP`). Params are a list with one pytree per
    layer; :meth:`forward` returns a :class:`Cache`. ``Backward.deltas[i]`` is layer ``i``'s
    per-example error, unscaled by ``1/B``: ``δ = ∂C_n/∂z`` for a layer with a weighted input
    (:class:`~bpjax.layers.Dense`), else ``∂C_n/∂y`` at its output.

    Outputs may have axes between the batch and the features, ``(batch, ..., n_out)`` (a sequence
    model's time steps): the loss then takes targets ``(batch, ...)`` (labels) or
    ``(batch, ..., n_out)``, and ``C_n`` is the mean over those positions, so ``C`` is the mean
    over all ``batch × positions`` outputs.

    ``forward``, ``loss``, ``per_example_loss`` and ``value_and_grad`` take ``key=``: a PRNG key
    for the layers that draw randomness in training (:class:`~bpjax.layers.Dropout`), one
    ``fold_in`` per layer position; ``None`` (the default) is evaluation mode.
    """

    layers: tuple[Any, ...]
    objective: losses.Loss
    input_shape: tuple[int, ...]
    fuse_output: bool = True

    # how error messages describe the input and the params list (MLP words them its own way)
    _input_symbol: ClassVar[str] = ""
    _per_layer: ClassVar[str] = "one per layer"

    @property
    def fused(self) -> losses.FusedOutput | None:
        """The fused output pair in use (a last Dense layer with a canonical loss), or ``None``."""
        last = self.layers[-1]
        if not self.fuse_output or not isinstance(last, Dense):
            return None
        return losses.fused_output(last.activation, self.objective)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """One example's output shape, without the batch axis (``(n_L,)`` for an MLP)."""
        return _output_shape(self)

    @property
    def needs_key(self) -> bool:
        """Whether any layer draws randomness in training (takes ``key=``)."""
        return any(getattr(layer, "needs_key", False) for layer in self.layers)

    # -- the user's methods ----------------------------------------------------------------

    def __repr__(self) -> str:
        layers = ", ".join(map(repr, self.layers))
        return (
            f"serial({layers}, loss={self.objective.name!r}, input_shape={self.input_shape}"
            + ("" if self.fuse_output else ", fuse_output=False")
            + ")"
        )

    def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> list[Any]:
        """Each layer's params, initialised in order from ``input_shape``.

        Args:
          key: a ``jax.random.key`` (or legacy ``PRNGKey``).
          dtype: float16, bfloat16, float32 or float64.

        Returns:
          A list with one params pytree per layer.

        Raises:
          TypeError: ``key`` not one PRNG key, or ``dtype`` not one of those four.
        """
        check_key(key)
        return chain_init(self.layers, key, self.input_shape, param_dtype(dtype))[0]

    def forward(
        self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, Cache]:
        """The output ``(batch, *out_shape)`` and a :class:`Cache`.

        Args:
          params: as from :meth:`init`.
          x: inputs ``(batch, *input_shape)``; floating ones are cast to the params' dtype.
          key: a PRNG key for the layers that take one (training), or ``None``.
        """
        if key is not None:
            check_key(key)
        x = self.check_inputs(params, x)
        out, caches = chain_forward(self.layers, params, x, key)
        return out, Cache(x, caches, out)

    def __call__(self, params: Sequence[Any], x: Array, *, key: PRNGKey | None = None) -> Array:
        """The network's output."""
        return self.forward(params, x, key=key)[0]

    def per_example_loss(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> Array:
        """``C_n`` for each example, shape ``(batch,)``: plain JAX, from the forward maths."""
        out, cache = self.forward(params, x, key=key)
        return self.example_losses(cache, self.check_targets(y, out))

    def loss(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> Array:
        """The batch-mean loss ``C = (1/B) Σ_n C_n``: the plain-JAX reference for autodiff.

        Args:
          params: as from :meth:`init`.
          x: inputs ``(batch, *input_shape)``.
          y: targets: ``(batch, ..., n_out)``, or integer labels ``(batch, ...)`` for
            cross_entropy.

        Returns:
          A scalar of the params' dtype.
        """
        return jnp.mean(self.per_example_loss(params, x, y, key=key))

    def backward(self, params: Sequence[Any], cache: Cache, y: Array) -> Backward:
        """The δ-recursion from the output back to the input.

        Args:
          params: as from :meth:`init`.
          cache: from :meth:`forward` on the same params.
          y: targets as :meth:`loss` takes them.

        Returns:
          A :class:`Backward` with the batch-mean ``grads`` (params' structure), the per-example
          ``deltas`` (one per layer) and ``input_grad`` (``∂C/∂x``, ``None`` for integer inputs).
        """
        self.check_params(params)
        self.check_cache(cache)
        y = self.check_targets(y, cache.out)
        grads, errors, input_grad = self.backprop(params, cache, self.output_error(cache, y))
        batch = cache.out.shape[0]
        # the recursion carries w_n = 1/B (see output_error); report the per-example errors
        return Backward(grads, [e * batch for e in errors], input_grad)

    def value_and_grad(
        self, params: Sequence[Any], x: Array, y: Array, *, key: PRNGKey | None = None
    ) -> tuple[Array, list[Any]]:
        """The batch-mean loss and its gradient, by the forward pass and the δ-recursion.

        Returns:
          ``(loss, grads)``: the scalar ``C`` and ``∇_θ C`` with the params' structure.
        """
        out, cache = self.forward(params, x, key=key)
        y = self.check_targets(y, out)
        loss = jnp.mean(self.example_losses(cache, y))
        # input_grad is not returned, so under jit its matmul is dead code and never runs
        grads, _, _ = self.backprop(params, cache, self.output_error(cache, y))
        return loss, grads

    def output_loss(self, z: Array, a: Array, y: Array) -> Array:
        """``C`` per output position, shape ``(positions,)``, from the last layer's ``z`` and ``a``.

        ``z`` and ``a`` are ``(positions, n_out)`` rows (``(batch, n_L)`` for an MLP); the loss is
        taken from the logits for a fused canonical pair, else ``objective.value(z, a, y)``; ``y``
        as :meth:`check_targets` returns it.
        """
        fused = self.fused
        if fused is not None:
            return fused.value(z, y)
        return self.objective.value(z, a, y)

    def output_delta(self, cache: Cache, y: Array) -> Array:
        """The last layer's per-example error, unscaled: ``δ^L_n = ∂C_n/∂z^L_n`` for a layer with
        a weighted input (fused, or ``J_fᵀ ∇_a C_n``), else ``∂C_n/∂y_n``; shaped like the output.
        """
        self.check_cache(cache)
        y = self.check_targets(y, cache.out)
        start = self.output_error(cache, y, weights=jnp.ones(cache.out.shape[0], cache.out.dtype))
        error, delta = start
        if delta is not None:
            return delta
        assert error is not None  # an OutputError holds exactly one of the two
        last = self.layers[-1]
        if hasattr(last, "backward_delta"):
            return last.delta(cache.layers[-1], error)
        return error

    # -- the network protocol --------------------------------------------------------------

    def example_losses(self, cache: Cache, y: Array) -> Array:
        """``C_n``, shape ``(batch,)``, from a forward's cache: the mean over each example's
        output positions; ``y`` as :meth:`check_targets` returns it."""
        out = cache.out
        z, a = self._last_z(cache), _positions(out)
        return jnp.mean(self.output_loss(z, a, y).reshape(out.shape[0], -1), axis=1)

    def output_error(self, cache: Cache, y: Array, *, weights: Array | None = None) -> OutputError:
        """The error the δ-recursion starts from, each example's scaled by its weight.

        Args:
          cache: from :meth:`forward`.
          y: targets as :meth:`check_targets` returns them.
          weights: ``w_n``, shape ``(batch,)``; ``None`` is ``1/B`` (the batch mean). Each
            example's ``C_n`` is a mean over its positions, so each position gets ``w_n/P``.

        Returns:
          An :class:`OutputError`: ``w_n δ^L_n`` at the last layer's weighted input for a fused
          pair, else ``w_n ∂C_n/∂y_n``; with them :meth:`backprop` returns ``Σ_n w_n ∇_θ C_n``.
        """
        out = cache.out
        positions = out.size // (out.shape[0] * out.shape[-1])
        if weights is None:
            scale: Any = 1.0 / (out.shape[0] * positions)
        else:
            per_example = jnp.asarray(weights).astype(out.dtype) / positions
            scale = per_example.reshape(-1, *([1] * (out.ndim - 1)))
        fused = self.fused
        z, a = self._last_z(cache), _positions(out)
        if fused is not None:
            return OutputError(None, fused.delta(z, a, y).reshape(out.shape) * scale)
        return OutputError(self.objective.grad(z, a, y).reshape(out.shape) * scale, None)

    def backprop(
        self, params: Sequence[Any], cache: Cache, error: OutputError
    ) -> tuple[list[Any], list[Array], Array | None]:
        """The δ-recursion from ``error``: :func:`bpjax.layers.backprop` over the layers.

        Returns:
          ``(grads, errors, input_grad)``, scaled as ``error`` is (``Σ_n w_n ∇_θ C_n``).
        """
        return backprop(
            self.layers, params, cache.layers,
            output_error=error.output_error, output_delta=error.output_delta,
        )  # fmt: skip

    def check_params(self, params: Any) -> None:
        """Raises ``ValueError`` listing every way ``params`` differ from :meth:`init`'s."""
        problems = _param_problems(params, _expected_params(self), self._per_layer)
        if problems:
            raise ValueError(
                f"params: do not match {self!r}:\n  "
                + "\n  ".join(problems)
                + "\nBuild them with net.init(key) or match its shapes."
            )

    def check_cache(self, cache: Any) -> None:
        """Raises ``TypeError`` unless ``cache`` is a :class:`Cache` with one entry per layer."""
        if not isinstance(cache, Cache):
            raise TypeError(
                "cache: expected the Cache from net.forward(params, x) (its second result), got "
                f"{describe(cache)}."
            )
        n, got = len(self.layers), cache.layers
        if not isinstance(got, (list, tuple)) or len(got) != n:
            count = f"{len(got)}" if isinstance(got, (list, tuple)) else describe(got)
            raise ValueError(
                f"cache.layers: expected {n} layer caches (one per layer), got {count}; pass the "
                "cache of this network's forward."
            )

    def check_inputs(self, params: Any, x: Array) -> Array:
        """Checks ``params`` and ``x``; returns ``x`` cast to the params' dtype (floating inputs).

        Raises:
          TypeError: integer inputs where the first layer takes floats, or the reverse.
          ValueError: params that do not match, ``x`` of the wrong shape, or an empty batch.
        """
        self.check_params(params)
        leaves = jax.tree.leaves(params)
        x_dtype = jnp.result_type(x)
        integer_input = getattr(self.layers[0], "integer_input", False)
        dtype = jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)
        if integer_input and not jnp.issubdtype(x_dtype, jnp.integer):
            raise TypeError(
                f"x: the first layer ({type(self.layers[0]).__name__}) takes integer inputs, "
                f"got dtype {x_dtype}; cast them with x.astype(jnp.int32)."
            )
        if not integer_input and not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(
                f"x: expected floating inputs, got dtype {x_dtype}; cast them first, e.g. "
                f"x.astype(jnp.{dtype.name})."
            )
        shape = tuple(jnp.shape(x))
        if shape[1:] != self.input_shape or len(shape) != len(self.input_shape) + 1:
            dims = ", ".join(map(str, self.input_shape))
            raise ValueError(
                f"x: expected shape {self._input_symbol}(batch, {dims}), got {shape}."
                + (
                    " For vmap over batches use jax.vmap(...)."
                    if len(shape) == len(self.input_shape) + 2
                    else ""
                )
            )
        if shape[0] == 0:
            raise ValueError(f"x: the batch is empty (shape {shape}); the mean loss is undefined.")
        return jnp.asarray(x) if integer_input else jnp.asarray(x).astype(dtype)

    def check_targets(self, y: Array, out: Array) -> Array:
        """``y`` as the loss takes it: one target per output position (``(positions, ...)``).

        Raises:
          ValueError, TypeError: targets of the wrong shape or dtype for the loss, naming ``y``.
        """
        # the labels as given: jnp.asarray would first wrap an int64 2**32 + 1 to int32 1
        self.check_labels(y)
        targets = self.objective.targets
        if out.ndim < 2:
            raise ValueError(
                f"the network's output has shape {out.shape}; losses take (batch, ..., n_out): "
                "end the network with a Dense layer."
            )
        y = jnp.asarray(y)
        lead, n_out = out.shape[:-1], out.shape[-1]
        positions = out.size // n_out
        if out.ndim > 2:
            if y.shape[: len(lead)] != lead or y.ndim not in (len(lead), len(lead) + 1):
                raise ValueError(
                    f"y: the network's output has shape {out.shape}; expected targets of shape "
                    f"{lead} (labels) or {out.shape}, got {y.shape}."
                )
            y = y.reshape(positions, *y.shape[len(lead) :])
        if targets is None:
            return y
        return targets(y, positions, n_out, out.dtype)

    def check_labels(self, y: Any) -> Any:
        """Checks concrete integer class labels lie in ``[0, n_out)``, before any tracing.

        Every function that runs the network under its own ``jax.jit`` (:mod:`bpjax.extend`,
        :mod:`bpjax.parallel`, :func:`bpjax.fit`) calls it first, so concrete labels are judged
        as :meth:`loss` judges them eagerly. Traced labels (inside a caller's ``jit``) pass here;
        an out-of-range one makes its example's loss and the gradients NaN, and
        :func:`bpjax.checked` raises on it.

        Returns:
          ``y``, a Python list or tuple of concrete values as one NumPy array.

        Raises:
          ValueError: a label outside ``[0, n_out)``, naming ``y``, the range and the first one.
        """
        if isinstance(y, (list, tuple)):  # as jnp.asarray reads them in the loss
            if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(y)):
                return y
            y = np.asarray(y)
        if not self.objective.labels or not jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return y
        losses.check_labels(y, self.output_shape[-1], loss=self.objective.name)
        return y

    def _last_z(self, cache: Cache) -> Array:
        """The last layer's ``z`` as ``(positions, n_out)`` rows (its output if it has none)."""
        last = cache.layers[-1]
        has_z = hasattr(self.layers[-1], "backward_delta") and hasattr(last, "z")
        return _positions(last.z if has_z else cache.out)


def _positions(out: Array) -> Array:
    """``(batch, ..., n)`` as ``(batch·positions, n)``: one row per output position."""
    return out.reshape(-1, out.shape[-1])


def _expected_params(net: Serial) -> Any:
    """The params tree :meth:`Serial.init` builds, as ShapeDtypeStructs (shapes only)."""
    try:
        return _expected_params_cached(net)
    except TypeError:  # a user's layer that cannot be hashed: trace init every time
        return jax.eval_shape(lambda: net.init(jax.random.key(0)))


@functools.lru_cache(maxsize=512)
def _expected_params_cached(net: Serial) -> Any:
    return jax.eval_shape(lambda: net.init(jax.random.key(0)))


def _output_shape(net: Serial) -> tuple[int, ...]:
    integer_input = getattr(net.layers[0], "integer_input", False)
    x = jax.ShapeDtypeStruct((1, *net.input_shape), jnp.int32 if integer_input else jnp.float32)
    out = jax.eval_shape(lambda p, x: chain_forward(net.layers, p, x, None)[0],
                         _expected_params(net), x)  # fmt: skip
    return tuple(out.shape[1:])


def _keys_text(keys: Sequence[str]) -> str:
    quoted = [repr(k) for k in keys]
    if not quoted:
        return "no keys"
    if len(quoted) == 1:
        return "keys " + quoted[0]
    return "keys " + ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _param_problems(params: Any, expected: list[Any], per_layer: str) -> list[str]:
    """Every way ``params`` differ from ``expected`` in structure, shape or dtype, one line each."""
    n = len(expected)
    kind = "dicts" if all(isinstance(e, dict) for e in expected) else "pytrees"
    if not isinstance(params, (list, tuple)):
        return [f"expected a list of {n} layer {kind}, got {type(params).__name__}."]
    if len(params) != n:
        return [f"expected {n} layers ({per_layer}), got {len(params)}."]
    problems, dtypes = [], set()
    for l, (got, want) in enumerate(zip(params, expected, strict=True)):
        if isinstance(want, dict) and (not isinstance(got, dict) or set(got) != set(want)):
            have = sorted(got) if isinstance(got, dict) else type(got).__name__
            problems.append(
                f"params[{l}]: expected a dict with {_keys_text(sorted(want))}, got {have}."
            )
            continue
        try:
            flat, treedef = jax.tree_util.tree_flatten_with_path(got)
        except Exception as err:  # a params object JAX cannot flatten
            problems.append(f"params[{l}]: cannot read it as a pytree: {err}")
            continue
        flat_want, treedef_want = jax.tree_util.tree_flatten_with_path(want)
        if treedef != treedef_want:  # type: ignore[operator]
            problems.append(f"params[{l}]: expected the tree {treedef_want}, got {treedef}.")
            continue
        for (path, leaf), (_, spec) in zip(flat, flat_want, strict=True):
            where = f"params[{l}]{jax.tree_util.keystr(path)}"
            if jnp.shape(leaf) != spec.shape:
                problems.append(f"{where}: expected shape {spec.shape}, got {jnp.shape(leaf)}.")
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                problems.append(f"{where}: expected a floating dtype, got {dtype}.")
            dtypes.add(dtype)
    if len(dtypes) > 1:
        problems.append(f"all leaves must share one dtype, got {sorted(d.name for d in dtypes)}.")
    return problems


@overload
def serial(
    *layers: Any, loss: None = None, input_shape: None = None, fuse_output: bool = True
) -> Sequential: ...


@overload
def serial(
    *layers: Any,
    loss: str | losses.Loss,
    input_shape: Sequence[int],
    fuse_output: bool = True,
) -> Serial: ...


def serial(
    *layers: Any,
    loss: str | losses.Loss | None = None,
    input_shape: Sequence[int] | None = None,
    fuse_output: bool = True,
) -> Serial | Sequential:
    """A network of ``layers`` in series ending in ``loss``; without a loss, a layer.

    Args:
      *layers: objects with the layer contract of :mod:`bpjax.layers` (``init``, ``forward``,
        ``backward``), input first; a ``serial(...)`` without a loss is one.
      loss: a loss name from :data:`bpjax.LOSSES` or a :class:`bpjax.Loss`. Without it (and
        without ``input_shape``) the result is a :class:`bpjax.layers.Sequential` layer, to nest
        in another ``serial`` or a :class:`~bpjax.layers.Residual` (stax's ``serial`` habit).
      input_shape: one example's shape, without the batch axis, e.g. ``(n_0,)``; required with
        a loss.
      fuse_output: use the fused output error when the last layer is a Dense layer whose
        activation is the loss's canonical partner.

    Returns:
      A :class:`Serial` network with ``init``, ``loss``, ``forward``, ``backward``,
      ``value_and_grad``; or, without a loss, a :class:`~bpjax.layers.Sequential`.

    Raises:
      ValueError: no layers, a bad or missing ``input_shape``, an unknown loss, or a last Dense
        activation the loss is not defined on.
      TypeError: a layer without ``init``, ``forward`` and ``backward``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax.layers import Dense, Residual
      >>> net = serial(Dense(4, "tanh"), Dense(2, "softmax"), loss="cross_entropy",
      ...              input_shape=(3,))
      >>> params = net.init(jax.random.key(0))
      >>> loss, grads = jax.jit(net.value_and_grad)(params, jnp.ones((5, 3)), jnp.zeros(5, int))
      >>> [g["W"].shape for g in grads]
      [(4, 3), (2, 4)]
      >>> block = serial(Dense(4, "tanh"), Dense(4))  # no loss: a layer
      >>> deep = serial(Dense(4, "tanh"), Residual(block), Dense(2, "softmax"),
      ...               loss="cross_entropy", input_shape=(3,))
      >>> len(deep.init(jax.random.key(0))[1][0])  # the Residual's one branch layer: the block
      2
    """
    if not layers:
        raise ValueError("layers: expected at least one layer, got none.")
    check_layers(layers)
    if loss is None:
        if input_shape is not None:
            raise ValueError(
                "loss: a network needs a loss (and then input_shape); without a loss serial(...) "
                "returns a layer, which takes its input shape from the layer before it."
            )
        return Sequential(*layers)
    if input_shape is None:
        raise ValueError("input_shape: a network needs one example's shape, e.g. (n_0,).")
    shape = checked_input_shape(input_shape)
    objective = losses.get_loss(loss)
    check_output(objective, layers, "layers[-1]")
    return Serial(tuple(layers), objective, shape, bool(fuse_output))
