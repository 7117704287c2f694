"""The sharded checks of test_parallel.py, run in one subprocess on 8 host devices.

Not collected by pytest (no ``test_`` prefix): ``tests/test_parallel.py`` runs it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so the main test process keeps one device,
and asserts on the JSON it prints (one object, the last line of stdout). Every case compares a
sharded step with the single-device manual ``value_and_grad`` and with ``jax.grad`` of the plain
forward, or a sharded :mod:`bpjax.extend` quantity with the single-device one.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bpjax as bp
from bpjax import extend as bx
from bpjax import parallel
from bpjax.layers import Dense

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

NETS = {
    # widths 8, 6, 8, 4: over M = 4 layers 1, 3, 4 are split and layer 2 is whole, so every
    # backward collective appears (reduce-scatter, psum into a whole layer, slice out of one)
    "mlp": bp.MLP((5, 8, 6, 8, 4), ("tanh", "relu", "sigmoid", "softmax"), "cross_entropy"),
    # a non-canonical output pair: the generic δ^L = J_fᵀ ∇_a C_n (and signed GGN factors)
    "mlp_generic": bp.MLP((5, 8, 4), ("tanh", "tanh"), "squared_error"),
    # output positions (batch, 4, 3): C_n is the mean over an example's positions
    "serial_seq": bp.serial(
        Dense(8, "tanh"), Dense(3, "identity"), loss="squared_error", input_shape=(4, 5)
    ),
    "serial_bce": bp.serial(
        Dense(8, "relu"), Dense(4, "sigmoid"), loss="binary_cross_entropy", input_shape=(5,)
    ),
}


def _data(name: str, batch: int, dtype: str):
    """Seeded numpy data and params (no JAX compile), non-zero biases included."""
    net = NETS[name]
    rng = np.random.default_rng(batch)
    in_shape = net.input_shape if isinstance(net, bp.Serial) else (net.sizes[0],)
    widths = [in_shape[-1]] + [layer.n_out for layer in net.layers]
    params = [
        {
            "W": (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(dtype),
            "b": (0.1 * rng.normal(size=n_out)).astype(dtype),
        }
        for n_in, n_out in itertools.pairwise(widths)
    ]
    x = rng.normal(size=(batch, *in_shape)).astype(dtype)
    if name == "mlp":
        y = rng.integers(0, widths[-1], size=batch).astype(np.int32)
    elif name == "serial_bce":
        y = rng.uniform(size=(batch, widths[-1])).astype(dtype)
    else:
        y = rng.normal(size=(batch, *in_shape[:-1], widths[-1])).astype(dtype)
    return net, params, x, y


SEEDED = {
    # every extend quantity but KFAC (LayerNorm has none) through the layers' rules
    "cnn": bp.serial(
        bp.layers.Conv2D(3, 3, padding="SAME", activation="tanh"),
        bp.layers.MaxPool2D(2),
        bp.layers.LayerNorm(),
        bp.layers.Flatten(),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(4, 4, 2),
    ),
    # KFC: A over each conv's patches (16 and 4 positions), through the layers' kfac_factors
    "cnn_kfac": bp.serial(
        bp.layers.Conv2D(3, 3, padding="SAME", activation="tanh"),
        bp.layers.Conv2D(4, 2, strides=2, padding="VALID", activation="relu"),
        bp.layers.Flatten(),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(4, 4, 2),
    ),
    # many-to-one: the scans' zero carries must vary over the data axis like h_t
    "lstm": bp.serial(
        bp.layers.Embedding(5, 3),
        bp.layers.LSTM(4),
        bp.layers.LastStep(),
        Dense(3, "softmax"),
        loss="cross_entropy",
        input_shape=(4,),
    ),
    # many-to-many, identity + squared error: the loss-Hessian columns are the same for every
    # example (replicated), so the backward scan's carry must take its type from the cache
    "elman": bp.serial(
        bp.layers.Embedding(5, 3),
        bp.layers.Elman(4),
        Dense(2, "identity"),
        loss="squared_error",
        input_shape=(4,),
    ),
}


def _seeded_data(name: str, batch: int):
    """A SEEDED net's float64 params (biases made non-zero) and seeded numpy data."""
    net = SEEDED[name]
    rng = np.random.default_rng(batch)
    params = net.init(jax.random.key(batch), jnp.float64)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    if name in ("lstm", "elman"):
        x = rng.integers(0, 5, size=(batch, 4)).astype(np.int32)  # token ids
    else:
        x = rng.normal(size=(batch, 4, 4, 2))
    if name == "elman":
        y = rng.normal(size=(batch, 4, 2))  # a target per step
    else:
        y = rng.integers(0, 3, size=batch).astype(np.int32)
    return net, params, x, y


def _any_data(name: str, batch: int, dtype: str):
    """NETS' data in ``dtype``, or SEEDED's (float64 only)."""
    if name in SEEDED:
        assert dtype == "float64", dtype
        return _seeded_data(name, batch)
    return _data(name, batch, dtype)


_REFS: dict = {}


def _references(name: str, batch: int, dtype: str):
    """The single-device manual value_and_grad and jax.value_and_grad, in one compile."""
    key = (name, batch, dtype)
    if key not in _REFS:
        net, params, x, y = _any_data(name, batch, dtype)

        def both(params, x, y):
            return net.value_and_grad(params, x, y), jax.value_and_grad(net.loss)(params, x, y)

        _REFS[key] = jax.jit(both)(params, x, y)
    return _REFS[key]


def _rel(got, want) -> float:
    """The largest norm-relative error over the leaves."""
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            return float("inf")
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-300)))
    return max(errs)


def _grad_case(group, label, name, batch, dtype, make_step, mesh):
    refs = _references(name, batch, dtype)
    net, params, x, y = _any_data(name, batch, dtype)
    step = make_step(net, mesh)
    compiled = step.lower(params, x, y).compile()
    loss, grads = compiled(params, x, y)
    (m_loss, m_grads), (a_loss, a_grads) = refs
    case = {
        "group": group,
        "case": f"{label} {name} B={batch} {dtype} mesh={dict(mesh.shape)}",
        "dtype": dtype,
        "loss_err": _rel(loss, m_loss),
        "vs_manual": _rel(grads, m_grads),
        "vs_jax_grad": max(_rel(grads, a_grads), _rel(loss, a_loss)),
    }
    if group in ("mesh2d", "tensor_parallel", "float32"):
        # the communication the sharding implies against the collectives XLA compiled
        model_axis = "model" if "model" in mesh.axis_names else None
        data_axis = "data" if "data" in mesh.axis_names else None
        want = parallel.communication_volume(
            net, mesh, batch, data_axis=data_axis, model_axis=model_axis, dtype=dtype
        )
        got = parallel.compiled_collectives(compiled.as_text())
        case["comm_predicted"] = want.bytes_per_device
        case["comm_compiled"] = float(sum(c.bytes_per_device for c in got))
        case["comm_exact_check"] = batch % mesh.shape.get("data", 1) == 0
        if model_axis is not None:
            specs = jax.tree.leaves(
                parallel.tensor_parallel_specs(net, mesh), is_leaf=lambda s: isinstance(s, P)
            )
            case["specs_match"] = all(
                NamedSharding(mesh, spec).is_equivalent_to(g.sharding, g.ndim)
                for spec, g in zip(specs, jax.tree.leaves(grads), strict=True)
            ) and any(spec != P() for spec in specs)
    return case


def _all_of(functions):
    return lambda p, x, y: {q: f(p, x, y) for q, f in functions.items()}


def _dp(net, mesh):
    return parallel.data_parallel(net, mesh)


def _2d(net, mesh):
    return parallel.data_tensor_parallel(net, mesh)


def _tp(net, mesh):
    return parallel.tensor_parallel(net, mesh)


def main() -> int:
    start = time.perf_counter()
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.device_mesh
    explicit_2x4 = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes, JAX's default
    model_4 = jax.make_mesh((4,), ("model",))
    cases = []
    for d in (4, 8):
        cases.append(_grad_case("data_parallel", "dp", "mlp", 16, "float64", _dp, mesh(d)))
    cases.append(_grad_case("data_parallel", "dp", "mlp_generic", 16, "float64", _dp, mesh(8)))
    cases.append(
        _grad_case("data_parallel", "dp explicit", "mlp", 16, "float64", _dp, explicit_2x4)
    )
    for d, batch in ((8, 13), (8, 5)):  # 5 < 8: three shards hold nothing but padding
        cases.append(_grad_case("uneven", "dp", "mlp", batch, "float64", _dp, mesh(d)))
    cases.append(_grad_case("uneven", "dp", "serial_seq", 13, "float64", _dp, mesh(4)))
    cases.append(_grad_case("tensor_parallel", "tp", "mlp", 16, "float64", _tp, mesh(1, 8)))
    cases.append(_grad_case("tensor_parallel", "tp explicit", "mlp", 16, "float64", _tp, model_4))
    cases.append(_grad_case("tensor_parallel", "tp", "serial_bce", 16, "float64", _tp, mesh(1, 4)))
    cases.append(_grad_case("mesh2d", "2d", "mlp", 13, "float64", _2d, mesh(2, 4)))
    cases.append(_grad_case("mesh2d", "2d", "mlp", 16, "float64", _2d, mesh(4, 2)))
    cases.append(_grad_case("mesh2d", "2d", "mlp_generic", 16, "float64", _2d, mesh(2, 2)))
    cases.append(_grad_case("mesh2d", "2d explicit", "mlp", 16, "float64", _2d, explicit_2x4))
    cases.append(_grad_case("float32", "2d", "mlp", 13, "float32", _2d, mesh(2, 4)))
    cases.append(_grad_case("float32", "dp", "mlp", 13, "float32", _dp, mesh(8)))
    for name in ("lstm", "elman"):  # B = 13 on 4 shards: padded, masked sequences
        cases.append(_grad_case("recurrent", "dp", name, 13, "float64", _dp, mesh(4)))
    every = parallel.DATA_PARALLEL_QUANTITIES
    for name, quantities in (
        ("mlp", every),
        ("mlp_generic", ("kfac_factors",)),  # signed factors of an indefinite H_n
        # the layers' rules, B = 13 on 4 shards; LayerNorm, Residual, Embedding, LSTM and Elman
        # have no Kronecker factors: kfac_factors gives them their GGN diagonal
        ("cnn", every),
        ("cnn_kfac", ("kfac_factors",)),
        ("lstm", every),
        ("elman", every),
    ):
        net, params, x, y = _any_data(name, 13, "float64")
        sharded = {q: parallel.data_parallel_extend(net, mesh(4), q) for q in quantities}
        # one compile for all quantities each way: the jitted functions inline
        got = jax.jit(_all_of(sharded))(params, x, y)
        want = jax.jit(_all_of({q: functools.partial(getattr(bx, q), net) for q in quantities}))(
            params, x, y
        )
        for q in quantities:
            cases.append(
                {
                    "group": "extend",
                    "case": f"{q} {name} B=13 float64 mesh={{'data': 4}}",
                    "dtype": "float64",
                    "vs_single_device": _rel(got[q], want[q]),
                }
            )
    print(
        json.dumps(
            {
                "cases": cases,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
