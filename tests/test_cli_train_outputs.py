"""``bpjax train --out``: checked before training, written as one set, kept on Ctrl-C.

Every run trains the default xor MLP for one or a few epochs (one compiled step, shared by the
module). Ctrl-C is a real SIGINT (``signal.raise_signal``) sent at a chosen step from inside the
run, so the interrupt lands at the same place every time; failures while saving are made by
replacing a writer. Nothing here measures time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pathlib
import signal
import sys

import jax
import numpy as np
import pytest

import bpjax as bp
from bpjax import datasets
from bpjax import train as train_module
from bpjax.cli import main, train_outputs
from bpjax.cli.train import EXIT_INTERRUPTED, EXIT_IOERR, EXIT_OK, EXIT_USAGE
from bpjax.cli.train_outputs import MANIFEST, RESULT_FILES, STAGING_PREFIX
from bpjax.train import fit, get_optimizer

XOR = ["train", "--data", "xor", "--epochs", "2"]  # 5 steps an epoch


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(out: pathlib.Path) -> dict[str, bytes]:
    """Every file in ``out`` (hidden ones included) with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def _assert_one_complete_run(out: pathlib.Path) -> dict:
    """``out`` holds exactly the result files its manifest lists, with the sizes and digests it
    gives, and no staging leftovers; returns the manifest."""
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert sorted(manifest["files"]) == sorted(RESULT_FILES)
    for name, record in manifest["files"].items():
        data = (out / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    return manifest


def _history(out: pathlib.Path) -> dict:
    return json.loads((out / "history.json").read_text(encoding="utf-8"))


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the command gets as far as training."""

    def fit(*args, **kwargs):
        pytest.fail("trained although --out could not take the results")

    monkeypatch.setattr(train_module, "fit", fit)


def _ctrl_c_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The command's fit gets a real SIGINT right after step ``step``."""
    real_fit = train_module.fit

    def fit(*args, on_step, **kwargs):
        def step_then_signal(done):
            on_step(done)
            if done == step:
                signal.raise_signal(signal.SIGINT)

        return real_fit(*args, on_step=step_then_signal, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit)


# -- fit ------------------------------------------------------------------------------------


def test_fit_stops_at_the_step_its_interrupt_says():
    # the command's xor run (its split, net, optimiser and batch): one compiled step for both
    data, _ = datasets.split_dataset(datasets.xor_dataset(), 0.2, seed=0)
    net = bp.MLP((2, 8, 2), ("tanh", "softmax"), "cross_entropy")
    params = net.init(jax.random.key(0))
    options = dict(optimizer=get_optimizer("adam", 0.01), epochs=2, batch_size=32, seed=0)
    polls: list[int] = []

    def interrupt() -> bool:
        polls.append(1)
        return len(polls) >= 7

    stopped = fit(net, params, data, interrupt=interrupt, **options)
    whole = fit(net, params, data, **options)
    history = stopped.history
    assert history.stopped == "interrupted"
    assert len(polls) == 7  # polled once a step, and no step after it said so
    # the uninterrupted run's first 7 steps, then an evaluation there: 1 epoch of 5 steps done
    assert history.step_loss == whole.history.step_loss[:7]
    last = history.evals[-1]
    assert (last.epoch, last.step) == (1, 7)
    metrics = jax.jit(train_module.evaluate, static_argnums=0)(net, stopped.params, data.x, data.y)
    assert float(metrics.loss) == pytest.approx(last.train_loss)


# -- before training: --out must be able to take the results -----------------------------


def test_an_existing_file_as_out_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "run").write_text("not a directory", encoding="utf-8")
    code, out, err = _run([*XOR, "--out", str(tmp_path / "run")], capsys)
    assert code == EXIT_USAGE and out == ""
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: {str(tmp_path / 'run')!r} is a file; expected a "
        "directory for the results (created if missing)"
    )
    assert (tmp_path / "run").read_text(encoding="utf-8") == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_an_unwritable_out_fails_before_training(tmp_path, capsys, no_training):
    run = tmp_path / "run"
    run.mkdir(mode=0o500)
    try:
        code, out, err = _run([*XOR, "--out", str(run)], capsys)
    finally:
        run.chmod(0o700)
    assert code == EXIT_USAGE and out == ""
    assert f"argument --out: cannot write in {str(run)!r} (Permission denied)" in err
    assert list(run.iterdir()) == []


def test_a_directory_that_takes_no_file_fails_before_training(
    tmp_path, capsys, no_training, monkeypatch
):
    # what a read-only mount or an ACL does, for any user (root included): creating a file fails
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(train_outputs.tempfile, "mkdtemp", refuse)
    code, _, err = _run([*XOR, "--out", str(tmp_path)], capsys)
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert lines[-1] == (
        f"bpjax train: error: argument --out: cannot write in {str(tmp_path)!r} (Permission "
        "denied); expected a writable directory"
    )
    assert "Traceback" not in err


def test_a_name_too_long_for_the_file_system_fails_in_one_line(tmp_path, capsys, no_training):
    out = str(tmp_path / ("a" * 300))  # one component beyond NAME_MAX (255): ENAMETOOLONG
    code, stdout, err = _run([*XOR, "--out", out], capsys)
    assert code == EXIT_USAGE and stdout == ""
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: cannot create {out!r} (File name too long); "
        "expected a writable directory"
    )


def test_any_os_error_while_checking_out_fails_in_one_line(
    tmp_path, capsys, no_training, monkeypatch
):
    def broken(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(train_outputs.pathlib.Path, "exists", broken)
    code, _, err = _run([*XOR, "--out", str(tmp_path / "run")], capsys)
    assert code == EXIT_USAGE and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: cannot create {str(tmp_path / 'run')!r} "
        "(Input/output error); expected a writable directory"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's PATH_MAX, 4096")
def test_out_too_long_for_the_staging_paths_fails_before_training(tmp_path, capsys, no_training):
    # DIR/.bpjax-train-XXXXXXXX fits in PATH_MAX, DIR/.bpjax-train-XXXXXXXX/manifest.json not:
    # the save would fail after training, so the check must refuse it
    out = str(tmp_path)
    while len(out) < 3800:
        out += "/" + "d" * 250
    out += "/" + "e" * (4066 - len(out) - 1)
    code, stdout, err = _run([*XOR, "--out", out], capsys)
    assert code == EXIT_USAGE and stdout == ""
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: cannot write in {out!r} (File name too long); "
        "expected a writable directory"
    )
    assert os.listdir(out) == []


def test_an_empty_out_is_refused_not_the_current_directory(
    tmp_path, capsys, no_training, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run([*XOR, "--out", ""], capsys)
    assert code == EXIT_USAGE and stdout == ""
    assert err.splitlines()[-1] == (
        "bpjax train: error: argument --out: '' is an empty path; expected a directory for the "
        "results (created if missing)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_result_name_taken_by_a_directory_fails_even_with_overwrite(
    tmp_path, capsys, no_training
):
    (tmp_path / "params.npz").mkdir()
    code, _, err = _run([*XOR, "--out", str(tmp_path), "--overwrite"], capsys)
    assert code == EXIT_USAGE
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: {str(tmp_path / 'params.npz')!r} is not a file, "
        "so the run's params.npz could not replace it; remove it or choose another directory"
    )


# -- the set of files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One complete run in a directory that also holds a file of the user's."""
    out = tmp_path_factory.mktemp("first")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main([*XOR, "--out", str(out)]) == EXIT_OK
    return out


def test_a_run_writes_one_complete_set_with_versions(first_run):
    manifest = _assert_one_complete_run(first_run)
    assert manifest["interrupted"] is False and manifest["stopped"] == "epochs"
    assert manifest["step"] == 10 and manifest["exit_status"] == EXIT_OK
    history = _history(first_run)
    versions = history["versions"]
    assert versions["jax"] == jax.__version__ and versions["bpjax"] and versions["jaxlib"]
    assert history["device"]["platform"] == jax.devices()[0].platform
    assert history["device"]["kind"] == jax.devices()[0].device_kind
    assert history["options"]["epochs"] == 2 and history["options"]["overwrite"] is False
    assert history["interrupted"] is False and history["step"] == len(history["step_loss"]) == 10


def test_earlier_results_are_replaced_only_with_overwrite(first_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for path in first_run.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = _snapshot(out)
    code, stdout, err = _run([*XOR, "--seed", "1", "--out", str(out)], capsys)
    assert code == EXIT_USAGE and stdout == ""  # refused before training
    assert err.splitlines()[-1] == (
        f"bpjax train: error: argument --out: {str(out)!r} holds an earlier run's results "
        "(params.npz, history.json, loss.png, manifest.json); pass --overwrite to replace them, "
        "or choose another directory"
    )
    assert _snapshot(out) == before
    code, _, err = _run([*XOR, "--seed", "1", "--out", str(out), "--overwrite"], capsys)
    assert code == EXIT_OK, err
    _assert_one_complete_run(out)
    assert _history(out)["options"]["seed"] == 1  # the new run's, every file of it
    for name in RESULT_FILES:
        assert (out / name).read_bytes() != before[name], name
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"  # not a result: kept


def test_a_failed_save_leaves_the_earlier_run_whole(first_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for path in first_run.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = _snapshot(out)

    def disk_full(history, path, *, title):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    # params.npz and history.json are staged by then: the failure comes mid-set
    monkeypatch.setattr(train_outputs, "plot_history", disk_full)
    code, stdout, err = _run([*XOR, "--seed", "1", "--out", str(out), "--overwrite"], capsys)
    assert code == EXIT_IOERR
    assert "done after 2 epochs" in stdout
    (line,) = err.strip().splitlines()
    assert line.startswith(f"bpjax train: error: cannot write the results to {str(out)!r}: ")
    assert line.endswith("loss.png: No space left on device")
    assert _snapshot(out) == before  # the earlier set, whole; no staging directory left


# -- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_stops_and_saves_the_run_so_far(tmp_path, capsys, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    _ctrl_c_at(monkeypatch, 3)
    code, stdout, err = _run([*XOR, "--out", str(tmp_path)], capsys)
    assert code == EXIT_INTERRUPTED
    assert err == (
        f"bpjax train: interrupted at step 3 of 10; saved the params and history reached to "
        f"{str(tmp_path)!r}, marked interrupted\n"
    )
    assert "INTERRUPTED (Ctrl-C) after 0 epochs (3 steps)" in stdout
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    manifest = _assert_one_complete_run(tmp_path)
    assert manifest["interrupted"] is True and manifest["step"] == 3
    assert manifest["exit_status"] == EXIT_INTERRUPTED
    history = _history(tmp_path)
    assert history["interrupted"] is True and history["stopped"] == "interrupted"
    assert history["step"] == len(history["step_loss"]) == history["evals"][-1]["step"] == 3
    with np.load(tmp_path / "params.npz") as saved:
        assert sorted(saved.files) == ["W0", "W1", "b0", "b1", "x_mean", "x_scale"]


def test_ctrl_c_without_out_says_nothing_was_saved(capsys, monkeypatch):
    _ctrl_c_at(monkeypatch, 2)
    code, _, err = _run(XOR, capsys)
    assert code == EXIT_INTERRUPTED
    assert err == "bpjax train: interrupted at step 2 of 10; nothing saved (no --out)\n"


def test_a_second_ctrl_c_while_saving_leaves_the_earlier_run_whole(
    first_run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    out.mkdir()
    for path in first_run.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = _snapshot(out)
    handler = signal.getsignal(signal.SIGINT)
    _ctrl_c_at(monkeypatch, 3)

    def second_ctrl_c(history, path, *, title):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_outputs, "plot_history", second_ctrl_c)
    code, _, err = _run([*XOR, "--out", str(out), "--overwrite"], capsys)
    assert code == EXIT_INTERRUPTED
    assert err == (
        f"bpjax train: interrupted; nothing saved; {str(out)!r} is as it was before the run\n"
    )
    assert _snapshot(out) == before  # no half-written file, no staging directory
    assert signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_before_training_is_one_line(capsys, monkeypatch):
    def interrupted(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "load_dataset", interrupted)
    code, out, err = _run(XOR, capsys)
    assert code == EXIT_INTERRUPTED and out == ""
    assert err == "bpjax train: interrupted; nothing saved\n"


def test_a_latin_1_stdout_gets_escapes_not_a_traceback(monkeypatch):
    # a latin-1 or cp1252 terminal: no → or δ; the summary line and the help hold both
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="latin-1") for name in ("out", "err")}
    monkeypatch.setattr(sys, "stdout", streams["out"])
    monkeypatch.setattr(sys, "stderr", streams["err"])
    assert main([*XOR[:-1], "1"]) == EXIT_OK
    assert main(["check", "--help"]) == 0
    for stream in streams.values():
        stream.flush()
    out = streams["out"].buffer.getvalue().decode("latin-1")
    assert "MLP 2-8-2 tanh\\u2192softmax" in out  # the summary line
    assert "layer's \\u03b4" in out  # bpjax check --help
    assert streams["err"].buffer.getvalue() == b""


def test_ctrl_c_during_setup_stops_before_training_even_with_overwrite(
    tmp_path, capsys, monkeypatch, no_training
):
    # a first Ctrl-C before training is a flag main() holds (never a KeyboardInterrupt that a
    # garbage-collection callback could swallow); the run must not train nor replace --out
    for name in (*RESULT_FILES, MANIFEST):
        (tmp_path / name).write_text("earlier", encoding="utf-8")
    before = _snapshot(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    load = datasets.load_dataset

    def ctrl_c_then_load(source):
        with contextlib.suppress(KeyboardInterrupt):  # what a gc callback does with it
            signal.raise_signal(signal.SIGINT)
        return load(source)

    monkeypatch.setattr(datasets, "load_dataset", ctrl_c_then_load)
    code, out, err = _run([*XOR, "--out", str(tmp_path), "--overwrite"], capsys)
    assert code == EXIT_INTERRUPTED and out == ""
    assert err == (
        f"bpjax train: interrupted; nothing saved; {str(tmp_path)!r} is as it was before the run\n"
    )
    assert _snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_while_reading_the_arguments_is_one_line(capsys, monkeypatch):
    import bpjax.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bpjax.cli, "_parser", interrupted)
    code, out, err = _run(XOR, capsys)
    assert code == EXIT_INTERRUPTED and out == ""
    assert err == "bpjax: interrupted before it started; nothing done\n"


def test_help_documents_the_exit_statuses_and_overwrite(capsys):
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    words = " ".join(out.split())
    assert "--overwrite" in words and "manifest.json" in words
    for status in ("0 done", "1 the loss stopped being finite", "2 a bad option", "74", "130"):
        assert status in words, status
