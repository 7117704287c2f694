"""bpjax: backpropagation written out by hand in JAX, and proven right against JAX autodiff."""

from bpjax import datasets as datasets
from bpjax import extend as extend
from bpjax import layers as layers
from bpjax import parallel as parallel
from bpjax import rnn as rnn
from bpjax import testing as testing  # imports neither hypothesis nor pytest
from bpjax.activations import ACTIVATIONS, Activation, get_activation
from bpjax.bridge import custom_vjp
from bpjax.check import (
    DEFAULT_RTOL,
    REFERENCES,
    CheckRow,
    GradCheckReport,
    GradientMismatchError,
    assert_grads_match,
    check_grads,
    check_mlp,
    check_network,
)
from bpjax.datasets import Dataset, load_dataset, split_dataset
from bpjax.layers import Dense, DenseCache, backprop
from bpjax.losses import LOSSES, FusedOutput, Loss, fused_output, get_loss
from bpjax.mlp import MLP
from bpjax.network import Backward, Cache, OutputError, Serial, SerialCache, serial
from bpjax.runtime_checks import checked, checks_enabled
from bpjax.train import (
    OPTIMIZERS,
    EvalRecord,
    FitResult,
    History,
    Metrics,
    TrainState,
    evaluate,
    fit,
    get_optimizer,
    gradient_fn,
    make_train_step,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_RTOL",
    "LOSSES",
    "MLP",
    "OPTIMIZERS",
    "REFERENCES",
    "Activation",
    "Backward",
    "Cache",
    "CheckRow",
    "Dataset",
    "Dense",
    "DenseCache",
    "EvalRecord",
    "FitResult",
    "FusedOutput",
    "GradCheckReport",
    "GradientMismatchError",
    "History",
    "Loss",
    "Metrics",
    "OutputError",
    "Serial",
    "SerialCache",
    "TrainState",
    "assert_grads_match",
    "backprop",
    "check_grads",
    "check_mlp",
    "check_network",
    "checked",
    "checks_enabled",
    "custom_vjp",
    "evaluate",
    "fit",
    "fused_output",
    "get_activation",
    "get_loss",
    "get_optimizer",
    "gradient_fn",
    "load_dataset",
    "make_train_step",
    "serial",
    "split_dataset",
]
