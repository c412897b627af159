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
