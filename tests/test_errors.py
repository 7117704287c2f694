"""Bad input fails at trace time with a message naming the argument, the expected and the received.

Each check runs eagerly and under ``jax.jit`` (the ``maybe_jit`` fixture): the shape, dtype and
tree checks look only at static information, so they fire while tracing. Only the label-range
check needs concrete values and runs outside jit alone.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp

ACTIVATION_NAMES = sorted(bp.ACTIVATIONS)
B = 5


@pytest.fixture
def ce():
    net = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    x = jnp.ones((B, 3))
    y = jnp.array([0, 1, 1, 0, 1])
    return net, params, x, y


@pytest.fixture
def se():
    net = bp.MLP((3, 4, 2), ("tanh", "identity"), "squared_error")
    params = net.init(jax.random.key(0))
    return net, params, jnp.ones((B, 3)), jnp.ones((B, 2))


# every entry point that takes (params, x, y)
ENTRY_POINTS = ("loss", "value_and_grad", "per_example_loss", "backward")


def _call(net, entry: str, wrap):
    """``entry`` as a function of (params, x, y), jitted or not."""
    if entry == "backward":

        def run(params, x, y):
            _, cache = net.forward(params, x)
            return net.backward(params, cache, y)

        return wrap(run)
    return wrap(getattr(net, entry))


# -- the spec ---------------------------------------------------------------------------------


def test_activation_count_differs_from_layers():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "activations: expected 2 activations, one per layer of sizes=(3, 4, 2), "
            "got 1: ('tanh',)."
        ),
    ):
        bp.MLP((3, 4, 2), ("tanh",), "squared_error")
    with pytest.raises(ValueError, match=r"activations: expected 1 activations.*got 2"):
        bp.MLP((3, 2), ("tanh", "tanh"), "squared_error")


def test_single_activation_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"activations: .*got a single 'tanh'.*\('tanh',\)"):
        bp.MLP((3, 2), "tanh", "squared_error")


def test_unknown_activation_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"activations\[1\]: unknown activation 'tanhh'; expected one of "
        + re.escape(", ".join(ACTIVATION_NAMES)),
    ):
        bp.MLP((3, 4, 2), ("tanh", "tanhh"), "squared_error")


def test_activation_of_wrong_type():
    with pytest.raises(TypeError, match=r"activations\[0\]: expected an activation name"):
        bp.MLP((3, 2), (jnp.tanh,), "squared_error")


def test_unknown_loss_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"^loss: unknown loss 'mse'; expected one of "
        r"binary_cross_entropy, cross_entropy, squared_error",
    ):
        bp.MLP((3, 2), ("identity",), "mse")


@pytest.mark.parametrize("out", ["tanh", "sigmoid", "identity", "relu"])
def test_cross_entropy_needs_a_softmax_output(out):
    with pytest.raises(
        ValueError,
        match=rf"activations\[-1\]: the loss 'cross_entropy' .* output activation '{out}'.*"
        r"cross_entropy needs probabilities: use a 'softmax' output",
    ):
        bp.MLP((3, 2), (out,), "cross_entropy")


@pytest.mark.parametrize("out", ["tanh", "identity", "softplus"])
def test_binary_cross_entropy_needs_a_unit_interval_output(out):
    with pytest.raises(
        ValueError,
        match=rf"activations\[-1\]: the loss 'binary_cross_entropy' .* '{out}' gives .* values; "
        r"use a 'sigmoid' output",
    ):
        bp.MLP((3, 2), (out,), "binary_cross_entropy")


@pytest.mark.parametrize(
    "sizes,match",
    [
        ((3,), r"sizes: expected at least two widths \(n_0, n_1\) for one layer, got \(3,\)"),
        ((3, 0), r"sizes: expected positive integers, got \(3, 0\) \(bad: \[0\]\)"),
        ((3, 2.0), r"sizes: expected positive integers, got \(3, 2.0\)"),
    ],
)
def test_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        bp.MLP(sizes, ("identity",) * max(1, len(sizes) - 1), "squared_error")


def test_init_dtype_must_be_floating():
    net = bp.MLP((3, 2), ("identity",), "squared_error")
    with pytest.raises(TypeError, match=r"dtype: expected a floating dtype .*got int32"):
        net.init(jax.random.key(0), jnp.int32)


# -- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_x_feature_size(entry, ce, maybe_jit):
    net, params, _, y = ce
    with pytest.raises(
        ValueError, match=re.escape("x: expected shape (batch, n_0) = (batch, 3), got (5, 4).")
    ):
        _call(net, entry, maybe_jit)(params, jnp.ones((B, 4)), y)


def test_x_with_a_leading_batch_axis_suggests_vmap(ce, maybe_jit):
    net, params, _, _ = ce
    with pytest.raises(ValueError, match=r"got \(2, 5, 3\)\. For vmap over batches use jax\.vmap"):
        maybe_jit(net.forward)(params, jnp.ones((2, B, 3)))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_integer_x(entry, ce, maybe_jit):
    net, params, _, y = ce
    with pytest.raises(
        TypeError,
        match=r"x: expected floating inputs, got dtype int32; cast them first, e\.g\. "
        r"x\.astype\(jnp\.float32\)",
    ):
        _call(net, entry, maybe_jit)(params, jnp.ones((B, 3), jnp.int32), y)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("shape", [(B, 3), (B,), (B - 1, 2)])
def test_y_shape_squared_error(entry, shape, se, maybe_jit):
    net, params, x, _ = se
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"y: squared_error expects targets of shape (batch, n_L) = (5, 2), got shape {shape}."
        ),
    ):
        _call(net, entry, maybe_jit)(params, x, jnp.ones(shape))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_y_shape_cross_entropy(entry, ce, maybe_jit):
    net, params, x, _ = ce
    with pytest.raises(
        ValueError,
        match=re.escape(
            "y: cross_entropy expects integer labels of shape (batch,) = (5,) or probabilities "
            "of shape (batch, n_L) = (5, 2), got shape (5, 3)."
        ),
    ):
        _call(net, entry, maybe_jit)(params, x, jnp.ones((B, 3)))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_float_labels_for_cross_entropy(entry, ce, maybe_jit):
    net, params, x, y = ce
    with pytest.raises(
        TypeError,
        match=r"y: cross_entropy takes integer class labels of shape \(batch,\) = \(5,\) .*"
        r"got shape \(5,\) with dtype float32\. Cast labels with y\.astype\(jnp\.int32\)",
    ):
        _call(net, entry, maybe_jit)(params, x, y.astype(jnp.float32))


def test_integer_probabilities_for_cross_entropy(ce, maybe_jit):
    net, params, x, _ = ce
    with pytest.raises(
        TypeError,
        match=r"y: cross_entropy probability targets of shape \(batch, n_L\) must be floating, "
        r"got dtype int32",
    ):
        maybe_jit(net.loss)(params, x, jnp.ones((B, 2), jnp.int32))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("labels,lo,hi", [([0, 1, 2, 0, 1], 0, 2), ([0, -1, 1, 0, 1], -1, 1)])
def test_label_out_of_range(entry, labels, lo, hi, ce):
    """Concrete labels only: under jit they are traced and their values unknown."""
    net, params, x, _ = ce
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"y: cross_entropy labels must lie in [0, n_L) = [0, 2), got labels from {lo} to {hi}."
        ),
    ):
        _call(net, entry, lambda f: f)(params, x, jnp.asarray(labels))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_L\)"):
        _call(net, entry, lambda f: f)(params, x, np.asarray(labels, np.int32))


# -- params -----------------------------------------------------------------------------------

# the message names the spec by its repr: sizes, activations and loss
PARAMS_HEAD = (
    r"params: do not match "
    r"MLP\(sizes=\(3, 4, 2\), activations=\('tanh', 'softmax'.*\), loss='cross_entropy'\):"
)


def _bad_params(params, kind):
    w0, b0, w1, b1 = params[0]["W"], params[0]["b"], params[1]["W"], params[1]["b"]
    return {
        "layers": ([params[0]], r"expected 2 layers \(one per activation\), got 1\."),
        "not a list": ({"W": w0}, r"expected a list of 2 layer dicts, got dict\."),
        "keys": (
            [{"W": w0}, params[1]],
            r"params\[0\]: expected a dict with keys 'W' and 'b', got \['W'\]\.",
        ),
        "shapes": (
            [{"W": w0.T, "b": b0}, {"W": w1, "b": b1[:1]}],
            # every mismatch, not just the first
            r"params\[0\]\['W'\]: expected shape \(4, 3\), got \(3, 4\)\.\n"
            r"  params\[1\]\['b'\]: expected shape \(2,\), got \(1,\)\.",
        ),
        "dtype": (
            [params[0], {"W": w1.astype(jnp.int32), "b": b1}],
            r"params\[1\]\['W'\]: expected a floating dtype, got int32\.",
        ),
    }[kind]


@pytest.mark.parametrize("kind", ["layers", "not a list", "keys", "shapes", "dtype"])
@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "forward"])
def test_params_do_not_match_the_spec(kind, entry, ce, maybe_jit):
    net, params, x, y = ce
    bad, detail = _bad_params(params, kind)
    if entry == "forward":
        fn = maybe_jit(lambda p, x, y: net.forward(p, x))
    else:
        fn = _call(net, entry, maybe_jit)
    with pytest.raises(ValueError, match=PARAMS_HEAD + r"\n  " + detail) as info:
        fn(bad, x, y)
    assert str(info.value).endswith("Build them with net.init(key) or match its shapes.")


def test_backward_checks_params_against_the_cache(ce, maybe_jit):
    net, params, x, y = ce
    _, cache = net.forward(params, x)
    with pytest.raises(ValueError, match=PARAMS_HEAD + r"\n  expected 2 layers"):
        maybe_jit(net.backward)(params[:1], cache, y)


def test_mixed_param_dtypes(ce):
    net, params, x, y = ce
    mixed = [params[0], {"W": params[1]["W"].astype(jnp.bfloat16), "b": params[1]["b"]}]
    with pytest.raises(
        ValueError, match=r"all leaves must share one dtype, got \['bfloat16', 'float32'\]"
    ):
        net.loss(mixed, x, y)


# -- errors come at trace time ----------------------------------------------------------------


def test_errors_are_raised_while_tracing(ce):
    """No compilation or execution happens: jax.eval_shape sees the same error."""
    net, params, _, y = ce
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, n_0\)"):
        jax.eval_shape(net.value_and_grad, params, jnp.ones((B, 4)), y)
    with pytest.raises(TypeError, match=r"y: cross_entropy takes integer class labels"):
        jax.make_jaxpr(net.value_and_grad)(params, jnp.ones((B, 3)), y.astype(jnp.float32))


# -- arguments of the other entry points: named, with what was expected and what came ----------


@pytest.mark.parametrize("sizes", [np.array([3, 4, 2]), (np.int64(3), np.int32(4), 2)])
def test_mlp_takes_numpy_integer_sizes(sizes):
    net = bp.MLP(sizes, ("tanh", "softmax"), "cross_entropy")
    assert net.sizes == (3, 4, 2) and all(type(n) is int for n in net.sizes)
    assert net == bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")


@pytest.mark.parametrize("activations", [None, 3])
def test_activations_that_are_not_a_sequence(activations):
    with pytest.raises(TypeError, match=r"activations: expected a sequence of 2 activations"):
        bp.MLP((3, 4, 2), activations, "cross_entropy")


def _quadratic(p):
    return jnp.sum(p**2)


def _quadratic_manual(p):
    return _quadratic(p), 2 * p


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"params": None}, ValueError, "params: expected a pytree of floating arrays.*no leaves"),
        ({"params": "abc"}, TypeError, "params: leaf .* is a str; expected floating arrays"),
        ({"rtol": -1.0}, ValueError, r"rtol: expected a finite number >= 0, got -1\.0"),
        ({"atol": "a"}, ValueError, "atol: expected a finite number >= 0, got 'a'"),
        ({"seed": "a"}, TypeError, "seed: expected an integer, got str"),
        (
            {"reference": lambda p: p**2},
            TypeError,
            r"reference: expected .* the scalar loss, got "
            r"an output of shape \(3,\)",
        ),
        ({"manual": 3}, TypeError, "manual: expected a function, got int"),
    ],
    ids=["params-None", "params-str", "rtol", "atol", "seed", "reference-vector", "manual"],
)
def test_check_grads_names_a_bad_argument(kwargs, error, match):
    args = {"manual": _quadratic_manual, "reference": _quadratic, "params": jnp.ones(3)} | kwargs
    manual, reference, params = args.pop("manual"), args.pop("reference"), args.pop("params")
    with pytest.raises(error, match=match):
        bp.check_grads(manual, reference, params, **args)


@pytest.mark.parametrize("name", ["manual", "reference"])
def test_check_network_explains_it_builds_manual_and_reference(name, ce):
    net, params, x, y = ce
    with pytest.raises(TypeError, match=f"{name}: check_network builds the manual and reference"):
        bp.check_network(net, params, x, y, **{name: _quadratic})


@pytest.mark.parametrize("batch", [0, -5, 2.0])
def test_communication_volume_needs_a_positive_batch(batch, ce):
    with pytest.raises(ValueError, match=f"batch: expected the global batch, .*got {batch!r}"):
        bp.parallel.communication_volume(ce[0], {"data": 2}, batch)


def test_communication_volume_names_bad_mesh_sizes(ce):
    with pytest.raises(ValueError, match=r"mesh_shape: expected positive integer axis sizes"):
        bp.parallel.communication_volume(ce[0], {"data": 0}, 4)
    vol = bp.parallel.communication_volume(ce[0], {"data": np.int64(2)}, np.int64(4))
    assert vol == bp.parallel.communication_volume(ce[0], {"data": 2}, 4)


def test_data_parallel_names_the_users_batch_not_a_shards(ce):
    net, params, x, y = ce
    step = bp.parallel.data_parallel(net, bp.parallel.device_mesh())
    with pytest.raises(TypeError, match=rf"y: cross_entropy takes .* \(batch,\) = \({B},\)"):
        step(params, x, y.astype(jnp.float32))


def test_diag_ggn_mc_names_a_missing_key(ce):
    net, params, x, y = ce
    with pytest.raises(TypeError, match=r"key: expected a PRNG key from jax\.random\.key"):
        bp.extend.diag_ggn_mc(net, params, x, y, None)


@pytest.mark.parametrize(
    "grad_fn, optimizer, match",
    [
        (3, None, "grad_fn: expected a function"),
        (_quadratic, "adam", "optimizer: expected an optax gradient transformation.*got str"),
    ],
)
def test_make_train_step_names_a_bad_argument(grad_fn, optimizer, match):
    with pytest.raises(TypeError, match=match):
        bp.make_train_step(grad_fn, optimizer)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": None}, ValueError, "epochs: expected a positive integer, got None"),
        ({"batch_size": 1.5}, ValueError, r"batch_size: expected a positive integer, got 1\.5"),
        ({"seed": "0"}, TypeError, "seed: expected an integer, got str"),
        ({"optimizer": "adam"}, TypeError, "optimizer: expected an optax gradient"),
        ({"train": None}, TypeError, r"train: expected a bpjax\.Dataset"),
        ({"net": 3}, TypeError, "net: expected a bpjax network"),
    ],
    ids=["epochs", "batch_size", "seed", "optimizer", "train", "net"],
)
def test_fit_names_a_bad_argument(kwargs, error, match):
    net = bp.MLP((2, 3, 2), ("tanh", "softmax"), "cross_entropy")
    args = {
        "net": net,
        "params": net.init(jax.random.key(0)),
        "train": bp.datasets.xor_dataset(),
        "optimizer": bp.get_optimizer("sgd", 0.1),
        "epochs": 1,
        "batch_size": 4,
    } | kwargs
    with pytest.raises(error, match=match):
        bp.fit(args.pop("net"), args.pop("params"), args.pop("train"), **args)


def test_learning_rate_that_is_not_a_number():
    with pytest.raises(TypeError, match="learning_rate: expected a positive number, got str"):
        bp.get_optimizer("sgd", "0.1")


def test_an_activation_of_your_own_is_told_to_declare_its_range():
    mine = bp.Activation(
        "mysoftmax",
        lambda z: jax.nn.softmax(z, axis=-1),
        lambda z, a, g: a * (g - jnp.sum(g * a, -1, keepdims=True)),
    )
    with pytest.raises(ValueError, match=re.escape("Activation(..., output='simplex')")):
        bp.MLP((3, 3), (mine,), "cross_entropy")
    declared = bp.Activation("mysoftmax", mine.forward, mine.backward, output="simplex")
    assert bp.MLP((3, 3), (declared,), "cross_entropy").objective.name == "cross_entropy"
