"""One process of the 2-process loopback test of bpjax.parallel (launched by test_parallel.py).

Not collected by pytest (no ``test_`` prefix). Usage::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
        python tests/_multihost_worker.py

Each process exposes 2 CPU devices; the 4-device data-parallel step must agree with the
single-process ``net.value_and_grad``. Prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys

import jax

from bpjax import parallel

parallel.initialize(cpu_devices=2, initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bpjax as bp  # noqa: E402

jax.config.update("jax_enable_x64", True)


def _rel(got, want) -> float:
    errs = [
        float(
            np.linalg.norm(np.asarray(g) - np.asarray(w))
            / max(np.linalg.norm(np.asarray(w)), 1e-300)
        )
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    return max(errs)


def _local(tree):
    """A replicated global array's value on this process."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def main() -> int:
    pid, nproc = jax.process_index(), jax.process_count()
    net = bp.MLP((5, 8, 3), ("tanh", "softmax"), "cross_entropy")
    params = jax.tree.map(np.asarray, net.init(jax.random.key(0), jnp.float64))
    mesh = parallel.device_mesh()
    step = parallel.data_parallel(net, mesh)
    result = {
        "process": pid,
        "processes": nproc,
        "global_devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
    }
    for name, batch in (("even", 8), ("uneven", 7)):
        x = np.asarray(jax.random.normal(jax.random.key(1), (batch, 5), jnp.float64))
        y = np.asarray(jax.random.randint(jax.random.key(2), (batch,), 0, 3))
        want_loss, want_grads = net.value_and_grad(params, x, y)  # one process, one device
        if batch % len(jax.devices()) == 0:
            # each host holds its own rows: the usual multi-host input pipeline
            rows = slice(pid * batch // nproc, (pid + 1) * batch // nproc)
            sharding = NamedSharding(mesh, P("data"))
            gx = jax.make_array_from_process_local_data(sharding, x[rows], x.shape)
            gy = jax.make_array_from_process_local_data(sharding, y[rows], y.shape)
        else:
            gx, gy = x, y  # the same host arrays everywhere: replicated, padded inside
        loss, grads = _local(step(params, gx, gy))
        result[name] = {
            "loss_err": abs(float(loss) - float(want_loss)) / abs(float(want_loss)),
            "grad_rel_err": _rel(grads, want_grads),
        }
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
