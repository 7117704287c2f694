"""The MLP's value and gradient by other libraries: a plain NumPy δ-recursion and PyTorch eager.

Both take the params of :meth:`bpjax.MLP.init` (one ``{"W": (n_l, n_{l-1}), "b": (n_l,)}`` per
layer, PyTorch's ``nn.Linear`` layout) and compute the batch-mean loss ``C = (1/B) Σ_n C_n`` and
``∇_θ C`` for the canonical output pairs that :class:`bpjax.MLP` fuses:

==========  ====================  ================================  ===========================
output      loss                  ``C_n`` from the logits ``z^L``   ``δ^L_n = ∂C_n/∂z^L_n``
==========  ====================  ================================  ===========================
softmax     cross_entropy         ``logsumexp(z) − z_{y_n}``        ``a − onehot(y_n)``
sigmoid     binary_cross_entropy  ``Σ_j softplus(z_j) − y_j z_j``   ``a − y``
identity    squared_error         ``½ Σ_j (z_j − y_j)²``            ``z − y``
==========  ====================  ================================  ===========================

with hidden activations ``identity``, ``sigmoid``, ``tanh`` or ``relu``.

* :func:`numpy_value_and_grad` writes the δ-recursion out in NumPy, the forward keeping every
  ``z^l`` and ``a^l``, then one reversed loop::

      ∇_{W^l} C = (δ^l)ᵀ a^{l-1},   ∇_{b^l} C = Σ_n δ^l_n,   δ^{l-1} = (δ^l W^l) ∘ f'(z^{l-1})

  with the ``1/B`` of the mean folded into ``δ^L``, as :meth:`bpjax.MLP.value_and_grad` does.
* :func:`torch_value_and_grad` builds the same network as ``torch.nn.Sequential`` of
  ``nn.Linear`` layers holding copies of the params, and gets the gradient from PyTorch's eager
  autograd (``loss.backward()``). torch is optional (``pip install ".[bench]"``);
  :func:`torch_status` says whether it is installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bpjax import MLP

__all__ = [
    "HIDDEN",
    "OUTPUT_PAIRS",
    "numpy_value_and_grad",
    "to_numpy_params",
    "torch_grads_to_numpy",
    "torch_status",
    "torch_value_and_grad",
]

NumpyParams = list[dict[str, np.ndarray]]

HIDDEN = ("identity", "sigmoid", "tanh", "relu")
"""Hidden activations both peers implement."""

OUTPUT_PAIRS = {
    "softmax": "cross_entropy",
    "sigmoid": "binary_cross_entropy",
    "identity": "squared_error",
}
"""The output activation and loss pairs both peers implement (bpjax's fused canonical pairs)."""


def _check_net(net: MLP) -> tuple[list[str], str]:
    """The hidden activations' names and the output's, or a ValueError naming what is missing."""
    names = [a.name for a in net.activations]
    *hidden, output = names
    bad = [f"activations[{i}]={h!r}" for i, h in enumerate(hidden) if h not in HIDDEN]
    if bad:
        raise ValueError(
            f"net: the peers implement hidden activations {', '.join(HIDDEN)}, got "
            f"{', '.join(bad)}."
        )
    if OUTPUT_PAIRS.get(output) != net.objective.name:
        pairs = ", ".join(f"{o} + {loss}" for o, loss in OUTPUT_PAIRS.items())
        raise ValueError(
            f"net: the peers implement the output pairs {pairs}, got {output} + "
            f"{net.objective.name}."
        )
    return hidden, output


def to_numpy_params(params: Any) -> NumpyParams:
    """Copies of bpjax params as NumPy arrays, same structure and dtype."""
    return [{"W": np.array(layer["W"]), "b": np.array(layer["b"])} for layer in params]


# -- NumPy ---------------------------------------------------------------------------------------

_NP_FORWARD: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
}

# f'(z) from z and a = f(z)
_NP_DERIVATIVE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "identity": lambda z, a: np.ones_like(z),
    "sigmoid": lambda z, a: a * (1 - a),
    "tanh": lambda z, a: 1 - a * a,
    "relu": lambda z, a: (z > 0).astype(z.dtype),
}


def _np_logsumexp(z: np.ndarray) -> np.ndarray:
    """``log Σ_j exp z_j`` over the last axis, shape ``(batch,)``, without overflow."""
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]


def _np_output(output: str, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C_n, δ^L_n)`` of shapes ``(batch,)`` and ``(batch, n_L)`` from the logits ``z^L``."""
    if output == "softmax":
        lse = _np_logsumexp(z)
        rows = np.arange(z.shape[0])
        delta = np.exp(z - lse[:, None])  # a = softmax(z)
        delta[rows, y] -= 1  # a − onehot(y)
        return lse - z[rows, y], delta
    if output == "sigmoid":
        softplus = np.logaddexp(0, z).astype(z.dtype)
        return (softplus - y * z).sum(axis=-1), _NP_FORWARD["sigmoid"](z) - y
    diff = z - y
    return 0.5 * (diff * diff).sum(axis=-1), diff


def numpy_value_and_grad(
    net: MLP,
) -> Callable[[NumpyParams, np.ndarray, np.ndarray], tuple[np.ndarray, NumpyParams]]:
    """The batch-mean loss and its gradient of ``net`` by a δ-recursion in plain NumPy.

    Args:
      net: an MLP with hidden activations from :data:`HIDDEN` and an output pair from
        :data:`OUTPUT_PAIRS`.

    Returns:
      ``value_and_grad(params, x, y) -> (loss, grads)``: ``params`` as :func:`to_numpy_params`
      gives, ``x`` of shape ``(batch, n_0)``, ``y`` integer labels ``(batch,)`` for
      cross_entropy else ``(batch, n_L)``; ``loss`` a 0-d array, ``grads`` like ``params``. The
      arithmetic runs in the params' dtype.

    Raises:
      ValueError: an activation or output pair the peer does not implement.

    Example:
      >>> import jax
      >>> net = MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
      >>> params = to_numpy_params(net.init(jax.random.key(0)))
      >>> loss, grads = numpy_value_and_grad(net)(params, np.ones((5, 3), np.float32),
      ...                                          np.array([0, 1, 1, 0, 1]))
      >>> loss.dtype, [g["W"].shape for g in grads]
      (dtype('float32'), [(4, 3), (2, 4)])
    """
    hidden, output = _check_net(net)

    def value_and_grad(
        params: NumpyParams, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, NumpyParams]:
        dtype = params[0]["W"].dtype
        a = np.asarray(x, dtype)
        if output != "softmax":
            y = np.asarray(y, dtype)
        inputs, zs, activations = [], [], []
        for layer, act in zip(params, [*hidden, "identity"], strict=True):
            inputs.append(a)
            z = a @ layer["W"].T + layer["b"]  # z^l = a^{l-1} (W^l)ᵀ + b^l
            a = _NP_FORWARD[act](z)  # a^l = f^l(z^l); the output's f^L is inside the loss
            zs.append(z)
            activations.append(a)
        per_example, delta = _np_output(output, zs[-1], y)
        batch = a.shape[0]
        delta = delta / np.asarray(batch, dtype)  # δ^L / B: the mean's 1/B, applied once
        grads: NumpyParams = [{} for _ in params]
        for l in reversed(range(len(params))):
            # ∇_{W^l} C = (δ^l)ᵀ a^{l-1},  ∇_{b^l} C = Σ_n δ^l_n
            grads[l] = {"W": delta.T @ inputs[l], "b": delta.sum(axis=0)}
            if l > 0:  # δ^{l-1} = (δ^l W^l) ∘ f'(z^{l-1})
                delta = (delta @ params[l]["W"]) * _NP_DERIVATIVE[hidden[l - 1]](
                    zs[l - 1], activations[l - 1]
                )
        return per_example.mean(dtype=dtype), grads

    return value_and_grad


# -- PyTorch -------------------------------------------------------------------------------------


def torch_status() -> str:
    """``"torch X.Y.Z"`` when PyTorch imports, else ``"not installed (...)"``."""
    try:
        import torch
    except ImportError as err:
        return f"not installed ({err}; pip install '.[bench]')"
    return f"torch {torch.__version__}"


def torch_value_and_grad(
    net: MLP, params: Any, *, device: str = "cpu"
) -> tuple[Callable[[Any, Any], tuple[Any, list[dict[str, Any]]]], Callable[..., Any]]:
    """The batch-mean loss and its gradient of ``net`` by PyTorch eager autograd.

    Builds ``torch.nn.Sequential`` of ``nn.Linear`` layers (weights ``(n_l, n_{l-1})``, the
    layout of bpjax's params) holding copies of ``params`` in their dtype, the hidden activations
    between them, and the output activation folded into the loss as PyTorch does it
    (``cross_entropy`` of the logits, ``binary_cross_entropy_with_logits``, ``½ Σ (z − y)²``).

    Args:
      net: an MLP with hidden activations from :data:`HIDDEN` and an output pair from
        :data:`OUTPUT_PAIRS`.
      params: its params, as from ``net.init``.
      device: the torch device the model and data live on.

    Returns:
      ``(value_and_grad, to_torch)``: ``to_torch(x, y)`` moves NumPy or JAX data to the
      device as tensors of the right dtypes; ``value_and_grad(x, y) -> (loss, grads)`` runs
      forward and ``loss.backward()`` on them and returns the loss tensor and the ``.grad``
      tensors as ``[{"W": ..., "b": ...}, ...]`` (on a CUDA device it synchronises first, so
      the call is over when it returns).

    Raises:
      ImportError: torch is not installed.
      ValueError: an activation or output pair the peer does not implement.
    """
    import torch

    hidden, output = _check_net(net)
    modules = {"identity": torch.nn.Identity, "sigmoid": torch.nn.Sigmoid}
    modules |= {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    layers = []
    for layer in params:
        w = torch.from_numpy(np.array(layer["W"]))
        linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype, device=device)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
        layers.append(linear)
    stack: list[Any] = list(
        itertools.chain.from_iterable(
            (linear, modules[act]()) for linear, act in zip(layers[:-1], hidden, strict=True)
        )
    )
    model = torch.nn.Sequential(*stack, layers[-1])
    dtype = layers[0].weight.dtype
    functional = torch.nn.functional

    def loss_of_logits(z: Any, y: Any) -> Any:
        if output == "softmax":
            return functional.cross_entropy(z, y)
        if output == "sigmoid":
            return functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
        return 0.5 * ((z - y) ** 2).sum() / z.shape[0]

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def value_and_grad(x: Any, y: Any) -> tuple[Any, list[dict[str, Any]]]:
        model.zero_grad(set_to_none=True)
        loss = loss_of_logits(model(x), y)
        loss.backward()
        sync()
        return loss.detach(), [{"W": lin.weight.grad, "b": lin.bias.grad} for lin in layers]

    def to_torch(x: Any, y: Any) -> tuple[Any, Any]:
        tx = torch.from_numpy(np.array(x)).to(device=device, dtype=dtype)
        ty = torch.from_numpy(np.array(y)).to(device)
        ty = ty.long() if output == "softmax" else ty.to(dtype)
        return tx, ty

    return value_and_grad, to_torch


def torch_grads_to_numpy(grads: Sequence[dict[str, Any]]) -> NumpyParams:
    """The gradients :func:`torch_value_and_grad` returns, as NumPy arrays on the host."""
    return [{k: np.asarray(v.detach().cpu()) for k, v in g.items()} for g in grads]
