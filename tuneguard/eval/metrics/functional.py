"""Metric arithmetic in plain numpy, shared by the ``evaluate`` modules next to this file.

The modules stay thin wrappers so their numbers can be checked against scikit-learn's in tests,
and so the per-item scores (exact match, token F1) that the paired comparison needs come from the
same code as the aggregate.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

AVERAGES = (None, "binary", "micro", "macro", "weighted")


def confusion_matrix(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any] | None = None,
    sample_weight: Sequence[float] | None = None,
) -> np.ndarray:
    """Rows are true labels, columns predicted ones (scikit-learn's layout); unknown labels are ignored."""
    labels = sorted(set(references) | set(predictions)) if labels is None else list(labels)
    where = {label: i for i, label in enumerate(labels)}
    weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    matrix = np.zeros((len(labels), len(labels)), dtype=float if sample_weight is not None else np.int64)
    for ref, pred, w in zip(references, predictions, weights, strict=True):
        if ref in where and pred in where:
            matrix[where[ref], where[pred]] += w
    return matrix


def accuracy(
    predictions: Sequence[Any], references: Sequence[Any], normalize: bool = True,
    sample_weight: Sequence[float] | None = None,
) -> float:
    hits = np.asarray([p == r for p, r in zip(predictions, references, strict=True)], dtype=float)
    weights = np.ones(len(hits)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    total = float((hits * weights).sum())
    return total / float(weights.sum()) if normalize and len(hits) else total


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(num.shape, float(zero_division))
    np.divide(num, den, out=out, where=den != 0)
    return out


def precision_recall_f1(
    predictions: Sequence[Any], references: Sequence[Any], *, labels: Sequence[Any] | None = None,
    pos_label: Any = 1, average: str | None = "binary", sample_weight: Sequence[float] | None = None,
    zero_division: float = 0.0,
) -> tuple[Any, Any, Any]:
    """Precision, recall and F1 with scikit-learn's conventions for ``labels``, ``average`` and ``zero_division``."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    present = sorted(set(references) | set(predictions))
    if average == "binary":
        if len(present) > 2:
            raise ValueError(f"average='binary' needs at most 2 labels, got {len(present)}; pick 'macro' or 'micro'")
        labels = [pos_label]
    elif labels is None:
        labels = present
    weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    refs, preds = np.asarray(references, dtype=object), np.asarray(predictions, dtype=object)
    tp = np.array([weights[(refs == lab) & (preds == lab)].sum() for lab in labels], dtype=float)
    true = np.array([weights[refs == lab].sum() for lab in labels], dtype=float)
    pred = np.array([weights[preds == lab].sum() for lab in labels], dtype=float)
    if average == "micro":
        tp, true, pred = tp.sum(keepdims=True), true.sum(keepdims=True), pred.sum(keepdims=True)
    precision = _divide(tp, pred, zero_division)
    recall = _divide(tp, true, zero_division)
    f1 = _divide(2 * tp, true + pred, zero_division)
    if average is None:
        return precision, recall, f1
    if average == "weighted":
        if true.sum() == 0:
            return float(zero_division), float(zero_division), float(zero_division)
        return tuple(float(np.average(x, weights=true)) for x in (precision, recall, f1))  # type: ignore[return-value]
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def _squad_normalize(text: str) -> str:
    """Lower case, drop punctuation and English articles, squeeze whitespace (the SQuAD evaluation script's rules)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1_score(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over the bags of normalised words of one prediction and one reference."""
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(
    prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
    regexes_to_ignore: Sequence[str] = (), strip: bool = True,
) -> float:
    """1.0 when the two strings are equal after the chosen normalisations, else 0.0."""
    def norm(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        return text.strip() if strip else text

    return float(norm(prediction) == norm(reference))
