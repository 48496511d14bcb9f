"""Exact match: the fraction of generated strings equal to their reference after light normalisation."""

import evaluate

from tuneguard.eval.metrics import shared
from tuneguard.eval.metrics.functional import exact_match_score

_DESCRIPTION = "Exact match rate between predicted and reference strings (1 when equal, else 0, averaged)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
    regexes_to_ignore (list of str): patterns removed from both before comparing.
    ignore_case (bool): compare lower-cased strings (default False).
    ignore_punctuation (bool): drop ASCII punctuation before comparing (default False).
    strip (bool): ignore leading and trailing whitespace (default True).
Returns:
    exact_match (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("tuneguard/eval/metrics/exact_match")
    >>> metric.compute(predictions=[" Paris", "rome"], references=["Paris", "Rome"])
    {'exact_match': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return shared.metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "string")

    def _compute(
        self, predictions, references, regexes_to_ignore=(), ignore_case=False, ignore_punctuation=False, strip=True
    ):
        scores = [
            exact_match_score(
                p, r, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation,
                regexes_to_ignore=regexes_to_ignore or (), strip=strip,
            )
            for p, r in zip(predictions, references, strict=True)
        ]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0}
