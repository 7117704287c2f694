"""The recurrent layers :class:`Elman`, :class:`LSTM` and :class:`LastStep`, and their caches.

They live in :mod:`bpjax.layers` (``bpjax/layers/_recurrent.py``, whose docstring writes out
backpropagation through time); this module re-exports them, so ``from bpjax.rnn import LSTM``
and ``from bpjax.layers import LSTM`` give the same class.
"""

from bpjax.layers import LSTM, Elman, ElmanCache, LastStep, LastStepCache, LSTMCache

__all__ = [
    "LSTM",
    "Elman",
    "ElmanCache",
    "LSTMCache",
    "LastStep",
    "LastStepCache",
]
