"""The ``bpjax check`` table: a row per case, the worst error against each reference, the times."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bpjax.cli.matrix import Case
from bpjax.cli.networks import LayerCase, layer_names, shape_text
from bpjax.cli.runner import CaseResult

_TARGETS_SHORT = {"labels": "labels", "probabilities": "probs", "reals": "reals"}
_DTYPES_SHORT = {"float32": "f32", "float64": "f64"}
# the error columns: header and which report rows each one takes its worst error from
_ERROR_COLUMNS = (
    ("value", lambda row: row.path == "value"),
    ("jax.grad", lambda row: row.reference == "jax.grad"),
    ("jax.vjp", lambda row: row.reference == "jax.vjp"),
    ("jvp", lambda row: row.reference == "jvp"),
    ("fin.diff", lambda row: row.reference == "finite_diff"),
    ("δ, ∂x", lambda row: row.path.startswith("δ") or row.path == "input_grad"),
)


def red(text: str) -> str:
    """``text`` in bold red (rich markup)."""
    return f"[bold red]{text}[/bold red]"


def _status(result: CaseResult) -> str:
    return "[green]ok[/green]" if result.passed else red("FAIL")


def _error_cell(report: Any, select: Any) -> str:
    """The worst norm-relative error of the selected rows; red when one of them failed."""
    rows = [row for row in report.rows if select(row)]
    if not rows:
        return "–"
    errors = [row.rel_err for row in rows]
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    text = "nan" if math.isnan(worst) else "0" if worst == 0 else f"{worst:.1e}"
    return text if all(row.passed for row in rows) else red(text)


def _taylor_cell(result: CaseResult) -> str:
    """The smallest observed Taylor order over the leaves; red when one failed."""
    rows = [row for row in result.report.rows if row.reference == "taylor"]
    if not rows:
        return "–"
    orders = [row.order for row in rows if row.order is not None]
    text = f"{min(orders):.2f}" if orders else "flat"
    return text if all(row.passed for row in rows) else red(text)


def _microseconds(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1e6:.0f}"


def _section(case: Case | LayerCase) -> str:
    """The table's sections: one per activation, and one per layer row."""
    return case.activation if isinstance(case, Case) else case.network.label


def _row(result: CaseResult, *, timing: bool) -> list[str]:
    case = result.case
    if isinstance(case, Case):
        cells = [
            case.activation,
            case.loss,
            _TARGETS_SHORT[case.targets],
            _DTYPES_SHORT[case.dtype],
            "·".join(str(n) for n in case.sizes),
        ]
    else:  # the layer, and one example's shape in and out
        spec = case.network
        cells = [
            spec.label,
            spec.loss,
            _TARGETS_SHORT[spec.targets],
            _DTYPES_SHORT[case.dtype],
            f"{shape_text(spec.input_shape)}→{shape_text(spec.output_shape)}",
        ]
    if result.report is None:
        blank = len(_ERROR_COLUMNS) + (3 if timing else 0)
        return [*cells, red("raised"), *[""] * blank, red("FAIL")]
    cells += [_error_cell(result.report, select) for _, select in _ERROR_COLUMNS]
    cells.append(_taylor_cell(result))
    if timing:
        cells += [
            _microseconds(result.manual_s),
            _microseconds(result.autodiff_s),
            "–" if math.isnan(result.ratio) else f"{result.ratio:.2f}",
        ]
    cells.append(_status(result))
    return cells


def table(results: Sequence[CaseResult], *, title: str, caption: str, timing: bool) -> Any:
    """One row per case, a section per activation and one per layer row (rich ``Table``)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
    )
    for name in ("activation", "loss", "y", "dtype", "sizes"):
        table.add_column(name, no_wrap=True)
    for name, _ in _ERROR_COLUMNS:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("taylor", justify="right", no_wrap=True)
    for name in ("manual µs", "jax µs", "ratio") if timing else ():
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for i, result in enumerate(results):
        next_section = _section(results[i + 1].case) if i + 1 < len(results) else None
        table.add_row(
            *_row(result, timing=timing),
            end_section=next_section != _section(result.case),
        )
    return table


def failure_title(case: Case | LayerCase) -> str:
    """The heading over a failing case's full report."""
    if isinstance(case, Case):
        return (
            f"[red]FAILED[/red] {case.activation} × {case.loss}, {case.dtype}, "
            f"sizes {case.sizes}, activations {case.activations}, y {case.targets}"
        )
    spec = case.network
    return (
        f"[red]FAILED[/red] {spec.label} ({case.layer}), {case.dtype}, "
        f"layers {' → '.join(layer_names(case))}, input {shape_text(spec.input_shape)}, "
        f"{spec.loss}, y {spec.targets}"
    )
