"""Metrics as ``evaluate`` modules shipped inside the package and loaded by path (the Hub is never needed).

``evaluate`` is imported lazily: it pulls in ``datasets`` and costs seconds, and most tasks only
need means of per-item outcomes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneguard.errors import TuneguardError
from tuneguard.eval.metrics.functional import confusion_matrix

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).parent
NAMES = ("accuracy", "precision", "recall", "f1", "exact_match", "token_f1")
# Module objects are cached and stateful (compute = add_batch + finalize), so one computation at a time.
_COMPUTE = threading.Lock()


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of :data:`NAMES`, loaded from its folder here; kept in memory so no cache files or locks are written."""
    if name not in NAMES:
        raise TuneguardError(f"unknown metric '{name}'; choose one of {', '.join(NAMES)}")
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def classification_metrics(predictions: Sequence[int], references: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and micro precision/recall/F1, per-class F1 and the confusion matrix, all JSON-ready.

    Every label of the task is scored, also one that never occurs, so runs on different subsets stay comparable.
    """
    import evaluate

    preds, refs, ids = [int(p) for p in predictions], [int(r) for r in references], list(range(len(labels)))
    prf = evaluate.combine([load_metric("precision"), load_metric("recall"), load_metric("f1")])
    with _COMPUTE:
        macro = prf.compute(predictions=preds, references=refs, labels=ids, average="macro")
        micro = prf.compute(predictions=preds, references=refs, labels=ids, average="micro")
        per_class = prf.compute(predictions=preds, references=refs, labels=ids, average=None)
        acc = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    return {
        "acc": acc,
        **{f"{k}_macro": v for k, v in macro.items()},
        **{f"{k}_micro": v for k, v in micro.items()},
        "f1_per_class": dict(zip(labels, per_class["f1"], strict=True)),
        "precision_per_class": dict(zip(labels, per_class["precision"], strict=True)),
        "recall_per_class": dict(zip(labels, per_class["recall"], strict=True)),
        "confusion_matrix": confusion_matrix(preds, refs, ids).tolist(),
        "labels": list(labels),
    }


__all__ = ["METRICS_DIR", "NAMES", "classification_metrics", "confusion_matrix", "load_metric"]
