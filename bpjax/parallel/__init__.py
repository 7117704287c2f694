"""The hand-written backward sharded over many devices and hosts: data, tensor and 2-D parallel.

Everything here runs the δ-recursion of the README per shard inside :func:`jax.shard_map`, with the
collectives that the maths needs written out. ``B`` is the global batch, ``D`` the size of the
mesh's data axis and ``M`` that of its model axis.

Data parallel (:func:`data_parallel`). The batch mean is a sum over examples,
``∇C = Σ_n w_n ∇C_n`` with ``w_n = 1/B``, so each shard ``d`` runs the forward and the
δ-recursion on its rows with the output error scaled by ``w_n`` instead of ``1/B_d``, and one
all-reduce over the data axis adds the shards::

    δ^L_{d,n} = w_n ∂C_n/∂z^L_n,   ∇_{W^l} C = psum_d (δ^l_d)ᵀ a^{l-1}_d,   C = psum_d Σ_n w_n C_n

A batch that does not divide by ``D`` is padded to ``⌈B/D⌉·D`` rows (copies of real rows, so
nothing non-finite enters) and the pads get ``w_n = 0``: the weights, not the shard sizes, carry
the ``1/B`` of the true batch. Per-example quantities that are sums over the batch
(:func:`data_parallel_extend`: ``sum_grad_squared``, ``variance``, ``diag_ggn``,
``kfac_factors``) reduce the same way, with the pads masked out.

Tensor parallel (:func:`tensor_parallel`, :func:`data_tensor_parallel`). The rows of ``W^l``
(output features) and ``b^l`` are split over the model axis,
``W^l = [W^l_1; …; W^l_M]``, shard ``m`` holding ``W^l_m`` of shape ``(n_l/M, n_{l-1})``. Per
layer, with ``a^{l-1}`` whole on every shard::

    forward   z^l_m = a^{l-1} (W^l_m)ᵀ + b^l_m                       local, (B, n_l/M)
              a^l_m = f^l(z^l_m)                                    local (elementwise f)
              a^l   = all_gather_m(a^l_m)                           all-gather, (B, n_l)
    output    z^L   = all_gather_m(z^L_m);  C_n, δ^L from the whole z^L (softmax needs all of it)
    backward  ∇_{W^l_m} C = (δ^l_m)ᵀ a^{l-1},  ∇_{b^l_m} C = Σ_n δ^l_{m,n}   local
              ∂C/∂a^{l-1} = δ^l W^l = Σ_m δ^l_m W^l_m                   a sum over shards:
              ∂C/∂a^{l-1}_m = psum_scatter_m(δ^l_m W^l_m)            reduce-scatter, (B, n_{l-1}/M)
              δ^{l-1}_m = (f^{l-1})'(z^{l-1}_m) ∘ ∂C/∂a^{l-1}_m        local

so each hidden layer costs one all-gather forward and one reduce-scatter backward of a
``(B, n_l)`` activation, and no weight ever moves. A layer whose width ``M`` does not divide is
kept whole on every model shard (replicated: computed redundantly, no collective of its own;
the reduce-scatter into it becomes an all-reduce, ``psum``, and out of it a local slice). With a
data axis as well (:func:`data_tensor_parallel`) every collective above runs within one data
shard's model group, and the weight gradients are then all-reduced over the data axis as in data
parallel.

Several hosts: :func:`initialize` wires :func:`jax.distributed.initialize` from environment
variables (one process per host); after it ``jax.devices()`` lists every host's devices, a mesh
over them spans the hosts, and the functions above run unchanged (see the README for a launch).

The modules: :mod:`bpjax.parallel.mesh` (meshes, hosts, and the checks, placement and padding the
sharded steps share), :mod:`bpjax.parallel.data` (data parallel), :mod:`bpjax.parallel.tensor`
(tensor and 2-D parallel) and :mod:`bpjax.parallel.comm` (the communication volume).
"""

from bpjax.parallel.comm import Collective, CommVolume, communication_volume, compiled_collectives
from bpjax.parallel.data import DATA_PARALLEL_QUANTITIES, data_parallel, data_parallel_extend
from bpjax.parallel.mesh import device_mesh, initialize
from bpjax.parallel.tensor import data_tensor_parallel, tensor_parallel, tensor_parallel_specs

__all__ = [
    "DATA_PARALLEL_QUANTITIES",
    "Collective",
    "CommVolume",
    "communication_volume",
    "compiled_collectives",
    "data_parallel",
    "data_parallel_extend",
    "data_tensor_parallel",
    "device_mesh",
    "initialize",
    "tensor_parallel",
    "tensor_parallel_specs",
]
