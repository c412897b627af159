"""Metrics recbole_llm adds to RecBole's evaluator, and each evaluated user's (or row's) share of a metric.

RecBole finds its metrics by introspecting ``recbole.evaluator.metrics`` once, at import; :func:`register_metric`
adds a class to the same four registries (Config and the Evaluator read them by reference), so ``metrics: [AUC,
LogLoss, Accuracy]`` works in any YAML, for every model.

:func:`evaluation_units` keeps what a test result is an average of (RecBole's per-user values of each top-k metric;
the scores and labels of the rows a CTR metric is computed over), for paired significance between the models of a
comparison (:mod:`recbole_llm.significance`).
"""

from __future__ import annotations

import numpy as np
from recbole.evaluator.base_metric import LossMetric


class Accuracy(LossMetric):
    r"""Share of labeled rows whose predicted probability falls on the label's side of 0.5 (RALLRec's ACC,
    sklearn's ``accuracy_score(y, p > 0.5)``):

    .. math:: ACC = \frac{1}{|S|} \sum_{(u,i) \in S} [\,(\hat{r}_{ui} > 0.5) = r_{ui}\,]

    Like LogLoss it assumes the model's ``predict`` returns probabilities (every RecBole CTR model does).
    """

    def calculate_metric(self, dataobject):
        return self.output_metric("accuracy", dataobject)

    def metric_info(self, preds, trues):
        return float(np.mean((np.asarray(preds) > 0.5) == (np.asarray(trues) > 0.5)))


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    r"""Standard error of an AUC measured on ``positives`` + ``negatives`` labeled rows (Hanley and McNeil, 1982,
    "The meaning and use of the area under a ROC curve", Radiology 143, eq. 1):

    .. math:: SE = \sqrt{\frac{A(1-A) + (n_1-1)(Q_1-A^2) + (n_2-1)(Q_2-A^2)}{n_1 n_2}},
              \quad Q_1 = \frac{A}{2-A}, \quad Q_2 = \frac{2A^2}{1+A}

    Two models scored on the same rows differ by more than noise only well beyond this."""
    if positives < 1 or negatives < 1:
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives)
    return float(np.sqrt(max(variance, 0.0)))


def register_metric(cls) -> None:
    """Make ``cls`` (a RecBole metric class) usable by name in ``metrics``, like RecBole's own."""
    from recbole.evaluator import register

    name = cls.__name__.lower()
    register.metrics_dict[name] = cls
    register.metric_information[name] = cls.metric_need
    register.metric_types[name] = cls.metric_type
    if cls.smaller and name not in register.smaller_metrics:
        register.smaller_metrics.append(name)


register_metric(Accuracy)


def metric_class(name: str):
    """RecBole's metric class for a result key (``"ndcg@10"`` -> NDCG, ``"auc"`` -> AUC)."""
    from recbole.evaluator.register import metrics_dict

    return metrics_dict[name.split("@")[0].lower()]


def per_user_values(struct, metrics, topk) -> dict[str, np.ndarray]:
    """``{"ndcg@10": [rows] float, ...}``: every top-k metric's value for each evaluated row (a user in full
    ranking), taken from RecBole's own computation: the per-user matrix its ``topk_result`` averages. Other
    metrics (AUC, GAUC, coverage, ...) are not averages over users and are left out."""
    from recbole.evaluator.base_metric import TopkMetric

    values = {}

    def keep(label, matrix):
        for k in topk:
            values[f"{label}@{k}"] = np.asarray(matrix[:, k - 1], dtype=np.float64)
        return {}

    for name in metrics:
        cls = metric_class(name)
        if issubclass(cls, TopkMetric):
            metric = cls({"metric_decimal_place": 12, "topk": list(topk)})
            metric.topk_result = keep
            metric.calculate_metric(struct)
    return values


def evaluation_units(struct, metrics, topk) -> dict | None:
    """What an evaluation's metrics average over, in a JSON-ready dict ordered by user id (stable, so a user's rows
    keep their order), or None when the evaluation kept neither:

    * ``{"unit": "user", "users": [...], "values": {"ndcg@10": [...], ...}}`` for top-k metrics (full ranking),
    * ``{"unit": "row", "users": [...], "scores": [...], "labels": [...]}`` for scored rows (CTR metrics).

    ``users`` are internal user ids (``rec.users``, kept by :class:`recbole_llm.trainer.parallel.RowCollector`);
    without them (RecBole's decision-tree trainers collect scores only) the rows keep their evaluation order and
    ``users`` is None."""
    if struct is None:
        return None
    users = struct.get("rec.users") if "rec.users" in struct else None
    values = per_user_values(struct, metrics, topk) if "rec.topk" in struct else {}
    if values:  # one value per user and metric
        kind, columns = "user", values
    elif "rec.score" in struct and "data.label" in struct:  # one score and label per row
        kind, columns = "row", {key: struct.get(source).reshape(-1).double().numpy()
                                for key, source in (("scores", "rec.score"), ("labels", "data.label"))}
    else:
        return None
    n = len(next(iter(columns.values())))
    if users is not None and len(users) != n:  # e.g. sampled-candidate ranking: one score row per candidate
        users = None
    order = np.arange(n) if users is None else np.argsort(users.numpy(), kind="stable")
    columns = {name: column[order].tolist() for name, column in columns.items()}
    out = {"unit": kind, "users": None if users is None else users.numpy()[order].tolist()}
    return {**out, "values": columns} if kind == "user" else {**out, **columns}
