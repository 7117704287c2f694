"""The `bpjax` command line: the check matrix and its table, failures, help and bad options.

The MLP rows and the layer rows (``bpjax.cli.networks``) both; `bpjax train` is in test_train.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.cli import LAYER_NETWORKS, build_layer_matrix, build_matrix, layer_case_data, main
from bpjax.cli.networks import layer_names
from bpjax.cli.runner import workers
from bpjax.layers import AvgPool2D, Dense

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
            "--no-layers",
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
            "--no-layers",
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
            "--no-layers",
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
        "--no-mlp",
        "--layers",
        "--no-layers",
    ):
        assert option in out
    assert "jax.grad" in out
    assert "differences" in out
    for name in LAYER_NETWORKS:
        assert name in out
    assert "maxpool2d (MaxPool2D → Dense), " in _words(out)


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
        (["check", "--layers", "conv2d,conv3d"], "argument --layers: unknown layer 'conv3d'"),
        (
            ["check", "--layers", "lstm", "--no-layers"],
            "argument --no-layers: not allowed with argument --layers",
        ),
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
    assert main([*argv, "--no-layers"]) == 2
    out = capsys.readouterr().out
    assert "skipped tanh × cross_entropy" in out
    assert "nothing to check" in out
    assert main(["check", "--no-mlp", "--no-layers"]) == 2
    assert "nothing to check" in capsys.readouterr().out


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
    (net, p32, x32, y32), (_, p64, x64_, y64) = (cli.case_data(case) for case in cases)
    assert net.sizes == cases[0].sizes
    assert p32[0]["W"].dtype == x32.dtype == jnp.float32
    assert p64[0]["W"].dtype == x64_.dtype == jnp.float64
    for a, b in ((p32[0]["W"], p64[0]["W"]), (p32[0]["b"], p64[0]["b"]), (x32, x64_)):
        assert jnp.array_equal(a.astype(jnp.float64), b)
    assert y32.shape == (6,) and y32.dtype == jnp.int32  # integer labels for tanh
    assert jnp.array_equal(y32, y64)
    assert int(y32.min()) >= 0 and int(y32.max()) < cases[0].sizes[-1]


# -- the layer rows ------------------------------------------------------------------------------


def test_the_layer_rows():
    cases = build_layer_matrix(
        tuple(LAYER_NETWORKS), dtypes=("float32", "float64"), batch=12, seed=0
    )
    assert [(c.layer, c.dtype) for c in cases] == [
        (name, dtype) for name in LAYER_NETWORKS for dtype in ("float32", "float64")
    ]
    assert [spec.label for spec in LAYER_NETWORKS.values()] == [
        "Conv2D", "MaxPool2D", "AvgPool2D", "LayerNorm", "Residual", "Embedding", "Dropout",
        "Elman", "LSTM",
    ]  # fmt: skip
    for case in cases:  # the layer under test is in its network, named as the row is
        assert case.network.label in layer_names(case)
    # float32 and float64 check the same network, and each layer has a seed of its own
    seeds = {}
    for case in cases:
        seeds.setdefault(case.layer, set()).add(case.seed)
    assert all(len(s) == 1 for s in seeds.values())
    assert len({s for (s,) in seeds.values()}) == len(LAYER_NETWORKS)
    # a selection reproduces the full matrix's rows, whatever order it names them in
    part = build_layer_matrix(("lstm", "conv2d"), dtypes=("float64",), batch=12, seed=0)
    assert part == [c for c in cases if c.layer in ("conv2d", "lstm") and c.dtype == "float64"]


def test_the_layer_rows_spread_over_the_workers_in_pairs():
    cases = build_layer_matrix(("lstm",), dtypes=("float32", "float64"), batch=4, seed=0)
    assert workers(cases, 2) == 1  # a layer's float32 and float64 rows stay together
    cases = build_layer_matrix(
        tuple(LAYER_NETWORKS), dtypes=("float32", "float64"), batch=4, seed=0
    )
    assert workers(cases, 2) == 2
    assert workers(cases, 1) == 1


def test_layer_case_data_float32_and_float64_share_the_numbers(x64):
    for name, spec in LAYER_NETWORKS.items():
        c32, c64 = build_layer_matrix((name,), dtypes=("float32", "float64"), batch=3, seed=1)
        # (layer_case_data also checks the network's output shape against the row's)
        net, p32, x32, y32, key32 = layer_case_data(c32)
        _, p64, x64_, y64, key64 = layer_case_data(c64)
        assert net.input_shape == spec.input_shape
        for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p64), strict=True):
            assert a.dtype == jnp.float32 and b.dtype == jnp.float64
            assert jnp.array_equal(a.astype(jnp.float64), b)
        assert x32.shape == x64_.shape == (3, *spec.input_shape)
        assert x32.dtype == (jnp.int32 if spec.tokens else jnp.float32)
        assert jnp.array_equal(x32.astype(x64_.dtype), x64_)
        assert jnp.array_equal(y32.astype(y64.dtype), y64)
        assert y32.shape == (3, *spec.output_shape)
        if spec.key:
            assert jnp.array_equal(jax.random.key_data(key32), jax.random.key_data(key64))
        else:
            assert key32 is key64 is None


def test_layer_rows_pass_in_both_dtypes(capsys):
    code = main(
        [
            "check",
            "--no-mlp",
            "--layers", "avgpool2d,embedding",
            "--repeats", "1",
            "--jobs", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all 4 cases passed" in out
    for label, loss, y, sizes in (
        ("AvgPool2D", "squared_error", "reals", "4×4×2→2×2×3"),
        ("Embedding", "squared_error", "reals", "5→5×3"),
    ):
        rows = _rows(out, label)
        assert [row.split()[:5] for row in rows] == [
            [label, loss, y, dtype, sizes] for dtype in ("f32", "f64")
        ], rows
        for row in rows:
            assert row.rstrip().endswith("ok"), row
            assert "–" not in row, row  # every error (Embedding: its δ, no ∂x) and time
            assert 1.5 <= float(row.split()[11]) <= 2.5  # the Taylor order
    assert "Rows named by a layer" in _words(out)


@dataclasses.dataclass(frozen=True)
class BrokenAvgPool2D(AvgPool2D):
    """AvgPool2D with the planted bug: the ∂C/∂x it hands down is 1% too large."""

    def backward(self, params, cache, dy):
        grads, dx = super().backward(params, cache, dy)
        return grads, 1.01 * dx


def _broken_avgpool_network():
    return BrokenAvgPool2D(3, 2, "SAME"), Dense(3)


def test_a_wrong_layer_backward_fails_and_prints_the_report(capsys, monkeypatch):
    spec = LAYER_NETWORKS["avgpool2d"]
    monkeypatch.setitem(LAYER_NETWORKS, "avgpool2d", spec._replace(layers=_broken_avgpool_network))
    code = main(
        [
            "check",
            "--no-mlp",
            "--layers", "avgpool2d",
            "--dtype", "float64",
            "--no-timing",
            "--jobs", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "1 of 1 cases FAILED" in out
    (row,) = _rows(out, "AvgPool2D")
    assert row.rstrip().endswith("FAIL")
    words = _words(out)
    assert "FAILED AvgPool2D (avgpool2d), float64, layers BrokenAvgPool2D → Dense" in words
    # the report in full: the input gradient is wrong, the params' gradients above are right
    assert "input_grad" in out
    assert "∂C/∂x is wrong: look at the dx of layer 1 (BrokenAvgPool2D)'s backward" in words
