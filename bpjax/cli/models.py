"""``bpjax train --model``: the networks the command builds or loads, names and saves.

``--model`` is ``mlp`` (a Dense stack from ``--hidden``/``--sizes``/``--activations``), ``cnn``
(:func:`build_cnn`, a small CNN for images) or a Python spec ``path/to/file.py:NAME``
(:func:`load_network`: NAME is a :class:`bpjax.Serial` network, or a zero-argument callable that
returns one). A network is checked against the data before any step (:func:`check_fits`), so a
mismatch is a one-line error (:class:`OptionError`, exit status 2) that names the option.

Inputs of several axes (an image ``(H, W, C)``) are standardised per channel, with statistics
pooled over the positions (:func:`input_normalizer`); flat inputs per feature. Params of any
network are saved as named arrays (:func:`params_arrays`, read back by :func:`params_from_arrays`):
``params[l][k]`` is ``k{l}``, so an MLP's are ``W0, b0, W1, b1, …`` as before.

Heavy imports (jax, bpjax's layers) happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import sys
from typing import Any

__all__ = [
    "MODELS",
    "OUTPUT_ACTIVATION",
    "PROBABILITY_ROW_TOLERANCE",
    "OptionError",
    "build_cnn",
    "build_mlp",
    "check_fits",
    "check_targets",
    "cnn_input_shape",
    "default_loss",
    "describe_network",
    "image_shape",
    "input_normalizer",
    "layer_summary",
    "load_network",
    "model_label",
    "model_option",
    "network_record",
    "params_arrays",
    "params_from_arrays",
    "probability_rows",
    "split_spec",
]

MODELS = ("mlp", "cnn")
"""The built-in models; anything else given to ``--model`` is a ``path/to/file.py:NAME`` spec."""

OUTPUT_ACTIVATION = {
    "cross_entropy": "softmax",
    "binary_cross_entropy": "sigmoid",
    "squared_error": "identity",
}
"""The output activation that goes with each loss (the fused pairs of :mod:`bpjax.losses`)."""


class OptionError(Exception):
    """A bad option or data file found after parsing: ``argument --OPTION: why``, exit status 2."""


# -- parsing ----------------------------------------------------------------------------------


def split_spec(text: str) -> tuple[str, str]:
    """``path/to/file.py:NAME`` as ``(path, NAME)``; the last ``:`` splits (``C:\\`` paths)."""
    path, _, name = text.rpartition(":")
    return path, name


def model_option(text: str) -> str:
    """``--model``: ``mlp``, ``cnn`` or ``path/to/file.py:NAME``, returned as given."""
    if text in MODELS:
        return text
    path, name = split_spec(text)
    if not path or not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(MODELS)} or a Python spec path/to/file.py:NAME (NAME a network "
            f"or a function that returns one), got {text!r}"
        )
    return text


def image_shape(text: str) -> tuple[int, int, int]:
    """``--input-shape``: ``H,W,C``, one image's height, width and channels, each positive."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected an image shape H,W,C (three positive integers) like 8,8,1, got {text!r}"
        )
    return shape[0], shape[1], shape[2]


def model_label(model: str) -> str:
    """What the summary line calls the model: ``MLP``, ``CNN`` or the spec's ``file.py:NAME``."""
    if model in MODELS:
        return model.upper()
    path, name = split_spec(model)
    return f"{pathlib.Path(path).name}:{name}"


# -- building ---------------------------------------------------------------------------------


def default_loss(data: Any, loss: str | None, source: str) -> str:
    """``loss``, or the default for ``data``: cross_entropy for class labels, else squared_error.

    Raises:
      OptionError: cross_entropy on a single regression target.
    """
    loss = loss or ("cross_entropy" if data.num_classes is not None else "squared_error")
    if loss == "cross_entropy" and data.num_classes is None and data.num_outputs < 2:
        raise OptionError(
            f"argument --loss: cross_entropy needs class labels or probability rows, but "
            f"{source} has one regression target per example; use squared_error"
        )
    return loss


# A probability row stored in float32: rounding each p_j moves it by ≤ u·p_j (u = 2⁻²⁴ ≈ 6e-8),
# the row's sum by ≤ u; a row normalised in float32 (p_j = e_j / S, S a float32 sum of K terms,
# off by ≤ (K − 1)u·S) sums to 1 within about 2K·u ≈ 1.2e-7·K. 1e-6·K is 8× that: any
# probability row passes, and regression targets (which sum to anything) almost never do. An entry
# written as 1 − (the sum of the others) is off by the same ≤ 2K·u, so it may come out below 0 by
# that much: entries down to −1e-6·K pass too, and are set to 0 (probability_rows).
PROBABILITY_ROW_TOLERANCE = 1e-6
"""Float targets for cross_entropy must sum to 1 per row within this times the row's width K,
and each entry be at least minus that (set to 0)."""


def _row_text(row: Any) -> str:
    shown = ", ".join(f"{v:.4g}" for v in row[:4])
    return f"[{shown}{', …' if len(row) > 4 else ''}]"


def check_targets(loss: str, data: Any, source: str, chosen_by: str) -> None:
    """Float targets that ``loss`` is defined on: for cross_entropy, rows of probabilities
    (non-negative and summing to 1, both within ``PROBABILITY_ROW_TOLERANCE · K``: see
    :func:`probability_rows` for the entries just below 0); for binary_cross_entropy, entries in
    ``[0, 1]``. Class labels (``data.num_classes`` set) pass.

    Args:
      loss: the network's loss name.
      data: the :class:`bpjax.datasets.Dataset`.
      source: ``--data`` as given, for the message.
      chosen_by: what chose the loss, for the message: ``--loss cross_entropy``, ``net.py:NET``.

    Raises:
      OptionError: ``argument --data: …`` naming the first bad row, what came and what was
        expected; otherwise training would minimise a loss that is not one (cross_entropy of
        real-valued targets has no minimum: it went to −0.14 and on).
    """
    import numpy as np

    if data.num_classes is not None or loss not in ("cross_entropy", "binary_cross_entropy"):
        return
    y = np.asarray(data.y, np.float64)
    tolerance = PROBABILITY_ROW_TOLERANCE * y.shape[1]
    if loss == "binary_cross_entropy":
        bad = np.any((y < 0) | (y > 1), axis=1)
    else:
        bad = np.any(y < -tolerance, axis=1) | (np.abs(y.sum(axis=1) - 1) > tolerance)
    if not np.any(bad):
        return
    row = int(np.argmax(bad))
    if loss == "binary_cross_entropy":
        got = _row_text(y[row])
        expected = "targets in [0, 1] (probabilities of each output)"
    else:
        got = f"{_row_text(y[row])} (sum {y[row].sum():.4g})"
        expected = (
            "integer class labels (n,), one-hot rows, or rows of non-negative entries summing "
            f"to 1, both within {tolerance:.0e}"
        )
    raise OptionError(
        f"argument --data: {source}: y holds float targets {tuple(y.shape)} that {loss} "
        f"({chosen_by}) is not defined on: {np.sum(bad):,} rows such as row {row}, {got}; "
        f"expected {expected}, or the squared_error loss for regression targets"
    )


def probability_rows(loss: str, data: Any) -> Any:
    """``data`` with the entries of cross_entropy's probability rows that
    :func:`check_targets` let through below 0 (by at most ``PROBABILITY_ROW_TOLERANCE · K``:
    rounding) set to 0; any other data as it is."""
    import dataclasses

    import numpy as np

    if data.num_classes is not None or loss != "cross_entropy" or not np.any(data.y < 0):
        return data
    return dataclasses.replace(data, y=np.maximum(data.y, 0).astype(data.y.dtype))


def build_mlp(
    data: Any,
    source: str,
    *,
    sizes: tuple[int, ...] | None,
    hidden: tuple[int, ...],
    activations: tuple[str, ...],
    loss: str,
) -> Any:
    """The ``--model mlp`` network: :class:`bpjax.MLP` from ``--sizes`` or ``--hidden``.

    ``activations`` is one name for every hidden layer, one per hidden layer, or one per layer
    (the output's last); otherwise the output's follows the loss (:data:`OUTPUT_ACTIVATION`).

    Raises:
      OptionError: sizes that do not run from the data's features to its outputs, the wrong
        number of activations, or an activation the loss is not defined on.
    """
    import bpjax as bp

    n_in, n_out = data.num_features, data.num_outputs
    if sizes is not None:
        if sizes[0] != n_in or sizes[-1] != n_out:
            what = (
                f"{data.num_classes} classes"
                if data.num_classes is not None
                else f"{n_out} targets"
            )
            raise OptionError(
                f"argument --sizes: {source} has {n_in} features and {what}, so the sizes "
                f"must run {n_in},…,{n_out}; got {','.join(map(str, sizes))}"
            )
    else:
        sizes = (n_in, *hidden, n_out)
    depth = len(sizes) - 2
    if len(activations) == 1:
        names = (activations[0],) * depth + (OUTPUT_ACTIVATION[loss],)
    elif len(activations) == depth:
        names = (*activations, OUTPUT_ACTIVATION[loss])
    elif len(activations) == depth + 1:
        names = activations
    else:
        raise OptionError(
            f"argument --activations: expected 1 name, {depth} (one per hidden layer) or "
            f"{depth + 1} (one per layer) for sizes {','.join(map(str, sizes))}, got "
            f"{len(activations)}: {','.join(activations)}"
        )
    try:
        return bp.MLP(sizes, names, loss)
    except (ValueError, TypeError) as error:
        raise OptionError(f"argument --activations/--loss: {error}") from None


def cnn_input_shape(
    requested: tuple[int, ...] | None, num_features: int, source: str
) -> tuple[int, ...]:
    """The image shape ``(H, W, C)`` for ``--model cnn``.

    ``--input-shape`` if given (its size must be the data's features); else a square
    single-channel image ``(s, s, 1)`` when the features are a perfect square ``s²`` (digits:
    ``8×8×1``). The CNN pools twice by 2, so H and W must be at least 4.

    Raises:
      OptionError: no shape given and none to infer, a size that is not the features', or an
        image smaller than 4×4.
    """
    if requested is None:
        side = math.isqrt(num_features)
        if side * side != num_features:
            raise OptionError(
                f"argument --input-shape: --model cnn needs the image shape H,W,C of {source}'s "
                f"{num_features} features (not a square number, so not inferred as H,H,1)"
            )
        shape: tuple[int, ...] = (side, side, 1)
    else:
        shape = tuple(requested)
        if math.prod(shape) != num_features:
            raise OptionError(
                f"argument --input-shape: {'×'.join(map(str, shape))} is {math.prod(shape)} "
                f"values per example, but {source} has {num_features} features"
            )
    if min(shape[:2]) < 4:
        raise OptionError(
            f"argument --input-shape: the CNN pools twice by 2, so it needs images of at least "
            f"4×4; got {'×'.join(map(str, shape))}"
        )
    return shape


def build_cnn(input_shape: tuple[int, ...], n_out: int, loss: str) -> Any:
    """The ``--model cnn`` network, that of ``tests/test_digits_cnn.py``.

    Conv2D(8, 3×3, SAME, relu) → MaxPool2D(2) → Conv2D(16, 3×3, SAME, relu) → MaxPool2D(2) →
    Flatten → Dense(n_out) with the output activation of ``loss`` (softmax for cross_entropy).
    """
    import bpjax as bp
    from bpjax.layers import Conv2D, Dense, Flatten, MaxPool2D

    return bp.serial(
        Conv2D(8, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Conv2D(16, 3, padding="SAME", activation="relu"),
        MaxPool2D(2),
        Flatten(),
        Dense(n_out, OUTPUT_ACTIVATION[loss]),
        loss=loss,
        input_shape=input_shape,
    )


def load_network(spec: str) -> Any:
    """The network of a Python spec ``path/to/file.py:NAME``.

    The file is imported as a module (``importlib``, under the name ``bpjax_model_<stem>``);
    NAME is a :class:`bpjax.Serial` (``bp.serial(..., loss=, input_shape=)`` or ``bp.MLP``), or a
    callable that takes no arguments and returns one.

    Raises:
      OptionError: ``argument --model: …`` for a missing file, one that raises on import, no
        NAME in it, or a NAME that is not (and does not return) a network.
    """
    import importlib.machinery
    import importlib.util

    path_text, name = split_spec(spec)
    path = pathlib.Path(path_text)
    if not path.exists():
        raise OptionError(f"argument --model: no such file {path_text!r}")
    if not path.is_file():
        raise OptionError(f"argument --model: {path_text!r} is not a file; expected a .py file")
    module_name = "bpjax_model_" + re.sub(r"\W", "_", path.stem)
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    module_spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    assert module_spec is not None  # a loader is given
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickle look the module up there
    try:
        loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[module_name]
        raise OptionError(
            f"argument --model: importing {path_text}{_where(error, path)} raised "
            f"{type(error).__name__}: {error}"
        ) from None
    if not hasattr(module, name):
        raise OptionError(f"argument --model: {path_text} has no {name!r}; {_candidates(module)}")
    value = getattr(module, name)
    what = f"{path_text}:{name}"
    if _is_network(value):
        return value
    if callable(value) and not isinstance(value, type):
        try:
            value = value()
        except Exception as error:
            raise OptionError(
                f"argument --model: calling {what}() raised {type(error).__name__}: {error}; "
                "expected a function of no arguments that returns a network"
            ) from None
        if _is_network(value):
            return value
        what += "()"
    raise OptionError(f"argument --model: {what} is {_not_a_network(value)}")


def _is_network(value: Any) -> bool:
    from bpjax.network import Serial

    return isinstance(value, Serial)


def _not_a_network(value: Any) -> str:
    from bpjax.layers import Sequential

    if isinstance(value, Sequential):
        return (
            "a serial(...) without loss= and input_shape=, a layer rather than a network; "
            "give it loss= and input_shape="
        )
    kind = f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__
    return (
        f"{kind}, not a network; expected bp.serial(..., loss=, input_shape=), a bp.MLP, "
        "or a function of no arguments that returns one"
    )


def _where(error: BaseException, path: pathlib.Path) -> str:
    """`` (line N)``: where in the spec file ``error`` was raised, if it was."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f" (line {error.lineno})"
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if pathlib.Path(traceback.tb_frame.f_code.co_filename) == path:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return "" if line is None else f" (line {line})"


def _candidates(module: Any) -> str:
    """The networks and the functions of no arguments the spec file defines, as a hint."""
    import inspect

    found = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if _is_network(value):
            found.append(key)
        elif inspect.isfunction(value) and value.__module__ == module.__name__:
            try:
                required = [
                    p
                    for p in inspect.signature(value).parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
            except (TypeError, ValueError):
                continue
            if not required:
                found.append(f"{key}()")
    if not found:
        return "it defines no network and no function of no arguments"
    return f"it defines {', '.join(found)}"


def check_fits(net: Any, data: Any, source: str, option: str) -> None:
    """``net`` takes ``data``'s rows and gives one output row per example, as :func:`bpjax.fit`
    requires; checked before training so that a mismatch is a one-line error.

    Raises:
      OptionError: ``argument --OPTION: …`` for a first layer that takes integer indices, an
        input size that is not the data's features, or outputs that are not the data's.
    """
    from bpjax.train import check_data

    try:
        check_data(net, data, source)
    except ValueError as error:
        raise OptionError(f"argument --{option}: {error}".rstrip(".")) from None


def input_normalizer(x: Any, input_shape: tuple[int, ...]) -> Any:
    """The standardisation of training inputs ``x`` (flat rows) for a network's input shape.

    Flat inputs ``(n_0,)``: per feature (:func:`bpjax.datasets.fit_normalizer`). Inputs of
    several axes, an image ``(H, W, C)``: per channel, the mean and standard deviation over every
    position of every example, repeated for each position, so every pixel of a channel is mapped
    alike (a convolution's kernel sees the same contrast everywhere). Either way a
    :class:`bpjax.datasets.Normalizer` of the flat rows: ``x̂ = (x − mean) / scale``.
    """
    import numpy as np

    from bpjax import datasets

    if len(input_shape) == 1:
        return datasets.fit_normalizer(x)
    channels = input_shape[-1]
    per_channel = datasets.fit_normalizer(np.asarray(x).reshape(-1, channels))
    positions = math.prod(input_shape[:-1])
    return datasets.Normalizer(
        np.tile(per_channel.mean, positions), np.tile(per_channel.scale, positions)
    )


# -- naming and saving ------------------------------------------------------------------------


def layer_summary(layer: Any) -> str:
    """``Dense(10, softmax)``, ``Conv2D(8, relu)``, ``Dropout(0.2)``, ``MaxPool2D``: a layer's
    name with its width (or rate) and its activation; a block lists its layers."""
    name = getattr(layer, "name", "") or type(layer).__name__
    inner = getattr(layer, "layers", None)
    if isinstance(inner, tuple) and inner:  # Residual, Sequential
        return f"{name}({'→'.join(map(layer_summary, inner))})"
    parts = []
    for field in ("n_out", "features", "hidden", "rate"):
        value = getattr(layer, field, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{value:g}")
            break
    activation = getattr(getattr(layer, "activation", None), "name", None)
    if isinstance(activation, str) and activation != "identity":
        parts.append(activation)
    return f"{name}({', '.join(parts)})" if parts else name


def describe_network(net: Any) -> str:
    """A short name for a network, for the summary line and the plot's title.

    An MLP: ``64-256-10 relu→softmax, cross_entropy``. Any other: its input shape and layers,
    ``8×8×1→Conv2D(8, relu)→MaxPool2D→…→Dense(10, softmax), cross_entropy``.
    """
    from bpjax.mlp import MLP

    if isinstance(net, MLP):
        names = [a.name for a in net.activations]
        hidden = sorted(set(names[:-1]))
        acts = "→".join([*hidden, names[-1]]) if len(hidden) == 1 else "→".join(names)
        return f"{'-'.join(map(str, net.sizes))} {acts}, {net.objective.name}"
    layers = "→".join(map(layer_summary, net.layers))
    shape = "×".join(map(str, net.input_shape))
    return f"{shape}→{layers}, {net.objective.name}"


def network_record(net: Any) -> dict[str, Any]:
    """history.json's ``net``: an MLP's sizes, activations and loss; any other network's layers
    (:func:`layer_summary`), loss, input shape and ``repr``."""
    from bpjax.mlp import MLP

    if isinstance(net, MLP):
        return {
            "sizes": list(net.sizes),
            "activations": [a.name for a in net.activations],
            "loss": net.objective.name,
        }
    return {
        "layers": [layer_summary(layer) for layer in net.layers],
        "loss": net.objective.name,
        "input_shape": list(net.input_shape),
        "repr": repr(net),
    }


def _key_text(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_names(paths: list[Any]) -> list[str]:
    """``params[l][k]`` → ``k{l}`` (``W0``, ``b0``, …); deeper ``params[l][i]…[k]`` →
    ``k{l}.i.…``; the paths as ``jax.tree_util.keystr`` writes them if those would clash."""
    import jax

    names = []
    for path in paths:
        parts = [_key_text(key) for key in path]
        if len(parts) >= 2:
            names.append(f"{parts[-1]}{parts[0]}" + "".join(f".{p}" for p in parts[1:-1]))
        else:
            names.append(f"params{parts[0]}" if parts else "params")
    if len(set(names)) == len(names):
        return names
    return [jax.tree_util.keystr(tuple(path)) for path in paths]


def params_arrays(params: Any) -> dict[str, Any]:
    """Every leaf of a network's params as a NumPy array, named by its path (see
    :func:`params_from_arrays`): an MLP's ``W0, b0, W1, b1, …``, a CNN's ``W0, b0, W2, b2, W5,
    b5`` (the layer's position in ``params``)."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = _leaf_names([path for path, _ in leaves])
    return {name: np.asarray(leaf) for name, (_, leaf) in zip(names, leaves, strict=True)}


def params_from_arrays(arrays: Any, like: Any) -> Any:
    """The params pytree of ``like`` (e.g. ``net.init(key)``) with its leaves read from
    ``arrays`` (a mapping such as ``np.load("params.npz")``), by the names of
    :func:`params_arrays`."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = _leaf_names([path for path, _ in leaves])
    return jax.tree_util.tree_unflatten(treedef, [arrays[name] for name in names])
