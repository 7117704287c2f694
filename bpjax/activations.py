"""Activations with their hand-written derivatives.

An :class:`Activation` is a NamedTuple of pure functions. ``forward(z) -> a`` applies ``f`` and
``backward(z, a, g) -> ∂C/∂z`` maps the error arriving at the output, ``g = ∂C/∂a``, to the error at
the weighted input, ``δ = J_f(z)ᵀ g``. For an elementwise ``f`` that is ``g ∘ f'(z)``; the cached
``a = f(z)`` is reused wherever it makes ``f'`` cheaper (``σ' = a(1 − a)``, ``tanh' = 1 − a²``).
Softmax returns ``Jᵀg = a ∘ (g − Σ_j g_j a_j)`` without forming the ``n × n`` Jacobian.

All arrays are batch-row: ``z``, ``a`` and ``g`` have shape ``(batch, n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "get_activation",
]

# What an activation's outputs can be; a loss states which of these it accepts.
REAL = "real"
POSITIVE = "positive"
UNIT_INTERVAL = "unit_interval"  # every a_j in (0, 1)
SIMPLEX = "simplex"  # a_j in (0, 1) and Σ_j a_j = 1: a probability vector


class Activation(NamedTuple):
    """An activation function ``a = f(z)`` and its hand-written backward.

    Attributes:
      name: the registry name, shown in reports and error messages.
      forward: ``z -> a``, both of shape ``(batch, n)``.
      backward: ``(z, a, g) -> δ``, all of shape ``(batch, n)``: ``δ = J_f(z)ᵀ g`` where
        ``g = ∂C/∂a`` and ``a = forward(z)`` is the cached output.
      output: what the outputs can be: ``"real"``, ``"positive"``, ``"unit_interval"`` or
        ``"simplex"``. Losses check it: cross-entropy needs ``"simplex"``.
      init: the weight initialisation that suits it: ``"glorot"`` (variance ``2/(n_in + n_out)``)
        or ``"he"`` (variance ``2/n_in``, for the ReLU family).

    Example:
      A user-defined activation is just another instance:

      >>> import jax.numpy as jnp
      >>> cube = Activation("cube", lambda z: z**3, lambda z, a, g: g * 3 * z**2)
      >>> cube.backward(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2))).tolist()
      [[3.0, 3.0]]
    """

    name: str
    forward: Callable[[Array], Array]
    backward: Callable[[Array, Array, Array], Array]
    output: str = REAL
    init: str = "glorot"

    def __repr__(self) -> str:  # the functions' reprs are addresses: name what identifies it
        return f"Activation(name={self.name!r}, output={self.output!r}, init={self.init!r})"


# Each forward sits right above its backward, with the same names; the comment gives f'.


def _identity_forward(z: Array) -> Array:
    return z


def _identity_backward(z: Array, a: Array, g: Array) -> Array:
    del z, a  # f' = 1
    return g


def _sigmoid_forward(z: Array) -> Array:
    return jax.nn.sigmoid(z)


def _sigmoid_backward(z: Array, a: Array, g: Array) -> Array:
    del z  # σ' = σ(1 − σ)
    return g * a * (1 - a)


def _tanh_forward(z: Array) -> Array:
    return jnp.tanh(z)


def _tanh_backward(z: Array, a: Array, g: Array) -> Array:
    del z  # tanh' = 1 − tanh²
    return g * (1 - a * a)


def _relu_forward(z: Array) -> Array:
    return jax.nn.relu(z)


def _relu_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # relu' = [z > 0]; 0 at the kink, as jax.nn.relu
    return jnp.where(z > 0, g, jnp.zeros_like(g))


LEAKY_RELU_SLOPE = 0.01  # JAX's and PyTorch's default negative slope


def _leaky_relu_forward(z: Array) -> Array:
    return jax.nn.leaky_relu(z, negative_slope=LEAKY_RELU_SLOPE)


def _leaky_relu_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # f' = 1 for z ≥ 0 (as jax.nn.leaky_relu), else the slope
    return jnp.where(z >= 0, g, LEAKY_RELU_SLOPE * g)


def _elu_forward(z: Array) -> Array:
    return jax.nn.elu(z)  # α = 1


def _elu_backward(z: Array, a: Array, g: Array) -> Array:
    # f' = 1 for z > 0, else α e^z = a + α
    return jnp.where(z > 0, g, g * (a + 1))


def _softplus_forward(z: Array) -> Array:
    return jax.nn.softplus(z)


def _softplus_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # softplus' = σ(z)
    return g * jax.nn.sigmoid(z)


_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_forward(z: Array) -> Array:
    return jax.nn.gelu(z, approximate=False)  # z Φ(z), Φ by erf


def _gelu_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # gelu' = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + jax.lax.erf(z * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
    return g * (cdf + z * pdf)


def _silu_forward(z: Array) -> Array:
    return jax.nn.silu(z)  # z σ(z)


def _silu_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # silu' = σ(z) (1 + z (1 − σ(z)))
    s = jax.nn.sigmoid(z)
    return g * s * (1 + z * (1 - s))


def _mish_forward(z: Array) -> Array:
    return jax.nn.mish(z)  # z tanh(softplus(z))


def _mish_backward(z: Array, a: Array, g: Array) -> Array:
    del a  # mish' = t + z (1 − t²) σ(z), t = tanh(softplus(z))
    t = jnp.tanh(jax.nn.softplus(z))
    return g * (t + z * (1 - t * t) * jax.nn.sigmoid(z))


def _softmax_forward(z: Array) -> Array:
    return jax.nn.softmax(z, axis=-1)


def _softmax_backward(z: Array, a: Array, g: Array) -> Array:
    del z  # J = diag(a) − a aᵀ, so Jᵀg = a ∘ (g − ⟨g, a⟩)
    return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))


identity = Activation("identity", _identity_forward, _identity_backward)
sigmoid = Activation("sigmoid", _sigmoid_forward, _sigmoid_backward, output=UNIT_INTERVAL)
tanh = Activation("tanh", _tanh_forward, _tanh_backward)
relu = Activation("relu", _relu_forward, _relu_backward, init="he")
leaky_relu = Activation("leaky_relu", _leaky_relu_forward, _leaky_relu_backward, init="he")
elu = Activation("elu", _elu_forward, _elu_backward, init="he")
softplus = Activation("softplus", _softplus_forward, _softplus_backward, output=POSITIVE)
gelu = Activation("gelu", _gelu_forward, _gelu_backward, init="he")
silu = Activation("silu", _silu_forward, _silu_backward, init="he")
mish = Activation("mish", _mish_forward, _mish_backward, init="he")
softmax = Activation("softmax", _softmax_forward, _softmax_backward, output=SIMPLEX)

ACTIVATIONS: dict[str, Activation] = {
    act.name: act
    for act in (
        identity,
        sigmoid,
        tanh,
        relu,
        leaky_relu,
        elu,
        softplus,
        gelu,
        silu,
        mish,
        softmax,
    )
}
"""Every built-in activation by name."""


def get_activation(activation: str | Activation, *, argname: str = "activation") -> Activation:
    """Returns the :class:`Activation` named ``activation``, or ``activation`` itself.

    Args:
      activation: a registry name (see :data:`ACTIVATIONS`) or an :class:`Activation`.
      argname: the argument name to use in error messages.

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
      TypeError: for anything that is neither a string nor an :class:`Activation`.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation]
        except KeyError:
            raise ValueError(
                f"{argname}: unknown activation {activation!r}; expected one of "
                f"{', '.join(sorted(ACTIVATIONS))}, or a bpjax.Activation."
            ) from None
    raise TypeError(
        f"{argname}: expected an activation name (str) or a bpjax.Activation, "
        f"got {type(activation).__name__}: {activation!r}."
    )
