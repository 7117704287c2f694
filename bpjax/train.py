"""Training any network with optax, on the hand-written gradients or on ``jax.grad``'s.

One optimisation step is a pure function of arrays (:func:`make_train_step`)::

    (C, ∇_θ C) = grad_fn(θ, x_batch, y_batch)      the δ-recursion, or jax.value_and_grad
    (u, s')    = optimizer.update(∇_θ C, s, θ)
    θ'         = θ + u

and :func:`fit` runs it, jitted, over shuffled minibatches for a number of epochs, evaluating the
loss and accuracy on the whole training split and on a held-out split every ``eval_every`` epochs.
The gradient is a pluggable callable ``grad_fn(params, x, y) -> (loss, grads)``
(:func:`gradient_fn` builds the manual and autodiff ones), so the same loop trains on any gradient
of the batch-mean loss ``C = (1/B) Σ_n C_n``: a data-parallel one, say, that averages shards.

Inputs. Data sets hold flat rows ``(n, n_0)``; a network whose ``input_shape`` has several axes
(a CNN's ``(H, W, C)``) gets each row reshaped to it in C order (:func:`network_inputs`), so the
digits' 64 pixels are an ``(8, 8, 1)`` image. A network with layers that draw randomness in
training (``needs_key``: :class:`~bpjax.layers.Dropout`) gets a fresh key each step,
``fold_in(key(seed), step)``; evaluation runs without one (evaluation mode).

Targets. Training data hold integer class labels ``(n,)`` or float targets ``(n, n_L)`` (see
:class:`bpjax.datasets.Dataset`); labels go to cross_entropy as they are, and to every other
loss as one-hot rows ``[j = y_n]`` (:func:`loss_targets`). Accuracy is the share of examples whose
largest output ``argmax_j a^L_{nj}`` is the label; regression targets have none (NaN).

Determinism. Given the initial params and ``seed`` (which orders the minibatches) the run is
reproducible, and the manual and autodiff runs see the same batches in the same order, so their
histories differ only by the floating-point rounding of the two gradients.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax._types import Array, Grads, Params, is_int, is_real
from bpjax.datasets import Dataset
from bpjax.losses import check_labels, one_hot_labels
from bpjax.network import Serial
from bpjax.train_data import check_data, network_inputs

__all__ = [
    "GRADIENTS",
    "OPTIMIZERS",
    "EvalRecord",
    "FitResult",
    "History",
    "Metrics",
    "TrainState",
    "check_data",
    "check_training",
    "evaluate",
    "fit",
    "get_optimizer",
    "gradient_fn",
    "loss_targets",
    "make_train_step",
    "network_inputs",
]

GradFn = Callable[[Params, Array, Array], tuple[Array, Grads]]
# (params, x (batch, n_0), y) -> (C, ∇_θ C): the batch-mean loss and its gradient

GRADIENTS = ("manual", "autodiff")
"""How :func:`gradient_fn` differentiates: the δ-recursion, or ``jax.value_and_grad``."""

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "nadam": optax.nadam,
    "adamax": optax.adamax,
    "adabelief": optax.adabelief,
    "radam": optax.radam,
    "yogi": optax.yogi,
    "lamb": optax.lamb,
    "lion": optax.lion,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}
"""optax optimisers by name, each a function of the learning rate; optax's defaults otherwise
(``momentum`` and ``nesterov`` are ``optax.sgd`` with momentum 0.9)."""


@functools.lru_cache(maxsize=64)
def get_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The optax optimiser ``name`` (a key of :data:`OPTIMIZERS`) at ``learning_rate``.

    Optimisers are stateless, so equal arguments give the same object, and :func:`fit` reuses
    its compiled step.

    Raises:
      ValueError: an unknown name (the message lists the known ones) or a learning rate that is
        not a positive finite number.
      TypeError: a learning rate that is not a number.

    Example:
      >>> opt = get_optimizer("adam", 1e-3)
      >>> type(opt).__name__
      'GradientTransformationExtraArgs'
    """
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}."
        )
    if not is_real(learning_rate):
        raise TypeError(
            f"learning_rate: expected a positive number, got {type(learning_rate).__name__}: "
            f"{learning_rate!r}."
        )
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate: expected a positive number, got {learning_rate}.")
    return OPTIMIZERS[name](learning_rate)


@functools.lru_cache(maxsize=64)
def gradient_fn(
    net: Serial, grad: str = "manual", *, mesh: jax.sharding.Mesh | None = None, axis: str = "data"
) -> GradFn:
    """``(params, x, y) -> (C, ∇_θ C)`` for ``net``: by the δ-recursion or by autodiff.

    Equal arguments give the same function, so :func:`fit` reuses its compiled step.

    Args:
      net: the network spec.
      grad: ``"manual"``, :meth:`MLP.value_and_grad` (forward pass and the explicit
        δ-recursion), or ``"autodiff"``, ``jax.value_and_grad(net.loss)`` (reverse-mode autodiff
        of the plain forward maths).
      mesh: a device mesh to run data parallel on: the batch is split over its ``axis`` and the
        gradients all-reduced. ``"manual"`` is :func:`bpjax.parallel.data_parallel` (per-shard
        δ-recursion, one ``psum``; a batch that ``axis`` does not divide is padded and masked);
        ``"autodiff"`` constrains ``x`` and ``y`` to that sharding and lets the compiler place
        the collectives. ``None`` (default): one device.
      axis: the mesh axis the batch is split over.

    Raises:
      ValueError: ``grad`` is not one of :data:`GRADIENTS`, or ``axis`` is not an axis of
        ``mesh``.
    """
    if grad not in GRADIENTS:
        raise ValueError(f"grad: expected one of {', '.join(GRADIENTS)}, got {grad!r}.")
    if mesh is not None and net.needs_key:
        raise ValueError(
            "mesh: data-parallel training takes no PRNG key, and this network has layers that "
            "draw randomness in training (needs_key: Dropout); train it on one device."
        )
    if mesh is None:
        return net.value_and_grad if grad == "manual" else jax.value_and_grad(net.loss)
    from bpjax import parallel

    if grad == "manual":
        return parallel.data_parallel(net, mesh, axis=axis)
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: expected one of the mesh's axes {mesh.axis_names}, got {axis!r}.")
    batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    autodiff = jax.value_and_grad(net.loss)

    def sharded_autodiff(params: Params, x: Array, y: Array) -> tuple[Array, Grads]:
        x = jax.lax.with_sharding_constraint(x, batch_sharded)
        y = jax.lax.with_sharding_constraint(y, batch_sharded)
        return autodiff(params, x, y)

    return sharded_autodiff


class TrainState(NamedTuple):
    """What one optimisation step carries to the next."""

    params: Params  # θ: [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]
    opt_state: optax.OptState  # the optimiser's state s (moments, counts), a pytree

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation) -> TrainState:
        """The state before the first step: ``params`` and ``optimizer.init(params)``."""
        return cls(params, optimizer.init(params))


def make_train_step(
    grad_fn: GradFn, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[TrainState, Array]]:
    """One optimisation step as a pure function ``(state, x, y) -> (state', C)``.

    ``(C, g) = grad_fn(θ, x, y)``, ``(u, s') = optimizer.update(g, s, θ)``, ``θ' = θ + u``;
    ``C`` is the batch-mean loss at ``θ``, before the step. Wrap it in ``jax.jit``.

    Args:
      grad_fn: ``(params, x, y) -> (loss, grads)`` of the batch-mean loss, e.g. from
        :func:`gradient_fn`.
      optimizer: an optax gradient transformation.

    Raises:
      TypeError: ``grad_fn`` not callable, or ``optimizer`` without ``init`` and ``update``.

    Returns:
      ``step(state, x, y, key=None)`` for a :class:`TrainState`, inputs of shape
      ``(batch, *input_shape)`` and targets in the form the loss takes (:func:`loss_targets`);
      a ``key`` is handed to ``grad_fn(params, x, y, key=key)`` (a network with ``needs_key``
      layers, whose ``value_and_grad`` and ``loss`` take one).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax import MLP
      >>> net = MLP((2, 3, 1), ("tanh", "identity"), "squared_error")
      >>> opt = get_optimizer("sgd", 0.1)
      >>> step = jax.jit(make_train_step(gradient_fn(net), opt))
      >>> state = TrainState.create(net.init(jax.random.key(0)), opt)
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> state, first = step(state, x, y)
      >>> state, second = step(state, x, y)
      >>> bool(second < first)
      True
    """

    check_training(grad_fn, optimizer)

    def step(
        state: TrainState, x: Array, y: Array, key: Array | None = None
    ) -> tuple[TrainState, Array]:
        if key is None:
            loss, grads = grad_fn(state.params, x, y)
        else:  # a network with layers that draw randomness in training (Dropout)
            loss, grads = grad_fn(state.params, x, y, key=key)  # type: ignore[call-arg]
        # optax mixes Python floats with its int32 step count (adam's bias correction 1 − β^t),
        # which strict dtype promotion rejects; the gradient above keeps the caller's setting
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), loss

    return step


def check_training(grad_fn: Any, optimizer: Any) -> None:
    """Raises ``TypeError`` unless ``grad_fn`` is callable and ``optimizer`` is an optax
    gradient transformation (``init`` and ``update``)."""
    if not callable(grad_fn):
        raise TypeError(
            "grad_fn: expected a function (params, x, y) -> (loss, grads), e.g. "
            f"bpjax.gradient_fn(net), got {type(grad_fn).__name__}: {grad_fn!r}."
        )
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            "optimizer: expected an optax gradient transformation (init and update), e.g. "
            f"bpjax.get_optimizer('adam', 1e-3), got {type(optimizer).__name__}: {optimizer!r}."
        )


def loss_targets(net: Serial, y: Array) -> Array:
    """``y`` in the form ``net``'s loss takes: integer labels become one-hot rows where needed.

    Integer labels of shape ``(batch,)`` stay labels for cross_entropy and become one-hot rows
    ``y_{nj} = [j = y_n]`` of shape ``(batch, n_L)`` in the network's dtype (float32) for every
    other loss; float targets pass through. Concrete labels outside ``[0, n_L)`` raise
    ``ValueError``; traced ones become rows of NaN (:func:`bpjax.losses.one_hot_labels`).
    """
    if isinstance(y, (list, tuple)):  # as jnp.asarray reads them in the loss
        y = np.asarray(y)
    labels = jnp.ndim(y) == 1 and jnp.issubdtype(jnp.result_type(y), jnp.integer)
    if labels and net.objective.name != "cross_entropy":
        n_out = net.output_shape[-1]
        check_labels(y, n_out, loss=net.objective.name)
        return one_hot_labels(jnp.asarray(y), n_out, jnp.float32)
    return jnp.asarray(y)


class Metrics(NamedTuple):
    """The loss and accuracy of a network on a set of examples."""

    loss: Array  # (): C = (1/n) Σ_n C_n
    accuracy: Array  # (): share of argmax_j a^L_nj = y_n; NaN for regression targets


def evaluate(net: Serial, params: Params, x: Array, y: Array) -> Metrics:
    """The mean loss and the accuracy of ``net`` on ``x``.

    Args:
      net: the network spec (static under ``jax.jit``: pass it with ``static_argnums=0``).
      params: as from ``net.init``.
      x: inputs of shape ``(n, n_0)``.
      y: integer class labels of shape ``(n,)`` (accuracy reported; see :func:`loss_targets`)
        or float targets of shape ``(n, n_L)`` (accuracy NaN).

    Returns:
      :class:`Metrics` of scalars in the params' dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bpjax import MLP
      >>> net = MLP((2, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.array([[1.0, 2.0], [-1.0, 0.5]]), jnp.array([0, 1])
      >>> metrics = evaluate(net, params, x, y)
      >>> bool(metrics.loss == net.loss(params, x, y))
      True
      >>> predicted = jnp.argmax(net(params, x), axis=-1)
      >>> float(metrics.accuracy) == float(jnp.mean(predicted == y))
      True
    """
    loss = net.loss(params, x, loss_targets(net, y))
    out = net(params, x)  # under jit, the same forward as the loss's (XLA merges the two)
    y = jnp.asarray(y)
    if y.ndim == 1 and jnp.issubdtype(y.dtype, jnp.integer):
        # argmax is int64 under jax_enable_x64, the labels int32 as loaded: compare in the labels'
        # dtype, which strict dtype promotion would otherwise reject
        predicted = jnp.argmax(out, axis=-1).astype(y.dtype)
        accuracy = jnp.mean((predicted == y).astype(loss.dtype))
    else:
        accuracy = jnp.full((), jnp.nan, loss.dtype)
    return Metrics(loss, accuracy)


@functools.cache
def _jitted_evaluate() -> Callable[[Serial, Params, Array, Array], Metrics]:
    """:func:`evaluate` under ``jax.jit`` (the net static), one compiled cache for every fit."""
    return jax.jit(evaluate, static_argnums=0)


class EvalRecord(NamedTuple):
    """The metrics at one evaluation during :func:`fit`; ``None`` where there is nothing to
    measure (no held-out split, or no accuracy for regression targets)."""

    epoch: int  # epochs completed
    step: int  # optimisation steps completed
    seconds: float  # wall time since the start of training
    train_loss: float  # C on the whole training split
    train_accuracy: float | None
    test_loss: float | None  # C on the held-out split
    test_accuracy: float | None


class History(NamedTuple):
    """What happened during :func:`fit`."""

    step_loss: list[float]  # the minibatch loss C before each step, one per step
    evals: list[EvalRecord]  # after every eval_every epochs (and the last one)
    # "epochs", "target_loss" (reached), "nonfinite" (the loss became NaN/inf) or
    # "interrupted" (fit's interrupt returned True)
    stopped: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``step_loss``, ``evals`` (a list of dicts) and ``stopped``."""
        return {
            "step_loss": list(self.step_loss),
            "evals": [record._asdict() for record in self.evals],
            "stopped": self.stopped,
        }


class FitResult(NamedTuple):
    """The trained params and the history of the run."""

    params: Params
    history: History


def fit(
    net: Serial,
    params: Params,
    train: Dataset,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    grad: str = "manual",
    grad_fn: GradFn | None = None,
    test: Dataset | None = None,
    eval_every: int = 1,
    target_loss: float | None = None,
    on_step: Callable[[int], None] | None = None,
    on_eval: Callable[[EvalRecord], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
) -> FitResult:
    """Trains ``net`` from ``params`` by minibatch optimisation; returns the params and history.

    Each epoch shuffles the training examples (a permutation drawn from ``seed``) and takes
    ``⌊n / batch_size⌋`` steps of :func:`make_train_step` on consecutive batches (the remainder
    of the permutation waits for a later epoch's shuffle). After every ``eval_every`` epochs,
    and after the last, the whole training split and the held-out split are evaluated
    (:func:`evaluate`). Training stops early when the training-split loss is at most
    ``target_loss``, when a loss is no longer finite, or when ``interrupt()`` says so.

    Args:
      net: any network (an :class:`~bpjax.MLP` or a :func:`~bpjax.serial` one); its input size
        must be the data's number of features (rows are reshaped to ``input_shape``, see
        :func:`network_inputs`) and its ``output_shape`` ``(n_L,)`` the data's outputs. A network
        with ``needs_key`` layers gets ``fold_in(key(seed), step)`` each step.
      params: the initial params, e.g. ``net.init(jax.random.key(seed))``.
      train: the training examples (labels or regression targets, see :func:`loss_targets`).
      optimizer: an optax optimiser, e.g. :func:`get_optimizer`.
      epochs: the most epochs to run, at least 1.
      batch_size: examples per step; at least 1, at most the training set's size is used.
      seed: orders the minibatches.
      grad: ``"manual"`` or ``"autodiff"``, for :func:`gradient_fn`; ignored when ``grad_fn``
        is given.
      grad_fn: a gradient ``(params, x, y) -> (loss, grads)`` to train on instead, e.g. a
        data-parallel one; it must work under ``jax.jit``.
      test: held-out examples to evaluate on, or ``None``/empty for none.
      eval_every: evaluate after every this many epochs.
      target_loss: stop once the training-split loss is at most this.
      on_step: called with the number of steps done after each step is dispatched (the loss is
        not waited for), e.g. to advance a progress bar.
      on_eval: called with each :class:`EvalRecord` as it is made.
      interrupt: polled after every step; once it returns ``True`` training stops there, at a
        step boundary, so the params and the step losses agree: the params reached are
        evaluated (an :class:`EvalRecord` whose ``epoch`` counts the epochs completed) and
        returned with ``history.stopped == "interrupted"``. A Ctrl-C handler that sets a flag,
        as ``bpjax train`` does, stops a run without losing it.

    Returns:
      A :class:`FitResult`. The history's ``step_loss`` has one minibatch loss per step taken.

    Raises:
      ValueError: ``epochs``, ``batch_size`` or ``eval_every`` not a positive integer; data
        whose width or outputs do not match ``net.sizes``.
      TypeError: ``net`` not a network, ``seed`` not an integer, ``grad_fn`` not callable or
        ``optimizer`` not an optax gradient transformation.

    Example:
      >>> import jax
      >>> from bpjax import MLP
      >>> from bpjax.datasets import xor_dataset
      >>> net = MLP((2, 8, 2), ("tanh", "softmax"), "cross_entropy")
      >>> result = fit(net, net.init(jax.random.key(0)), xor_dataset(),
      ...              optimizer=get_optimizer("adam", 0.05), epochs=20, batch_size=50)
      >>> result.history.evals[-1].train_accuracy
      1.0
    """
    if not isinstance(net, Serial):
        raise TypeError(
            f"net: expected a bpjax network (bpjax.serial(...) or bpjax.MLP), got "
            f"{type(net).__name__}."
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
    if not is_int(seed):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}: {seed!r}.")
    check_training(grad_fn or net.value_and_grad, optimizer)
    check_data(net, train, "train")
    held_out = None
    if test is not None and len(test) > 0:
        check_data(net, test, "test")
        held_out = (network_inputs(net, test.x), jnp.asarray(test.y))
    indexed_step = _jitted_step(grad_fn or gradient_fn(net, grad), optimizer)
    base_key = jax.random.key(seed) if net.needs_key else None

    # the data go to the device once; each step gathers its batch there
    x_train, y_train = network_inputs(net, train.x), jnp.asarray(train.y)
    targets = loss_targets(net, y_train)
    n = len(train)
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    rng = np.random.default_rng(seed)
    state = TrainState.create(params, optimizer)
    evaluate_jit = _jitted_evaluate()
    step_loss: list[float] = []
    evals: list[EvalRecord] = []
    pending: list[Array] = []
    stopped = "epochs"
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        for index in order:
            key = None
            if base_key is not None:
                key = jax.random.fold_in(base_key, len(step_loss) + len(pending))
            state, loss = indexed_step(state, x_train, targets, jnp.asarray(index), key)
            pending.append(loss)
            if on_step is not None:
                on_step(len(step_loss) + len(pending))
            if interrupt is not None and interrupt():
                stopped = "interrupted"
                break
        if stopped != "interrupted" and epoch % eval_every and epoch != epochs:
            continue
        fresh = np.asarray(jnp.stack(pending)).tolist()
        step_loss.extend(fresh)
        pending.clear()
        train_metrics = evaluate_jit(net, state.params, x_train, y_train)
        test_metrics = None if held_out is None else evaluate_jit(net, state.params, *held_out)
        record = EvalRecord(
            epoch=len(step_loss) // steps_per_epoch,  # completed: an interrupted one is not
            step=len(step_loss),
            seconds=time.perf_counter() - start,
            train_loss=float(train_metrics.loss),
            train_accuracy=_optional(train_metrics.accuracy),
            test_loss=None if test_metrics is None else float(test_metrics.loss),
            test_accuracy=None if test_metrics is None else _optional(test_metrics.accuracy),
        )
        evals.append(record)
        if on_eval is not None:
            on_eval(record)
        if stopped == "interrupted":
            break
        if not (math.isfinite(record.train_loss) and all(map(math.isfinite, fresh))):
            stopped = "nonfinite"
            break
        if target_loss is not None and record.train_loss <= target_loss:
            stopped = "target_loss"
            break
    return FitResult(state.params, History(step_loss, evals, stopped))


def _jitted_step(grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Any:
    """``jax.jit`` of :func:`_indexed_step`, memoized: a second fit with the same gradient and
    optimiser reuses the compiled program (unhashable ones simply compile afresh)."""
    try:
        return _cached_jitted_step(grad_fn, optimizer)
    except TypeError:
        return _cached_jitted_step.__wrapped__(grad_fn, optimizer)


@functools.lru_cache(maxsize=64)
def _cached_jitted_step(grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Any:
    return jax.jit(functools.partial(_indexed_step, make_train_step(grad_fn, optimizer)))


def _indexed_step(
    step: Callable[..., tuple[TrainState, Array]],
    state: TrainState,
    x: Array,
    y: Array,
    index: Array,
    key: Array | None,
) -> tuple[TrainState, Array]:
    """``step`` on the minibatch ``x[index], y[index]``; the data stay on the device."""
    return step(state, x[index], y[index], key)


def _optional(value: Array) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number
