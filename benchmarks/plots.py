"""The benchmark suite's figures (PNG, matplotlib's Agg backend), from its JSON payload.

Each function takes the ``"benchmarks"`` part of the suite's JSON (see ``benchmarks/run.py``) and
writes one PNG, returning its path, or ``None`` when the benchmark it draws was not run:

* :func:`plot_mlp`: time of one value-and-grad step against the parameter count, one line per
  library, log axes, the interquartile range as error bars;
* :func:`plot_layers`: ``manual / jax.grad`` per CNN/RNN case, with its interquartile range;
* :func:`plot_extend`: the speed-ups ``vmap(grad) / bpjax`` and ``BackPACK / bpjax`` per quantity,
  log scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

__all__ = ["plot_extend", "plot_layers", "plot_mlp"]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _errorbar(stats: list[dict[str, float]]) -> tuple[list[float], list[list[float]]]:
    """Medians in ms and the ``[below, above]`` distances to the quartiles, for ``errorbar``."""
    medians = [s["median"] * 1e3 for s in stats]
    below = [(s["median"] - s["q1"]) * 1e3 for s in stats]
    above = [(s["q3"] - s["median"]) * 1e3 for s in stats]
    return medians, [below, above]


def plot_mlp(benchmarks: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """Median step time (ms) against parameter count per library, log-log, IQR error bars."""
    rows = benchmarks.get("mlp")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    libraries = [lib for lib in rows[0]["libraries"] if lib != "forward"]
    for lib, marker in zip(libraries, "os^vD", strict=False):
        have = [r for r in rows if lib in r["times_s"]]
        if not have:
            continue
        medians, err = _errorbar([r["times_s"][lib] for r in have])
        ax.errorbar(
            [r["params"] for r in have], medians, yerr=err, marker=marker, capsize=3, label=lib
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("value_and_grad ms (median, IQR)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layers(benchmarks: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """``manual / jax.grad`` per case with its interquartile range; 1 marks a tie."""
    rows = benchmarks.get("layers")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ratios = [r["ratio_manual_over_jax"] for r in rows]
    medians = [s["median"] for s in ratios]
    err = [[s["median"] - s["q1"] for s in ratios], [s["q3"] - s["median"] for s in ratios]]
    ax.bar([r["case"] for r in rows], medians, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("manual / jax.grad (paired, IQR)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_extend(benchmarks: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """Grouped bars of ``other / bpjax`` per quantity, log scale; above 1 means bpjax is faster."""
    cases = benchmarks.get("extend")
    if not cases:
        return None
    fig, axes = plt.subplots(len(cases), 1, figsize=(7.2, 3.8 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases, strict=True):
        rows = [r for r in case["rows"] if r["speedup_over_bpjax"]]
        for i, peer in enumerate(("vmap(grad)", "BackPACK")):
            xs = [
                j + (i - 0.5) * 0.4 for j, r in enumerate(rows) if peer in r["speedup_over_bpjax"]
            ]
            ys = [
                r["speedup_over_bpjax"][peer]["median"]
                for r in rows
                if peer in r["speedup_over_bpjax"]
            ]
            ax.bar(xs, ys, width=0.4, label=f"{peer} / bpjax")
        ax.set_xticks(range(len(rows)), [r["quantity"] for r in rows], rotation=30, ha="right")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("time / bpjax time (median)")
        sizes = ",".join(map(str, case["sizes"]))
        ax.set_title(f"{title}\n{case['case']}: {sizes} @ B={case['batch']}", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, path)
