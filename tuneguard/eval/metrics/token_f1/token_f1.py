"""Token F1 (SQuAD-style): word overlap between a generated answer and its reference, averaged over items."""

import evaluate

from tuneguard.eval.metrics import shared
from tuneguard.eval.metrics.functional import token_f1_score

_DESCRIPTION = (
    "Token-level F1 as in the SQuAD evaluation script: both strings are lower-cased, stripped of punctuation "
    "and of the articles a/an/the, split on whitespace, and F1 is computed on the bags of words."
)
_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of EMNLP},
  year = {2016},
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
Returns:
    token_f1 (float): mean per-item F1 in [0, 1].
Examples:
    >>> metric = evaluate.load("tuneguard/eval/metrics/token_f1")
    >>> metric.compute(predictions=["the cat sat"], references=["a cat sat down"])
    {'token_f1': 0.8}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return shared.metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "string", _CITATION)

    def _compute(self, predictions, references):
        scores = [token_f1_score(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"token_f1": sum(scores) / len(scores) if scores else 0.0}
