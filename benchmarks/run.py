"""The benchmark suite: every benchmark of bpjax in one run, its peers side by side.

``python -m benchmarks`` (or ``python benchmarks/run.py``) runs, in this order:

* ``mlp``: the MLP's batch-mean loss and gradient (tanh hidden layers, softmax + cross-entropy,
  float32) on the three sizes of ``bench_mlp.py``, by five implementations of four libraries:
  bpjax's manual δ-recursion, ``jax.grad`` and the forward alone (jitted JAX); PyTorch eager
  autograd (optional: ``pip install ".[bench]"``); and a plain NumPy δ-recursion
  (``benchmarks/peers.py``), all from the same params and data;
* ``layers``: the CNN and RNN cases of ``bench_layers.py`` (manual backward vs ``jax.grad``);
* ``extend``: per-example gradients and curvature (``bench_extend.py``): ``bpjax.extend`` vs
  ``vmap(grad)`` vs BackPACK;
* ``parallel``: ``benchmarks/bench_parallel.py --json PATH`` in a subprocess with 8 host devices,
  when that file exists; its ``"markdown"`` goes into the report.

Fair timing on a few CPU cores: XLA's, PyTorch's and OpenBLAS's thread pools each spin for a while
after their work and take cores from whichever library runs next, and this machine's speed drifts
(the same jitted program measured 160 ms in one run and 285 ms in the next). So jitted JAX's
manual, jax.grad and forward first run in interleaved rounds (``bench_mlp.time_interleaved``, the
order varied by round: bench_mlp.py's own protocol); then the four libraries take
turns in blocks (``bench_mlp.time_blocks``): each round gives every library, in turn, 50 ms of
untimed calls (the previous library's thread pools stop spinning, its own wake up) and then a
block of calls in a row, whose median is its time for the round. A slow spell then falls on
every library alike, and the MLP table's ratios (each library against jax.grad, and bpjax manual
against PyTorch) are medians of per-round paired ratios. Tables give medians with the
interquartile range. Every implementation's gradient is checked against ``jax.grad``'s
(``max |Δ∇| / max |∇|``).

JAX runs on its default device (a GPU when one is there); PyTorch on CUDA when JAX is on a GPU and
torch sees one, else on the CPU; NumPy on the CPU. The table says which. Outputs go to ``--out``
(default ``benchmarks/results/``): ``suite_<platform>.json``, ``suite_<platform>.md`` and PNG plots
``suite_<platform>_{mlp,layers,extend}.png``; ``--quick`` and ``--only`` runs add ``_quick`` or the
benchmark names to the file names, so they never overwrite the full run's.

Usage::

    python -m benchmarks                       # everything, under 10 minutes on 2 CPU cores
    python -m benchmarks --only mlp extend     # some of it
    python -m benchmarks --quick --out /tmp/b  # tiny sizes, a few seconds: a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpjax as bp
from benchmarks import bench_extend, bench_layers, bench_mlp, peers, plots
from benchmarks.bench_mlp import Case, Stats
from benchmarks.machine import describe
from bpjax import MLP

BENCHMARKS = ("mlp", "layers", "extend", "parallel")
"""The suite's benchmarks, in the order they run."""

RESULTS = Path(__file__).resolve().parent / "results"
PARALLEL_SCRIPT = Path(__file__).resolve().parent / "bench_parallel.py"
MLP_NET = {"activation": "tanh", "output": "softmax", "loss": "cross_entropy"}
"""The MLP benchmark's hidden activation, output activation and loss."""
TORCH, NUMPY = "PyTorch eager", "NumPy δ-recursion"
JAX_VARIANTS = ("bpjax manual", "jax.grad", "forward")
"""The suite's names for bench_mlp's ``manual``, ``jax.grad`` and ``forward``."""


class Config(NamedTuple):
    """What the suite runs and how long it times each piece."""

    mlp_cases: tuple[Case, ...]
    layer_cases: tuple[bench_layers.Case, ...]
    extend_cases: tuple[Case, ...]
    extend_quantities: tuple[str, ...]
    repeats: int | None  # rounds per library and case; None: as many as fit in budget_s
    budget_s: float  # seconds of timing per library and case (MLP, layers)
    extend_budget_s: float  # seconds of timing per extend quantity
    extend_min_repeats: int
    pause_s: float  # between libraries
    block_s: float  # MLP blocks: this many seconds of untimed calls, then as many timed (2-50)
    parallel_args: tuple[str, ...]  # extra arguments for bench_parallel.py
    parallel_timeout_s: float


FULL = Config(
    mlp_cases=tuple(bench_mlp.CASES.values()),
    layer_cases=tuple(bench_layers.CASES.values()),
    extend_cases=(bench_extend.CASES["medium"],),
    # bench_extend's quantities before batch_diag_ggn and the Hessian diagonals joined them: the
    # suite is sized to stay under 10 minutes on 2 cores, batch_diag_ggn's vmap(grad) version costs
    # as much as diag_ggn's, and on ReLU networks diag_hessian costs diag_ggn
    extend_quantities=tuple(
        q
        for q in bench_extend.QUANTITIES
        if q not in ("batch_diag_ggn", "diag_hessian", "batch_diag_hessian")
    ),
    repeats=None,
    budget_s=3.0,
    extend_budget_s=2.0,
    extend_min_repeats=3,  # the slowest vmap(grad) calls take seconds each
    pause_s=1.0,
    block_s=0.05,
    parallel_args=(),
    parallel_timeout_s=240.0,
)
"""The full suite: the issue's sizes."""

QUICK = Config(
    mlp_cases=(Case("tiny", (8, 16, 10), 8),),
    layer_cases=(
        bench_layers.Case(
            "dense-tiny",
            lambda: bp.serial(
                *MLP((8, 16, 10), ("tanh", "softmax"), "cross_entropy").layers,
                loss="cross_entropy",
                input_shape=(8,),
            ),
            (8,),
            8,
            "Dense16-Dense10, serial (the layers code path, cheap to compile)",
        ),
    ),
    extend_cases=(Case("tiny", (8, 16, 10), 8),),  # the same init as mlp's and layers'
    extend_quantities=("batch_l2_grad", "sum_grad_squared"),
    repeats=3,
    budget_s=0.05,
    extend_budget_s=0.05,
    extend_min_repeats=3,
    pause_s=0.01,
    block_s=0.0,
    parallel_args=("--quick",),
    parallel_timeout_s=120.0,
)
"""Tiny sizes and a few rounds: a smoke test that runs every code path in seconds."""


# -- MLP: four libraries -------------------------------------------------------------------------


class MLPRow(NamedTuple):
    """One MLP case timed in every library."""

    case: Case
    params: int  # number of parameters
    times: dict[str, Stats]  # by library: JAX_VARIANTS, TORCH, NUMPY (those that ran)
    repeats: dict[str, int]  # rounds, by library
    manual_ratio: Stats  # bpjax manual / jax.grad, paired per interleaved round (bench_mlp's)
    mismatch: dict[str, float]  # max |Δ∇| / max |∇| against jax.grad, by library
    devices: dict[str, str]  # where each library ran
    peak_mib: dict[str, float] | None = None  # compiled peak memory: bpjax manual, jax.grad
    block_ratios: dict[str, Stats] | None = None  # "<lib> / jax.grad", "bpjax manual / <lib>"
    block: int = 0  # calls per block


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and torch sees one, else ``"cpu"``."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if platform_name() == "gpu" and torch.cuda.is_available() else "cpu"


def _block_plan(once: dict[str, float], config: Config) -> tuple[int, int]:
    """``(rounds, block)`` for :func:`bench_mlp.time_blocks`: timed blocks of at least
    ``block_s`` (2 to 50 calls), as many rounds as fit ``budget_s`` per library (7 to 41, odd),
    or ``config.repeats`` rounds."""
    block = min(50, max(2, math.ceil(config.block_s / max(min(once.values()), 1e-9))))
    if config.repeats:
        return config.repeats, block
    round_s = sum(block * t + max(t, config.block_s) for t in once.values())
    return bench_mlp.auto_repeats(round_s, config.budget_s * len(once), lo=7, hi=41), block


def _paired(samples: dict[str, np.ndarray], num: str, den: str) -> Stats:
    return Stats.of(samples[num] / samples[den])


def bench_mlp_case(case: Case, config: Config, *, seed: int, console: Console) -> MLPRow:
    """Times ``case``: jitted JAX's variants interleaved, then every library in paired blocks."""
    activation, output, loss = MLP_NET["activation"], MLP_NET["output"], MLP_NET["loss"]
    result = bench_mlp.bench_case(
        case,
        activation=activation,
        output=output,
        loss=loss,
        repeats=config.repeats,
        budget=config.budget_s,
        seed=seed,
    )
    net = bench_mlp.build_net(case, activation=activation, output=output, loss=loss)
    params, x, y = bench_mlp.make_problem(net, case.batch, loss, seed)
    jitted = bench_mlp.jitted_functions(net)
    _, reference = jitted["jax.grad"](params, x, y)
    mismatch = {"bpjax manual": result.grad_mismatch, "jax.grad": 0.0}
    jax_device = bench_mlp.machine_info()["device"]
    devices = dict.fromkeys(JAX_VARIANTS, jax_device) | {NUMPY: "cpu"}
    steps: dict[str, Callable[[], Any]] = {
        "bpjax manual": functools.partial(jitted["manual"], params, x, y),
        "jax.grad": functools.partial(jitted["jax.grad"], params, x, y),
    }

    np_params, np_x, np_y = peers.to_numpy_params(params), np.asarray(x), np.asarray(y)
    steps[NUMPY] = functools.partial(peers.numpy_value_and_grad(net), np_params, np_x, np_y)
    mismatch[NUMPY] = bench_mlp.grad_mismatch(
        jax.tree.map(jnp.asarray, steps[NUMPY]()[1]), reference
    )
    status = peers.torch_status()
    if status.startswith("torch "):
        device = torch_device()
        step, to_torch = peers.torch_value_and_grad(net, params, device=device)
        steps[TORCH] = functools.partial(step, *to_torch(x, y))
        grads = peers.torch_grads_to_numpy(steps[TORCH]()[1])
        mismatch[TORCH] = bench_mlp.grad_mismatch(jax.tree.map(jnp.asarray, grads), reference)
        devices[TORCH] = f"{device} ({status})"
    else:
        console.log(f"PyTorch eager skipped: {status}")

    once = bench_mlp.warm_up(steps, ())
    rounds, block = _block_plan(once, config)
    console.log(f"mlp {case.name}: {len(steps)} libraries, {rounds} rounds of {block}-call blocks")
    samples = bench_mlp.time_blocks(steps, rounds=rounds, block=block, settle=config.block_s)
    times = {lib: Stats.of(s) for lib, s in samples.items()} | {"forward": result.times["forward"]}
    repeats = dict.fromkeys(steps, rounds) | {"forward": result.repeats}
    ratios = {f"{lib} / jax.grad": _paired(samples, lib, "jax.grad") for lib in steps}
    if TORCH in samples:
        ratios[f"bpjax manual / {TORCH}"] = _paired(samples, "bpjax manual", TORCH)
    time.sleep(config.pause_s)
    n_params = bench_extend.num_params(case.sizes)
    peak = None if result.peak_mib is None else {
        "bpjax manual": result.peak_mib["manual"], "jax.grad": result.peak_mib["jax.grad"]
    }  # fmt: skip
    return MLPRow(
        case, n_params, times, repeats, result.ratio, mismatch, devices, peak, ratios, block
    )


def mlp_row_to_json(row: MLPRow) -> dict[str, Any]:
    """A JSON-ready dict of one MLP row; times in seconds."""
    jax_grad = row.times["jax.grad"].median
    return {
        "case": row.case.name,
        "sizes": list(row.case.sizes),
        "batch": row.case.batch,
        "params": row.params,
        "libraries": list(row.times),
        "times_s": {lib: s._asdict() for lib, s in row.times.items()},
        "repeats": row.repeats,
        "ratio_manual_over_jax_paired": row.manual_ratio._asdict(),
        "ratio_of_medians_over_jax": {lib: s.median / jax_grad for lib, s in row.times.items()},
        "block_ratios_paired": {k: v._asdict() for k, v in (row.block_ratios or {}).items()},
        "block_calls": row.block,
        "grad_mismatch_vs_jax": row.mismatch,
        "devices": row.devices,
        "peak_mib": row.peak_mib,
    }


# -- the parallel benchmark, in a subprocess -----------------------------------------------------


def run_parallel(config: Config, *, console: Console, script: Path | None = None) -> dict[str, Any]:
    """Runs ``bench_parallel.py --json PATH`` with 8 host devices; returns its JSON and status.

    The returned dict has ``status`` (``"ok"``, ``"missing"`` or ``"failed: ..."``), ``seconds``,
    ``markdown`` (the script's own, or a line saying why there is none) and, when it ran,
    ``result`` (the script's JSON).
    """
    script = PARALLEL_SCRIPT if script is None else script
    if not script.exists():
        note = f"not run: {script.name} is not there."
        return {"status": "missing", "seconds": 0.0, "markdown": note}
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count=8"
    if flag not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parallel.json"
        command = [sys.executable, str(script), "--json", str(path), *config.parallel_args]
        console.log(f"parallel: {' '.join(command[1:])}")
        try:
            done = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                timeout=config.parallel_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            status = f"failed: no result within {config.parallel_timeout_s:.0f} s"
            return {"status": status, "seconds": time.perf_counter() - start, "markdown": status}
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not path.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            status = f"failed: exit status {done.returncode}: {tail[0]}"
            return {"status": status, "seconds": seconds, "markdown": status}
        result = json.loads(path.read_text())
    markdown = result.get("markdown") or "bench_parallel.py wrote no markdown."
    return {"status": "ok", "seconds": seconds, "markdown": markdown, "result": result}


# -- the report ----------------------------------------------------------------------------------


def _cell(stats: Stats | dict[str, float] | None) -> str:
    """``median [q1–q3]`` in ms, three significant digits."""
    if stats is None:
        return "—"
    s = stats if isinstance(stats, dict) else stats._asdict()
    return f"{_num(s['median'] * 1e3)} [{_num(s['q1'] * 1e3)}–{_num(s['q3'] * 1e3)}]"


def _num(value: float) -> str:
    """Three significant digits, without an exponent up to 10⁶."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _mlp_markdown(rows: Sequence[dict[str, Any]], torch: str) -> list[str]:
    """The MLP table; ``torch`` is :func:`peers.torch_status` of the run."""
    missing = {TORCH: torch if torch.startswith("not installed") else "not run", NUMPY: "not run"}
    libraries = ("bpjax manual", "jax.grad", TORCH, NUMPY)
    checked = ("bpjax manual", TORCH, NUMPY)
    ratio_names = (
        "bpjax manual / jax.grad",
        f"{TORCH} / jax.grad",
        f"{NUMPY} / jax.grad",
        f"bpjax manual / {TORCH}",
    )
    devices = {lib: d for r in rows for lib, d in r["devices"].items()}
    lines = [
        "### MLP value_and_grad: bpjax manual, jax.grad, PyTorch eager, NumPy δ-recursion",
        "",
        "float32, tanh hidden layers, softmax + cross-entropy. The libraries take turns in "
        "rounds; in each, every library gets 50 ms of untimed calls, then a block of timed calls "
        "in a row (the median of the block is its time for the round), so that a slow spell of the "
        "machine falls on all of them. ms as median [IQR] over the rounds; ratios are medians "
        "[IQR] of per-round paired ratios; max rel Δ∇ against jax.grad; peak MiB of the "
        "compiled programs (XLA's memory_analysis: arguments + outputs + temporaries). Devices: "
        + "; ".join(f"{lib} on {devices.get(lib, missing.get(lib))}" for lib in libraries)
        + ".",
        "",
        "| case | sizes @ batch | params | rounds × calls | bpjax manual ms | jax.grad ms "
        "| PyTorch ms | NumPy ms | manual / jax.grad | PyTorch / jax.grad | NumPy / jax.grad "
        "| manual / PyTorch | max rel Δ∇ (manual, PyTorch, NumPy) | peak MiB manual / jax.grad |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in rows:
        times, diff, ratios = r["times_s"], r["grad_mismatch_vs_jax"], r["block_ratios_paired"]
        lines.append(
            f"| {r['case']} | {','.join(map(str, r['sizes']))} @ {r['batch']} | {r['params']:,} | "
            f"{r['repeats']['jax.grad']} × {r['block_calls']} | "
            + " | ".join(_cell(times.get(lib)) for lib in libraries)
            + "".join(f" | {_ratio(ratios.get(name), missing)}" for name in ratio_names)
            + " | "
            + ", ".join(f"{diff[lib]:.0e}" if lib in diff else "—" for lib in checked)
            + f" | {_peak(r.get('peak_mib'))} |"
        )
    return lines


def _ratio(stats: dict[str, float] | None, missing: dict[str, str]) -> str:
    """``median [q1–q3]``, two decimals; what is missing where the ratio's library did not run."""
    if stats is None:
        return missing[TORCH].split(" (")[0]
    return f"{stats['median']:.2f} [{stats['q1']:.2f}–{stats['q3']:.2f}]"


def _peak(peak_mib: dict[str, float] | None) -> str:
    if not peak_mib:
        return "—"
    return f"{peak_mib['bpjax manual']:.1f} / {peak_mib['jax.grad']:.1f}"


def _layers_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "### CNN and RNN layers: manual backward vs jax.grad",
        "",
        "float32, softmax + cross-entropy; ms as median [IQR]; manual / jax.grad paired per round.",
        "",
        "| case | network | batch | manual ms | jax.grad ms | forward ms | manual / jax.grad "
        "| max rel Δ∇ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        t, ratio = r["times_s"], r["ratio_manual_over_jax"]
        lines.append(
            f"| {r['case']} | {r['network']} | {r['batch']} | "
            + " | ".join(_cell(t[f]) for f in bench_layers.FUNCTIONS)
            + f" | {ratio['median']:.2f} [{ratio['q1']:.2f}–{ratio['q3']:.2f}]"
            + f" | {r['grad_mismatch']:.0e} |"
        )
    return lines


def render_markdown(payload: dict[str, Any]) -> str:
    """The suite's report as GitHub Markdown, from its JSON payload."""
    m, benchmarks = payload["machine"], payload["benchmarks"]
    lines = [
        f"## bpjax benchmark suite ({payload['platform']}{', quick' if payload['quick'] else ''})",
        "",
        f"Measured {payload['date']} in {payload['total_s']:.0f} s on {describe(m)} "
        f"({m['machine']}), jax {m['jax']}, python "
        f"{m['python']}, {payload['torch']}. Command: `{payload['command']}`.",
    ]
    load = payload.get("load_average")
    if load:
        lines[-1] += (
            f" Load average (1 min) at the start and the end: {load[0]:.1f}, {load[1]:.1f}"
            # The end figure counts the suite's own threads; only the start tells of other work.
            f"{'; other work was running, so the times are noisy' if load[0] > 1.5 else ''}."
        )
    if "mlp" in benchmarks:
        lines += ["", *_mlp_markdown(benchmarks["mlp"], payload["torch"])]
    if "layers" in benchmarks:
        lines += ["", *_layers_markdown(benchmarks["layers"])]
    if "extend" in benchmarks:
        lines += [
            "",
            "### Per-example gradients and curvature: bpjax.extend vs vmap(grad) vs BackPACK",
            "",
            "relu hidden layers, softmax + cross-entropy, float32; ms medians; speed-ups are "
            "vmap(grad)'s per-round paired ratio and BackPACK's times over the median bpjax time "
            "(BackPACK runs apart, after a pause).",
        ]
        for case in benchmarks["extend"]:
            rows = [bench_extend_row(r) for r in case["rows"]]
            lines += [
                "",
                bench_extend.markdown(
                    Case(case["case"], tuple(case["sizes"]), case["batch"]), rows
                ),
            ]
    if "parallel" in benchmarks:
        lines += ["", "### Data parallel on 8 host devices (bench_parallel.py)", ""]
        lines.append(benchmarks["parallel"]["markdown"].strip())
    return "\n".join(lines) + "\n"


def bench_extend_row(row: dict[str, Any]) -> bench_extend.Row:
    """A :class:`bench_extend.Row` back from its JSON (``bench_extend.row_to_json``)."""
    return bench_extend.Row(
        row["quantity"],
        {n: Stats(**s) for n, s in row["times_s"].items()},
        {n: Stats(**s) for n, s in row["speedup_over_bpjax"].items()},
        row["repeats"],
        row["mismatch_vs_vmap"],
        row["note"],
        row.get("mismatch_vs_backpack"),
    )


# -- the run -------------------------------------------------------------------------------------


def platform_name() -> str:
    """``"cpu"`` or ``"gpu"`` (or JAX's backend name for anything else): the files' suffix."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def run_suite(
    config: Config, only: Sequence[str], *, seed: int, console: Console
) -> dict[str, Any]:
    """Runs the benchmarks named in ``only``, in :data:`BENCHMARKS` order; returns the payload."""
    start = time.perf_counter()
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in (b for b in BENCHMARKS if b in only):
        begin = time.perf_counter()
        if name == "mlp":
            rows = []
            for case in config.mlp_cases:
                console.log(f"mlp {case.name}: {case.sizes} @ {case.batch}")
                rows.append(
                    mlp_row_to_json(bench_mlp_case(case, config, seed=seed, console=console))
                )
            out["mlp"] = rows
        elif name == "layers":
            results = []
            for lcase in config.layer_cases:
                console.log(f"layers {lcase.name}: {lcase.description} @ {lcase.batch}")
                results.append(
                    bench_layers.result_to_json(
                        bench_layers.bench_case(
                            lcase, repeats=config.repeats, budget=config.budget_s, seed=seed
                        )
                    )
                )
            out["layers"] = results
        elif name == "extend":
            cases = []
            for ecase in config.extend_cases:
                extend_rows = bench_extend.bench_case(
                    ecase,
                    config.extend_quantities,
                    budget=config.extend_budget_s,
                    min_repeats=config.extend_min_repeats,
                    max_gib=8.0,
                    skip_vmap=(),
                    warm_runs=0 if config.repeats else 1,
                    chunk_gib=1.0,
                    seed=seed,
                    console=console,
                    pause=config.pause_s,
                )
                cases.append(
                    {
                        "case": ecase.name,
                        "sizes": list(ecase.sizes),
                        "batch": ecase.batch,
                        "rows": [bench_extend.row_to_json(r) for r in extend_rows],
                    }
                )
            out["extend"] = cases
        else:
            time.sleep(config.pause_s)
            out["parallel"] = run_parallel(config, console=console)
            console.log(f"parallel: {out['parallel']['status']}")
        seconds[name] = time.perf_counter() - begin
        console.log(f"{name}: {seconds[name]:.0f} s")
    return {"benchmarks": out, "seconds": seconds, "total_s": time.perf_counter() - start}


def write_outputs(payload: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Writes ``stem.json``, ``stem.md`` and the plots to ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    md_path.write_text(payload["markdown"])
    title = f"{payload['machine']['device']}, jax {payload['machine']['jax']}"
    figures = [
        plots.plot_mlp(payload["benchmarks"], out_dir / f"{stem}_mlp.png", title=title),
        plots.plot_layers(payload["benchmarks"], out_dir / f"{stem}_layers.png", title=title),
        plots.plot_extend(payload["benchmarks"], out_dir / f"{stem}_extend.png", title=title),
    ]
    return [json_path, md_path, *(f for f in figures if f is not None)]


def _load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the OS does not tell."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def settings_to_json(config: Config) -> dict[str, Any]:
    """``config`` as JSON-ready values: each case as its name, sizes and batch."""
    settings = config._asdict()
    for key in ("mlp_cases", "extend_cases"):
        settings[key] = [
            {"name": c.name, "sizes": c.sizes, "batch": c.batch} for c in settings[key]
        ]
    settings["layer_cases"] = [
        {"name": c.name, "input_shape": c.input_shape, "batch": c.batch} for c in config.layer_cases
    ]
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
        help=f"benchmarks to run, from {', '.join(BENCHMARKS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few rounds: seconds")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"output folder (default: {RESULTS})"
    )
    parser.add_argument(
        "--pause", type=float, help="seconds between libraries (default: 1, quick: 0.01)"
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for params and data")
    args = parser.parse_args(argv)
    if args.pause is not None and args.pause < 0:
        parser.error(f"--pause: expected a non-negative number of seconds, got {args.pause}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite and writes its outputs. Returns the process exit status."""
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.pause is not None:
        config = config._replace(pause_s=args.pause)
    console = Console(width=None if sys.stdout.isatty() else 150)
    info = bench_mlp.machine_info()
    console.log(
        f"jax {info['jax']} on {info['device']}, {info['cpus_usable']} usable CPUs; "
        f"PyTorch: {peers.torch_status()}"
    )
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "platform": platform_name(),
        "quick": args.quick,
        "machine": info,
        "torch": peers.torch_status(),
        "settings": {**settings_to_json(config), "seed": args.seed, "only": args.only},
    }
    load_start = _load_average()
    payload |= run_suite(config, args.only, seed=args.seed, console=console)
    if load_start is not None:
        payload["load_average"] = [load_start, _load_average()]
    payload["markdown"] = render_markdown(payload)
    stem = f"suite_{payload['platform']}" + ("_quick" if args.quick else "")
    if set(args.only) != set(BENCHMARKS):
        stem += "_" + "_".join(b for b in BENCHMARKS if b in args.only)
    console.print(payload["markdown"], markup=False, highlight=False)
    for path in write_outputs(payload, args.out, stem):
        console.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
