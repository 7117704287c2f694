"""bpjax: backpropagation written out by hand in JAX, and proven right against JAX autodiff."""

from bpjax import extend as extend
from bpjax import layers as layers
from bpjax import parallel as parallel
from bpjax import rnn as rnn
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
from bpjax.layers import Dense, DenseCache, backprop
from bpjax.losses import LOSSES, FusedOutput, Loss, fused_output, get_loss
from bpjax.mlp import MLP, Backward, Cache
from bpjax.network import Serial, SerialCache, serial

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_RTOL",
    "LOSSES",
    "MLP",
    "REFERENCES",
    "Activation",
    "Backward",
    "Cache",
    "CheckRow",
    "Dense",
    "DenseCache",
    "FusedOutput",
    "GradCheckReport",
    "GradientMismatchError",
    "Loss",
    "Serial",
    "SerialCache",
    "assert_grads_match",
    "backprop",
    "check_grads",
    "check_mlp",
    "check_network",
    "custom_vjp",
    "fused_output",
    "get_activation",
    "get_loss",
    "serial",
]
