"""bpjax.parallel: data, tensor and 2-D parallel gradients equal the single-device ones.

The sharded checks need several devices, and this process keeps one: they run in subprocesses,
started together when the module's first test asks for them — ``tests/_parallel_worker.py`` on
8 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), which prints every case
as JSON, and two processes of ``tests/_multihost_worker.py`` joined over loopback with
``jax.distributed`` (2 CPU devices each). The tests below assert on their reports; the argument
checks run here, on one device.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import bpjax as bp
from bpjax import parallel
from bpjax.layers import Dense, Flatten
from tests._subprocess_env import subprocess_env

# under pytest-xdist, `--dist loadgroup` keeps these on one worker: the subprocesses start once
pytestmark = pytest.mark.xdist_group("parallel")

TESTS = Path(__file__).resolve().parent
TIMEOUT = 600  # seconds; the checks take ~20 s of CPU, a loaded machine stretches that

# float64: a sharded sum reorders additions, nothing more; float32: the per-dtype default
RTOL = {"float64": 1e-12, "float32": 1e-5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def launched() -> Any:
    """The 8-device worker and the two multi-host processes, started at once."""
    worker = subprocess.Popen(
        [sys.executable, str(TESTS / "_parallel_worker.py")],
        env=subprocess_env(8, isolate=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = _free_port()
    hosts = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "_multihost_worker.py")],
            env=subprocess_env(
                isolate=True,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    procs = {"worker": worker, "hosts": hosts}
    yield procs
    for proc in [worker, *hosts]:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipes, unread if `-k` skipped its report


def _report(proc: subprocess.Popen[str], what: str) -> Any:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {TIMEOUT} s:\n{err[-4000:]}")
    lines = out.strip().splitlines()  # the last line is the JSON (gloo logs before it)
    assert proc.returncode == 0 and lines, f"{what} failed ({proc.returncode}):\n{err[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cases(launched: Any) -> list[dict[str, Any]]:
    return _report(launched["worker"], "tests/_parallel_worker.py")["cases"]


@pytest.fixture(scope="module")
def hosts(launched: Any) -> list[dict[str, Any]]:
    return [_report(p, f"multi-host process {i}") for i, p in enumerate(launched["hosts"])]


def _group(cases: list[dict[str, Any]], group: str, minimum: int) -> list[dict[str, Any]]:
    chosen = [c for c in cases if c["group"] == group]
    assert len(chosen) >= minimum, f"expected ≥ {minimum} {group} cases, got {len(chosen)}"
    return chosen


def _assert_close(chosen: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    bad = [
        f"{c['case']}: {k} = {c[k]:.2e} > {RTOL[c['dtype']]:.0e}"
        for c in chosen
        for k in keys
        if not c[k] <= RTOL[c["dtype"]]
    ]
    assert not bad, "\n".join(bad)


GRAD_KEYS = ("loss_err", "vs_manual", "vs_jax_grad")


@pytest.mark.slow
def test_data_parallel_equals_single_device_and_jax_grad(cases):
    """1-D meshes of 4 and 8, a 2-D mesh's data axis, canonical and generic output errors."""
    _assert_close(_group(cases, "data_parallel", 4), GRAD_KEYS)


@pytest.mark.slow
def test_uneven_batch_is_padded_and_masked(cases):
    """B = 13 and B = 5 over 8 shards (some all padding), and per-position losses."""
    _assert_close(_group(cases, "uneven", 3), GRAD_KEYS)


@pytest.mark.slow
def test_tensor_parallel_equals_single_device_and_jax_grad(cases):
    """Rows of W^l over 4 and 8 devices: split and whole layers mixed, MLP and serial."""
    _assert_close(_group(cases, "tensor_parallel", 3), GRAD_KEYS)


@pytest.mark.slow
def test_split_grads_come_back_sharded_as_the_specs_say(cases):
    chosen = [c for c in cases if "specs_match" in c]
    assert len(chosen) >= 5
    assert all(c["specs_match"] for c in chosen), [
        c["case"] for c in chosen if not c["specs_match"]
    ]


@pytest.mark.slow
def test_2d_mesh_equals_single_device_and_jax_grad(cases):
    """data × model meshes 2×4, 4×2, 2×2, with an uneven batch and Explicit mesh axes."""
    _assert_close(_group(cases, "mesh2d", 4), GRAD_KEYS)


@pytest.mark.slow
def test_float32_within_its_tolerance(cases):
    _assert_close(_group(cases, "float32", 2), GRAD_KEYS)


@pytest.mark.slow
def test_recurrent_nets_equal_single_device_and_jax_grad(cases):
    """Embedding + LSTM (many-to-one) and Embedding + Elman (many-to-many), B = 13 on 4."""
    chosen = _group(cases, "recurrent", 2)
    assert {c["case"].split()[1] for c in chosen} == {"lstm", "elman"}
    _assert_close(chosen, GRAD_KEYS)


@pytest.mark.slow
def test_extend_quantities_reduce_like_the_gradient(cases):
    """sum_grad_squared, variance, diag_ggn, KFAC and the per-example ones, B = 13 on 4."""
    chosen = _group(cases, "extend", len(parallel.DATA_PARALLEL_QUANTITIES))
    assert {c["case"].split()[0] for c in chosen} == set(parallel.DATA_PARALLEL_QUANTITIES)
    _assert_close(chosen, ("vs_single_device",))


@pytest.mark.slow
def test_extend_quantities_cover_recurrent_and_conv_nets(cases):
    """Every quantity on the LSTM, Elman and CNN nets (KFAC: their layers' GGN diagonals where
    they have no Kronecker factors), and KFC on a conv net."""
    by_net: dict[str, set[str]] = {}
    for c in _group(cases, "extend", 1):
        quantity, name = c["case"].split()[:2]
        by_net.setdefault(name, set()).add(quantity)
    for name in ("lstm", "elman", "cnn"):
        assert by_net.get(name) == set(parallel.DATA_PARALLEL_QUANTITIES), (name, by_net.get(name))
    assert "kfac_factors" in by_net.get("cnn_kfac", set())


@pytest.mark.slow
def test_communication_volume_equals_the_compiled_collectives(cases):
    """The bytes the sharding implies are the bytes in the collectives XLA compiled."""
    chosen = [c for c in cases if c.get("comm_exact_check")]
    assert len(chosen) >= 5
    bad = [
        f"{c['case']}: predicted {c['comm_predicted']} B, compiled {c['comm_compiled']} B"
        for c in chosen
        if c["comm_predicted"] != c["comm_compiled"]
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_two_processes_on_loopback_agree_with_one(hosts):
    """jax.distributed over 2 processes × 2 CPU devices: one data-parallel step each."""
    assert [h["process"] for h in hosts] == [0, 1]
    for h in hosts:
        assert (h["processes"], h["global_devices"], h["local_devices"]) == (2, 4, 2)
        for batch in ("even", "uneven"):  # host-local rows; replicated arrays, padded
            assert h[batch]["loss_err"] <= RTOL["float64"], (h["process"], batch, h[batch])
            assert h[batch]["grad_rel_err"] <= RTOL["float64"], (h["process"], batch, h[batch])


# -- on this process's one device: meshes, argument checks, the volume formula -------------------


NET = bp.MLP((3, 4, 2), ("tanh", "softmax"), "cross_entropy")


def test_device_mesh_shapes_and_too_many_devices():
    assert parallel.device_mesh().axis_names == ("data",)
    assert dict(parallel.device_mesh(1, 1).shape) == {"data": 1, "model": 1}
    count = jax.device_count()
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        parallel.device_mesh(count + 1)
    with pytest.raises(ValueError, match="model: expected a positive integer"):
        parallel.device_mesh(1, 0)


def test_bad_arguments_name_themselves():
    mesh = parallel.device_mesh(1)
    with pytest.raises(ValueError, match="axis: the mesh has no axis 'batch'"):
        parallel.data_parallel(NET, mesh, axis="batch")
    with pytest.raises(TypeError, match=r"mesh: expected a jax\.sharding\.Mesh"):
        parallel.data_parallel(NET, "data")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"net: expected a bpjax\.MLP"):
        parallel.data_parallel(object(), mesh)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_axis: the mesh has no axis 'model'"):
        parallel.tensor_parallel(NET, mesh)
    with pytest.raises(ValueError, match="quantity: expected one of"):
        parallel.data_parallel_extend(NET, mesh, "hessian")
    conv = bp.serial(Flatten(), Dense(2, "softmax"), loss="cross_entropy", input_shape=(2, 2))
    with pytest.raises(TypeError, match="layers\\[0\\] is Flatten"):
        parallel.tensor_parallel(conv, parallel.device_mesh(1, 1))
    step = parallel.data_parallel(NET, mesh)
    params = NET.init(jax.random.key(0))
    with pytest.raises(ValueError, match="y: expected 5 targets"):
        step(params, jnp.ones((5, 3)), jnp.zeros(4, jnp.int32))


def _sequence_net(cell: Any) -> bp.Serial:
    """Embedding + a recurrent layer + a per-step identity output: squared error per step."""
    layers = [bp.layers.Embedding(5, 3), cell, Dense(2, "identity")]
    return bp.serial(*layers, loss="squared_error", input_shape=(4,))


@pytest.mark.parametrize("cell", [bp.layers.LSTM(3), bp.layers.Elman(3)], ids=["lstm", "elman"])
def test_recurrent_layers_run_inside_shard_map(cell, x64):
    """A scan's zero carry must vary over the data axis as its body's output does; one device
    suffices to type-check it (the 8-device worker compares the numbers)."""
    net = _sequence_net(cell)
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.randint(jax.random.key(1), (3, 4), 0, 5)
    y = jax.random.normal(jax.random.key(2), (3, 4, 2), jnp.float64)
    mesh = parallel.device_mesh(1)
    loss, grads = parallel.data_parallel(net, mesh)(params, x, y)
    want_loss, want_grads = net.value_and_grad(params, x, y)
    assert jnp.allclose(loss, want_loss, rtol=1e-12)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert jnp.allclose(g, w, rtol=1e-12, atol=1e-15)
    # identity + squared error: the loss-Hessian columns do not vary, the cached states do
    diag = parallel.data_parallel_extend(net, mesh, "diag_ggn")(params, x, y)
    want = bp.extend.diag_ggn(net, params, x, y)
    for g, w in zip(jax.tree.leaves(diag), jax.tree.leaves(want), strict=True):
        assert jnp.allclose(g, w, rtol=1e-12, atol=1e-15)


def test_kfac_factors_give_a_diagonal_for_a_layer_without_kronecker_factors(x64):
    net = _sequence_net(bp.layers.LSTM(3))
    f = parallel.data_parallel_extend(net, parallel.device_mesh(1), "kfac_factors")
    params = net.init(jax.random.key(0), jnp.float64)
    x = jnp.array([[0, 1, 2, 3], [4, 4, 1, 0]])
    y = jax.random.normal(jax.random.key(1), (2, 4, 2), jnp.float64)
    got, want = f(params, x, y), bp.extend.kfac_factors(net, params, x, y)
    assert isinstance(got[0], bp.extend.KFACDiagonal)  # Embedding, and LSTM: their GGN diagonal
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.allclose(g, w, rtol=1e-12, atol=1e-15)  # float64 sums of a few products


def test_split_hidden_softmax_is_refused():
    net = bp.MLP((3, 4, 2), ("softmax", "softmax"), "cross_entropy")
    with pytest.raises(ValueError, match="elementwise built-in activation"):
        parallel.communication_volume(net, {"data": 1, "model": 2}, 8, model_axis="model")


def test_initialize_reads_and_checks_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES: expected an integer"):
        parallel.initialize("127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="process_id: expected 0 ≤ process_id < num_processes"):
        parallel.initialize("127.0.0.1:1")


def test_communication_volume_follows_the_ring_formulas():
    """Each collective's bytes from its size, group and dtype; the totals add them up."""
    net = bp.MLP((6, 8, 8, 4), ("relu", "relu", "softmax"), "cross_entropy")
    vol = parallel.communication_volume(
        net, {"data": 2, "model": 4}, 10, model_axis="model", dtype=jnp.float64
    )
    rows = 5  # ⌈10 / 2⌉ per data shard
    expected = [
        ("all-gather", "model", rows * 8, 4),  # a^1
        ("all-gather", "model", rows * 8, 4),  # a^2
        ("all-gather", "model", rows * 4, 4),  # z^3
        ("reduce-scatter", "model", rows * 8, 4),  # δ^3 W^3
        ("reduce-scatter", "model", rows * 8, 4),  # δ^2 W^2
        ("all-reduce", "data", (8 * 6 + 8) // 4, 2),
        ("all-reduce", "data", (8 * 8 + 8) // 4, 2),
        ("all-reduce", "data", (4 * 8 + 4) // 4, 2),
        ("all-reduce", "data", 1, 2),  # the loss
    ]
    assert [(c.op, c.axis, c.elements, c.group) for c in vol.collectives] == expected
    for c in vol.collectives:
        factor = 2 if c.op == "all-reduce" else 1
        assert c.bytes_per_device == factor * (c.group - 1) / c.group * c.elements * 8
    assert vol.bytes_per_device == sum(c.bytes_per_device for c in vol.collectives)
    assert vol.total_bytes == vol.bytes_per_device * 8
    single = parallel.communication_volume(net, {"data": 1}, 10)
    assert single.collectives == () and single.total_bytes == 0
