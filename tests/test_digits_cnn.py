"""A small CNN trained on scikit-learn's 8×8 digits with the manual backward, against jax.grad.

Issue 4's end-to-end check: Conv-Pool-Conv-Pool-Dense reaches ≥ 95% held-out accuracy with the
hand-written backward passes, and its training curve is the one ``jax.grad`` gives, step for step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax.layers import Conv2D, Dense, Flatten, MaxPool2D

datasets = pytest.importorskip("sklearn.datasets")

EPOCHS = 10
BATCH = 64
N_TRAIN = 1437  # 80% of the 1797 digits


def _digits():
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


NET = bp.serial(
    Conv2D(8, 3, padding="SAME", activation="relu"),
    MaxPool2D(2),
    Conv2D(16, 3, padding="SAME", activation="relu"),
    MaxPool2D(2),
    Flatten(),
    Dense(10, "softmax"),
    loss="cross_entropy",
    input_shape=(8, 8, 1),
)
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def _global_rel_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = sum(jnp.sum((x - y) ** 2) for x, y in pairs)
    den = sum(jnp.sum(y**2) for y in jax.tree.leaves(b))
    return jnp.sqrt(num / den)


@functools.partial(jax.jit, static_argnums=4)
def _train(params, x, y, batches, manual):
    """SGD with momentum over the minibatches; per step: the loss and, on the manual run, the
    norm-relative difference between the manual gradient and jax.grad at the same params."""

    def step(carry, index):
        params, state = carry
        xb, yb = x[index], y[index]
        if manual:
            loss, grads = NET.value_and_grad(params, xb, yb)
            diff = _global_rel_diff(grads, jax.grad(NET.loss)(params, xb, yb))
        else:
            loss, grads = jax.value_and_grad(NET.loss)(params, xb, yb)
            diff = jnp.zeros((), loss.dtype)
        updates, state = OPTIMIZER.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), (loss, diff)

    (params, _), (losses, diffs) = jax.lax.scan(step, (params, OPTIMIZER.init(params)), batches)
    return params, losses, diffs


def test_cnn_trains_on_digits_with_the_manual_backward_like_jax_grad():
    x_train, y_train, x_test, y_test = _digits()
    steps_per_epoch = N_TRAIN // BATCH
    batches = np.stack(
        [
            np.random.default_rng(1 + epoch).permutation(N_TRAIN)[: steps_per_epoch * BATCH]
            for epoch in range(EPOCHS)
        ]
    ).reshape(-1, BATCH)
    params = NET.init(jax.random.key(0), jnp.float32)
    data = (jnp.asarray(x_train), jnp.asarray(y_train), jnp.asarray(batches))

    manual_params, manual_losses, grad_diffs = _train(params, *data, True)
    autodiff_params, autodiff_losses, _ = _train(params, *data, False)

    # the manual gradient is jax.grad's at every step of the manual run, to float32 tolerance
    assert float(jnp.max(grad_diffs)) <= bp.DEFAULT_RTOL["float32"]
    # and the two training curves agree step for step
    np.testing.assert_allclose(manual_losses, autodiff_losses, rtol=1e-4, atol=1e-5)
    accuracy = float(jnp.mean(jnp.argmax(NET(manual_params, x_test), axis=-1) == y_test))
    autodiff_accuracy = float(jnp.mean(jnp.argmax(NET(autodiff_params, x_test), axis=-1) == y_test))
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f}"
    assert abs(accuracy - autodiff_accuracy) <= 1 / len(y_test)
    assert float(manual_losses[-steps_per_epoch:].mean()) < 0.1
