"""The 2-D convolution :class:`Conv2D` (NHWC), its backward written as two more convolutions.

The normalisation of ``kernel_size``/``strides``/``padding`` arguments, their resolution to
explicit pads, and the pads of the transposed (backward) window are in :mod:`bpjax.layers._init`,
shared with the pooling layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from bpjax._types import Array, PRNGKey
from bpjax.activations import Activation
from bpjax.layers._conv_method import conv_kernel_grad
from bpjax.layers._init import (
    Pads,
    check_padding,
    check_pair,
    checked_activation,
    conv_taps,
    out_spatial,
    positive_int,
    resolve_pads,
    transposed_pads,
    truncated_normal_weight,
)
from bpjax.layers._outer import (
    column_sum,
    example_outer_sq_norms,
    example_outer_square_sums,
    example_outer_t,
    kfac_outer,
    outer_square_sum,
    use_gram,
)

__all__ = ["Conv2D", "Conv2DCache", "conv_patches"]

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")  # the forward: images NHWC, kernel (kh, kw, C_in, C_out)
# dx: the flipped kernel read with its in/out axes swapped (HWOI), so no transpose is copied
_NHWC_HWOI = ("NHWC", "HWOI", "NHWC")


def _dodge_group_dim(
    pads: tuple[int, int], window: int, stride: int
) -> tuple[tuple[int, int], int]:
    """Transposed pads that XLA compiles safely, and how many cells to crop from each end.

    XLA's convolution operand swap (in its algebraic simplifier, as of jax 0.10) reads a spatial
    axis with window 2, base (lhs) dilation 2, stride 1 and no padding as a "group" axis and
    leaves it unswapped while it swaps the others (it swaps when the kernel is larger than the
    input on the other axes, e.g. ``k_w > W_out``); the process then aborts on the invalid
    convolution (``Window dimensions do not match RHS shape``). ``jax.vjp`` of the same forward
    hits it too (forward kernel 2, stride 2, pads ``(1, 1)`` on an even-sized axis). On exactly
    that axis this pads one more cell at each end, which the caller crops from ``dx``: the same
    values, a convolution two cells longer.
    """
    if window == 2 and stride == 2 and pads == (0, 0):
        return (1, 1), 1
    return pads, 0


def conv_patches(x: Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> Array:
    """Every window of the padded input unfolded: ``(batch, H_out·W_out, C·k_h·k_w)``.

    Entry ``c·k_h·k_w + i·k_w + j`` holds ``x_pad[n, s_h p + i, s_w q + j, c]``, the order of
    :func:`jax.lax.conv_general_dilated_patches` (and exactly its values). Built from
    :func:`conv_taps`: no convolution.
    """
    taps = conv_taps(x, window, strides, pads)
    u = jnp.stack(taps, axis=-1)  # (batch, H_out, W_out, C, k_h·k_w)
    return u.reshape(x.shape[0], taps[0].shape[1] * taps[0].shape[2], -1)


class Conv2DCache(NamedTuple):
    """What :meth:`Conv2D.forward` keeps for the backward pass."""

    x: Array  # (batch, H, W, C_in): the layer's input a^{l-1}
    z: Array  # (batch, H_out, W_out, features): the weighted input z^l
    a: Array  # (batch, H_out, W_out, features): the activation a^l = f(z^l)


@dataclasses.dataclass(frozen=True, init=False)
class Conv2D:
    """A 2-D convolution over NHWC images, ``z = x ⋆ W + b``, ``a = f(z)``; ``W`` is HWIO.

    With inputs ``x`` of shape ``(batch, H, W, C_in)`` zero-padded to ``x_pad`` by
    ``((top, bottom), (left, right))``, strides ``(s_h, s_w)`` and a kernel ``W`` of shape
    ``(k_h, k_w, C_in, features)``, the forward is the correlation (as
    :func:`jax.lax.conv_general_dilated` computes it)::

        z[n, p, q, o] = Σ_{i, j, c} x_pad[n, s_h p + i, s_w q + j, c] W[i, j, c, o] + b[o]
        a = f(z)                                 shape (batch, H_out, W_out, features)

    with ``H_out = ⌊(H + top + bottom − k_h) / s_h⌋ + 1`` (``W_out`` alike). The backward, from
    ``δ = ∂C/∂z = J_f(z)ᵀ ∂C/∂a``, is two more convolutions and a sum, never autodiff:

    - ``∂C/∂x`` is the transposed convolution: ``δ`` dilated by the strides (``s − 1`` zeros
      between its rows and columns, ``lhs_dilation``), correlated at stride 1 with the spatially
      flipped kernel whose in/out channel axes are swapped, ``W[k_h−1−i, k_w−1−j, o, c]``, under
      pads ``(k − 1 − top, k − 1 − bottom + r)`` per axis. ``r = (H + top + bottom − k_h) mod s_h``
      counts the last input rows no window reached; they get zero gradient. A pad larger than
      ``k − 1`` makes these pads negative, which crops.
    - ``∂C/∂W[i, j, c, o] = Σ_{n, p, q} x_pad[n, s_h p + i, s_w q + j, c] δ[n, p, q, o]``: the
      correlation of ``x`` with ``δ`` dilated by the strides (``rhs_dilation``), the batch as the
      contracted axis and ``C_in`` as the convolution's batch, so the result comes out HWIO.
    - ``∂C/∂b[o] = Σ_{n, p, q} δ[n, p, q, o]``.

    As for :class:`~bpjax.layers.Dense`, the sums run over the batch: the ``1/B`` of a batch mean
    is already in the ``∂C/∂a`` that arrives. ``"SAME"``/``"VALID"`` resolve to explicit pads by
    :func:`jax.lax.padtype_to_pads` from the input's shape, at init and at trace time.

    Args:
      features: the number of output channels.
      kernel_size: ``k`` or ``(k_h, k_w)``.
      strides: ``s`` or ``(s_h, s_w)``.
      padding: ``"SAME"``, ``"VALID"``, ``p`` (all sides), ``(p_h, p_w)`` or
        ``((top, bottom), (left, right))``.
      activation: a name from :data:`bpjax.ACTIVATIONS` or a :class:`bpjax.Activation`, applied
        elementwise (softmax: over the channel axis).
      precision: the ``precision`` of every :func:`jax.lax.conv_general_dilated` call (``None``:
        JAX's default for the dtype and platform).

    Raises:
      ValueError: a bad ``features``, ``kernel_size``, ``strides``, ``padding`` or activation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv2D(4, 3, padding="SAME", activation="relu")
      >>> params, out_shape = layer.init(jax.random.key(0), (8, 8, 1))
      >>> y, cache = layer.forward(params, jnp.ones((2, 8, 8, 1)))
      >>> grads, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> out_shape, grads["W"].shape, grads["b"].shape, dx.shape
      ((8, 8, 4), (3, 3, 1, 4), (4,), (2, 8, 8, 1))
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int]
    padding: Any
    activation: Activation  # a name is resolved to its Activation by __init__
    precision: Any

    def __init__(
        self,
        features: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = 1,
        padding: Any = "VALID",
        *,
        activation: str | Activation = "identity",
        precision: Any = None,
    ) -> None:
        object.__setattr__(self, "features", positive_int(features, "features"))
        object.__setattr__(self, "kernel_size", check_pair("kernel_size", kernel_size))
        object.__setattr__(self, "strides", check_pair("strides", strides))
        object.__setattr__(self, "padding", check_padding(padding))
        object.__setattr__(self, "activation", checked_activation(activation))
        object.__setattr__(self, "precision", precision)

    @property
    def _window(self) -> tuple[int, int]:
        return self.kernel_size  # type: ignore[return-value]  # a pair after __init__

    @property
    def _strides(self) -> tuple[int, int]:
        return self.strides  # type: ignore[return-value]  # a pair after __init__

    def _pads(self, x_shape: tuple[int, ...]) -> Pads:
        return resolve_pads((x_shape[1], x_shape[2]), self._window, self._strides, self.padding)

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``W`` truncated normal (Glorot, or He for the ReLU family), ``b = 0``.

        The fans count the receptive field: ``fan_in = k_h k_w C_in``,
        ``fan_out = k_h k_w features``.

        Args:
          key: a PRNG key.
          in_shape: one example's shape ``(H, W, C_in)``.
          dtype: the params' dtype.

        Returns:
          ``({"W": (k_h, k_w, C_in, features), "b": (features,)}, (H_out, W_out, features))``.

        Raises:
          ValueError: ``in_shape`` is not ``(H, W, C)`` or the kernel does not fit it.
        """
        _, (h_out, w_out) = out_spatial(
            "Conv2D", in_shape, self._window, self._strides, self.padding
        )
        w_shape = (*self._window, int(in_shape[2]), self.features)
        params = {
            "W": truncated_normal_weight(
                key, w_shape, dtype, self.activation.init, in_axis=-2, out_axis=-1
            ),
            "b": jnp.zeros((self.features,), dtype),
        }
        return params, (h_out, w_out, self.features)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, Conv2DCache]:
        """``a = f(x ⋆ W + b)``, shape ``(batch, H_out, W_out, features)``, and the cache."""
        self._check_input(params, x)
        z = (
            lax.conv_general_dilated(
                x,
                params["W"],
                self._strides,
                self._pads(x.shape),
                dimension_numbers=_NHWC_HWIO,
                precision=self.precision,
            )
            + params["b"]
        )  # z = x_pad ⋆_s W + b
        a = self.activation.forward(z)
        return a, Conv2DCache(x, z, a)

    def delta(self, cache: Conv2DCache, dy: Array) -> Array:
        """``δ = J_f(z)ᵀ dy``, shape ``(batch, H_out, W_out, features)``: the error at ``z``."""
        return self.activation.backward(cache.z, cache.a, dy)

    def backward_delta(
        self, params: dict[str, Array], cache: Conv2DCache, delta: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``δ``: ``∇W = x ⋆ δ`` (δ dilated), ``∇b = Σ δ``, ``dx = dilate(δ) ⋆ flip(W)ᵀ``.

        Returns:
          ``({"W": (k_h, k_w, C_in, features), "b": (features,)}, dx)``, ``dx`` of the input's
          shape ``(batch, H, W, C_in)``.
        """
        x, w = cache.x, params["W"]
        (kh, kw), (sh, sw) = self._window, self._strides
        (top, bottom), (left, right) = self._pads(x.shape)
        grad_w = self._kernel_grad(x, delta)
        # ∂C/∂b[o] = Σ_{n,p,q} δ[n,p,q,o]
        grad_b = jnp.sum(delta, axis=(0, 1, 2))
        # ∂C/∂x = dilate_s(δ) ⋆_1 W[::-1, ::-1] with in/out swapped, under the transposed pads
        pads_h, crop_h = _dodge_group_dim(
            transposed_pads(x.shape[1], (top, bottom), kh, sh), kh, sh
        )
        pads_w, crop_w = _dodge_group_dim(
            transposed_pads(x.shape[2], (left, right), kw, sw), kw, sw
        )
        dx = lax.conv_general_dilated(
            delta,
            w[::-1, ::-1],
            (1, 1),
            (pads_h, pads_w),
            lhs_dilation=(sh, sw),
            dimension_numbers=_NHWC_HWOI,
            precision=self.precision,
        )
        if crop_h or crop_w:
            dx = dx[:, crop_h : crop_h + x.shape[1], crop_w : crop_w + x.shape[2]]
        return {"W": grad_w, "b": grad_b}, dx

    def _kernel_grad(self, x: Array, delta: Array) -> Array:
        """``∂C/∂W[i,j,c,o] = Σ_{n,p,q} x_pad[n, s_h p + i, s_w q + j, c] δ[n,p,q,o]``, HWIO, by
        the method measured fastest for the shape (:func:`conv_kernel_grad`)."""
        return conv_kernel_grad(
            x, delta, self._window, self._strides, self._pads(x.shape), self.precision
        )

    def backward(
        self, params: dict[str, Array], cache: Conv2DCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """From ``dy = ∂C/∂a``: ``δ = J_fᵀ dy``, then :meth:`backward_delta`."""
        return self.backward_delta(params, cache, self.delta(cache, dy))

    # -- extension rules (bpjax.extend.rules): a convolution is a Dense layer on patches -------
    #
    # z[n, p, q] = W̃ u[n, p, q] + b with u the unfolded patch (C_in·k_h·k_w entries, channel
    # major, as lax.conv_general_dilated_patches orders them) and W̃[o, (c, i, j)] = W[i, j, c, o],
    # so g_n = Σ_{p,q} δ[n, p, q] u[n, p, q]ᵀ over the P = H_out·W_out positions. The norm takes
    # the Gram form of layers._outer over the patches where P·(features + C_in k_h k_w) is the
    # smaller cost (few positions, wide kernels); otherwise the per-example kernel gradients are
    # one batched product per tap (i, j) (_example_tap_grads), each a (C_in, features) block.

    def _patches(self, x: Array) -> Array:
        """``(batch, H_out·W_out, C_in·k_h·k_w)``: :func:`conv_patches` of this layer."""
        return conv_patches(x, self._window, self._strides, self._pads(x.shape))

    def _as_kernel(self, g: Array, c_in: int) -> Array:
        """``(..., features, C_in·k_h·k_w)`` back to HWIO ``(..., k_h, k_w, C_in, features)``."""
        kh, kw = self._window
        g = g.reshape(*g.shape[:-1], c_in, kh, kw)
        lead = g.ndim - 4
        order = (*range(lead), lead + 2, lead + 3, lead + 1, lead)
        return jnp.transpose(g, order)

    def _taps(self, x: Array) -> list[Array]:
        """The input under each tap ``(i, j)`` (row-major), channels first: ``(batch, C_in, P)``
        with ``x_pad[n, s_h p + i, s_w q + j, c]`` at ``[n, c, p·W_out + q]``
        (:func:`conv_taps`)."""
        taps = conv_taps(
            jnp.moveaxis(x, 3, 1),
            self._window,
            self._strides,
            self._pads(x.shape),
            channels_first=True,
        )
        return [tap.reshape(*tap.shape[:2], -1) for tap in taps]

    def _example_tap_grads(self, x: Array, delta: Array) -> list[Array]:
        """``∇W_n[i, j] = Σ_{p,q} x_pad[n, s_h p + i, s_w q + j] δ[n, p, q]ᵀ`` for every tap
        ``(i, j)`` (row-major) and example: a list of ``(batch, C_in, features)``.

        One batched product per tap, over a strided slice of the channels-first input
        (:func:`conv_taps`): the ``k_h·k_w``-fold copy of the unfolded patches is never built.
        On the benchmark CNN (B = 128) the kernel gradients took 6 and 32 ms this way, against 12
        and 39 ms through the patches and 27 and 51 ms for a grouped convolution (the backward's
        kernel-gradient convolution under ``vmap``); the channels-last slices, with ``C_in``
        innermost, fed the products 1.5× slower.
        """
        batch, features = delta.shape[0], delta.shape[-1]
        d = delta.reshape(batch, -1, features)  # (batch, P, features)
        return [example_outer_t(tap, d, self.precision) for tap in self._taps(x)]

    def _gram(self, x: Array, delta: Array) -> bool:
        positions = delta.size // (delta.shape[0] * delta.shape[-1])
        fan_in = x.shape[-1] * self._window[0] * self._window[1]
        return use_gram(positions, delta.shape[-1], fan_in)

    def example_grads(
        self, params: dict[str, Array], cache: Conv2DCache, delta: Array
    ) -> dict[str, Array]:
        """``∇W_n = Σ_{p,q} x_pad[n, window] δ[n, p, q]``, ``∇b_n = Σ_{p,q} δ[n, p, q]``:
        ``(batch, k_h, k_w, C_in, features)``, ``(batch, features)``."""
        kh, kw = self._window
        taps = self._example_tap_grads(cache.x, delta)
        kernel = jnp.stack(taps, axis=1).reshape(delta.shape[0], kh, kw, *taps[0].shape[1:])
        return {"W": kernel, "b": jnp.sum(delta, axis=(1, 2))}

    def example_sq_norms(
        self, params: dict[str, Array], cache: Conv2DCache, delta: Array
    ) -> dict[str, Array]:
        """``‖∇W_n‖²`` (the Gram form over the patches where it is cheaper, else the
        per-example kernel gradients, tap by tap) and ``‖∇b_n‖²``."""
        bias = jnp.sum(jnp.sum(delta, axis=(1, 2)) ** 2, axis=-1)
        if self._gram(cache.x, delta):
            d = delta.reshape(delta.shape[0], -1, delta.shape[-1])
            return {"W": example_outer_sq_norms(d, self._patches(cache.x)), "b": bias}
        # the taps are disjoint blocks of ∇W_n: their squared norms add up
        norms = [jnp.sum(g**2, axis=(1, 2)) for g in self._example_tap_grads(cache.x, delta)]
        return {"W": sum(norms[1:], norms[0]), "b": bias}

    def _square_sums(
        self, cache: Conv2DCache, deltas: Array, weights: Array, per_example: bool
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (∇θ_{c,n})²``, summed over the batch unless ``per_example``.

        Tap by tap, ``∇W_{c,n}[i, j]ᵀ = Σ_{p,q} x_pad[n, s_h p + i, s_w q + j] δ_c[n, p, q]ᵀ``:
        the channels-first slices (:func:`conv_taps`) are cut once and shared by all ``k``
        columns; per column and tap one batched product ``(batch, C_in, P)·(batch, P,
        features)``, squared and weighted. Vmapping the kernel-gradient convolution instead runs
        one grouped convolution per column, which XLA:CPU takes 1.5–2× longer over (a CNN's GGN
        diagonal); unfolding the patches first costs a ``k_h·k_w``-fold copy of the input that
        the taps never make (on the benchmark CNN's layers, ``k = 1``: 7 and 35 ms against 11
        and 42 ms).
        """
        d = deltas.reshape(*deltas.shape[:2], -1, deltas.shape[-1])
        bias = jnp.einsum(
            "cb,cbm->bm" if per_example else "cb,cbm->m", weights, jnp.sum(d, axis=2) ** 2
        )
        if d.shape[2] == 1:  # one position: (Σ_c w δ²) ⊗ u², no per-example kernel
            square = example_outer_square_sums if per_example else outer_square_sum
            g = self._as_kernel(square(d, self._patches(cache.x), weights), cache.x.shape[-1])
            return {"W": g, "b": bias}
        taps = self._taps(cache.x)

        def term(delta: Array, w: Array) -> list[Array]:
            blocks = [example_outer_t(tap, delta, self.precision) ** 2 for tap in taps]
            if per_example:
                return [w[:, None, None] * block for block in blocks]
            return [jnp.einsum("b,bcm->cm", w, block) for block in blocks]

        g = jnp.stack(column_sum(term, d, weights), axis=-3)  # (..., k_h k_w, C_in, features)
        return {"W": g.reshape(*g.shape[:-3], *self._window, *g.shape[-2:]), "b": bias}

    def square_sum(
        self, params: dict[str, Array], cache: Conv2DCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c Σ_n w_{c,n} (∇θ_{c,n})²``, like params."""
        return self._square_sums(cache, deltas, weights, per_example=False)

    def example_square_sums(
        self, params: dict[str, Array], cache: Conv2DCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (∇θ_{c,n})²`` per example, leaves ``(batch, *leaf)``."""
        return self._square_sums(cache, deltas, weights, per_example=True)

    def kfac_factors(
        self,
        params: dict[str, Array],
        cache: Conv2DCache,
        deltas: Array,
        weights: Array,
        example_weights: Array | None = None,
    ) -> tuple[Array, Array]:
        """KFC (Grosse & Martens 2016): KFAC's ``(A, G)`` over the unfolded patches ``u``, for
        ``W̄ = [W̃ | b]`` with ``W̃[o, (c, i, j)] = W[i, j, c, o]``: ``A`` of size
        ``C_in k_h k_w + 1`` (the mean over positions), ``G`` of size ``features`` (the sum).
        ``example_weights`` ``(batch,)`` replace ``A``'s ``1/B`` (see ``kfac_outer``)."""
        d = deltas.reshape(*deltas.shape[:2], -1, deltas.shape[-1])
        return kfac_outer(d, self._patches(cache.x), weights, example_weights)

    def _check_input(self, params: dict[str, Array], x: Array) -> None:
        """At trace time: ``x`` is ``(batch, H, W, C_in)`` with ``W``'s ``C_in``, and fits."""
        w_shape = jnp.shape(params["W"])
        if len(w_shape) != 4 or tuple(w_shape[:2]) != self._window:
            raise ValueError(
                f"params['W']: expected shape ({self._window[0]}, {self._window[1]}, C_in, "
                f"{self.features}), got {w_shape}; build the params with Conv2D.init."
            )
        if jnp.ndim(x) != 4 or x.shape[3] != w_shape[2]:
            raise ValueError(
                f"x: Conv2D takes NHWC inputs (batch, H, W, {w_shape[2]}), got shape "
                f"{jnp.shape(x)}."
            )
        out_spatial("Conv2D", x.shape[1:], self._window, self._strides, self.padding, arg="x")
