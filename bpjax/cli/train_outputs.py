"""Where ``bpjax train --out DIR`` puts a run's results, so that they are never lost or mixed.

Before training, :func:`prepare_out_dir` makes sure the results can be written: ``DIR`` is a
directory (created if missing) in which a staging directory and, in it, a file of the longest
result name can be created (the very paths the save will use), no result name in it is taken by
something other than a file, and it holds no earlier results unless ``--overwrite``. A problem is
an :class:`~bpjax.cli.models.OptionError` (exit status 2) before the first step, not a traceback
after the run.

After training, :func:`save_run` writes the run's files into a fresh staging directory inside
``DIR`` (:mod:`tempfile`), so that no file is ever seen half-written under its name; then, with
Ctrl-C held off (:func:`sigint_held`), removes the earlier run's ``manifest.json`` and result
files, moves the new files into place (:func:`os.replace`, atomic within one file system), and
moves ``manifest.json`` in last: the names, sizes and SHA-256 of the files of one run. So
``DIR`` holds either the complete new run (its manifest matches its files) or, when writing
fails or a second Ctrl-C stops it before the move, whatever it held before; the staging
directory is removed either way. Files in ``DIR`` that are not results are left alone.

:func:`sigint_flag` turns the first Ctrl-C into a flag that :func:`bpjax.train.fit` polls
(``interrupt=``), so an interrupted run stops at a step boundary and is saved; a second Ctrl-C
raises :class:`KeyboardInterrupt` as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from bpjax.cli.models import OptionError, describe_network, network_record, params_arrays
from bpjax.cli.train_report import plot_history

__all__ = [
    "MANIFEST",
    "RESULT_FILES",
    "STAGING_PREFIX",
    "SaveError",
    "earlier_results",
    "file_record",
    "history_record",
    "prepare_out_dir",
    "run_environment",
    "save_run",
    "sigint_flag",
    "sigint_held",
    "write_results",
]

RESULT_FILES = ("params.npz", "history.json", "loss.png")
"""The files a run writes to ``--out``, besides :data:`MANIFEST`."""

MANIFEST = "manifest.json"
"""Written last: the run's files with their sizes and SHA-256, and how the run ended."""

STAGING_PREFIX = ".bpjax-train-"
"""The name prefix of the staging directory (and the write probe) inside ``--out``."""


class SaveError(Exception):
    """The results could not be written after training (exit status 74, EX_IOERR); ``--out``
    holds what it held before."""


def earlier_results(out: pathlib.Path) -> list[str]:
    """The names in ``out`` that a run writes and that exist there already, in writing order."""
    return [name for name in (*RESULT_FILES, MANIFEST) if os.path.lexists(out / name)]


def prepare_out_dir(text: str, *, overwrite: bool) -> pathlib.Path:
    """``--out``, checked before training: a writable directory (created if missing) whose
    result names are free, or hold files of an earlier run and ``overwrite`` is set.

    Raises:
      OptionError: ``argument --out: …``, one line: an empty path, an existing file, a directory
        that cannot be created or written in (any :class:`OSError`), a result name taken by a
        directory (nothing could replace it), or earlier results without ``overwrite`` (named).
    """
    if not text:  # `--out "$DIR"` with DIR unset: pathlib reads "" as ".", the current directory
        raise OptionError(
            "argument --out: '' is an empty path; expected a directory for the results "
            "(created if missing)"
        )
    out = pathlib.Path(text)
    try:
        if out.exists() and not out.is_dir():
            raise OptionError(
                f"argument --out: {text!r} is a file; expected a directory for the results "
                "(created if missing)"
            )
        out.mkdir(parents=True, exist_ok=True)
        _probe_staging(out)
    except OSError as error:  # any: a name too long, a loop of links, an I/O error, …
        what = "write in" if os.path.isdir(out) else "create"
        raise OptionError(
            f"argument --out: cannot {what} {text!r} ({error.strerror or error}); expected a "
            "writable directory"
        ) from None
    earlier = earlier_results(out)
    taken = [name for name in earlier if not (out / name).is_file()]
    if taken:
        raise OptionError(
            f"argument --out: {str(out / taken[0])!r} is not a file, so the run's "
            f"{taken[0]} could not replace it; remove it or choose another directory"
        )
    if earlier and not overwrite:
        raise OptionError(
            f"argument --out: {text!r} holds an earlier run's results ({', '.join(earlier)}); "
            "pass --overwrite to replace them, or choose another directory"
        )
    return out


def _probe_staging(out: pathlib.Path) -> None:
    """Creates and removes what :func:`save_run` will: a staging directory in ``out`` with the
    result file of the longest name in it, so that a path too long for the system (``PATH_MAX``),
    like permissions, a read-only mount, ACLs or quotas, fails here and not after training.

    Raises:
      OSError: as creating them raised it.
    """
    # creating the files is the only sure test; the staging names are as long as save_run's
    staging = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        (staging / max((*RESULT_FILES, MANIFEST), key=len)).write_bytes(b"")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_record(path: pathlib.Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, for the manifest."""
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_run(
    out: pathlib.Path,
    writers: dict[str, Callable[[pathlib.Path], None]],
    summary: dict[str, Any],
) -> list[pathlib.Path]:
    """Writes one run's files to ``out`` as a set (see the module doc); returns their paths.

    Args:
      out: the directory, from :func:`prepare_out_dir`.
      writers: each result name (of :data:`RESULT_FILES`) with the function that writes that
        file to the path it is given.
      summary: how the run ended, for the manifest (``stopped``, ``interrupted``, ``step``);
        ``files`` is added.

    Raises:
      SaveError: a write failed; ``out`` holds what it held before.
      KeyboardInterrupt: a Ctrl-C that the SIGINT handler turned into one while the files
        were written; ``out`` holds what it held before. One during the move is held off until
        the set is in place, and then the save returns normally.
    """
    moved = False
    try:
        with tempfile.TemporaryDirectory(
            dir=out, prefix=STAGING_PREFIX, ignore_cleanup_errors=True
        ) as staging_text:
            staging = pathlib.Path(staging_text)
            for name, write in writers.items():
                write(staging / name)
            files = {name: file_record(staging / name) for name in writers}
            manifest = {**summary, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            try:
                with sigint_held():
                    _move_into_place(staging, out, tuple(writers))
                    moved = True
            except KeyboardInterrupt:
                if not moved:
                    raise
                # held off until the set was in place: it is complete, and the run ends anyway
    except OSError as error:
        where = error.filename or out
        raise SaveError(
            f"cannot write the results to {str(out)!r}: {where}: {error.strerror or error}"
        ) from None
    return [out / name for name in (*writers, MANIFEST)]


def _move_into_place(staging: pathlib.Path, out: pathlib.Path, names: tuple[str, ...]) -> None:
    """The staged files replace the earlier run's; the manifest comes last.

    The earlier run's files go first, its manifest before them, so that even a rename that fails
    halfway leaves some of the new files without a manifest, never old files beside new ones.
    """
    for name in (MANIFEST, *RESULT_FILES):
        (out / name).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, out / name)
    os.replace(staging / MANIFEST, out / MANIFEST)


def _in_main_thread() -> bool:
    # signal handlers can only be set, and only run, in the main thread
    return threading.current_thread() is threading.main_thread()


def _restore(previous: Any) -> None:
    # None: a handler installed from C, which Python cannot put back; the default is closest
    signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


@contextlib.contextmanager
def sigint_flag() -> Iterator[Callable[[], bool]]:
    """A function that says whether Ctrl-C (SIGINT) was pressed inside the block.

    The first Ctrl-C only sets the flag (a caller polls it and stops cleanly); the second raises
    :class:`KeyboardInterrupt`. Outside the main thread, where no handler can be set, the flag
    stays ``False`` and Ctrl-C is handled as before.
    """
    if not _in_main_thread():
        yield lambda: False
        return
    caught: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(caught)
    finally:
        _restore(previous)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) off inside the block, then hands it to the previous handler.

    For a few renames that must happen together: a Ctrl-C among them would leave the old and
    the new files side by side.
    """
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        _restore(previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def run_environment() -> dict[str, Any]:
    """history.json's ``versions`` (bpjax, jax, jaxlib, numpy, optax, Python) and ``device``
    (the first device's platform and kind, and the device count), to tell runs apart."""
    import importlib.metadata
    import platform

    import jax
    import numpy as np

    import bpjax

    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    return {
        "versions": {
            "bpjax": bpjax.__version__,
            "jax": jax.__version__,
            "jaxlib": version("jaxlib"),
            "numpy": np.__version__,
            "optax": version("optax"),
            "python": platform.python_version(),
        },
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
        },
    }


def history_record(
    setup: Any, args: argparse.Namespace, result: Any, status: int
) -> dict[str, Any]:
    """history.json: every option, the network, the data, the versions and the device
    (:func:`run_environment`), how the run ended (``stopped``, ``interrupted``, the ``step``
    reached, ``exit_status``), and the history itself (every step's loss, every evaluation)."""
    history = result.history
    options = {
        key: value for key, value in vars(args).items() if key not in ("run", "parser", "command")
    }
    return {
        "command": "bpjax train",
        "options": options,
        "model": args.model,
        "net": network_record(setup.net),
        "optimizer": {"name": args.optimizer, "learning_rate": setup.lr},
        "epochs": setup.epochs,
        "batch_size": setup.batch_size,
        "data": {
            "source": args.data,
            "train_examples": len(setup.train),
            "test_examples": len(setup.test),
            "features": setup.train.num_features,
            "classes": setup.train.num_classes,
        },
        **run_environment(),
        "interrupted": history.stopped == "interrupted",
        "step": len(history.step_loss),
        "exit_status": status,
        **history.to_dict(),
    }


def write_results(setup: Any, args: argparse.Namespace, result: Any, status: int) -> list[str]:
    """params.npz, history.json and loss.png under ``setup.out``, as one set with its manifest
    (:func:`save_run`); returns the paths.

    ``setup`` is ``bpjax train``'s: the network and its label, the data splits, the input
    normalizer, the learning rate, the epochs, the batch size and ``out``; ``status`` the exit
    status the run ends with, recorded.

    Raises:
      SaveError: see :func:`save_run`.
    """
    import json

    import numpy as np

    arrays = params_arrays(result.params)
    arrays["x_mean"], arrays["x_scale"] = (np.asarray(a) for a in setup.normalizer)
    record = history_record(setup, args, result, status)
    title = (
        f"{args.data}: {setup.label} {describe_network(setup.net)}, "
        f"{args.optimizer} lr {setup.lr:g}, {args.grad} gradients"
        + (" (interrupted)" if record["interrupted"] else "")
    )
    writers = {
        "params.npz": lambda path: np.savez(path, **arrays),
        "history.json": lambda path: path.write_text(json.dumps(record), encoding="utf-8"),
        "loss.png": lambda path: plot_history(result.history, path, title=title),
    }
    summary = {
        key: record[key] for key in ("command", "stopped", "interrupted", "step", "exit_status")
    }
    return [str(path) for path in save_run(setup.out, writers, summary)]
