"""Recall, with scikit-learn's ``average`` modes (binary, micro, macro, weighted, or per class)."""

import datasets
import evaluate
import numpy as np

from tuneguard.eval.metrics.functional import precision_recall_f1

_DESCRIPTION = "Recall of a classifier; recall.compute(..., average=None) gives one score per label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    labels (list of int): the labels to score and average over; default all labels seen.
    pos_label (int): the positive class when average='binary' (default 1).
    average (str or None): 'binary' (default), 'micro', 'macro', 'weighted', or None for per-label scores.
    sample_weight (list of float): per-item weights.
    zero_division (float): the value of an undefined ratio (default 0).
Returns:
    recall (float, or list of float when average is None).
Examples:
    >>> metric = evaluate.load("tuneguard/eval/metrics/recall")
    >>> metric.compute(predictions=[0, 2, 1, 0], references=[0, 1, 2, 0], average="macro")
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None,
        zero_division=0.0,
    ):
        score = precision_recall_f1(
            predictions, references, labels=labels, pos_label=pos_label, average=average,
            sample_weight=sample_weight, zero_division=zero_division,
        )[1]
        return {"recall": score.tolist() if isinstance(score, np.ndarray) else score}
