"""The lookup table :class:`Embedding`: ``y = W[x]`` for integer token indices ``x``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from bpjax._types import Array, PRNGKey
from bpjax.layers._init import positive_int
from bpjax.layers._outer import column_sum

__all__ = ["Embedding", "EmbeddingCache"]


class EmbeddingCache(NamedTuple):
    """What :meth:`Embedding.forward` keeps for the backward pass."""

    x: Array  # (batch, ...) integer: the token indices looked up


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A lookup table: token ``x`` (an integer in ``[0, vocab_size)``) maps to row ``W[x]``.

    ``W`` has shape ``(vocab_size, features)``; an input of indices of shape ``(batch, ...)``
    gives an output of shape ``(batch, ..., features)``,

        y[n, …] = W[x[n, …]],      ∂C/∂W_v = Σ_{(n, …) : x[n, …] = v} dy[n, …],

    the gradient of row ``v`` being the sum of the output errors of every position that looked it
    up: a scatter-add of the rows of ``dy`` into the indices. The input is discrete, so there is
    no ``∂C/∂x``: the backward pass returns ``dx = None`` (``integer_input``).

    ``W`` is initialised ``N(0, 1)`` (PyTorch's default): every feature of an embedding has unit
    variance, the input scale the next layer's Glorot or He initialisation assumes.

    Indices follow JAX's gather, made consistent in both passes: a negative index counts from the
    end as in NumPy (``-1`` is the last row), and an index still outside ``[0, vocab_size)`` is
    clamped to the nearest row (JAX clamps out-of-bounds gathers; it cannot raise inside ``jit``).
    The backward pass adds each ``dy`` row into the row the forward pass actually read (a
    clamping scatter), so the gradient is the true one even there, where ``jax.grad`` of a plain
    ``W[x]`` drops the out-of-range rows. Keep indices in range: clamping hides the bug.

    Args:
      vocab_size: the number of rows (tokens) of the table.
      features: the size of each embedding vector.

    Raises:
      ValueError: ``vocab_size`` or ``features`` not a positive integer.
      TypeError: (at trace time) an input that is not of an integer dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Embedding(10, 3)
      >>> params, out_shape = layer.init(jax.random.key(0), (5,))
      >>> x = jnp.array([[1, 2, 2, 0, 9]])
      >>> y, cache = layer.forward(params, x)
      >>> grads, dx = layer.backward(params, cache, jnp.ones((1, 5, 3)))
      >>> out_shape, y.shape, grads["W"][:3, 0].tolist(), dx
      ((5, 3), (1, 5, 3), [1.0, 1.0, 2.0], None)
    """

    vocab_size: int
    features: int
    integer_input: ClassVar[bool] = True
    """The layer takes integer inputs (token indices); its backward returns ``dx = None``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab_size", positive_int(self.vocab_size, "vocab_size"))
        object.__setattr__(self, "features", positive_int(self.features, "features"))

    def init(
        self, key: PRNGKey, in_shape: tuple[int, ...], dtype: Any = jnp.float32
    ) -> tuple[dict[str, Array], tuple[int, ...]]:
        """``W ~ N(0, 1)``, shape ``(vocab_size, features)``.

        Args:
          key: a PRNG key.
          in_shape: the index shape of one example: ``()`` for one token, ``(T,)`` for a
            sequence of ``T``, any shape.
          dtype: the floating dtype of ``W``.

        Returns:
          ``({"W": (vocab_size, features)}, (*in_shape, features))``.
        """
        params = {"W": jax.random.normal(key, (self.vocab_size, self.features), dtype)}
        return params, (*tuple(in_shape), self.features)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, EmbeddingCache]:
        """``y = W[x]``, shape ``(batch, ..., features)``, and the cache ``x``.

        Raises:
          TypeError: ``x`` is not of an integer dtype.
        """
        x_dtype = jnp.result_type(x)
        if not jnp.issubdtype(x_dtype, jnp.integer):
            raise TypeError(
                f"x: Embedding looks up integer token indices, got dtype {x_dtype}; pass "
                "indices in [0, vocab_size) as integers (x.astype(jnp.int32))."
            )
        x = jnp.asarray(x)
        y = params["W"].at[x].get(mode="clip")  # y = W[x]: negative from the end, then clamped
        return y, EmbeddingCache(x)

    # -- extension rules (bpjax.extend.rules) -----------------------------------------------
    #
    # Example n's gradient has row v = Σ_{t : i_t = v} dy_t over its P positions. With
    # M_{tt'} = [i_t = i_{t'}] (the rows the forward read: negative indices wrapped, then
    # clamped, as the backward's scatter does), row i_t of g_n is G_t = Σ_{t'} M_{tt'} dy_{t'}
    # and ‖g_n‖² = Σ_{t,t'} M_{tt'} dy_t·dy_{t'} (P² work, no (vocab, features) table per example
    # unless that is smaller); a squared row G_t² is counted once per distinct token, i.e. with
    # weight 1/c_t, c_t = Σ_{t'} M_{tt'}.

    def _rows_read(self, x: Array) -> Array:
        """``(batch, P)``: the table row each position read (wrapped, then clamped)."""
        v = self.vocab_size
        rows = jnp.where(x < 0, x + v, x)
        return jnp.clip(rows, 0, v - 1).reshape(x.shape[0], -1)

    def _same(self, x: Array) -> Array:
        rows = self._rows_read(x)
        return rows[:, :, None] == rows[:, None, :]  # M, (batch, P, P)

    def example_grads(
        self, params: dict[str, Array], cache: EmbeddingCache, dy: Array
    ) -> dict[str, Array]:
        """Per example the scatter-add of its ``dy`` rows: ``(batch, vocab_size, features)``."""
        rows = self._rows_read(cache.x)
        d = dy.reshape(rows.shape[0], -1, dy.shape[-1])
        batch = jnp.arange(rows.shape[0])[:, None]
        g = jnp.zeros((rows.shape[0], *params["W"].shape), dy.dtype).at[batch, rows].add(d)
        return {"W": g}

    def example_sq_norms(
        self, params: dict[str, Array], cache: EmbeddingCache, dy: Array
    ) -> dict[str, Array]:
        """``‖g_n‖² = Σ_{t,t'} [i_t = i_{t'}] dy_t·dy_{t'}``, shape ``(batch,)``."""
        d = dy.reshape(dy.shape[0], -1, dy.shape[-1])
        if d.shape[1] ** 2 > params["W"].size:  # the table per example is the smaller
            return {"W": jnp.sum(self.example_grads(params, cache, dy)["W"] ** 2, axis=(1, 2))}
        same = self._same(cache.x).astype(d.dtype)
        return {"W": jnp.einsum("bpq,bpf,bqf->b", same, d, d)}

    def _squared_rows(self, cache: EmbeddingCache, dy: Array, w: Array) -> Array:
        """``w_n G_t² / c_t`` for every position, ``(batch, P, features)``."""
        d = dy.reshape(dy.shape[0], -1, dy.shape[-1])
        same = self._same(cache.x).astype(d.dtype)
        rows = jnp.einsum("bpq,bqf->bpf", same, d)  # G_t: the whole row of token i_t
        count = jnp.sum(same, axis=2)  # c_t ≥ 1 (M_tt = 1)
        return rows * rows * (w[:, None] / count)[:, :, None]

    def square_sum(
        self, params: dict[str, Array], cache: EmbeddingCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c Σ_n w_{c,n} (g_{c,n})²``: each distinct token's squared row, scattered."""
        rows = self._rows_read(cache.x).reshape(-1)
        zero = jnp.zeros(params["W"].shape, deltas.dtype)

        def term(dy: Array, w: Array) -> Array:
            sq = self._squared_rows(cache, dy, w)
            return zero.at[rows].add(sq.reshape(-1, sq.shape[-1]))

        return {"W": column_sum(term, deltas, weights)}

    def example_square_sums(
        self, params: dict[str, Array], cache: EmbeddingCache, deltas: Array, weights: Array
    ) -> dict[str, Array]:
        """``Σ_c w_{c,n} (g_{c,n})²`` per example, ``(batch, vocab_size, features)``."""
        rows = self._rows_read(cache.x)
        batch = jnp.arange(rows.shape[0])[:, None]
        zero = jnp.zeros((rows.shape[0], *params["W"].shape), deltas.dtype)

        def term(dy: Array, w: Array) -> Array:
            return zero.at[batch, rows].add(self._squared_rows(cache, dy, w))

        return {"W": column_sum(term, deltas, weights)}

    def backward(
        self, params: dict[str, Array], cache: EmbeddingCache, dy: Array
    ) -> tuple[dict[str, Array], None]:
        """``∂C/∂W = `` the scatter-add of the rows of ``dy`` into the indices; ``dx = None``.

        Args:
          params: as from :meth:`init`.
          cache: from :meth:`forward`.
          dy: ``∂C/∂y``, shape ``(batch, ..., features)``.

        Returns:
          ``({"W": (vocab_size, features)}, None)``.
        """
        W = params["W"]
        dW = jnp.zeros_like(W).at[cache.x].add(dy, mode="clip")  # Σ_{x=v} dy
        return {"W": dW}, None
