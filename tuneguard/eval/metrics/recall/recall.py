"""Recall, with scikit-learn's ``average`` modes (binary, micro, macro, weighted, or per class)."""

from tuneguard.eval.metrics import shared


class Recall(shared.LabelScore):
    """Recall of a classifier; recall.compute(..., average=None) gives one score per label."""

    score_name, score_index = "recall", 1
