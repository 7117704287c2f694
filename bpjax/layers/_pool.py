"""Pooling over NHWC images: :class:`MaxPool2D` and :class:`AvgPool2D`, backward by hand.

Both forwards are one :func:`jax.lax.reduce_window`; neither backward uses autodiff.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from bpjax._types import Array, PRNGKey
from bpjax.layers._init import (
    Pads,
    check_padding,
    check_pair,
    conv_taps,
    out_spatial,
    resolve_pads,
    transposed_pads,
)

__all__ = [
    "AvgPool2D",
    "MaxPool2D",
    "PoolCache",
    "max_routes_by_offsets",
    "max_routes_by_tiles",
    "windows_tile",
]


def _cells_per_window(size: int, pads: tuple[int, int], window: int, stride: int) -> np.ndarray:
    """Along one axis: how many cells of each window ``[s p − lo, s p − lo + k)`` are inputs."""
    lo, hi = pads
    start = np.arange((size + lo + hi - window) // stride + 1) * stride - lo
    return (np.minimum(start + window, size) - np.maximum(start, 0)).astype(np.float64)


def _window_cells(
    size: int, pads: tuple[int, int], window: int, stride: int, offset: int, count: int
) -> tuple[np.ndarray | None, tuple[int, int, int]]:
    """Cell ``offset`` of each of ``count`` windows along one axis: where it is, and the way back.

    Returns whether each lies in the input rather than the padding (``None`` where all do), and
    the ``lax.pad`` config ``(low, high, interior)`` that puts ``count`` values, one per window,
    back on the input's ``size`` cells: interior padding ``s − 1`` spreads them ``s`` apart, the
    low pad ``offset − lo`` places the first, and negative edge pads crop what fell in the padding.
    """
    lo = pads[0]
    where = np.arange(count) * stride + offset - lo  # in input coordinates
    inside = (where >= 0) & (where < size)
    low = offset - lo
    return (None if inside.all() else inside), (
        low,
        size - 1 - low - stride * (count - 1),
        stride - 1,
    )


def _outer_mask(rows: np.ndarray | None, cols: np.ndarray | None, h: int, w: int) -> Array:
    """``rows[p] and cols[q]`` (``None``: all true) as a ``(1, h, w, 1)`` constant mask."""
    rows = np.ones(h, bool) if rows is None else rows
    cols = np.ones(w, bool) if cols is None else cols
    return jnp.asarray((rows[:, None] & cols[None, :])[None, :, :, None])


def max_routes_by_offsets(
    x: Array,
    y: Array,
    dy: Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pads,
) -> Array:
    """``∂C/∂x``, shape of ``x``: each ``dy[n, p, q, c]`` to the first maximum of its window.

    Any window, stride and padding: a loop over the ``k_h k_w`` window offsets (not over
    pixels). At each, a strided slice of ``x`` compared with ``y`` marks the windows whose first
    maximum sits there (row-major, so ties go to the smallest ``i``, then ``j``), and
    ``lax.pad`` with interior padding puts their ``dy`` back onto ``x``'s grid, summed where
    windows overlap. No scatter.

    Args:
      x: ``(batch, H, W, C)``, the forward's input.
      y: ``(batch, H_out, W_out, C)``, its window maxima.
      dy: ``∂C/∂y``, shaped like ``y``.
      window, strides: ``(k_h, k_w)``, ``(s_h, s_w)``.
      pads: ``((top, bottom), (left, right))``; padded cells never win.
    """
    (kh, kw), (sh, sw) = window, strides
    (h, w), (h_out, w_out) = x.shape[1:3], y.shape[1:3]
    taps = conv_taps(x, window, strides, pads)  # row-major over (i, j)
    taken = jnp.zeros(y.shape, bool)  # whether window (p, q) has found its maximum yet
    dx = jnp.zeros(x.shape, dy.dtype)
    for i in range(kh):  # the window offsets, row-major: the tie order
        rows_in, rows_back = _window_cells(h, pads[0], kh, sh, i, h_out)
        for j in range(kw):
            cols_in, cols_back = _window_cells(w, pads[1], kw, sw, j, w_out)
            # the cells x_pad[n, s_h p + i, s_w q + j, c] of every window (p, q)
            cells = taps[i * kw + j]
            hit = (cells == y) & ~taken  # the window's maximum, and no earlier one: ties
            if rows_in is not None or cols_in is not None:  # padding never wins
                inside = _outer_mask(rows_in, cols_in, h_out, w_out)
                hit = hit & inside
            taken = taken | hit
            # ∂C/∂x[n, s_h p + i − top, s_w q + j − left, c] += dy[n, p, q, c] where hit
            routed = jnp.where(hit, dy, jnp.zeros((), dy.dtype))
            dx = dx + lax.pad(
                routed, jnp.zeros((), dy.dtype), ((0, 0, 0), rows_back, cols_back, (0, 0, 0))
            )
    return dx


def windows_tile(window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> bool:
    """Whether the windows tile the input: strides equal to the window and no padding.

    Then every input cell lies in at most one window (the last ``H mod k_h`` rows and
    ``W mod k_w`` columns in none), the case :func:`max_routes_by_tiles` takes.
    """
    return tuple(window) == tuple(strides) and all(p == 0 for side in pads for p in side)


def max_routes_by_tiles(x: Array, y: Array, dy: Array, window: tuple[int, int]) -> Array:
    """:func:`max_routes_by_offsets` where the windows tile (:func:`windows_tile`), by reshaping.

    The covered ``(k_h H_out, k_w W_out)`` corner of ``x`` is viewed as ``(batch, H_out, k_h,
    W_out, k_w, C)``: each window is a ``(k_h, k_w)`` block, compared with its maximum ``y``
    broadcast, the first maximum kept in row-major order (the same ties, and NaN windows pass
    nothing, as there). The mask depends on ``x`` and ``y`` only, so under ``vmap`` over the
    columns of a loss-Hessian factor it is built once, and each column's ``dx`` is one select of
    ``dy`` broadcast over the block, reshaped: no strided pad and no sum of ``k_h k_w``
    full-size arrays per column (a CNN's GGN diagonal ran 1.5× faster for it). The uncovered
    last rows and columns get zero.
    """
    kh, kw = window
    batch, h_out, w_out, channels = y.shape
    h, w = kh * h_out, kw * w_out
    blocks = x[:, :h, :w].reshape(batch, h_out, kh, w_out, kw, channels)
    equal = blocks == y[:, :, None, :, None, :]
    taken = jnp.zeros(y.shape, bool)  # whether window (p, q) has found its maximum yet
    rows = []
    for i in range(kh):  # row-major: the tie order
        cols = []
        for j in range(kw):
            hit = equal[:, :, i, :, j] & ~taken
            taken = taken | hit
            cols.append(hit)
        rows.append(jnp.stack(cols, axis=3))  # (batch, H_out, W_out, k_w, C)
    first = jnp.stack(rows, axis=2)  # (batch, H_out, k_h, W_out, k_w, C)
    zero = jnp.zeros((), dy.dtype)
    dx = jnp.where(first, dy[:, :, None, :, None, :], zero).reshape(batch, h, w, channels)
    rest = ((0, 0, 0), (0, x.shape[1] - h, 0), (0, x.shape[2] - w, 0), (0, 0, 0))
    return lax.pad(dx, zero, rest)


class PoolCache(NamedTuple):
    """What :meth:`MaxPool2D.forward` and :meth:`AvgPool2D.forward` keep for the backward pass."""

    x: Array  # (batch, H, W, C): the layer's input
    y: Array  # (batch, H_out, W_out, C): the pooled output


@dataclasses.dataclass(frozen=True)
class _Pool2D:
    """Window, strides and padding of a pooling layer, checked and normalised."""

    window: int | tuple[int, int]
    strides: int | tuple[int, int] | None = None
    padding: Any = "VALID"

    def __post_init__(self) -> None:
        window = check_pair("window", self.window)
        object.__setattr__(self, "window", window)
        strides = window if self.strides is None else check_pair("strides", self.strides)
        object.__setattr__(self, "strides", strides)
        padding = check_padding(self.padding)
        if not isinstance(padding, str) and any(
            p >= k for pads, k in zip(padding, window, strict=True) for p in pads
        ):
            raise ValueError(
                f"padding: each pad must be smaller than the window {window} along its axis, so "
                f"that every window holds an input cell; got {padding}."
            )
        object.__setattr__(self, "padding", padding)

    @property
    def _window(self) -> tuple[int, int]:
        return self.window  # type: ignore[return-value]  # a pair after __post_init__

    @property
    def _strides(self) -> tuple[int, int]:
        return self.strides  # type: ignore[return-value]  # a pair after __post_init__

    def _pads(self, x_shape: tuple[int, ...]) -> Pads:
        return resolve_pads((x_shape[1], x_shape[2]), self._window, self._strides, self.padding)

    def _reduce_window_args(self, x_shape: tuple[int, ...]) -> dict[str, Any]:
        (top, bottom), (left, right) = self._pads(x_shape)
        return {
            "window_dimensions": (1, *self._window, 1),
            "window_strides": (1, *self._strides, 1),
            "padding": ((0, 0), (top, bottom), (left, right), (0, 0)),
        }

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """No params; the output shape ``(H_out, W_out, C)`` of an ``(H, W, C)`` input.

        Raises:
          ValueError: ``in_shape`` is not ``(H, W, C)`` or the window does not fit it.
        """
        del key, dtype
        name = type(self).__name__
        _, (h_out, w_out) = out_spatial(name, in_shape, self._window, self._strides, self.padding)
        return {}, (h_out, w_out, int(in_shape[2]))

    def _check_input(self, x: Array) -> None:
        name = type(self).__name__
        if jnp.ndim(x) != 4:
            raise ValueError(f"x: {name} takes NHWC inputs (batch, H, W, C), got {jnp.shape(x)}.")
        out_spatial(name, x.shape[1:], self._window, self._strides, self.padding, arg="x")


@dataclasses.dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    """Max pooling over NHWC images: the largest input in each window, per channel.

    With ``x`` of shape ``(batch, H, W, C)``, padded by ``((top, bottom), (left, right))`` cells
    that never win (``−∞``)::

        y[n, p, q, c] = max_{i < k_h, j < k_w} x_pad[n, s_h p + i, s_w q + j, c]

    shape ``(batch, H_out, W_out, C)``. The backward routes each ``dy[n, p, q, c]`` to the cell of
    its window that holds the maximum, ``∂C/∂x = Σ_{p, q} dy[p, q] e_{argmax of window (p, q)}``,
    summing where windows overlap. Ties: the first maximal input cell of the window in row-major
    order (smallest ``i``, then smallest ``j``) gets the whole ``dy``, the others nothing; this is
    what ``jax.vjp`` of :func:`jax.lax.reduce_window` with :func:`jax.lax.max` does (its transpose
    is XLA's ``SelectAndScatter`` with ``>=``, which keeps the first maximum it met). A window whose
    maximum is NaN passes no gradient.

    Where the windows tile the input (strides equal to the window, no padding: the default
    ``MaxPool2D(k)`` on ``"VALID"``, or ``"SAME"`` on sizes divisible by ``k``) the backward
    reshapes ``x`` into its windows (:func:`max_routes_by_tiles`); otherwise it loops over the
    ``k_h k_w`` window offsets (:func:`max_routes_by_offsets`). No scatter, no autodiff.

    Args:
      window: ``k`` or ``(k_h, k_w)``.
      strides: ``s`` or ``(s_h, s_w)``; ``None`` (the default) takes the window, so windows tile.
      padding: ``"SAME"``, ``"VALID"``, ``p``, ``(p_h, p_w)`` or ``((top, bottom), (left, right))``;
        every explicit pad must be smaller than the window along its axis.

    Raises:
      ValueError: a bad ``window``, ``strides`` or ``padding``.

    Example:
      >>> import jax.numpy as jnp
      >>> pool = MaxPool2D(2)
      >>> x = jnp.array([[1.0, 2.0], [4.0, 3.0]]).reshape(1, 2, 2, 1)
      >>> y, cache = pool.forward({}, x)
      >>> _, dx = pool.backward({}, cache, jnp.ones_like(y))
      >>> y.ravel().tolist(), dx.ravel().tolist()
      ([4.0], [0.0, 0.0, 1.0, 0.0])
    """

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, PoolCache]:
        """``y``, the window maxima, shape ``(batch, H_out, W_out, C)``, and the cache."""
        del params
        self._check_input(x)
        # NumPy init value: concrete under jit, so JAX sees reduce_window_max (see AvgPool2D)
        y = lax.reduce_window(
            x, np.array(-np.inf, x.dtype), lax.max, **self._reduce_window_args(x.shape)
        )
        return y, PoolCache(x, y)

    def backward(
        self, params: dict[str, Array], cache: PoolCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``({}, dx)``: each ``dy`` to its window's first maximum, ``dx`` of ``x``'s shape."""
        del params
        x, y = cache
        window, strides, pads = self._window, self._strides, self._pads(x.shape)
        if windows_tile(window, strides, pads):
            return {}, max_routes_by_tiles(x, y, dy, window)
        return {}, max_routes_by_offsets(x, y, dy, window, strides, pads)


@dataclasses.dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    """Average pooling over NHWC images: the mean input of each window, per channel.

    With ``x`` of shape ``(batch, H, W, C)`` zero-padded by ``((top, bottom), (left, right))``::

        y[n, p, q, c] = (1 / N[p, q]) Σ_{i < k_h, j < k_w} x_pad[n, s_h p + i, s_w q + j, c]

    where ``N[p, q]`` counts the input cells of window ``(p, q)``: padded cells do not count, as
    in :func:`jax.example_libraries.stax.AvgPool` and TensorFlow's ``"SAME"`` average pooling
    (``count_include_pad=True`` divides by ``k_h k_w`` everywhere instead, as flax's ``avg_pool``
    and PyTorch's ``AvgPool2d`` do by default). Without padding the two agree.

    The backward spreads each ``dy[p, q] / N[p, q]`` evenly over its window's input cells,
    ``∂C/∂x[h, w] = Σ_{windows (p, q) ∋ (h, w)} dy[p, q] / N[p, q]``: one
    :func:`jax.lax.reduce_window` sum over ``dy / N`` dilated by the strides, a stride-1 window
    under the transposed pads (the transposed sum pooling). No autodiff.

    Args:
      window: ``k`` or ``(k_h, k_w)``.
      strides: ``s`` or ``(s_h, s_w)``; ``None`` (the default) takes the window, so windows tile.
      padding: ``"SAME"``, ``"VALID"``, ``p``, ``(p_h, p_w)`` or ``((top, bottom), (left, right))``;
        every explicit pad must be smaller than the window along its axis.
      count_include_pad: divide by the whole window size ``k_h k_w``, padded cells included.

    Raises:
      ValueError: a bad ``window``, ``strides`` or ``padding``.

    Example:
      >>> import jax.numpy as jnp
      >>> pool = AvgPool2D(2)
      >>> x = jnp.array([[1.0, 2.0], [4.0, 3.0]]).reshape(1, 2, 2, 1)
      >>> y, cache = pool.forward({}, x)
      >>> _, dx = pool.backward({}, cache, jnp.ones_like(y))
      >>> y.ravel().tolist(), dx.ravel().tolist()
      ([2.5], [0.25, 0.25, 0.25, 0.25])
    """

    _: dataclasses.KW_ONLY
    count_include_pad: bool = False

    def _counts(self, x_shape: tuple[int, ...]) -> np.ndarray:
        """``N[p, q]``, input cells per window, shape ``(1, H_out, W_out, 1)``, at trace time."""
        if self.count_include_pad:
            return np.full((1, 1, 1, 1), float(self._window[0] * self._window[1]))
        axes = [
            _cells_per_window(n, pads, k, s)
            for n, pads, k, s in zip(
                x_shape[1:3], self._pads(x_shape), self._window, self._strides, strict=True
            )
        ]
        return np.outer(*axes)[None, :, :, None]

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, PoolCache]:
        """``y``, the window means, shape ``(batch, H_out, W_out, C)``, and the cache."""
        del params
        self._check_input(x)
        # a NumPy init value stays concrete under jit, so JAX sees reduce_window_sum, which it
        # can differentiate (the plain-JAX reference needs that); a jnp one would be staged out
        total = lax.reduce_window(
            x, np.array(0, x.dtype), lax.add, **self._reduce_window_args(x.shape)
        )
        y = total / jnp.asarray(self._counts(x.shape), x.dtype)  # y = Σ_window x_pad / N
        return y, PoolCache(x, y)

    def backward(
        self, params: dict[str, Array], cache: PoolCache, dy: Array
    ) -> tuple[dict[str, Array], Array]:
        """``({}, dx)``: ``dy / N`` spread over each window, ``dx`` of ``x``'s shape."""
        del params
        x = cache.x
        (kh, kw), (sh, sw) = self._window, self._strides
        pads_h, pads_w = self._pads(x.shape)
        g = dy / jnp.asarray(self._counts(x.shape), dy.dtype)  # ∂C/∂(window sum) = dy / N
        # ∂C/∂x[h, w] = Σ over the windows holding (h, w) of g: a sum over dilate_s(g)
        dx = lax.reduce_window(
            g,
            np.array(0, g.dtype),  # concrete: the reduce_window_sum primitive, as in forward
            lax.add,
            window_dimensions=(1, kh, kw, 1),
            window_strides=(1, 1, 1, 1),
            padding=(
                (0, 0),
                transposed_pads(x.shape[1], pads_h, kh, sh),
                transposed_pads(x.shape[2], pads_w, kw, sw),
                (0, 0),
            ),
            base_dilation=(1, sh, sw, 1),
        )
        return {}, dx
