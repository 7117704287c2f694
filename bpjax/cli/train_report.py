"""What ``bpjax train`` shows while it runs and plots when done.

A rich progress bar on a terminal, about ten plain lines anywhere else (:func:`progress`), the
metrics and steps-per-second text of those lines and of the summary (:func:`metrics_text`,
:func:`rate_text`), and the loss-curve figure of ``--out`` (:func:`plot_history`). Records are
:class:`bpjax.train.EvalRecord` and :class:`bpjax.train.History`. rich and matplotlib are imported
inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["metrics_text", "plot_history", "progress", "rate_text"]


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def metrics_text(loss: float, accuracy: float | None) -> str:
    """``loss 0.1234 accuracy 97.5%``; no accuracy for regression targets."""
    return f"loss {loss:.4g}" + ("" if accuracy is None else f" accuracy {_percent(accuracy)}")


def _steps_per_second(previous: Any, record: Any) -> float | None:
    """Steps per second between two evaluations (from the start when ``previous`` is None)."""
    steps = record.step - (0 if previous is None else previous.step)
    seconds = record.seconds - (0.0 if previous is None else previous.seconds)
    return steps / seconds if seconds > 0 and steps > 0 else None


def rate_text(previous: Any, record: Any) -> str:
    """``", N steps/s"`` between two evaluations, or nothing."""
    rate = _steps_per_second(previous, record)
    return "" if rate is None else f", {rate:,.0f} steps/s"


def _eval_line(previous: Any, record: Any, *, epochs: int) -> str:
    """One line of metrics at an evaluation, with the steps/s since the ``previous`` line."""
    line = f"epoch {record.epoch}/{epochs}  step {record.step}  " + metrics_text(
        record.train_loss, record.train_accuracy
    )
    if record.test_loss is not None:
        line += "  held-out " + metrics_text(record.test_loss, record.test_accuracy)
    # the first line's time is mostly compiling: no rate there
    return line + ("" if previous is None else rate_text(previous, record))


@contextlib.contextmanager
def progress(total: int, *, epochs: int) -> Iterator[tuple[Any, Any]]:
    """``(on_step, on_eval)`` callbacks for :func:`bpjax.train.fit`.

    On a terminal: a rich progress bar with the loss, the accuracy and steps/s, gone when done.
    Elsewhere (a pipe, a log, a test): at most about ten plain lines, one per tenth of the run.
    """
    if not sys.stdout.isatty():
        every = max(1, math.ceil(epochs / 10))
        logged: list[Any] = [None]

        def log(record: Any) -> None:
            if record.epoch % every == 0 or record.epoch == epochs:
                print(_eval_line(logged[-1], record, epochs=epochs), flush=True)
                logged.append(record)

        yield (lambda step: None), log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # fits 80 columns; the header line above names the run, the summary below gives the time
    progress = Progress(
        BarColumn(bar_width=15),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("acc {task.fields[accuracy]}"),
        TextColumn("held-out {task.fields[held_out]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        transient=True,
    )
    task = progress.add_task("train", total=total, loss="–", accuracy="–", held_out="–", rate="–")
    evaluated: list[Any] = [None]

    def on_step(step: int) -> None:
        progress.update(task, completed=step)

    def on_eval(record: Any) -> None:
        progress.update(
            task,
            loss=f"{record.train_loss:.3g}",
            accuracy=_percent(record.train_accuracy),
            held_out=_percent(record.test_accuracy),
        )
        # between evaluations, and not the first (compiling): the steps and their waits alike
        rate = None if evaluated[-1] is None else _steps_per_second(evaluated[-1], record)
        if rate is not None:
            progress.update(task, rate=f"{rate:,.0f}")
        evaluated.append(record)

    with progress:
        yield on_step, on_eval


def plot_history(history: Any, path: Any, *, title: str) -> None:
    """The loss curve (every step's minibatch loss, and each evaluation) and the accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classify = any(r.train_accuracy is not None for r in history.evals)
    figure = Figure(figsize=(10, 4) if classify else (6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, *acc_ax = figure.subplots(1, 2 if classify else 1, squeeze=False)[0]
    steps = [record.step for record in history.evals]
    loss_ax.plot(
        range(1, len(history.step_loss) + 1),
        history.step_loss,
        color="0.7",
        linewidth=0.8,
        label="minibatch",
    )
    loss_ax.plot(steps, [r.train_loss for r in history.evals], "o-", markersize=3, label="train")
    if any(r.test_loss is not None for r in history.evals):
        loss_ax.plot(
            steps, [r.test_loss for r in history.evals], "s-", markersize=3, label="held-out"
        )
    finite = [v for v in history.step_loss if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    for ax in acc_ax:  # none for regression targets
        ax.plot(steps, [r.train_accuracy for r in history.evals], "o-", label="train")
        if any(r.test_accuracy is not None for r in history.evals):
            ax.plot(steps, [r.test_accuracy for r in history.evals], "s-", label="held-out")
        ax.set(xlabel="step", ylabel="accuracy", title="accuracy")
        ax.legend()
    figure.suptitle(title, fontsize="medium")
    figure.savefig(path, dpi=100)
