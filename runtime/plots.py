"""curves.png: the loss and the error of every split against the epoch, drawn with matplotlib.

The figure is drawn on matplotlib's Agg canvas directly (no pyplot, no global backend), so
it works without a display and leaves the caller's matplotlib state alone. `curves_png`
returns the PNG bytes; the caller writes them atomically.
"""
from __future__ import annotations

import io
from typing import Sequence

COLOURS = {"train": "tab:blue", "train_dev": "tab:purple", "dev": "tab:orange", "test": "tab:green"}
LABELS = {"train": "train", "train_dev": "train-dev", "dev": "dev", "test": "test"}


def curves_png(history: Sequence, title: str, real: bool = False, human_error: float | None = None) -> bytes:
    """Two panels, loss and error against epoch, one line per split (and the training cost
    J, regularisation included, as a dotted line); human_error as a dashed level; a red
    dash-dotted line before each epoch whose record has `changes` (dlnc tune), labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    epochs = [r.epoch for r in history]
    splits = [name for name in COLOURS if history and name in history[0].splits]
    marker = "o" if len(epochs) <= 30 else None
    for name in splits:
        colour = COLOURS[name]
        loss_axes.plot(epochs, [r.splits[name].loss for r in history], color=colour, label=LABELS[name],
                       marker=marker, markersize=3)
        error_axes.plot(epochs, [r.splits[name].error for r in history], color=colour, label=LABELS[name],
                        marker=marker, markersize=3)
    if history:
        loss_axes.plot(epochs, [r.cost for r in history], color="tab:blue", linestyle=":",
                       label="cost J (train steps)")
    if human_error is not None:
        error_axes.axhline(human_error, color="grey", linestyle="--", label="human error")
    for record in history:                     # graph inputs changed while it trained (dlnc tune)
        changes = getattr(record, "changes", None)
        if not changes:
            continue
        text = ", ".join(f"{name}={value:g}" for name, value in changes.items())
        for axes in (loss_axes, error_axes):
            axes.axvline(record.epoch - 0.5, color="tab:red", linestyle="-.", linewidth=1, alpha=0.7)
        loss_axes.annotate(text, (record.epoch - 0.5, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                           va="top", ha="right", fontsize="x-small", color="tab:red")
    loss_axes.set(title="loss", xlabel="epoch", ylabel="loss")
    error_axes.set(title="mean squared error" if real else "error rate", xlabel="epoch",
                   ylabel="MSE" if real else "error")
    from matplotlib.ticker import MaxNLocator
    for axes in (loss_axes, error_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        if history:
            axes.legend(fontsize="small")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
