"""Accuracy: the fraction of predictions equal to their reference."""

import evaluate

from tuneguard.eval.metrics import shared
from tuneguard.eval.metrics.functional import accuracy

_DESCRIPTION = "Accuracy = (TP + TN) / (TP + TN + FP + FN): the proportion of correct predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction (default) or the count of correct predictions.
    sample_weight (list of float): per-item weights, default uniform.
Returns:
    accuracy (float): in [0, 1] when normalized.
Examples:
    >>> metric = evaluate.load("tuneguard/eval/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return shared.metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "int32")

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": accuracy(predictions, references, normalize, sample_weight)}
