"""``bpjax train`` refuses data it cannot train on, before building anything, in one line.

Labels that ask for a giant output layer, float targets a cross-entropy loss is not defined on,
NaN or infinite values. None of these runs reaches a training step.
"""

from __future__ import annotations

import numpy as np
import pytest

from bpjax import datasets
from bpjax import train as train_module
from bpjax.cli import main
from bpjax.cli.models import (
    PROBABILITY_ROW_TOLERANCE,
    OptionError,
    check_targets,
    probability_rows,
)
from bpjax.cli.train import EXIT_USAGE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    x = np.random.default_rng(0).normal(size=(20, 3))
    np.savez(root / "huge_label.npz", x=x[:4], y=np.array([0, 1, 2, 10**9]))
    np.savez(root / "over_limit.npz", x=np.zeros((2000, 1)), y=np.arange(2000) * 6)
    np.savez(root / "sparse.npz", x=x[:4], y=np.array([0, 1, 2, 40]))
    np.savez(root / "real.npz", x=x, y=np.random.default_rng(1).normal(size=(20, 2)))
    rows = np.full((20, 2), 0.5)
    rows[3] = [0.5, 0.7]
    np.savez(root / "not_rows.npz", x=x, y=rows)
    np.savez(root / "inf_y.npz", x=x[:4], y=np.array([0.0, 1.0, np.inf, 2.0]))
    np.savez(root / "nan_x.npz", x=np.array([[1.0], [np.nan]]), y=np.array([0, 1]))
    np.savez(root / "int_rows.npz", x=x[:3], y=np.array([[0, 1], [1, 0], [2, 0]]))
    np.savez(root / "u64.npz", x=x[:2], y=np.array([0, 2**64 - 1], np.uint64))
    np.savez(root / "big_x.npz", x=np.array([[1.0], [2.0], [-1e300]]), y=np.array([0, 1, 0]))
    np.savez(root / "big_y.npz", x=x[:3], y=np.array([[0.0], [1e39], [1.0]]))
    return root


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        pytest.fail("trained on data that should have been refused")

    monkeypatch.setattr(train_module, "fit", fit)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--data", "{d}/huge_label.npz"],
            "argument --data: {d}/huge_label.npz: class labels y ask for K = max(y) + 1 classes, "
            "one network output each, and K may be at most 10,000 and at most 10 per example (40 "
            "for these 4); got a label 1,000,000,000, K = 1,000,000,001.",
        ),
        (["--data", "{d}/over_limit.npz"], "at most 10,000 and at most 10 per example (20,000"),
        (  # the label as it is, not wrapped to -1 by a cast to int64
            ["--data", "{d}/u64.npz"],
            "got a label 18,446,744,073,709,551,615, K = 18,446,744,073,709,551,616.",
        ),
        (["--data", "{d}/sparse.npz"], "(40 for these 4); got a label 40, K = 41."),
        (
            ["--data", "{d}/real.npz", "--loss", "cross_entropy"],
            "argument --data: {d}/real.npz: y holds float targets (20, 2) that cross_entropy "
            "(--loss cross_entropy) is not defined on: 20 rows such as row 0, [0.3456, 0.8216] "
            "(sum 1.167); expected integer class labels (n,), one-hot rows, or rows of "
            "non-negative entries summing to 1, both within 2e-06, or the squared_error loss for "
            "regression targets",
        ),
        (
            ["--data", "{d}/not_rows.npz", "--loss", "cross_entropy", "--model", "mlp"],
            "1 rows such as row 3, [0.5, 0.7] (sum 1.2)",
        ),
        (
            ["--data", "{d}/real.npz", "--loss", "binary_cross_entropy"],
            "that binary_cross_entropy (--loss binary_cross_entropy) is not defined on: 13 rows "
            "such as row 1, [0.3304, -1.303]; expected targets in [0, 1]",
        ),
        (
            ["--data", "{d}/inf_y.npz"],
            "argument --data: {d}/inf_y.npz: y has 1 NaN or infinite entries (the first in row "
            "2); expected finite numbers.",
        ),
        (["--data", "{d}/nan_x.npz"], "x has 1 NaN or infinite entries (the first in row 1)"),
        (  # finite in float64, inf in float32: refused, not trained on as inf
            ["--data", "{d}/big_x.npz"],
            "argument --data: {d}/big_x.npz: x has 1 values beyond float32's range (the first in "
            "row 2, -1e+300); expected numbers of magnitude at most 3.403e+38, as training runs "
            "in float32.",
        ),
        (  # integers are labels or one-hot rows, never regression targets
            ["--data", "{d}/int_rows.npz"],
            "argument --data: {d}/int_rows.npz: integer y must be class labels (n,) or (n, 1), "
            "or one-hot rows (n, K); got (3, 2), whose row 2, [2, 0], is not one-hot. Save "
            "regression or multi-label targets as floats.",
        ),
        (["--data", "{d}/big_y.npz"], "y has 1 values beyond float32's range (the first in row 1"),
    ],
)
def test_bad_data_exit_2_with_one_line(argv, message, files, capsys, no_training):
    argv = [arg.replace("{d}", str(files)) for arg in argv]
    code = main(["train", *argv])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE and captured.out == ""
    assert "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("bpjax train: error: ")
    assert message.replace("{d}", str(files)) in last


def test_labels_up_to_the_limits_are_classes(tmp_path):
    assert datasets.MAX_CLASSES == 10_000 and datasets.CLASSES_PER_EXAMPLE == 10
    np.savez(tmp_path / "edge.npz", x=np.zeros((3, 1)), y=np.array([0, 1, 29]))  # 10 × 3 = 30
    assert datasets.load_dataset(tmp_path / "edge.npz").num_classes == 30


def test_integer_labels_saved_as_a_column_are_labels(tmp_path, capsys, monkeypatch):
    x = np.random.default_rng(0).normal(size=(12, 3))
    np.savez(tmp_path / "col.npz", x=x, y=(np.arange(12) % 3).reshape(-1, 1))
    data = datasets.load_dataset(tmp_path / "col.npz")
    assert data.num_classes == 3 and data.y.shape == (12,)
    assert np.array_equal(data.y, np.arange(12) % 3)

    def fit(*args, **kwargs):  # the summary line is all this needs: stop at the first step
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", fit)
    main(["train", "--data", str(tmp_path / "col.npz")])
    # a 3-class classifier, not squared-error regression on one output
    assert "MLP 3-128-3 relu→softmax, cross_entropy" in capsys.readouterr().out


def _rows(y: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset(np.zeros((len(y), 1), np.float32), y, None, "rows")


def test_probability_rows_pass_within_the_tolerance():
    # float32 softmax rows of any width: each within the derived bound of summing to 1
    for width in (2, 10, 1000):
        z = np.random.default_rng(width).normal(scale=5.0, size=(64, width)).astype(np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        check_targets("cross_entropy", _rows(e / e.sum(axis=1, keepdims=True)), "p", "--loss")
    tolerance = PROBABILITY_ROW_TOLERANCE * 2
    check_targets("cross_entropy", _rows(np.array([[0.5, 0.5 + tolerance / 2]])), "p", "--loss")
    with pytest.raises(OptionError, match="summing to 1, both within 2e-06"):
        check_targets("cross_entropy", _rows(np.array([[0.5, 0.5 + 2 * tolerance]])), "p", "-")
    with pytest.raises(OptionError, match=r"row 0, \[1\.1, -0\.1\]"):  # sums to 1, but negative
        check_targets("cross_entropy", _rows(np.array([[1.1, -0.1]])), "p", "--loss")
    check_targets("squared_error", _rows(np.array([[1.1, -0.1]])), "p", "--loss")  # any target


def test_entries_a_rounding_below_0_pass_and_train_as_0(tmp_path, capsys, monkeypatch):
    tolerance = PROBABILITY_ROW_TOLERANCE * 3
    rows = np.array([[1 + 1e-9, -1e-9, 0.0], [0.5, 0.5 + tolerance / 2, -tolerance / 2]])
    check_targets("cross_entropy", _rows(rows), "p", "--loss")
    assert probability_rows("cross_entropy", _rows(rows)).y.min() == 0.0
    assert probability_rows("squared_error", _rows(rows)).y.min() < 0  # regression: as it is
    with pytest.raises(OptionError, match=r"row 0, \[1, -6e-06, 0\]"):  # beyond the tolerance
        check_targets("cross_entropy", _rows(np.array([[1.0, -2 * tolerance, 0.0]])), "p", "-")
    # the command trains on the clipped rows, both splits
    p = np.random.default_rng(1).dirichlet(np.ones(3), size=20)
    p[:, 0] += p[:, 2] + 1e-9
    p[:, 2] = -1e-9
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).normal(size=(20, 3)), y=p)
    seen = []

    def fit(net, params, training, *args, test, **kwargs):
        seen.extend([training.y, test.y])
        raise KeyboardInterrupt  # stop before any step

    monkeypatch.setattr(train_module, "fit", fit)
    main(["train", "--data", str(tmp_path / "p.npz"), "--loss", "cross_entropy"])
    assert "cross_entropy" in capsys.readouterr().out
    assert len(seen) == 2 and all(y.min() == 0.0 for y in seen)
