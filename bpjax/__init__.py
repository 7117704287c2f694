"""bpjax: backpropagation written out by hand in JAX, and proven right against JAX autodiff."""

from bpjax.activations import ACTIVATIONS, Activation, get_activation
from bpjax.losses import LOSSES, FusedOutput, Loss, fused_output, get_loss
from bpjax.mlp import MLP, Backward, Cache

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "Activation",
    "Backward",
    "Cache",
    "FusedOutput",
    "Loss",
    "fused_output",
    "get_activation",
    "get_loss",
]
