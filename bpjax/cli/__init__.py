"""The ``bpjax`` command line: ``bpjax check`` and ``bpjax train``.

``bpjax check`` (:mod:`bpjax.cli.check`) runs the verification matrix: every activation × every
loss, in float32 and float64, on random MLPs of several depths (:mod:`bpjax.cli.matrix`), and a
small network around each of the other layers (:mod:`bpjax.cli.networks`), each checked against
JAX autodiff and timed (:mod:`bpjax.cli.runner`), in one table (:mod:`bpjax.cli.table`); the exit
status is 1 when any check fails.

``bpjax train`` (:mod:`bpjax.cli.train`) trains any network (an MLP, the built-in CNN, or a
``bp.serial`` network from a Python file) on a built-in data set or a ``.npz`` file.

The argument types both commands share are in :mod:`bpjax.cli.options`. Heavy imports (jax, rich,
matplotlib) happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from bpjax.cli.check import add_check_parser
from bpjax.cli.matrix import Case, build_matrix, case_data
from bpjax.cli.networks import LAYER_NETWORKS, LayerCase, build_layer_matrix, layer_case_data
from bpjax.cli.runner import CaseResult, check_case, run_matrix
from bpjax.cli.train import add_train_parser, run_train
from bpjax.cli.train_outputs import sigint_flag

__all__ = [
    "LAYER_NETWORKS",
    "Case",
    "CaseResult",
    "LayerCase",
    "build_layer_matrix",
    "build_matrix",
    "case_data",
    "check_case",
    "layer_case_data",
    "main",
    "run_matrix",
]


def _parser() -> argparse.ArgumentParser:
    import bpjax as bp

    parser = argparse.ArgumentParser(
        prog="bpjax",
        description="bpjax: backpropagation written out by hand in JAX, proven against autodiff.",
    )
    parser.add_argument("--version", action="version", version=f"bpjax {bp.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_check_parser(commands)
    add_train_parser(commands)
    return parser


def _robust_output() -> None:
    """Text that stdout's or stderr's encoding cannot hold (``→``, ``δ``, ``×`` on a latin-1 or
    cp1252 terminal, or redirected to a file on Windows) is written as ``\\u2192`` escapes
    instead of raising :class:`UnicodeEncodeError` mid-run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            # a closed or detached stream: nothing to write to anyway
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``bpjax`` command line; returns the exit status.

    Args:
      argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
      0 when everything passed, 1 when a check failed (``check``) or the loss stopped being
      finite (``train``), 2 for bad arguments or a bad data file; ``train`` also 74 when its
      results could not be written and 130 when Ctrl-C stopped it (``bpjax.cli.train.EXIT_*``).
      Characters that stdout's or stderr's encoding cannot hold are written as backslash escapes.
    """
    _robust_output()
    # From here on a first Ctrl-C is a flag that bpjax train checks before it trains or writes:
    # under the default handler it would be a KeyboardInterrupt wherever the interpreter is, and
    # inside a garbage-collection callback (JAX has one) Python ignores it ("Exception ignored
    # in") and the run carries on. bpjax check gets the usual Ctrl-C back once its arguments are
    # read. (Ctrl-C while `import bpjax` itself runs, before this line, is Python's as usual.)
    with sigint_flag() as interrupted:
        try:
            parser = _parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exit_:  # --help, --version and argument errors
                return int(exit_.code or 0)
            if args.command == "train":
                return run_train(args, interrupted=interrupted)
        except KeyboardInterrupt:  # a second Ctrl-C before bpjax train's own handling
            return _interrupted()
        if interrupted():
            return _interrupted()
    return int(args.run(args))


def _interrupted() -> int:
    print("bpjax: interrupted before it started; nothing done", file=sys.stderr)
    return 130  # 128 + SIGINT, as a shell reports it
