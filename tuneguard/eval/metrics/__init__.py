"""Metrics as ``evaluate`` modules shipped inside the package (the Hub is never needed; ``evaluate.load`` of a
folder here works too).

``evaluate`` is imported lazily: it pulls in ``datasets`` and costs seconds, and most tasks only
need means of per-item outcomes.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tuneguard.errors import TuneguardError
from tuneguard.eval.metrics.functional import confusion_matrix
from tuneguard.io import cache_dir

if TYPE_CHECKING:
    import evaluate

NAMES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1",
         "exact_match": "ExactMatch", "token_f1": "TokenF1"}
"""Each metric's folder (and module) and its class."""
# Module objects are cached and stateful (compute = add_batch + finalize), so one computation at a time.
_COMPUTE = threading.Lock()


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of :data:`NAMES`, imported from its folder here and kept in memory. Not through ``evaluate.load``, which
    copies the script into ``$HF_HOME/modules`` and imports that copy: the same module, written outside
    tuneguard's caches; evaluate's (empty) data folder goes to ``$TUNEGUARD_CACHE/evaluate``."""
    if name not in NAMES:
        raise TuneguardError(f"unknown metric '{name}'; choose one of {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}.{name}")
    return getattr(module, NAMES[name])(keep_in_memory=True, cache_dir=str(cache_dir() / "evaluate"))


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
        **_defined_per_class(per_class, preds, refs, labels),
        "confusion_matrix": confusion_matrix(preds, refs, ids).tolist(),
        "labels": list(labels),
    }


def _defined_per_class(per_class: dict[str, Any], preds: list[int], refs: list[int], labels: Sequence[str]
                       ) -> dict[str, dict[str, float | None]]:
    """Per-class precision, recall and F1, None where the ratio is undefined (a class never predicted has no
    precision, one never present no recall): scikit-learn's 0 there read as a score, and averaged as one across
    cross-validation folds. Macro and micro averages keep scikit-learn's convention."""
    predicted, present = set(preds), set(refs)
    defined = {"precision": predicted, "recall": present, "f1": predicted | present}
    return {f"{metric}_per_class": {label: float(value) if i in defined[metric] else None
                                    for i, (label, value) in enumerate(zip(labels, per_class[metric], strict=True))}
            for metric in ("f1", "precision", "recall")}


__all__ = ["NAMES", "classification_metrics", "confusion_matrix", "load_metric"]
