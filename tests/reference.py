"""Plain-JAX references the tests compare bpjax with, written from the forward maths alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Every activation's forward as jax.nn defines it: a backward is checked against its autodiff.
JAX_NN_FORWARD = {
    "identity": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, negative_slope=0.01),
    "elu": lambda z: jax.nn.elu(z, alpha=1.0),
    "softplus": jax.nn.softplus,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
    "mish": jax.nn.mish,
    "softmax": lambda z: jax.nn.softmax(z, axis=-1),
}
