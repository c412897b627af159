"""Pictures of a comparison, written beside its table: the test metrics with their intervals, and learning curves.

matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend switch), PNG files. Inputs are
the runs' JSON records (:func:`recbole_llm.quick_start.run_recbole_llm`) and the comparison's intervals
(:func:`recbole_llm.significance.comparison_significance`), so a figure can be redrawn from saved records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_comparison(records: list[dict], significance: dict | None, path, title: str = "") -> Path:
    """One bar per model and test metric, with the model's bootstrap interval as an error bar where the
    comparison has one."""
    models = [r["model"] for r in records]
    metrics = list(records[0]["test_result"])
    intervals = (significance or {}).get("intervals", {})
    figure = _figure(max(6.0, 1.2 * len(metrics) * max(1, len(models)) ** 0.5 + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / len(models)
    for m, record in enumerate(records):
        xs = [i - 0.4 + width * (m + 0.5) for i in range(len(metrics))]
        heights = [record["test_result"].get(name, math.nan) for name in metrics]
        spans = [intervals.get(record["model"], {}).get(name) for name in metrics]
        errors = [[h - s[1] if s else 0 for h, s in zip(heights, spans)],
                  [s[2] - h if s else 0 for h, s in zip(heights, spans)]]
        axes.bar(xs, heights, width, yerr=errors, capsize=3, label=record["model"])
    axes.set_xticks(range(len(metrics)), [f"test {name}" for name in metrics])
    axes.set_ylabel("value")
    if significance:
        share = int(round(100 * significance["confidence"]))
        axes.set_title(f"{title}\n{share}% bootstrap intervals over {significance['unit'] or 'unit'}s "
                       f"({significance['resamples']} resamples)".strip(), fontsize=9)
    elif title:
        axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, ncols=min(len(models), 4))
    figure.savefig(path)
    return Path(path)


def _loss_value(loss) -> float:
    """A logged loss: one number, or the sum of a tuple of loss terms (as RecBole logs the total)."""
    return float(sum(loss)) if isinstance(loss, (list, tuple)) else float(loss)


def _batch_curves(rows) -> tuple[dict[str, tuple[list[float], list[float]]], list[float]]:
    """Per loss function, (x in epochs, moving average of the batch losses) from ``[name, epoch, batch, loss]``,
    and where each stage after the first starts. Stages come one after another on the epoch axis, in the order they
    trained (CALRec's Stage I or ILM's phase one, then fit's epochs), each ``max epoch + 1`` epochs wide."""
    grouped = defaultdict(list)
    for name, epoch, batch, loss in rows:
        grouped[name].append((epoch, batch, loss))
    curves, offset, starts = {}, 0.0, []
    for name, points in grouped.items():  # in the order each loss function first trained
        per_epoch = defaultdict(int)
        for epoch, batch, _ in points:
            per_epoch[epoch] = max(per_epoch[epoch], batch + 1)
        window = max(1, len(points) // 50)
        losses = [loss for _, _, loss in points]
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        curves[name] = ([offset + epoch + (batch + 1) / per_epoch[epoch] for epoch, batch, _ in points], smooth)
        offset += max(per_epoch) + 1
        starts.append(offset)
    return curves, starts[:-1]


def plot_curves(records: list[dict], path) -> Path:
    """One panel per run: its training loss (per batch, smoothed, for LLM trainers; else per epoch) and its valid
    metric at each validation (inside epochs too, with ``valid_curve_steps``), against epochs."""
    curves_figure(records).savefig(path)
    return Path(path)


def curves_figure(records: list[dict]):
    """The figure :func:`plot_curves` writes: per run, its loss lines on the panel's axes and its valid metric on
    their twin."""
    columns = min(3, len(records))
    rows = math.ceil(len(records) / columns)
    figure = _figure(4.2 * columns, 3.2 * rows)
    for index, record in enumerate(records):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_title(record["model"], fontsize=10)
        axes.set_xlabel("epoch")
        drawn, fit_start = False, 0.0
        if record.get("train_batch_losses"):
            curves, starts = _batch_curves(record["train_batch_losses"])
            for name, (xs, ys) in curves.items():
                axes.plot(xs, ys, linewidth=1, label=f"train loss ({name})")
                drawn = True
            for start in starts:  # a stage's end: the next one starts its epochs there
                axes.axvline(start, color="grey", linestyle=":", linewidth=1)
            if starts:
                axes.set_xlabel("epoch (stages one after another)")
                fit_start = starts[-1]  # validations count fit's epochs, which train last
        elif any(_loss_value(loss) for _, loss in record.get("train_losses") or []):
            # (a model with nothing to train, RecBole's Pop, logs a loss of 0 every epoch: no curve to draw)
            epochs = [epoch + 1 for epoch, _ in record["train_losses"]]
            axes.plot(epochs, [_loss_value(loss) for _, loss in record["train_losses"]], marker=".",
                      label="train loss (epoch sum)")
            drawn = True
        axes.set_ylabel("training loss")
        handles, labels = axes.get_legend_handles_labels()
        # the learning curve (validations inside epochs too, LLM trainers' valid_curve), else RecBole's epoch ends
        points = ([(fit_start + point["epochs"], point["valid_score"]) for point in record.get("valid_curve") or []]
                  or [(fit_start + epoch + 1, score) for epoch, score in record.get("valid_scores") or []])
        if points:
            twin = axes.twinx()
            twin.plot(*zip(*points), color="tab:red", marker="o", label=f"valid {record['valid_metric']}")
            twin.set_ylabel(f"valid {record['valid_metric']}", color="tab:red")
            more = twin.get_legend_handles_labels()
            handles, labels, drawn = handles + more[0], labels + more[1], True
        if not drawn:
            axes.text(0.5, 0.5, "no training curve", ha="center", va="center", transform=axes.transAxes)
        else:  # one legend for both axes, under the panel where it covers no line
            axes.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2,
                        frameon=False)
    return figure
