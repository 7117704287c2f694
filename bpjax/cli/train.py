"""``bpjax train``: train a network on a built-in data set or a ``.npz`` file.

``bpjax train`` trains a network with :func:`bpjax.train.fit` on a built-in data set or a ``.npz``
file (:mod:`bpjax.datasets`), on the manual or the autodiff gradients, with a rich progress bar
on a terminal (plain lines, about ten, anywhere else), and writes the params, the history and a
loss-curve PNG with ``--out DIR``. The network is an MLP, the built-in CNN or one from a Python
spec file (``--model``, :mod:`bpjax.cli.models`). The progress display and the loss-curve figure are
in :mod:`bpjax.cli.train_report`; how ``--out`` is checked before training and written as one
complete set after it, and how Ctrl-C stops a run and keeps it, in :mod:`bpjax.cli.train_outputs`.

Every failure is one line on stderr, and the exit status says which kind it was (``EXIT_*``): a
bad option or data file 2, a loss that stopped being finite 1, results that could not be written
74 (sysexits' EX_IOERR), Ctrl-C 130 (128 + SIGINT, as a shell reports it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from bpjax.cli.models import (
    MODELS,
    PROBABILITY_ROW_TOLERANCE,
    OptionError,
    build_cnn,
    build_mlp,
    check_fits,
    check_targets,
    cnn_input_shape,
    default_loss,
    describe_network,
    image_shape,
    input_normalizer,
    load_network,
    model_label,
    model_option,
    probability_rows,
)
from bpjax.cli.options import (
    fraction,
    name_list,
    non_negative,
    one_of,
    parse_sizes,
    positive,
    positive_float,
    widths,
)
from bpjax.cli.train_outputs import SaveError, prepare_out_dir, sigint_flag, write_results
from bpjax.cli.train_report import metrics_text, progress, rate_text
from bpjax.datasets import CLASSES_PER_EXAMPLE, MAX_CLASSES

EXIT_OK = 0
"""``bpjax train`` trained (to its epochs or its target loss) and saved what it was asked to."""
EXIT_DIVERGED = 1
"""The loss stopped being finite; the run up to there is saved."""
EXIT_USAGE = 2
"""A bad option or data file, or an ``--out`` that cannot take the results; nothing trained."""
EXIT_IOERR = 74
"""The results could not be written after training (sysexits.h EX_IOERR)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): the run reached so far is saved, marked interrupted, unless pressed twice."""

_EXIT_TEXT = (
    f"Exit status: {EXIT_OK} done; {EXIT_DIVERGED} the loss stopped being finite (the run so far "
    f"is saved); {EXIT_USAGE} a bad option or data file, or an --out that cannot take the results "
    f"(before any step); {EXIT_IOERR} the results could not be written after training "
    f"(EX_IOERR; --out is left as it was); {EXIT_INTERRUPTED} Ctrl-C: the run stops at the next "
    "step and the params and history reached are saved, marked interrupted; a second Ctrl-C "
    "quits at once without saving; one before the first step stops the run before it trains or "
    "writes. Limit: while Python still imports bpjax and JAX (the first second or so), Ctrl-C "
    "is Python's own (a traceback, or ignored inside a JAX callback): wait for the summary line."
)


@dataclasses.dataclass(frozen=True)
class _TrainDefaults:
    """The options `bpjax train` uses on a data set unless told otherwise."""

    hidden: tuple[int, ...]  # hidden-layer widths: sizes = (n_0, *hidden, n_L)
    activation: str  # of every hidden layer
    epochs: int
    batch_size: int
    lr: float


# Each reaches its data set's goal in seconds on 2 cores: digits ≥ 95% held-out accuracy (96.9-98.1%
# over seeds 0-5), xor and spirals ≈ 100%. "npz" is for a user's file.
_TRAIN_DEFAULTS = {
    "xor": _TrainDefaults(hidden=(8,), activation="tanh", epochs=50, batch_size=32, lr=0.01),
    "spirals": _TrainDefaults(
        hidden=(64, 64), activation="relu", epochs=200, batch_size=32, lr=0.01
    ),
    "digits": _TrainDefaults(hidden=(256,), activation="relu", epochs=30, batch_size=64, lr=1e-3),
    "npz": _TrainDefaults(hidden=(128,), activation="relu", epochs=30, batch_size=64, lr=1e-3),
}
# --model cnn on any data (hidden and activation unused): on digits 96.4-98.3% held-out accuracy
# over --seed 0-3 (split, init, batch order); on the seed-0 split 98.1-98.6% over init seeds 0-5
# (per-pixel standardisation instead of per-channel: 96.7-99.2%); ~2 s of steps once compiled on
# 2 cores (lr 3e-3: 96.1-98.3%, loss 10x higher). A spec file's network takes its data set's
# epochs, batch and lr.
_CNN_DEFAULTS = _TrainDefaults(hidden=(), activation="", epochs=20, batch_size=64, lr=1e-2)


def add_train_parser(commands: Any) -> None:
    """Adds ``bpjax train`` to the ``commands`` subparsers."""
    import bpjax as bp
    from bpjax.train import GRADIENTS, OPTIMIZERS

    defaults = "; ".join(
        f"{name}: --hidden {','.join(map(str, d.hidden))} --activations {d.activation} "
        f"--epochs {d.epochs} --batch-size {d.batch_size} --lr {d.lr:g}"
        for name, d in _TRAIN_DEFAULTS.items()
    )
    train = commands.add_parser(
        "train",
        help="train a network on a built-in data set or a .npz file, with a progress bar",
        description=(
            "Train a network (an MLP, a small CNN, or any bp.serial network from a Python file) "
            "with an optax optimiser on the hand-written gradients (the "
            "δ-recursion) or on jax.grad's, on a built-in data set (xor, spirals, digits: "
            "scikit-learn's bundled 8×8 digits) or on a .npz file with arrays x (n, n_0) and y: "
            "integer class labels (n,) or (n, 1), one-hot rows (n, K), or float regression "
            "targets (n, n_L); any other integer y is refused. Inputs are standardised with the "
            "training split's mean and standard deviation: per feature for flat inputs, per "
            "channel (pooled over the pixels) for images. A held-out split is evaluated after "
            "every epoch; the progress bar shows the loss, the accuracy and the steps per second."
        ),
        epilog=(
            f"Defaults by data set ({defaults}); --model cnn: --epochs {_CNN_DEFAULTS.epochs} "
            f"--batch-size {_CNN_DEFAULTS.batch_size} --lr {_CNN_DEFAULTS.lr:g} on any data; a "
            "spec file's network: its data set's. The output activation follows the loss: "
            "softmax for cross_entropy, sigmoid for binary_cross_entropy, identity for "
            "squared_error; class labels go to losses other than cross_entropy as one-hot rows. "
            "A spec file (--model path/to/file.py:NAME) is imported and NAME must be a network, "
            "bp.serial(*layers, loss=, input_shape=) or bp.MLP(...), or a function of no "
            "arguments that returns one; data rows are reshaped to its input_shape. "
            "Integer labels ask for K = max(y) + 1 classes: at most "
            f"{MAX_CLASSES:,}, and at most {CLASSES_PER_EXAMPLE} per example; float targets "
            "for cross_entropy must be rows of probabilities (non-negative and summing to 1, "
            f"both within {PROBABILITY_ROW_TOLERANCE:g}·K; entries just below 0 are set to 0), "
            "for binary_cross_entropy in [0, 1]; x and y "
            "finite, also in float32 (magnitudes at most 3.4e38). "
            "--out DIR writes params.npz (each params[l][k] as k{l}: an MLP's W0, b0, W1, b1, …, "
            "the CNN's W0, b0, W2, b2, W5, b5; a leaf deeper in a block params[l][i]…[k] as "
            "k{l}.i.…; x_mean, x_scale: the input standardisation x̂ = (x − x_mean)/x_scale of "
            "the flat rows), history.json (every option, the network, the versions of bpjax, jax "
            "and jaxlib, the device, how the run stopped, every step's minibatch loss and every "
            "evaluation), loss.png and, last, manifest.json (the files' sizes and SHA-256: the "
            "set is complete when it is there). --out is checked before training; earlier "
            "results in it are replaced only with --overwrite, as a whole. "
            f"{_EXIT_TEXT} "
            "Examples: bpjax train --data digits --grad autodiff --out run/; "
            "bpjax train --data digits --model cnn; bpjax train --data xor --model net.py:NET"
        ),
    )
    train.set_defaults(run=run_train, parser=train)
    train.add_argument(
        "--data",
        default="digits",
        metavar="NAME|PATH",
        help="xor, spirals, digits, or a .npz file with arrays x and y (default: %(default)s)",
    )
    train.add_argument(
        "--model",
        type=model_option,
        default="mlp",
        metavar="mlp|cnn|FILE.py:NAME",
        help=(
            "mlp: a Dense stack (--hidden/--sizes, --activations); cnn: Conv2D(8, 3×3, relu) → "
            "MaxPool2D(2) → Conv2D(16, 3×3, relu) → MaxPool2D(2) → Flatten → Dense(n_L) for "
            "images (--input-shape); FILE.py:NAME: the network NAME of a Python file, or a "
            "function of no arguments that returns it (default: %(default)s)"
        ),
    )
    train.add_argument(
        "--input-shape",
        type=image_shape,
        default=None,
        metavar="H,W,C",
        help=(
            "--model cnn: one image's height, width and channels, C-order in a data row "
            "(default: H,H,1 when the features are a square number H², e.g. digits' 8,8,1)"
        ),
    )
    shape = train.add_mutually_exclusive_group()
    shape.add_argument(
        "--hidden",
        type=widths,
        default=None,
        metavar="W1,...",
        help="--model mlp: hidden-layer widths; n_0 and n_L come from the data (default: by "
        "data set)",
    )
    shape.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="N0,...,NL",
        help="--model mlp: every layer's width, checked against the data's features and classes",
    )
    train.add_argument(
        "--activations",
        type=name_list(bp.ACTIVATIONS, "activation"),
        default=None,
        metavar="NAMES",
        help=(
            "--model mlp: one name for every hidden layer, or one per hidden layer, or one per "
            "layer with the output's last (default: by data set; the output's follows the loss)"
        ),
    )
    train.add_argument(
        "--loss",
        type=one_of(tuple(bp.LOSSES), "loss"),
        default=None,
        help="--model mlp or cnn: cross_entropy, binary_cross_entropy or squared_error "
        "(default: cross_entropy for class labels, squared_error for regression targets)",
    )
    train.add_argument(
        "--optimizer",
        type=one_of(tuple(OPTIMIZERS), "optimizer"),
        default="adam",
        help=f"an optax optimiser: {', '.join(OPTIMIZERS)} (default: %(default)s)",
    )
    train.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: by data set)"
    )
    train.add_argument(
        "--batch-size",
        type=positive,
        default=None,
        help="examples per step (default: by data set)",
    )
    train.add_argument(
        "--epochs", type=positive, default=None, help="passes over the data (default: by data set)"
    )
    train.add_argument(
        "--seed",
        type=non_negative,
        default=0,
        help="seeds the held-out split, the params and the batch order (default: %(default)s)",
    )
    train.add_argument(
        "--grad",
        type=one_of(GRADIENTS, "gradient"),
        default="manual",
        help="manual: the δ-recursion; autodiff: jax.value_and_grad (default: %(default)s)",
    )
    train.add_argument(
        "--devices",
        type=positive,
        default=None,
        metavar="N",
        help=(
            "data parallel over N devices: the batch is split over them and the gradients "
            "all-reduced (bpjax.parallel); on a CPU host, N CPU devices are made for it"
        ),
    )
    train.add_argument(
        "--target-loss",
        type=positive_float,
        default=None,
        metavar="LOSS",
        help="stop once the training split's loss is at most LOSS",
    )
    train.add_argument(
        "--test-fraction",
        type=fraction,
        default=0.2,
        metavar="F",
        help="share of the examples held out for evaluation, 0 for none (default: %(default)s)",
    )
    train.add_argument(
        "--eval-every",
        type=positive,
        default=1,
        metavar="EPOCHS",
        help="evaluate after every this many epochs (default: %(default)s)",
    )
    train.add_argument(
        "--no-normalize",
        action="store_true",
        help="feed the inputs as they are, without standardising them",
    )
    train.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=(
            "write params.npz, history.json, loss.png and manifest.json here (created if "
            "missing; checked writable before training)"
        ),
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (refused without it)",
    )


# -- the commands ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TrainSetup:
    """Everything `bpjax train` settles before the first step."""

    net: Any  # bpjax.Serial (bpjax.MLP for --model mlp)
    label: str  # what the summary line calls the model: MLP, CNN or file.py:NAME
    train: Any  # bpjax.datasets.Dataset, standardised
    test: Any  # bpjax.datasets.Dataset, standardised with the training split's statistics
    normalizer: Any  # bpjax.datasets.Normalizer
    optimizer: Any  # optax.GradientTransformation
    epochs: int
    batch_size: int
    lr: float
    out: Any  # pathlib.Path | None


def _check_model_options(args: argparse.Namespace) -> None:
    """The options that only some models take; raises OptionError."""
    if args.model == "mlp":
        if args.input_shape is not None:
            raise OptionError(
                "argument --input-shape: only with --model cnn; an MLP takes flat rows"
            )
        return
    why = "the CNN's layers are fixed" if args.model == "cnn" else "the file defines the network"
    for option in ("hidden", "sizes", "activations"):
        if getattr(args, option) is not None:
            raise OptionError(
                f"argument --{option}: not allowed with --model {args.model} ({why}); it sets "
                "the layers of --model mlp"
            )
    if args.model not in MODELS:
        for option in ("loss", "input_shape"):
            if getattr(args, option) is not None:
                raise OptionError(
                    f"argument --{option.replace('_', '-')}: not allowed with --model "
                    f"{args.model}: the file's network has its own {option}"
                )


def _build_net(args: argparse.Namespace, data: Any, defaults: _TrainDefaults) -> Any:
    """The network ``--model`` asks for, checked against the data; raises OptionError."""
    if args.model in MODELS:
        loss = default_loss(data, args.loss, args.data)
        check_targets(loss, data, args.data, f"--loss {loss}")
    if args.model == "mlp":
        return build_mlp(
            data,
            args.data,
            sizes=args.sizes,
            hidden=args.hidden or defaults.hidden,
            activations=args.activations or (defaults.activation,),
            loss=loss,
        )
    if args.model == "cnn":
        shape = cnn_input_shape(args.input_shape, data.num_features, args.data)
        net = build_cnn(shape, data.num_outputs, loss)
    else:
        net = load_network(args.model)
        check_targets(net.objective.name, data, args.data, f"--model {args.model}")
    check_fits(net, data, args.data, "model")
    return net


def _train_setup(args: argparse.Namespace) -> _TrainSetup:
    """Loads and splits the data, builds the net and the optimiser; raises OptionError."""
    from bpjax import datasets, train

    _check_model_options(args)
    try:
        data = datasets.load_dataset(args.data)
    except ValueError as error:
        raise OptionError(f"argument --data: {error}") from None
    if args.model == "cnn":
        defaults = _CNN_DEFAULTS
    else:
        defaults = _TRAIN_DEFAULTS[args.data if args.data in _TRAIN_DEFAULTS else "npz"]
    try:
        training, test = datasets.split_dataset(data, args.test_fraction, seed=args.seed)
    except ValueError as error:
        message = str(error).removeprefix("test_fraction: ")
        raise OptionError(f"argument --test-fraction: {message}") from None
    net = _build_net(args, data, defaults)
    # entries of probability rows a rounding below 0, which check_targets let through, become 0
    training, test = (probability_rows(net.objective.name, part) for part in (training, test))
    normalizer = (
        datasets.Normalizer.identity(data.num_features)
        if args.no_normalize
        else input_normalizer(training.x, tuple(net.input_shape))
    )
    training = dataclasses.replace(training, x=normalizer(training.x))
    test = dataclasses.replace(test, x=normalizer(test.x))

    out = None if args.out is None else prepare_out_dir(args.out, overwrite=args.overwrite)
    lr = args.lr or defaults.lr
    return _TrainSetup(
        net=net,
        label=model_label(args.model),
        train=training,
        test=test,
        normalizer=normalizer,
        optimizer=train.get_optimizer(args.optimizer, lr),
        epochs=args.epochs or defaults.epochs,
        batch_size=args.batch_size or defaults.batch_size,
        lr=lr,
        out=out,
    )


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    """argparse's error format: the usage, then ``prog: error: message`` on one line; status 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _device_mesh(devices: int | None) -> Any:
    """A 1-D ``"data"`` mesh over ``devices`` devices, or ``None`` for one device.

    On a CPU host JAX makes one CPU device unless told otherwise before its backend starts, so
    ask for ``devices`` of them first; once the backend is up (a second run in one process) the
    count is what it is, and :func:`bpjax.parallel.device_mesh` says so if it is too small.
    """
    if devices is None:
        return None
    import jax

    from bpjax import parallel

    # Once the backend has started the device count can no longer change (RuntimeError).
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", devices)
    return parallel.device_mesh(devices)


def run_train(args: argparse.Namespace, interrupted: Callable[[], bool] = lambda: False) -> int:
    """Runs ``bpjax train`` with parsed arguments; returns the exit status (``EXIT_*``).

    ``interrupted`` says whether Ctrl-C was pressed before this was called (``main`` holds a
    first one off as a flag from its start: :func:`~bpjax.cli.train_outputs.sigint_flag`);
    it is checked before training starts, and such a run stops there, writing nothing.
    """
    try:
        return _train(args, interrupted)
    except KeyboardInterrupt:
        # before the first step, or a second Ctrl-C: --out is as it was before the run
        kept = "" if args.out is None else f"; {args.out!r} is as it was before the run"
        print(f"{args.parser.prog}: interrupted; nothing saved{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _stop_reason(history: Any, target_loss: float | None) -> str:
    if history.stopped == "target_loss":
        return f"reached the target loss {target_loss:g}"
    if history.stopped == "nonfinite":
        return "STOPPED: the loss is no longer finite (try a lower --lr)"
    if history.stopped == "interrupted":
        return "INTERRUPTED (Ctrl-C)"
    return "done"


def _status(history: Any) -> int:
    if history.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_DIVERGED if history.stopped == "nonfinite" else EXIT_OK


def _train(args: argparse.Namespace, startup_interrupt: Callable[[], bool]) -> int:
    import jax

    from bpjax import train

    try:
        setup = _train_setup(args)
    except OptionError as error:
        return _fail(args.parser, str(error))
    if startup_interrupt():  # Ctrl-C while setting up: stop before anything is trained or written
        raise KeyboardInterrupt
    net, training, test = setup.net, setup.train, setup.test
    try:
        mesh = _device_mesh(args.devices)
        grad_fn = None if mesh is None else train.gradient_fn(net, args.grad, mesh=mesh)
    except ValueError as error:  # too few devices, or a network that draws randomness (Dropout)
        return _fail(args.parser, f"argument --devices: {error}")
    batch = min(setup.batch_size, len(training))
    total = setup.epochs * (len(training) // batch)
    print(
        f"bpjax train: {args.data} ({len(training)} train, {len(test)} held out), "
        f"{setup.label} {describe_network(net)}, "
        f"{args.optimizer} lr {setup.lr:g}, batch {batch}, {setup.epochs} epochs, "
        f"{args.grad} gradients"
        + ("" if mesh is None else f", data parallel over {args.devices} devices"),
        flush=True,
    )
    start = time.perf_counter()
    # the first Ctrl-C stops training at the next step and lets the run be saved; a second one,
    # in training or in saving, raises KeyboardInterrupt (run_train)
    with sigint_flag() as interrupted:
        if startup_interrupt():  # pressed before this handler took over: nothing trained yet
            raise KeyboardInterrupt
        try:
            with progress(total, epochs=setup.epochs) as (on_step, on_eval):
                result = train.fit(
                    net,
                    net.init(jax.random.key(args.seed)),
                    training,
                    optimizer=setup.optimizer,
                    epochs=setup.epochs,
                    batch_size=batch,
                    seed=args.seed,
                    grad=args.grad,
                    grad_fn=grad_fn,
                    test=test,
                    eval_every=args.eval_every,
                    target_loss=args.target_loss,
                    on_step=on_step,
                    on_eval=on_eval,
                    interrupt=interrupted,
                )
        except ValueError as error:
            if args.model in MODELS:
                raise  # a built-in model that fit rejects is a bug: keep the traceback
            # what check_fits does not foresee in a spec file's network: fit's message, one line
            return _fail(args.parser, f"argument --model: {error}")
        elapsed = time.perf_counter() - start
        history = result.history
        final = history.evals[-1]
        print(
            f"{_stop_reason(history, args.target_loss)} after {final.epoch} epochs "
            f"({final.step} steps) in {elapsed:.1f} s, compiling included"
            + (
                ""
                if len(history.evals) < 2
                else rate_text(history.evals[0], final) + " once compiled"
            )
        )
        line = "train " + metrics_text(final.train_loss, final.train_accuracy)
        if final.test_loss is not None:
            line += "; held-out " + metrics_text(final.test_loss, final.test_accuracy)
        print(line)
        status = _status(history)
        if setup.out is not None:
            try:
                print("wrote " + ", ".join(write_results(setup, args, result, status)))
            except SaveError as error:
                print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
                return EXIT_IOERR
    if status == EXIT_INTERRUPTED:
        kept = (
            "nothing saved (no --out)"
            if setup.out is None
            else f"saved the params and history reached to {str(setup.out)!r}, marked interrupted"
        )
        print(
            f"{args.parser.prog}: interrupted at step {final.step} of {total}; {kept}",
            file=sys.stderr,
        )
    return status
