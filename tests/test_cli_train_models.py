"""``bpjax train --model``: the built-in CNN, a Python spec file's network, and their errors.

Compiling dominates: the CNN trains once (one epoch on digits, module-scoped) and every check of
its outputs reads that run; the spec file's networks train on xor for a few epochs.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest

from bpjax import datasets
from bpjax.cli import main
from bpjax.cli.models import build_cnn, params_arrays, params_from_arrays
from bpjax.train import evaluate

CNN_LINE = (
    "bpjax train: digits (1438 train, 359 held out), CNN 8×8×1→Conv2D(8, relu)→MaxPool2D→"
    "Conv2D(16, relu)→MaxPool2D→Flatten→Dense(10, softmax), cross_entropy, adam lr 0.01, "
    "batch 64, 1 epochs, manual gradients"
)

SPEC = """
import bpjax as bp
from bpjax.layers import Dense, Dropout

NET = bp.serial(
    Dense(16, "tanh"), Dropout(0.1), Dense(2, "softmax"), loss="cross_entropy", input_shape=(2,)
)


def make_net():
    return bp.serial(
        Dense(16, "tanh"), Dropout(0.1), Dense(2, "softmax"), loss="cross_entropy",
        input_shape=(2,),
    )


THREE = bp.serial(Dense(3, "softmax"), loss="cross_entropy", input_shape=(2,))
WIDE = bp.serial(Dense(2, "softmax"), loss="cross_entropy", input_shape=(3,))
IMAGE = bp.serial(Dense(2, "softmax"), loss="cross_entropy", input_shape=(1, 2, 1))
BLOCK = bp.serial(Dense(2, "tanh"))
NUMBER = 3


def needs_args(width):
    return NET


def broken():
    raise RuntimeError("boom")


def returns_none():
    return None
"""


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _history(out_dir: pathlib.Path) -> dict:
    return json.loads((out_dir / "history.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    (root / "net.py").write_text(SPEC, encoding="utf-8")
    (root / "syntax.py").write_text("import bpjax\nNET = (\n", encoding="utf-8")
    (root / "raises.py").write_text("x = 1\nNET = 1 / 0\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """`bpjax train --data digits --model cnn --epochs 1 --out DIR`, once for the module."""
    out = tmp_path_factory.mktemp("cnn")
    argv = ["train", "--data", "digits", "--model", "cnn", "--epochs", "1", "--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, stderr.getvalue()
    return code, stdout.getvalue().splitlines(), out


def test_cnn_trains_on_digits_and_writes_readable_params(cnn_run):
    code, lines, out = cnn_run
    assert code == 0, lines
    assert lines[0] == CNN_LINE
    history = _history(out)
    assert history["model"] == history["options"]["model"] == "cnn"
    assert history["net"]["layers"] == [
        "Conv2D(8, relu)",
        "MaxPool2D",
        "Conv2D(16, relu)",
        "MaxPool2D",
        "Flatten",
        "Dense(10, softmax)",
    ]
    assert history["net"]["input_shape"] == [8, 8, 1]
    assert history["epochs"] == 1 and history["batch_size"] == 64
    final = history["evals"][-1]
    assert final["train_loss"] < np.log(10)  # below a uniform guess after one epoch
    # params.npz: each params[l][k] as k{l} (layers 1, 3, 4 have none), and the standardisation
    with np.load(out / "params.npz") as saved:
        assert sorted(saved.files) == ["W0", "W2", "W5", "b0", "b2", "b5", "x_mean", "x_scale"]
        net = build_cnn((8, 8, 1), 10, "cross_entropy")
        params = params_from_arrays(saved, net.init(jax.random.key(1)))
        norm = datasets.Normalizer(saved["x_mean"], saved["x_scale"])
    assert params[0]["W"].shape == (3, 3, 1, 8) and params[5]["W"].shape == (10, 64)
    # an image is standardised per channel: one mean and one scale for all 64 pixels
    assert np.all(norm.mean == norm.mean[0]) and np.all(norm.scale == norm.scale[0])
    # the saved params and standardisation give the run's held-out accuracy again
    _, test = datasets.split_dataset(datasets.digits_dataset(), 0.2, seed=0)
    x = norm(test.x).reshape(-1, 8, 8, 1)
    metrics = jax.jit(evaluate, static_argnums=0)(net, params, x, test.y)
    assert float(metrics.accuracy) == pytest.approx(final["test_accuracy"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_params_arrays_round_trip_any_pytree():
    params = [
        {"W": np.ones((2, 3)), "b": np.zeros(2)},
        {},
        [{"W": np.full((1, 2), 2.0)}, {"scale": np.ones(1)}],  # a block of two layers
    ]
    arrays = params_arrays(params)
    assert sorted(arrays) == ["W0", "W2.0", "b0", "scale2.1"]
    back = params_from_arrays(arrays, params)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
    # names that would clash (W1 of layer 0, W of layer 10) fall back to the keystr paths
    clash = [{"W1": np.ones(1)}] + [{}] * 9 + [{"W": np.zeros(1)}]
    assert sorted(params_arrays(clash)) == ["[0]['W1']", "[10]['W']"]


def test_a_spec_file_network_with_dropout_trains(specs, tmp_path, capsys):
    argv = ["train", "--data", "xor", "--epochs", "20", "--lr", "0.05", "--seed", "1"]
    code, out, err = _run([*argv, "--model", f"{specs}/net.py:NET", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert out.startswith(
        "bpjax train: xor (160 train, 40 held out), net.py:NET 2→Dense(16, tanh)→Dropout(0.1)→"
        "Dense(2, softmax), cross_entropy, adam lr 0.05, batch 32, 20 epochs"
    ), out
    history = _history(tmp_path)
    assert history["model"] == f"{specs}/net.py:NET"
    assert history["net"]["layers"] == ["Dense(16, tanh)", "Dropout(0.1)", "Dense(2, softmax)"]
    assert history["evals"][-1]["test_accuracy"] >= 0.9
    with np.load(tmp_path / "params.npz") as saved:
        assert sorted(saved.files) == ["W0", "W2", "b0", "b2", "x_mean", "x_scale"]
    # a function of no arguments that returns the same network: the same run
    code, out, err = _run(
        [*argv, "--model", f"{specs}/net.py:make_net", "--out", str(tmp_path / "f")], capsys
    )
    assert code == 0, err
    assert "net.py:make_net 2→Dense(16, tanh)" in out
    assert _history(tmp_path / "f")["step_loss"] == history["step_loss"]


def test_model_mlp_is_the_default(tmp_path, capsys):
    code, out, err = _run(
        ["train", "--data", "xor", "--model", "mlp", "--epochs", "1", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, err
    assert out.startswith("bpjax train: xor (160 train, 40 held out), MLP 2-8-2 tanh→softmax")
    history = _history(tmp_path)
    assert history["model"] == "mlp"
    assert history["net"] == {"sizes": [2, 8, 2], "activations": ["tanh", "softmax"]} | {
        "loss": "cross_entropy"
    }
    with np.load(tmp_path / "params.npz") as saved:
        assert sorted(saved.files) == ["W0", "W1", "b0", "b1", "x_mean", "x_scale"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "cnn", "--sizes", "64,10"], "argument --sizes: not allowed with --model cnn"),
        (
            ["--model", "cnn", "--activations", "relu"],
            "argument --activations: not allowed with --model cnn (the CNN's layers are fixed)",
        ),
        (["--model", "cnn", "--hidden", "8"], "argument --hidden: not allowed with --model cnn"),
        (
            ["--model", "{spec}/net.py:NET", "--sizes", "2,2"],
            "argument --sizes: not allowed with --model {spec}/net.py:NET (the file defines",
        ),
        (
            ["--model", "{spec}/net.py:NET", "--activations", "tanh"],
            "argument --activations: not allowed with --model {spec}/net.py:NET",
        ),
        (
            ["--model", "{spec}/net.py:NET", "--loss", "squared_error"],
            "argument --loss: not allowed with --model {spec}/net.py:NET: the file's network has "
            "its own loss",
        ),
        (
            ["--model", "{spec}/net.py:NET", "--input-shape", "1,2,1"],
            "argument --input-shape: not allowed with --model",
        ),
        (["--input-shape", "8,8,1"], "argument --input-shape: only with --model cnn"),
        (["--model", "rnn"], "argument --model: expected mlp, cnn or a Python spec"),
        (["--model", "net.py:not-a-name"], "argument --model: expected mlp, cnn or a Python"),
        (["--model", "{spec}/missing.py:NET"], "argument --model: no such file"),
        (["--model", "{spec}:NET"], "is not a file; expected a .py file"),
        (
            ["--model", "{spec}/net.py:MISSING"],
            "argument --model: {spec}/net.py has no 'MISSING'; it defines NET, make_net(), THREE, "
            "WIDE, IMAGE, broken(), returns_none()",
        ),
        (["--model", "{spec}/net.py:NUMBER"], "argument --model: {spec}/net.py:NUMBER is int, not"),
        (
            ["--model", "{spec}/net.py:BLOCK"],
            "BLOCK is a serial(...) without loss= and input_shape=, a layer rather than a network",
        ),
        (
            ["--model", "{spec}/net.py:needs_args"],
            "argument --model: calling {spec}/net.py:needs_args() raised TypeError",
        ),
        (["--model", "{spec}/net.py:broken"], "broken() raised RuntimeError: boom"),
        (
            ["--model", "{spec}/net.py:returns_none"],
            "argument --model: {spec}/net.py:returns_none() is NoneType, not a network",
        ),
        (
            ["--model", "{spec}/syntax.py:NET"],
            "argument --model: importing {spec}/syntax.py (line 2) raised SyntaxError",
        ),
        (
            ["--model", "{spec}/raises.py:NET"],
            "importing {spec}/raises.py (line 2) raised ZeroDivisionError: division by zero",
        ),
        (
            ["--model", "{spec}/net.py:THREE"],
            "argument --model: xor: the network has n_L = 3 outputs but the data have 2 classes",
        ),
        (
            ["--model", "{spec}/net.py:WIDE"],
            "argument --model: xor: the network takes n_0 = 3 inputs but the data have 2 features",
        ),
        (
            ["--model", "{spec}/net.py:IMAGE"],
            "argument --model: xor: the network's outputs have shape (1, 2, 2) per example",
        ),
        (
            ["--model", "{spec}/net.py:NET", "--devices", "1"],
            "argument --devices: mesh: data-parallel training takes no PRNG key",
        ),
        (
            ["--model", "cnn"],
            "argument --input-shape: --model cnn needs the image shape H,W,C of xor's 2 features",
        ),
        (
            ["--data", "digits", "--model", "cnn", "--input-shape", "8,8,2"],
            "argument --input-shape: 8×8×2 is 128 values per example, but digits has 64 features",
        ),
        (
            ["--data", "digits", "--model", "cnn", "--input-shape", "2,2,16"],
            "argument --input-shape: the CNN pools twice by 2, so it needs images of at least 4×4",
        ),
        (
            ["--data", "digits", "--model", "cnn", "--input-shape", "8,8"],
            "argument --input-shape: expected an image shape H,W,C",
        ),
    ],
)
def test_bad_models_exit_2_with_one_line(argv, message, specs, capsys):
    argv = [arg.replace("{spec}", str(specs)) for arg in argv]
    message = message.replace("{spec}", str(specs))
    if "--data" not in argv:
        argv = ["--data", "xor", *argv]
    code, out, err = _run(["train", *argv], capsys)
    assert code == 2
    assert out == ""  # nothing trained, nothing printed
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: bpjax train")
    assert lines[-1].startswith("bpjax train: error: "), err
    assert message in lines[-1], err  # the whole error on one line, after argparse's usage


def test_help_lists_the_model_options(capsys):
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    words = " ".join(out.split())
    for text in ("--model", "mlp|cnn|FILE.py:NAME", "--input-shape", "H,W,C", "per channel"):
        assert text in words, text
