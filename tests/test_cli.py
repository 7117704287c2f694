"""The `bpjax` command line: the check matrix and its table, failures, help and bad options."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.cli import build_matrix, main

# the error and timing columns of the table, in order
HEADERS = (
    "value",
    "jax.grad",
    "jax.vjp",
    "jvp",
    "fin.diff",
    "δ, ∂x",
    "taylor",
    "manual µs",
    "jax µs",
    "ratio",
)


def _words(out: str) -> str:
    return " ".join(out.split())


def _rows(out: str, activation: str) -> list[str]:
    return [line for line in out.splitlines() if line.split()[:1] == [activation]]


@pytest.mark.slow
def test_check_passes_and_prints_the_table(capsys):
    # two spawned workers (one per dtype), as `bpjax check` runs by default
    code = main(
        [
            "check",
            "--activations", "tanh",
            "--losses", "cross_entropy",
            "--sizes", "4,5,3",
            "--batch", "5",
            "--repeats", "2",
            "--jobs", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all 2 cases passed" in out
    for header in HEADERS:
        assert header in out
    # a row per dtype, passing, with every error and timing filled in
    rows = _rows(out, "tanh")
    assert len(rows) == 2, rows
    assert [row.split()[:5] for row in rows] == [
        ["tanh", "cross_entropy", "labels", dtype, "4·5·3"] for dtype in ("f32", "f64")
    ]
    for row in rows:
        assert row.rstrip().endswith("ok"), row
        assert "–" not in row, row
        errors = [float(cell) for cell in row.split()[5:11]]
        fd = HEADERS.index("fin.diff")
        # Against autodiff and forward mode: roundoff only, within the dtype's tolerance.
        assert max(e for i, e in enumerate(errors) if i != fd) < (1e-5 if "f32" in row else 1e-10)
        # Central differences at h = ε^{1/3} carry the method's own error, truncation h² f'''
        # plus roundoff ε |f| / h, each ≈ ε^{2/3} = 3.7e-11 relative in float64: 3e-11 to 5e-11
        # here depending on how the CPU rounds f, too close to 1e-10 to hold it to that. The
        # harness estimates and allows that error per direction (the row's "ok"); here only its
        # size: float32's manual gradient (~1e-7) swamps it, float64's gets 100 ε^{2/3}.
        assert errors[fd] < (
            1e-5 if "f32" in row else 100 * float(np.finfo(np.float64).eps) ** (2 / 3)
        )
        assert 1.5 <= float(row.split()[11]) <= 2.5  # the Taylor order
    assert "on 2 processes." in _words(out)  # the caption, which rich may wrap


def _broken_tanh_backward(z, a, g):
    del z
    return g * (1 - a)  # the planted bug: tanh' = 1 − a², not 1 − a


@pytest.mark.slow
def test_a_wrong_backward_fails_and_prints_the_report(capsys, monkeypatch):
    tanh = bp.ACTIVATIONS["tanh"]
    monkeypatch.setitem(bp.ACTIVATIONS, "tanh", tanh._replace(backward=_broken_tanh_backward))
    code = main(
        [
            "check",
            "--activations", "tanh,identity",
            "--losses", "squared_error",
            "--sizes", "4,5,3",
            "--dtype", "float64",
            "--no-timing",
            "--jobs", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "1 of 2 cases FAILED" in out
    (tanh_row,) = _rows(out, "tanh")
    (identity_row,) = _rows(out, "identity")
    assert tanh_row.rstrip().endswith("FAIL")
    assert identity_row.rstrip().endswith("ok")
    # the failing report, in full: every leaf's rows and the layer the δ check blames
    assert "FAILED tanh × squared_error, float64, sizes (4, 5, 3)" in out
    for leaf in ("[0]['W']", "[1]['b']", "δ^2 (deltas[1])", "input_grad"):
        assert leaf in out
    assert "First bad layer in backprop order: 2" in out
    assert "FAILED identity" not in out


def test_a_case_that_raises_is_a_failure(capsys, monkeypatch):
    def forward(z):
        raise FloatingPointError("planted")

    tanh = bp.ACTIVATIONS["tanh"]
    monkeypatch.setitem(bp.ACTIVATIONS, "tanh", tanh._replace(forward=forward))
    code = main(
        [
            "check",
            "--activations", "tanh",
            "--losses", "squared_error",
            "--sizes", "3,2",
            "--dtype", "float32",
            "--no-timing",
            "--jobs", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "raised" in out
    assert "FloatingPointError: planted" in out


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: bpjax" in out
    assert "check" in out
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--sizes",
        "--batch",
        "--seed",
        "--dtype",
        "--activations",
        "--losses",
        "--jobs",
        "--no-timing",
    ):
        assert option in out
    assert "jax.grad" in out
    assert "differences" in out


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "bpjax", "check", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: bpjax check" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check", "--sizes", "3"], "argument --sizes: expected at least two positive widths"),
        (["check", "--sizes", "3,x"], "argument --sizes: expected comma-separated layer widths"),
        (["check", "--sizes", "3,0,2"], "argument --sizes: expected at least two positive"),
        (["check", "--activations", "tanh,swish"], "unknown activation 'swish'; expected"),
        (["check", "--losses", "hinge"], "unknown loss 'hinge'; expected"),
        (["check", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["check", "--batch", "0"], "argument --batch: expected a positive integer, got 0"),
        (["check", "--jobs", "two"], "argument --jobs: expected a positive integer, got 'two'"),
        (["check", "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
        (["check", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: bpjax" in err


def test_the_message_lists_the_valid_names(capsys):
    assert main(["check", "--activations", "swish"]) == 2
    err = capsys.readouterr().err
    for name in bp.ACTIVATIONS:
        assert name in err


def test_nothing_left_to_check_exits_2(capsys):
    argv = ["check", "--sizes", "3,2", "--activations", "tanh", "--losses", "cross_entropy"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "skipped tanh × cross_entropy" in out
    assert "nothing to check" in out


def test_the_default_matrix():
    cases, skipped = build_matrix(
        activations=tuple(bp.ACTIVATIONS),
        losses=tuple(bp.LOSSES),
        dtypes=("float32", "float64"),
        sizes=None,
        batch=12,
        seed=0,
    )
    assert not skipped
    assert len(cases) == len(bp.ACTIVATIONS) * len(bp.LOSSES) * 2 == 66
    assert {(c.activation, c.loss, c.dtype) for c in cases} == {
        (a, loss, d) for a in bp.ACTIVATIONS for loss in bp.LOSSES for d in ("float32", "float64")
    }
    assert {len(c.sizes) - 1 for c in cases} == {1, 2, 3, 4}
    # every depth is a prefix of one architecture, so eager kernels are shared across cases
    assert len({c.sizes[0] for c in cases}) == len({c.sizes[-1] for c in cases}) == 1
    assert len({n for c in cases for n in c.sizes[1:-1]}) == 1
    for case in cases:
        net = bp.MLP(case.sizes, case.activations, case.loss)  # a valid pair
        assert case.activation in case.activations
        if case.loss == "cross_entropy":
            assert case.activations[-1] == "softmax"
        elif case.loss == "binary_cross_entropy":
            assert case.activations[-1] == "sigmoid"
        else:
            assert case.activations == (case.activation,) * net.num_layers
    targets = {c.targets for c in cases if c.loss == "cross_entropy"}
    assert targets == {"labels", "probabilities"}
    # float32 and float64 check the same network
    by_pair = {}
    for case in cases:
        by_pair.setdefault((case.activation, case.loss), set()).add((case.sizes, case.seed))
    assert all(len(v) == 1 for v in by_pair.values())


def test_a_restricted_matrix_reproduces_the_full_ones_rows():
    full, _ = build_matrix(
        activations=tuple(bp.ACTIVATIONS),
        losses=tuple(bp.LOSSES),
        dtypes=("float64",),
        sizes=None,
        batch=12,
        seed=3,
    )
    part, _ = build_matrix(
        activations=("gelu",),
        losses=("binary_cross_entropy",),
        dtypes=("float64",),
        sizes=None,
        batch=12,
        seed=3,
    )
    assert part == [c for c in full if (c.activation, c.loss) == ("gelu", "binary_cross_entropy")]


def test_fixed_sizes_of_one_layer_skip_pairs_without_the_activation():
    cases, skipped = build_matrix(
        activations=("tanh", "softmax", "sigmoid"),
        losses=tuple(bp.LOSSES),
        dtypes=("float32",),
        sizes=(3, 2),
        batch=4,
        seed=0,
    )
    pairs = {(c.activation, c.loss) for c in cases}
    assert pairs == {
        ("tanh", "squared_error"),
        ("softmax", "squared_error"),
        ("softmax", "cross_entropy"),
        ("sigmoid", "squared_error"),
        ("sigmoid", "binary_cross_entropy"),
    }
    assert len(skipped) == 4
    assert all(c.sizes == (3, 2) for c in cases)


def test_case_data_float32_and_float64_share_the_numbers(x64):
    cases, _ = build_matrix(
        activations=("tanh",),
        losses=("cross_entropy",),
        dtypes=("float32", "float64"),
        sizes=(4, 5, 3),
        batch=6,
        seed=0,
    )
    (net, p32, x32, y32), (_, p64, x64_, y64) = (cli._case_data(case) for case in cases)
    assert net.sizes == cases[0].sizes
    assert p32[0]["W"].dtype == x32.dtype == jnp.float32
    assert p64[0]["W"].dtype == x64_.dtype == jnp.float64
    for a, b in ((p32[0]["W"], p64[0]["W"]), (p32[0]["b"], p64[0]["b"]), (x32, x64_)):
        assert jnp.array_equal(a.astype(jnp.float64), b)
    assert y32.shape == (6,) and y32.dtype == jnp.int32  # integer labels for tanh
    assert jnp.array_equal(y32, y64)
    assert int(y32.min()) >= 0 and int(y32.max()) < cases[0].sizes[-1]
