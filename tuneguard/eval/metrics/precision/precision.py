"""Precision, with scikit-learn's ``average`` modes (binary, micro, macro, weighted, or per class)."""

from tuneguard.eval.metrics import shared


class Precision(shared.LabelScore):
    """Precision of a classifier; precision.compute(..., average=None) gives one score per label."""

    score_name, score_index = "precision", 0
