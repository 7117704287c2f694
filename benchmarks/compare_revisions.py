"""Time ``bench_mlp.py`` on two source trees of bpjax, interleaved, on the same machine.

A refactor must not slow the δ-recursion down. This runs ``benchmarks/bench_mlp.py`` of each
tree in a fresh subprocess with that tree first on ``PYTHONPATH``, alternating ``A B B A A B …``
for ``--rounds`` rounds, so that a slow spell of a shared machine falls on both alike, and
prints, per network size and tree, the median over rounds of the per-run median time of jitted
``value_and_grad`` and of the paired ratio ``manual / jax.grad`` (which cancels most of the
machine's drift), and the change from A to B.

Usage::

    git worktree add /tmp/before <old-commit>
    python benchmarks/compare_revisions.py /tmp/before . --rounds 4 --sizes small medium large
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _run(tree: Path, sizes: list[str], repeats: int, out: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    script = tree / "benchmarks" / "bench_mlp.py"
    command = [sys.executable, str(script), "--sizes", *sizes, "--repeats", str(repeats)]
    subprocess.run([*command, "--json", str(out)], env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def compare(a: Path, b: Path, *, rounds: int, sizes: list[str], repeats: int) -> list[str]:
    """The table's lines: per size, A and B's medians over rounds, and B / A."""
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            for label in order:
                tree = a if label == "A" else b
                runs[label].append(_run(tree, sizes, repeats, Path(tmp) / f"{label}{i}.json"))
    lines = [
        f"A = {a}, B = {b}; {rounds} interleaved rounds of bench_mlp.py --repeats {repeats}",
        "size | A manual ms | B manual ms | B/A | A manual/jax.grad | B manual/jax.grad",
        "--- | --- | --- | --- | --- | ---",
    ]
    for index, result in enumerate(runs["A"][0]["results"]):
        manual = {
            label: statistics.median(
                r["results"][index]["times_s"]["manual"]["median"] for r in runs[label]
            )
            for label in runs
        }
        ratio = {
            label: statistics.median(
                r["results"][index]["ratio_manual_over_jax"]["median"] for r in runs[label]
            )
            for label in runs
        }
        lines.append(
            f"{','.join(map(str, result['sizes']))} @ {result['batch']} | "
            f"{manual['A'] * 1e3:.3f} | {manual['B'] * 1e3:.3f} | "
            f"{manual['B'] / manual['A']:.3f} | {ratio['A']:.3f} | {ratio['B']:.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the first source tree (e.g. before a change)")
    parser.add_argument("b", type=Path, help="the second source tree (e.g. after it)")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each tree (default 4)")
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large"])
    parser.add_argument("--repeats", type=int, default=20, help="bench_mlp.py --repeats")
    args = parser.parse_args(argv)
    print("\n".join(compare(args.a, args.b, rounds=args.rounds, sizes=args.sizes,
                            repeats=args.repeats)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
