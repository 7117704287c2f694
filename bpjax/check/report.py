"""What a check returns: one row per leaf and reference, the verdict, and where to look.

A :class:`GradCheckReport` renders as a text table (``str``), HTML (in notebooks) and a
``rich`` table, failing rows first. For network checks its summary names the layer whose backward
is at fault, in the maths numbering of the README: layer ``l`` holds ``params[l-1]`` and records
``deltas[l-1]`` (the rows ``[l-1][...]`` and ``δ^l (deltas[l-1])``).
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any, NamedTuple

__all__ = ["CheckRow", "GradCheckReport", "GradientMismatchError", "layer_of"]


class CheckRow(NamedTuple):
    """One comparison: a leaf (or the value, or a layer's δ) against one reference."""

    path: str  # "value", "[1]['W']", "δ^2 (deltas[1])", ...
    reference: str  # one of REFERENCES, or what the δ/input checks compare with
    max_abs_err: float  # max |manual − reference| over the elements (or directions)
    rel_err: float  # ‖manual − reference‖ / ‖reference‖ (norm-relative)
    worst_index: tuple[int, ...] | None  # index of the worst element (or direction)
    passed: bool
    order: float | None = None  # Taylor rows: the observed order of the remainder
    note: str = ""
    allowed: float | None = None  # the largest max_abs_err that passes, where a check derives one
    manual_value: float | None = None  # the manual value at the worst index
    reference_value: float | None = None  # the reference value there


def layer_of(path: str) -> int | None:
    """Maths layer number (1-based) of a params leaf path ``[l-1][...]`` or a ``δ^l`` path."""
    if path.startswith("δ^"):
        digits = path[2:].split(" ", 1)[0]
        return int(digits) if digits.isdigit() else None
    if path.startswith("["):
        head = path[1:].split("]", 1)[0]
        return int(head) + 1 if head.isdigit() else None
    return None


def _fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return ""
    return f"{x:.2e}"


def _value(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """The outcome of :func:`~bpjax.check_grads`: one :class:`CheckRow` per leaf and reference.

    Attributes:
      rows: every comparison, in order: the value, then each reference's leaf rows.
      dtype: the params' dtype name.
      rtol: the relative tolerance given (0 when every allowance is derived per leaf).
      atol: the absolute tolerance given, or the largest derived allowance.
      deltas_checked: whether the rows include per-layer δ checks (from :func:`~bpjax.check_mlp`
        or :func:`~bpjax.check_network`).
      layer_names: for network checks, each layer's name (``"Conv2D"``, or the ``name`` a user
        gave a :class:`~bpjax.layers.Layer`), input first; empty for an MLP (all Dense).
      derived: whether the allowances were derived per leaf (see :mod:`bpjax.check.tolerance`)
        rather than given as ``rtol``/``atol``.
    """

    rows: tuple[CheckRow, ...]
    dtype: str
    rtol: float
    atol: float
    deltas_checked: bool = False
    layer_names: tuple[str, ...] = ()
    derived: bool = False

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(row.passed for row in self.rows)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> tuple[CheckRow, ...]:
        """The rows that failed."""
        return tuple(row for row in self.rows if not row.passed)

    @property
    def failing_paths(self) -> tuple[str, ...]:
        """The distinct paths with at least one failing row, in report order."""
        return tuple(dict.fromkeys(row.path for row in self.failures))

    @property
    def first_bad_layer(self) -> int | None:
        """The first layer, in backprop order (output → input), where something disagrees.

        Numbered as in the maths (layer ``l`` holds ``params[l-1]`` and ``deltas[l-1]``): the
        highest layer with a failing δ or a failing params leaf. ``None`` when nothing failed or
        no failing row names a layer.
        """
        return max((layer_of(row.path) or 0 for row in self.failures), default=0) or None

    def _tolerance_text(self) -> str:
        if self.derived:
            return f"{self.dtype}, allowed errors derived per leaf"
        return f"{self.dtype}, rtol={self.rtol:.1e}, atol={self.atol:.1e}"

    def summary(self) -> str:
        """One paragraph: all good, or where the first disagreement is and what it points to."""
        if self.ok:
            unjudged = sum("not judged" in row.note for row in self.rows)
            partly = f"; {unjudged} with parts not judged (see their notes)" if unjudged else ""
            return f"all {len(self.rows)} checks passed ({self._tolerance_text()}){partly}."
        lines = [
            f"{len(self.failures)} of {len(self.rows)} checks failed ({self._tolerance_text()}); "
            "failing: " + ", ".join(self.failing_paths) + "."
        ]
        blame = self._blame() if self.deltas_checked else None
        if blame is not None:
            lines.append(blame)
        elif self.first_bad_layer is not None:
            lines.append(f"First bad layer in backprop order: {self.first_bad_layer}.")
        return " ".join(lines)

    def _blame(self) -> str | None:
        """Walks the recursion from the output down to the first layer whose backward is wrong.

        With the errors above it right, layer ``l``'s backward is at fault when its params
        gradient is wrong, or when the error it passes down (``δ^{l-1}``) is wrong.
        """
        failing = [(row.path.startswith("δ"), layer_of(row.path)) for row in self.failures]
        bad_deltas = {layer for is_delta, layer in failing if is_delta and layer is not None}
        bad_params = {layer for is_delta, layer in failing if not is_delta and layer is not None}
        delta_layers = [layer_of(r.path) or 0 for r in self.rows if r.path.startswith("δ")]
        top = max(delta_layers, default=0)
        for l in range(top, 0, -1):
            if l in bad_deltas:
                label = self._layer_label(l)
                if l == top:
                    step = "the output error δ^L (the loss gradient or the output activation's " \
                        "backward)"  # fmt: skip
                elif l + 1 in bad_params:
                    above = self._layer_label(l + 1)
                    return (
                        f"First bad layer in backprop order: {above}: from a right incoming "
                        f"error δ^{l + 1} its backward gives a wrong params gradient and a wrong "
                        f"error below it (δ^{l}); look at its backward (grads and dx)."
                    )
                else:
                    step = self._delta_step(l)
                return f"First bad layer in backprop order: {label}; look at {step}."
            if l in bad_params:
                prefix = "Every δ agrees" if not bad_deltas else f"Every δ down to δ^{l} agrees"
                if self.layer_names:
                    return (
                        f"{prefix}; the params gradient of layer {self._layer_label(l)} is wrong "
                        "(its backward's grads from a right dy)."
                    )
                return (
                    f"{prefix}; the gradient formula of layer {l} is wrong "
                    "(∇W = (1/B) δᵀ a, ∇b = (1/B) Σ_n δ_n)."
                )
        if "input_grad" in self.failing_paths:
            first = self._layer_label(1)
            return (
                "Every δ and params gradient agrees; ∂C/∂x is wrong: look at the dx of layer "
                f"{first}'s backward."
            )
        return None

    def _layer_label(self, layer: int) -> str:
        if 0 < layer <= len(self.layer_names):
            return f"{layer} ({self.layer_names[layer - 1]})"
        return str(layer)

    def _delta_step(self, layer: int) -> str:
        """What a first wrong ``δ^layer`` (below a right ``δ^{layer+1}``) points to."""
        if self.layer_names:
            return (
                f"the backward of layer {self._layer_label(layer + 1)} (its dx) or the δ step of "
                f"layer {self._layer_label(layer)}"
            )
        return (
            f"the step from δ^{layer + 1} to δ^{layer} "
            f"(the product with W^{layer + 1} or the derivative of f^{layer})"
        )

    # -- rendering: failing rows first --------------------------------------------------------

    _HEADER = (
        "leaf", "reference", "max |Δ|", "allowed", "rel err", "worst at", "manual", "ref value",
        "order", "status", "note",
    )  # fmt: skip

    def _ordered(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.passed] + [r for r in self.rows if r.passed]

    def _cells(self, row: CheckRow) -> list[str]:
        return [
            row.path,
            row.reference,
            _fmt(row.max_abs_err),
            _fmt(row.allowed),
            _fmt(row.rel_err),
            "" if row.worst_index is None else str(row.worst_index),
            _value(row.manual_value),
            _value(row.reference_value),
            "" if row.order is None else f"{row.order:.2f}",
            "ok" if row.passed else "FAIL",
            row.note,
        ]

    def __str__(self) -> str:
        rows = self._ordered()
        body, header = [self._cells(r) for r in rows], self._HEADER
        widths = [
            max(len(h), *(len(r[i]) for r in body)) if body else len(h)
            for i, h in enumerate(header)
        ]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r).rstrip() for r in body]
        lines.append(self.summary())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._HEADER)
        body = []
        for row in self._ordered():
            style = "" if row.passed else ' style="background:#fdd"'
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in self._cells(row))
            body.append(f"<tr{style}>{tds}</tr>")
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<p>{html.escape(self.summary())}</p>"
        )

    def to_rich(self) -> Any:
        """The report as a ``rich.table.Table`` (failures first, in red)."""
        from rich.table import Table

        table = Table(*self._HEADER, title=self.summary())
        for row in self._ordered():
            table.add_row(*self._cells(row), style=None if row.passed else "red")
        return table


class GradientMismatchError(AssertionError):
    """Raised by :func:`~bpjax.assert_grads_match`; ``.report`` holds the report."""

    def __init__(self, report: GradCheckReport) -> None:
        super().__init__("manual gradients disagree with the references:\n" + str(report))
        self.report = report
