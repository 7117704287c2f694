"""The argument types the commands share: argparse ``type=`` parsers with one-line messages.

Each raises :class:`argparse.ArgumentTypeError`, which argparse prints as
``bpjax COMMAND: error: argument --OPTION: MESSAGE`` and exit status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any


def parse_sizes(text: str) -> tuple[int, ...]:
    """``8,16,16,4``: every layer's width ``n_0, ..., n_L``, at least two, each positive."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 8,16,16,4, got {text!r}"
        ) from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive widths (n_0,...,n_L) like 8,16,16,4, got {text!r}"
        )
    return sizes


def name_list(registry: dict[str, Any], kind: str) -> Any:
    """A parser of comma-separated names, each a key of ``registry`` (``kind`` names them)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in registry]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"expected comma-separated names from: {', '.join(registry)}"
            )
        return names

    return parse


def _integer(text: str, *, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive(text: str) -> int:
    """An integer ≥ 1."""
    return _integer(text, least=1, what="a positive integer")


def non_negative(text: str) -> int:
    """An integer ≥ 0."""
    return _integer(text, least=0, what="a non-negative integer")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in ``[0, 1)``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def widths(text: str) -> tuple[int, ...]:
    """``64,32``: hidden-layer widths, at least one, each positive."""
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive hidden-layer widths like 64,32, got {text!r}"
        )
    return parsed


def one_of(names: Sequence[str], kind: str) -> Any:
    """A parser of one name from ``names`` (``kind`` names them)."""

    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {text!r}; expected one of: {', '.join(names)}"
            )
        return text

    return parse
