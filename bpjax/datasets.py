"""Small data sets to train on: XOR, two spirals, scikit-learn's digits, or a user's ``.npz``.

A :class:`Dataset` holds host (NumPy) arrays: inputs ``x`` of shape ``(n, n_0)`` in float32 and
targets ``y`` that are either integer class labels of shape ``(n,)`` (a classification set, with
``num_classes`` classes) or float32 regression targets of shape ``(n, n_L)``
(``num_classes is None``). The built-in sets are deterministic: the same call gives the same
numbers on every machine.

=========  ======  =====  ========  ==================================================
name       n       n_0    classes   what
=========  ======  =====  ========  ==================================================
xor        200     2      2         Gaussian blobs (σ = 0.25) at the four corners
                                    (±1, ±1); class 1 where exactly one coordinate
                                    is positive: XOR, with room for a held-out split
spirals    400     2      2         two interleaved spirals of 1.75 turns with a
                                    little noise, the classic hard case for an MLP
digits     1797    64     10        scikit-learn's bundled 8×8 handwritten digits,
                                    pixels 0–16 (no download)
=========  ======  =====  ========  ==================================================

A ``.npz`` file (:func:`load_npz`) needs arrays ``x`` and ``y`` with one row per example.
``x`` is ``(n, n_0)`` (or ``(n, d_1, d_2, ...)``, flattened to ``(n, d_1 d_2 ...)``), real and
finite, also in float32 (the data are trained in float32: a float64 ``1e300`` would be ``inf``);
so are float targets ``y``. ``y`` decides the task:

- integer (or boolean) ``(n,)``, or ``(n, 1)`` (labels saved as a column, read as ``(n,)``):
  class labels ``0 … K−1``, ``K = max(y) + 1 ≥ 2``, with
  ``K ≤ MAX_CLASSES`` (10 000) and ``K ≤ CLASSES_PER_EXAMPLE · n`` (10 per example): a network
  has one output per class, so a label that is really an identifier (``1e9``) would ask for a
  giant output layer; and ``n`` examples show at most ``n`` classes, so ``K`` ten times beyond
  them means labels that are not class indices ``0 … K−1`` (a subsample that misses some
  classes stays well inside it);
- one-hot rows ``(n, K)``, ``K ≥ 2`` (every entry 0 or 1, exactly one 1 per row): read as the
  labels ``argmax`` of each row; any other integer ``(n, K)`` is refused (save regression or
  multi-label targets as floats);
- any other float ``(n, n_L)``, or float ``(n,)`` (read as ``(n, 1)``): regression targets.

Inputs are standardised per feature with the training split's statistics
(:func:`fit_normalizer`): ``x̂ = (x − μ) / s`` with ``μ`` and ``s`` the training split's mean and
standard deviation, and ``s = 1`` for a constant feature (digits' always-blank border pixels),
so the held-out split sees exactly the transformation the network was trained on.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from typing import NamedTuple

import numpy as np

__all__ = [
    "CLASSES_PER_EXAMPLE",
    "DATASETS",
    "MAX_CLASSES",
    "Dataset",
    "Normalizer",
    "digits_dataset",
    "fit_normalizer",
    "load_dataset",
    "load_npz",
    "spirals_dataset",
    "split_dataset",
    "xor_dataset",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Examples as host arrays, one row each; ``len(data)`` is the number of examples.

    ``y`` holds integer class labels when ``num_classes`` is set, else regression targets.
    """

    x: np.ndarray  # (n, n_0) float32 inputs
    y: np.ndarray  # (n,) int32 labels in [0, num_classes), or (n, n_L) float32 targets
    num_classes: int | None  # K for labels; None for regression targets
    name: str  # "xor", "spirals", "digits" or the .npz path, for reports

    @property
    def num_features(self) -> int:
        """``n_0``, the width of an input row."""
        return int(self.x.shape[1])

    @property
    def num_outputs(self) -> int:
        """``n_L`` a network needs: the number of classes, or the regression targets' width."""
        return self.num_classes if self.num_classes is not None else int(self.y.shape[1])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: np.ndarray) -> Dataset:
        """The examples at ``index`` (an integer array), in that order."""
        return dataclasses.replace(self, x=self.x[index], y=self.y[index])


class Normalizer(NamedTuple):
    """A per-feature affine map ``x̂ = (x − mean) / scale`` fitted on training inputs."""

    mean: np.ndarray  # (n_0,) float32: μ, the training inputs' mean
    scale: np.ndarray  # (n_0,) float32: s, their standard deviation (1 for a constant feature)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(x − mean) / scale`` of inputs of shape ``(n, n_0)``, in float32."""
        return ((x - self.mean) / self.scale).astype(np.float32)

    @classmethod
    def identity(cls, num_features: int) -> Normalizer:
        """The map that leaves inputs of width ``num_features`` unchanged."""
        return cls(np.zeros(num_features, np.float32), np.ones(num_features, np.float32))


def fit_normalizer(x: np.ndarray) -> Normalizer:
    """The standardisation of inputs ``x`` of shape ``(n, n_0)``: per-feature mean and std.

    A feature whose standard deviation is below ``1e-8`` of its scale (constant on the training
    split) gets ``scale = 1``, so it stays ``x − μ = 0`` instead of dividing by zero.

    Example:
      >>> norm = fit_normalizer(np.array([[0.0, 5.0], [2.0, 5.0]]))
      >>> norm.mean.tolist(), norm.scale.tolist()
      ([1.0, 5.0], [1.0, 1.0])
      >>> norm(np.array([[2.0, 5.0]])).tolist()
      [[1.0, 0.0]]
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty array of shape (n, n_0), got {x.shape}.")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    constant = std <= 1e-8 * np.maximum(np.abs(mean), 1.0)
    scale = np.where(constant, 1.0, std)
    return Normalizer(mean.astype(np.float32), scale.astype(np.float32))


# -- the built-in data sets -------------------------------------------------------------------


def xor_dataset(n: int = 200, *, noise: float = 0.25, seed: int = 0) -> Dataset:
    """XOR with room for a held-out split: Gaussian blobs at the corners of the square.

    Example ``i`` sits at corner ``c = (2a − 1, 2b − 1)`` for bits ``(a, b) = (i mod 2, ⌊i/2⌋ mod
    2)``, plus noise ``N(0, noise² I)``; its label is ``a XOR b`` (class 1 where the corner's
    coordinates have opposite signs). No straight line separates the classes.

    Args:
      n: the number of examples, at least 4 (an equal share per corner when ``n`` is a multiple
        of 4).
      noise: the blobs' standard deviation; at ``0.25`` a point lands on the wrong side of an
        axis with probability ``6e-5``.
      seed: seeds the noise (the default gives the set ``bpjax train --data xor`` uses).

    Returns:
      A :class:`Dataset` with ``x`` of shape ``(n, 2)`` and labels of shape ``(n,)``.

    Example:
      >>> data = xor_dataset(8, noise=0.0)
      >>> data.x[:4].tolist(), data.y[:4].tolist()
      ([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], [0, 1, 1, 0])
    """
    if n < 4:
        raise ValueError(f"n: expected at least 4 examples (one per corner), got {n}.")
    i = np.arange(n)
    bits = np.stack([i % 2, (i // 2) % 2], axis=1)
    noise_xy = np.random.default_rng(seed).normal(0.0, noise, size=(n, 2))
    x = (2.0 * bits - 1.0 + noise_xy).astype(np.float32)
    y = (bits[:, 0] ^ bits[:, 1]).astype(np.int32)
    return Dataset(x, y, 2, "xor")


def spirals_dataset(
    n: int = 400, *, turns: float = 1.75, noise: float = 0.03, seed: int = 0
) -> Dataset:
    """Two interleaved spirals, the classic test of a network's capacity (Lang and Witbrock).

    Class ``c ∈ {0, 1}`` holds ``n/2`` points at evenly spaced ``t ∈ [0.05, 1]``, at radius ``t``
    and angle ``2π · turns · t + cπ`` (the second spiral is the first turned by half a turn),
    plus noise ``N(0, noise² I)``; the classes alternate.

    Args:
      n: the number of examples, even, at least 4.
      turns: how many times each spiral winds round the origin.
      noise: the standard deviation of the noise added to each point.
      seed: seeds the noise (the default gives the set ``bpjax train --data spirals`` uses).

    Returns:
      A :class:`Dataset` with ``x`` of shape ``(n, 2)`` in about ``[−1, 1]²`` and labels of
      shape ``(n,)``.
    """
    if n < 4 or n % 2:
        raise ValueError(f"n: expected an even number of examples, at least 4, got {n}.")
    t = np.linspace(0.05, 1.0, n // 2)
    t = np.repeat(t, 2)  # (n,): t of each example, the classes alternating
    y = np.tile(np.array([0, 1], np.int32), n // 2)
    angle = 2 * np.pi * turns * t + np.pi * y
    x = t[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = x + np.random.default_rng(seed).normal(0.0, noise, size=x.shape)
    return Dataset(x.astype(np.float32), y, 2, "spirals")


def digits_dataset() -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits: 1797 images, 10 classes, no download.

    Returns:
      A :class:`Dataset` with ``x`` of shape ``(1797, 64)`` (pixel intensities 0–16, row by row)
      and labels of shape ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return Dataset(
        np.asarray(digits.data, np.float32), np.asarray(digits.target, np.int32), 10, "digits"
    )


DATASETS = {"xor": xor_dataset, "spirals": spirals_dataset, "digits": digits_dataset}
"""The built-in data sets by name, each a function of no required arguments."""


# -- a user's .npz ----------------------------------------------------------------------------

MAX_CLASSES = 10_000
"""The most classes ``K = max(y) + 1`` integer labels of a ``.npz`` may ask for."""

CLASSES_PER_EXAMPLE = 10
"""Integer labels may ask for at most this many classes per example: ``K ≤ 10 n``."""


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """A :class:`Dataset` from a ``.npz`` file with arrays ``x`` and ``y`` (see the module doc).

    Args:
      path: the file, as written by ``np.savez(path, x=x, y=y)``.

    Returns:
      The examples: labels when ``y`` is integer ``(n,)`` or ``(n, 1)``, or one-hot ``(n, K)``,
      else float32 regression targets of shape ``(n, n_L)``.

    Raises:
      ValueError: the file is missing, unreadable or not an ``.npz`` archive; ``x`` or ``y`` is
        absent, not numeric, of the wrong rank, with a different number of rows, empty, or not
        finite (also once cast to float32); integer ``y`` ``(n, K ≥ 2)`` that is not one-hot;
        labels that are negative, of fewer than two classes, or of more than
        :data:`MAX_CLASSES` or ``CLASSES_PER_EXAMPLE · n`` classes. Each message is one line.
    """
    file = pathlib.Path(path)
    where = f"{str(path)!r}"
    if not file.exists():
        raise ValueError(f"no such file {where}; expected a .npz with arrays x and y.")
    if file.is_dir():
        raise ValueError(f"{where} is a directory; expected a .npz file with arrays x and y.")
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # numpy takes anything without a .npy or zip header for a pickle, which it may not load
        detail = "not a NumPy file" if "pickle" in str(error) else str(error)
        raise ValueError(f"{where} is not a .npz archive ({detail}).") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is a single .npy array, not a .npz archive with x and y.")
    with archive:
        missing = [name for name in ("x", "y") if name not in archive.files]
        if missing:
            raise ValueError(
                f"{where} has no array{'s' if len(missing) > 1 else ''} "
                f"{' or '.join(missing)}; it holds {', '.join(archive.files) or 'nothing'}, "
                "expected x (n, n_0) and y (n,) or (n, n_L)."
            )
        try:
            x, y = archive["x"], archive["y"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            # an object array (needs pickle) or a damaged member
            raise ValueError(f"{where}: x and y could not be read ({error}).") from None
    return _from_arrays(x, y, name=str(path))


def _from_arrays(x: np.ndarray, y: np.ndarray, *, name: str) -> Dataset:
    """Checks a user's ``x`` and ``y`` and puts them in :class:`Dataset` form."""
    for label, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ValueError(f"{name}: {label} must be numeric, got dtype {array.dtype}.")
        if np.issubdtype(array.dtype, np.complexfloating):
            raise ValueError(f"{name}: {label} must be real, got dtype {array.dtype}.")
    if x.ndim < 2:
        raise ValueError(f"{name}: x must have shape (n, n_0), one row per example, got {x.shape}.")
    if y.ndim not in (1, 2):
        raise ValueError(f"{name}: y must have shape (n,) or (n, n_L), got {y.shape}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x and y must have one row per example, got x {x.shape} and y {y.shape} "
            f"({x.shape[0]} ≠ {y.shape[0]} rows)."
        )
    if x.shape[0] == 0 or x[0].size == 0 or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(f"{name}: no data: x {x.shape}, y {y.shape}.")
    x = _float32(x.reshape(x.shape[0], -1), "x", name)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]  # labels saved as a column
        if y.ndim == 1:
            return Dataset(x, *_labels(y, name), name)
        _check_one_hot(y, name)  # integers are never regression targets
    y = _float32(y, "y", name)
    if y.ndim == 2 and y.shape[1] >= 2 and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        labels, _ = _labels(np.argmax(y, axis=1), name)
        return Dataset(x, labels, int(y.shape[1]), name)  # one-hot: K is the width
    return Dataset(x, y.reshape(y.shape[0], -1).astype(np.float32), None, name)


def _check_one_hot(y: np.ndarray, name: str) -> None:
    """Integer ``y`` of shape ``(n, K ≥ 2)`` must be one-hot rows."""
    one_hot = np.all((y == 0) | (y == 1), axis=1) & (np.count_nonzero(y, axis=1) == 1)
    if not np.all(one_hot):
        row = int(np.argmin(one_hot))
        shown = ", ".join(str(v) for v in y[row][:4].tolist())
        raise ValueError(
            f"{name}: integer y must be class labels (n,) or (n, 1), or one-hot rows (n, K); got "
            f"{y.shape}, whose row {row}, [{shown}{', …' if y.shape[1] > 4 else ''}], is not "
            "one-hot. Save regression or multi-label targets as floats."
        )


def _float32(array: np.ndarray, label: str, name: str) -> np.ndarray:
    """``array`` in float32, checked finite before the cast (NaN, ±inf) and after it: a value
    finite in float64 but beyond float32's range (``|v| > 3.4e38``) would become ``inf``."""
    _check_finite(array, label, name)
    with np.errstate(over="ignore"):  # the overflow is reported below, as an error
        cast = array.astype(np.float32)
    bad = ~np.isfinite(cast)
    if np.any(bad):
        row = int(np.argwhere(bad)[0][0])
        biggest = float(np.finfo(np.float32).max)
        raise ValueError(
            f"{name}: {label} has {np.sum(bad)} values beyond float32's range (the first in row "
            f"{row}, {float(array[np.nonzero(bad)][0]):.4g}); expected numbers of magnitude at "
            f"most {biggest:.4g}, as training runs in float32."
        )
    return cast


def _check_finite(array: np.ndarray, label: str, name: str) -> None:
    bad = ~np.isfinite(array)
    if np.any(bad):
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"{name}: {label} has {np.sum(bad)} NaN or infinite entries (the first in row {row}); "
            "expected finite numbers."
        )


def _labels(y: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Integer labels as int32 and their class count ``K``, checked (see the module doc)."""
    lo, hi = int(y.min()), int(y.max())  # Python ints: a uint64 label ≥ 2⁶³ keeps its value
    if lo < 0:
        raise ValueError(f"{name}: class labels y must be 0, 1, …, K−1, got a label {lo}.")
    if hi < 1:
        raise ValueError(f"{name}: y has a single class (every label is {hi}); need at least 2.")
    # checked before anything is sized by K: the network's output layer, one-hot rows
    limit = min(MAX_CLASSES, CLASSES_PER_EXAMPLE * len(y))
    if hi + 1 > limit:
        raise ValueError(
            f"{name}: class labels y ask for K = max(y) + 1 classes, one network output each, "
            f"and K may be at most {MAX_CLASSES:,} and at most {CLASSES_PER_EXAMPLE} per example "
            f"({CLASSES_PER_EXAMPLE * len(y):,} for these {len(y):,}); got a label {hi:,}, "
            f"K = {hi + 1:,}."
        )
    return y.astype(np.int32), hi + 1


def load_dataset(source: str | os.PathLike[str]) -> Dataset:
    """A built-in data set by name (``xor``, ``spirals``, ``digits``) or a ``.npz`` path.

    Raises:
      ValueError: ``source`` is neither a built-in name nor a readable ``.npz`` (see
        :func:`load_npz`).

    Example:
      >>> data = load_dataset("xor")
      >>> data.x.shape, data.num_classes, data.num_outputs
      ((200, 2), 2, 2)
    """
    name = os.fspath(source)
    if name in DATASETS:
        return DATASETS[name]()
    if not pathlib.Path(name).exists() and not name.endswith(".npz"):
        raise ValueError(
            f"unknown data set {name!r}; expected one of {', '.join(DATASETS)} or a path to a "
            ".npz file with arrays x and y."
        )
    return load_npz(name)


def split_dataset(data: Dataset, test_fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A random split into training and held-out examples.

    A seeded permutation of the rows: the first ``round(test_fraction · n)`` go to the held-out
    split, the rest to training. ``test_fraction = 0`` holds nothing out (an empty held-out set).

    Args:
      data: the examples.
      test_fraction: the share held out, in ``[0, 1)``.
      seed: seeds the permutation.

    Returns:
      ``(train, test)``.

    Raises:
      ValueError: ``test_fraction`` outside ``[0, 1)``, or a split that leaves either side empty
        (a positive fraction of too few examples).

    Example:
      >>> train, test = split_dataset(xor_dataset(200), 0.25)
      >>> len(train), len(test)
      (150, 50)
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in [0, 1), got {test_fraction}.")
    n = len(data)
    n_test = round(test_fraction * n)
    if n - n_test < 1 or (test_fraction > 0 and n_test < 1):
        raise ValueError(
            f"test_fraction: holding out {test_fraction} of {n} examples leaves "
            f"{n - n_test} to train on and {n_test} held out; both need at least one."
        )
    order = np.random.default_rng(seed).permutation(n)
    return data.take(order[n_test:]), data.take(order[:n_test])
