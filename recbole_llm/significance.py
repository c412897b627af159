"""Which differences between the models of a comparison are real: seeded paired bootstrap intervals.

A test metric is an average over users (NDCG@10, Recall@10, ...) or a statistic of scored rows (AUC, LogLoss).
Every run's record keeps those units (:func:`recbole_llm.metrics.evaluation_units`). All models of a comparison
are evaluated on the same users (rows), so their difference is measured *paired*: each of ``resamples`` draws
picks users (rows) with replacement, the same draw for every model, and the metric is recomputed on it for each
model; the 2.5 and 97.5 percentiles of a model's values (or of two models' differences) are its 95% interval
(Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13: percentile intervals). A difference whose
interval excludes 0 is marked significant. Draws are seeded, so a rerun gives the same intervals.

For a top-k metric the resampled value is the mean of the drawn users' values; for a row metric RecBole's own
metric function (e.g. its AUC) is recomputed on the drawn rows, so AUC's dependence between rows is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from recbole_llm.metrics import metric_class

RESAMPLES = 1000
CONFIDENCE = 0.95
CHUNK = 100  # resamples drawn at once (a draw over 20k rows is 160 kB of indices)


class UnpairedError(ValueError):
    """Two runs' evaluation units are not the same users (rows): they cannot be compared pairwise."""


@dataclass(frozen=True)
class Interval:
    """A statistic on all units (``value``) and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def has_metric(units: dict | None, metric: str) -> bool:
    """Whether ``units`` can give ``metric`` (a top-k metric it kept, or any RecBole metric of scored rows)."""
    if not units:
        return False
    if units["unit"] == "user":
        return metric in units["values"]
    from recbole.evaluator.base_metric import LossMetric

    try:
        return issubclass(metric_class(metric), LossMetric)
    except KeyError:
        return False


def _statistic(units: dict, metric: str):
    """``f(index [draws, n]) -> [draws]``: the metric recomputed on each draw of units."""
    if units["unit"] == "user":
        values = np.asarray(units["values"][metric], dtype=np.float64)
        return lambda index: values[index].mean(axis=-1)
    scores, labels = (np.asarray(units[key], dtype=np.float64) for key in ("scores", "labels"))
    function = metric_class(metric)({"metric_decimal_place": 12}).metric_info
    return lambda index: np.array([function(scores[row], labels[row]) for row in np.atleast_2d(index)])


def _size(units: dict) -> int:
    return len(units["labels"] if units["unit"] == "row" else next(iter(units["values"].values())))


def _check_paired(a: dict, b: dict) -> None:
    if a["unit"] != b["unit"] or _size(a) != _size(b):
        raise UnpairedError(f"one run evaluated {_size(a)} {a['unit']}s, the other {_size(b)} {b['unit']}s")
    if a.get("users") is not None and b.get("users") is not None and a["users"] != b["users"]:
        raise UnpairedError("the two runs evaluated different users")
    if a["unit"] == "row" and a["labels"] != b["labels"]:
        raise UnpairedError("the two runs scored different rows (their labels differ)")


def _draws(n: int, resamples: int, seed: int):
    """The bootstrap's draws of ``n`` unit indices, ``CHUNK`` at a time, from one seeded stream."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, resamples - start), n))


def _on_all(statistic, n: int) -> float:
    return float(np.ravel(statistic(np.arange(n)))[0])


def _interval(value: float, samples: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def bootstrap(units: dict, metric: str, resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> Interval:
    """``metric`` on all of a run's units and its percentile bootstrap interval."""
    statistic, n = _statistic(units, metric), _size(units)
    samples = np.concatenate([statistic(index) for index in _draws(n, resamples, seed)])
    return _interval(_on_all(statistic, n), samples, confidence)


def paired_bootstrap(a: dict, b: dict, metric: str, resamples: int = RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> Interval:
    """``metric(a) - metric(b)`` on the same units, and its paired percentile bootstrap interval (both runs
    recomputed on each draw)."""
    _check_paired(a, b)
    stat_a, stat_b, n = _statistic(a, metric), _statistic(b, metric), _size(a)
    samples = np.concatenate([stat_a(index) - stat_b(index) for index in _draws(n, resamples, seed)])
    return _interval(_on_all(stat_a, n) - _on_all(stat_b, n), samples, confidence)


@dataclass(frozen=True)
class Difference:
    """A model's paired difference to the best other model of a comparison in ``metric`` (test split)."""

    model: str
    against: str
    metric: str
    difference: float
    low: float
    high: float
    significant: bool


def comparison_significance(records: list[dict], metric: str | None = None, resamples: int = RESAMPLES,
                            seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """The intervals of a comparison: every model's interval for every test metric its units give, and each
    model's paired difference to the best *other* model in ``metric`` (default: the run's ``valid_metric``).

    Returns a JSON-ready dict: ``{"metric", "resamples", "seed", "confidence", "unit", "intervals": {model:
    {metric: [value, low, high]}}, "differences": [Difference as dict, ...], "missing": [model, ...]}`` (models
    whose record kept no units for ``metric``, e.g. records written before units were kept)."""
    from recbole.evaluator.register import smaller_metrics

    metric = (metric or records[0]["valid_metric"]).lower()
    smaller = metric.split("@")[0] in smaller_metrics
    usable = [r for r in records if has_metric(r.get("test_units"), metric)]
    intervals = {}
    for record in records:
        units = record.get("test_units")
        intervals[record["model"]] = {
            name: list(asdict(bootstrap(units, name, resamples, seed, confidence)).values())
            for name in record["test_result"] if has_metric(units, name)
        }
    differences = []
    for record in usable:
        others = [r for r in usable if r is not record]
        if not others:
            break
        pick = min if smaller else max
        best = pick(others, key=lambda r: r["test_result"][metric])
        interval = paired_bootstrap(record["test_units"], best["test_units"], metric, resamples, seed, confidence)
        differences.append(asdict(Difference(record["model"], best["model"], metric, interval.value, interval.low,
                                             interval.high, interval.excludes_zero)))
    return {"metric": metric, "resamples": resamples, "seed": seed, "confidence": confidence,
            "unit": usable[0]["test_units"]["unit"] if usable else None, "intervals": intervals,
            "differences": differences, "missing": [r["model"] for r in records if r not in usable]}
