"""F1, with scikit-learn's ``average`` modes (binary, micro, macro, weighted, or per class)."""

from tuneguard.eval.metrics import shared


class F1(shared.LabelScore):
    """F1 of a classifier; f1.compute(..., average=None) gives one score per label."""

    score_name, score_index = "f1", 2
