"""Scaling of the data-parallel hand-written backward, and the communication each mesh shape needs.

Runs on ``--devices`` host devices (8 by default: the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, unless the flag is
already there). One float32 MLP (tanh hidden layers, softmax + cross-entropy) and three tables:

* weak scaling: ``bpjax.parallel.data_parallel`` on ``D = 1, 2, 4, 8`` devices with a fixed batch
  per device ``b`` (global batch ``b·D``), against jitted ``net.value_and_grad`` on one device at
  batch ``b``; efficiency ``t_1 / t_D`` (1 is perfect);
* strong scaling: a fixed global batch ``B`` over ``D`` devices, against ``net.value_and_grad`` on
  one device at ``B``; speedup ``t_1 / t_D`` (``D`` is perfect);
* communication per step by mesh shape (data × model) at batch ``B``, from the sharding
  (:func:`bpjax.parallel.communication_volume`, ring all-reduce / all-gather / reduce-scatter),
  next to the bytes of the collectives in the compiled program
  (:func:`bpjax.parallel.compiled_collectives`), and the time of one
  :func:`bpjax.parallel.data_tensor_parallel` step on that mesh.

All timings are interleaved rounds (``bench_mlp.time_interleaved``), medians with the
interquartile range. Every sharded gradient is checked against the one-device gradient
(``max |Δ∇| / max |∇|``).

Host devices share the machine's cores: on a 2-core CPU, 8 devices do not compute 8 times as
fast, so these tables measure what sharding costs (the collectives, the per-device dispatch,
the padding), not the speedup of real accelerators.

Usage::

    python benchmarks/bench_parallel.py --json benchmarks/results/bench_parallel_cpu.json
    python benchmarks/bench_parallel.py --quick --json /tmp/parallel.json   # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys

_FLAG = "--xla_force_host_platform_device_count"


def _set_device_count(argv: list[str]) -> None:
    """Asks XLA for ``--devices`` host devices, before JAX is imported (unless already asked)."""
    count = "8"
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            count = argv[i + 1]
        elif arg.startswith("--devices="):
            count = arg.split("=", 1)[1]
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={count}".strip()


if __name__ == "__main__":
    _set_device_count(sys.argv[1:])

import json  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from rich.console import Console  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpjax as bp  # noqa: E402
from benchmarks.bench_mlp import (  # noqa: E402
    Stats,
    auto_repeats,
    grad_mismatch,
    machine_info,
    time_interleaved,
    warm_up,
)
from bpjax import parallel  # noqa: E402

FULL = {"sizes": (784, 512, 512, 10), "per_device": 64, "batch": 512, "budget": 6.0}
QUICK = {"sizes": (64, 128, 128, 10), "per_device": 8, "batch": 64, "budget": 0.3}
QUICK_COUNTS = (1, 2, 8)  # --quick: fewer meshes, fewer compiles

_STEPS: dict[tuple[bp.MLP, int], Callable[..., Any]] = {}


def _data_parallel_step(net: bp.MLP, devices: int) -> Callable[..., Any]:
    """One jitted step per (net, D), shared by the tables (its compiles are cached)."""
    if (net, devices) not in _STEPS:
        _STEPS[net, devices] = parallel.data_parallel(net, parallel.device_mesh(devices))
    return _STEPS[net, devices]


def _problem(net: bp.MLP, batch: int, seed: int) -> tuple[Any, jax.Array, jax.Array]:
    params = net.init(jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (batch, net.sizes[0]), jnp.float32)
    y = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, net.sizes[-1])
    return params, x, y


def _timed(
    fns: dict[str, Callable[..., Any]], args: dict[str, tuple[Any, ...]], budget: float
) -> dict[str, Stats]:
    """Interleaved rounds over functions that each take their own arguments."""
    bound = {name: (lambda f=f, a=args[name]: f(*a)) for name, f in fns.items()}
    round_seconds = sum(warm_up(bound, ()).values())
    samples = time_interleaved(bound, (), repeats=auto_repeats(round_seconds, budget, lo=7))
    return {name: Stats.of(s) for name, s in samples.items()}


def scaling(
    net: bp.MLP, counts: Sequence[int], *, per_device: int | None, batch: int | None, budget: float
) -> list[dict[str, Any]]:
    """Weak (``per_device`` rows each) or strong (``batch`` rows in all) scaling rows."""
    one_batch = per_device if per_device is not None else batch
    assert one_batch is not None
    single = jax.jit(net.value_and_grad)
    fns: dict[str, Callable[..., Any]] = {"one device": single}
    args: dict[str, tuple[Any, ...]] = {"one device": _problem(net, one_batch, 0)}
    for d in counts:
        rows = per_device * d if per_device is not None else batch
        assert rows is not None
        fns[f"D={d}"] = _data_parallel_step(net, d)
        args[f"D={d}"] = _problem(net, rows, 0)
    stats = _timed(fns, args, budget)
    base = stats["one device"].median
    out = [
        {
            "devices": 1,
            "what": "net.value_and_grad",
            "batch": one_batch,
            "ms": _ms_dict(stats["one device"]),
            "ratio": 1.0,
            "grad_mismatch": 0.0,
        }
    ]
    for d in counts:
        name = f"D={d}"
        params, x, y = args[name]
        _, want = single(params, x, y)
        _, got = fns[name](params, x, y)
        t = stats[name].median
        out.append(
            {
                "devices": d,
                "what": "data_parallel",
                "batch": int(x.shape[0]),
                "ms": _ms_dict(stats[name]),
                # weak: efficiency t_1/t_D (ideal 1); strong: speedup t_1/t_D (ideal D)
                "ratio": base / t,
                "grad_mismatch": grad_mismatch(got, want),
            }
        )
    return out


def comm_table(
    net: bp.MLP, shapes: Sequence[tuple[int, int]], batch: int, budget: float
) -> list[dict[str, Any]]:
    """Predicted and compiled communication per step, and the step time, per mesh shape."""
    params, x, y = _problem(net, batch, 0)
    _, want = jax.jit(net.value_and_grad)(params, x, y)
    rows, fns, args = [], {}, {}
    for d, m in shapes:
        mesh = parallel.device_mesh(d, m)
        step = parallel.data_tensor_parallel(net, mesh)
        compiled = step.lower(params, x, y).compile()
        vol = parallel.communication_volume(net, mesh, batch, model_axis="model")
        hlo = parallel.compiled_collectives(compiled.as_text())
        by_axis = {
            axis: sum(c.bytes_per_device for c in vol.collectives if c.axis == axis)
            for axis in ("data", "model")
        }
        _, got = compiled(params, x, y)
        name = f"{d}x{m}"
        fns[name], args[name] = compiled, (params, x, y)
        rows.append(
            {
                "mesh": {"data": d, "model": m},
                "data_axis_bytes_per_device": by_axis["data"],
                "model_axis_bytes_per_device": by_axis["model"],
                "bytes_per_device": vol.bytes_per_device,
                "total_bytes": vol.total_bytes,
                "compiled_bytes_per_device": float(sum(c.bytes_per_device for c in hlo)),
                "collectives": [c._asdict() for c in vol.collectives],
                "grad_mismatch": grad_mismatch(got, want),
            }
        )
    stats = _timed(fns, args, budget)
    for row, name in zip(rows, fns, strict=True):
        row["ms"] = _ms_dict(stats[name])
    return rows


def _ms_dict(stats: Stats) -> dict[str, float]:
    return {"median": stats.median * 1e3, "q1": stats.q1 * 1e3, "q3": stats.q3 * 1e3}


def _ms(ms: dict[str, float]) -> str:
    return f"{ms['median']:.3g} [{ms['q1']:.3g}–{ms['q3']:.3g}]"


def _bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def render_markdown(result: dict[str, Any]) -> str:
    """The three tables as Markdown."""
    s = result["settings"]
    sizes = ",".join(map(str, s["sizes"]))
    lines = [
        f"Weak scaling, `{sizes}`, {s['per_device']} examples per device (float32; ms per step, "
        "median [IQR]; efficiency `t_1 / t_D`, 1 is perfect):",
        "",
        "| devices | step | global batch | ms | efficiency | max rel diff |",
        "| ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for r in result["weak"]:
        lines.append(
            f"| {r['devices']} | {r['what']} | {r['batch']} | {_ms(r['ms'])} | "
            f"{r['ratio']:.2f} | {r['grad_mismatch']:.1e} |"
        )
    lines += [
        "",
        f"Strong scaling, `{sizes}`, global batch {s['batch']} (speedup `t_1 / t_D`, `D` is "
        "perfect):",
        "",
        "| devices | step | global batch | ms | speedup | max rel diff |",
        "| ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for r in result["strong"]:
        lines.append(
            f"| {r['devices']} | {r['what']} | {r['batch']} | {_ms(r['ms'])} | "
            f"{r['ratio']:.2f} | {r['grad_mismatch']:.1e} |"
        )
    lines += [
        "",
        f"Communication per step by mesh shape (`data_tensor_parallel`, batch {s['batch']}, "
        "bytes each device sends under ring collectives, from the sharding; the compiled "
        "program's collectives for comparison):",
        "",
        "| data × model | data axis / device | model axis / device | per device | all devices "
        "| compiled / device | ms | max rel diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in result["comm"]:
        mesh = r["mesh"]
        lines.append(
            f"| {mesh['data']} × {mesh['model']} | {_bytes(r['data_axis_bytes_per_device'])} | "
            f"{_bytes(r['model_axis_bytes_per_device'])} | {_bytes(r['bytes_per_device'])} | "
            f"{_bytes(r['total_bytes'])} | {_bytes(r['compiled_bytes_per_device'])} | "
            f"{_ms(r['ms'])} | {r['grad_mismatch']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results and markdown here")
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument(
        "--devices", type=int, default=8, help="host devices to use (a power of 2; default 8)"
    )
    parser.add_argument("--budget", type=float, help="seconds of timing per table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    settings = dict(QUICK if args.quick else FULL)
    if args.budget is not None:
        settings["budget"] = args.budget
    available = jax.device_count()
    if available < args.devices:
        console.print(
            f"bench_parallel: {args.devices} devices asked for, {available} exist; run it as a "
            f"script (it sets XLA_FLAGS={_FLAG}={args.devices}) or set that flag yourself."
        )
        return 2
    counts = [
        d for d in (QUICK_COUNTS if args.quick else (1, 2, 4, 8, 16, 32)) if d <= args.devices
    ]
    net = bp.MLP(
        settings["sizes"], ("tanh",) * (len(settings["sizes"]) - 2) + ("softmax",), "cross_entropy"
    )
    budget = settings["budget"]
    console.log(f"weak scaling: {settings['per_device']} per device on {counts} devices")
    weak = scaling(net, counts, per_device=settings["per_device"], batch=None, budget=budget)
    console.log(f"strong scaling: batch {settings['batch']} on {counts} devices")
    strong = scaling(net, counts, per_device=None, batch=settings["batch"], budget=budget)
    top = counts[-1]
    shapes = [(top // m, m) for m in counts]
    console.log(f"communication by mesh shape: {shapes}")
    comm = comm_table(net, shapes, settings["batch"], budget)
    result: dict[str, Any] = {
        "settings": {**settings, "sizes": list(settings["sizes"]), "devices": top},
        "machine": machine_info(),
        "weak": weak,
        "strong": strong,
        "comm": comm,
    }
    result["markdown"] = render_markdown(result)
    print(result["markdown"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        console.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
