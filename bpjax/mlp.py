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

An MLP *is* the serial network (:class:`bpjax.Serial`) of its :class:`bpjax.layers.Dense`
layers: :class:`MLP` is its constructor, which adds the ``(sizes, activations, loss)`` signature
and its checks, and no state or code path of its own. Its backward is
:func:`bpjax.layers.backprop`, the one reversed loop over layers: each Dense step hands
``∂C/∂a^{l-1} = δ^l W^l`` to the layer below. The notation is that of docs/design.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bpjax._types import is_int
from bpjax._validate import check_output
from bpjax.activations import Activation, get_activation
from bpjax.layers import Dense
from bpjax.losses import Loss, get_loss
from bpjax.network import Backward, Cache, Serial

__all__ = ["MLP", "Backward", "Cache"]


class MLP(Serial):
    """A multilayer perceptron: the serial network of Dense layers, by sizes and activations.

    ``MLP(sizes, activations, loss)`` is ``serial(Dense(n_1, f^1), …, Dense(n_L, f^L), loss=loss,
    input_shape=(n_0,))`` with the checks and messages of this signature: a :class:`bpjax.Serial`
    (every network method and tool applies), frozen and hashable. ``forward`` returns a
    :class:`bpjax.Cache` whose ``z``/``a`` list every ``z^l``/``a^l``.

    Only arrays go into params and caches, so ``jax.jit(net.value_and_grad)`` needs no static
    arguments, and ``net`` itself can be a static argument or a dict key.

    Args:
      sizes: ``(n_0, n_1, ..., n_L)``, the input width then each layer's width; ``L ≥ 1``.
        Python or NumPy integers (a NumPy array of them too).
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

    # the words error messages use for this signature (see Serial.check_inputs/check_params)
    _input_symbol = "(batch, n_0) = "
    _per_layer = "one per activation"

    def __init__(
        self,
        sizes: Sequence[int],
        activations: Sequence[str | Activation],
        loss: str | Loss,
        *,
        fuse_output: bool = True,
    ) -> None:
        sizes_t = _check_sizes(sizes)
        if activations is None or not isinstance(activations, Iterable):
            raise TypeError(
                f"activations: expected a sequence of {len(sizes_t) - 1} activations (one per "
                f"layer), got {type(activations).__name__}: {activations!r}."
            )
        if isinstance(activations, (str, Activation)):
            raise TypeError(
                f"activations: expected a sequence of {len(sizes_t) - 1} activations (one per "
                f"layer), got a single {activations!r}; write activations=({activations!r},)."
            )
        acts = tuple(
            get_activation(a, argname=f"activations[{i}]") for i, a in enumerate(activations)
        )
        if len(acts) != len(sizes_t) - 1:
            raise ValueError(
                f"activations: expected {len(sizes_t) - 1} activations, one per layer of "
                f"sizes={sizes_t}, got {len(acts)}: {tuple(a.name for a in acts)}."
            )
        layers = []
        for i, (n_out, act) in enumerate(zip(sizes_t[1:], acts, strict=True)):
            try:
                layers.append(Dense(n_out, act))
            except ValueError as err:  # name the argument as this signature spells it
                raise ValueError(f"activations[{i}]: " + str(err).partition(": ")[2]) from None
        objective = get_loss(loss)
        check_output(objective, layers, "activations[-1]")
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "input_shape", (sizes_t[0],))
        object.__setattr__(self, "fuse_output", bool(fuse_output))

    def __repr__(self) -> str:
        acts = repr(tuple(a.name for a in self.activations))
        return (
            f"MLP(sizes={self.sizes}, activations={acts}, loss={self.objective.name!r}"
            + ("" if self.fuse_output else ", fuse_output=False")
            + ")"
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L)``: the input width, then each layer's width."""
        return (self.input_shape[0], *(layer.n_out for layer in self.layers))

    @property
    def activations(self) -> tuple[Activation, ...]:
        """The ``L`` activations, one per layer; the last is the output's."""
        return tuple(layer.activation for layer in self.layers)

    @property
    def num_layers(self) -> int:
        """``L``, the number of Dense layers."""
        return len(self.layers)


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
    bad = [s for s in sizes_t if not is_int(s) or s < 1]
    if bad:
        raise ValueError(f"sizes: expected positive integers, got {sizes_t} (bad: {bad}).")
    return tuple(int(s) for s in sizes_t)  # NumPy integers too: the spec stays plain and hashable
