"""Metrics recbole_llm adds to RecBole's evaluator.

RecBole finds its metrics by introspecting ``recbole.evaluator.metrics`` once, at import; :func:`register_metric`
adds a class to the same four registries (Config and the Evaluator read them by reference), so ``metrics: [AUC,
LogLoss, Accuracy]`` works in any YAML, for every model.
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
