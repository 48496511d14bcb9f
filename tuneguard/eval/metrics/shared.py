"""What the shipped ``evaluate`` modules have in common: their info block and the precision/recall/F1 base.

A metric script imports this *module* (not its classes), because ``evaluate.load`` takes the first
``Metric`` subclass it finds in the script's namespace as the metric.
"""

import datasets
import evaluate
import numpy as np

from tuneguard.eval.metrics.functional import precision_recall_f1

LABEL_SCORE_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    labels (list of int): the labels to score and average over; default all labels seen.
    pos_label (int): the positive class when average='binary' (default 1).
    average (str or None): 'binary' (default), 'micro', 'macro', 'weighted', or None for per-label scores.
    sample_weight (list of float): per-item weights.
    zero_division (float): the value of an undefined ratio (default 0).
Returns:
    {name} (float, or list of float when average is None).
Examples:
    >>> metric = evaluate.load("tuneguard/eval/metrics/{name}")
    >>> metric.compute(predictions=[0, 2, 1, 0], references=[0, 1, 2, 0], average="macro")
"""


def metric_info(description: str, kwargs: str, value_type: str, citation: str = "") -> evaluate.MetricInfo:
    """The MetricInfo of a metric over (prediction, reference) pairs of ``value_type`` ('int32' or 'string')."""
    return evaluate.MetricInfo(
        description=description, citation=citation, inputs_description=kwargs,
        features=datasets.Features({"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}),
    )


class LabelScore(evaluate.Metric):
    """Precision, recall or F1 (``score_index`` 0, 1, 2 of ``precision_recall_f1``), with scikit-learn's averages."""

    score_name: str
    score_index: int

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(self.__doc__ or "", LABEL_SCORE_KWARGS.format(name=self.score_name), "int32")

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None,
        zero_division=0.0,
    ):
        score = precision_recall_f1(
            predictions, references, labels=labels, pos_label=pos_label, average=average,
            sample_weight=sample_weight, zero_division=zero_division,
        )[self.score_index]
        return {self.score_name: score.tolist() if isinstance(score, np.ndarray) else score}
