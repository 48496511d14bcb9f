"""The shipped evaluate modules and their numpy core agree with scikit-learn, and load offline."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from tuneguard.errors import TuneguardError
from tuneguard.eval.metrics import classification_metrics, confusion_matrix, load_metric
from tuneguard.eval.metrics.functional import exact_match_score, precision_recall_f1, token_f1_score

N_LABELS = 4
pairs = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, N_LABELS - 1), min_size=n, max_size=n),
        st.lists(st.integers(0, N_LABELS - 1), min_size=n, max_size=n),
    )
)


def _sklearn(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@settings(max_examples=200, deadline=None, database=None)
@given(pairs, st.sampled_from([None, "micro", "macro", "weighted"]), st.booleans())
def test_functional_prf_equals_sklearn(data, average, all_labels) -> None:
    preds, refs = data
    labels = list(range(N_LABELS)) if all_labels else None
    ours = precision_recall_f1(preds, refs, labels=labels, average=average)
    theirs = _sklearn(skm.precision_recall_fscore_support, refs, preds, labels=labels, average=average, zero_division=0)
    for a, b in zip(ours, theirs[:3], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n), st.lists(st.integers(0, 1), min_size=n, max_size=n))))
def test_functional_binary_equals_sklearn(data) -> None:
    preds, refs = data
    ours = precision_recall_f1(preds, refs, average="binary")
    theirs = _sklearn(skm.precision_recall_fscore_support, refs, preds, average="binary", zero_division=0)
    np.testing.assert_allclose(ours, theirs[:3], atol=1e-12)


@settings(max_examples=25, deadline=None, database=None)
@given(pairs, st.sampled_from([None, "micro", "macro", "weighted"]))
def test_evaluate_modules_equal_sklearn(data, average) -> None:
    preds, refs = data
    labels = list(range(N_LABELS))
    kwargs = {"labels": labels, "average": average}
    assert load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(
        skm.accuracy_score(refs, preds)
    )
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        ours = load_metric(name).compute(predictions=preds, references=refs, **kwargs)[name]
        np.testing.assert_allclose(ours, _sklearn(fn, refs, preds, zero_division=0, **kwargs), atol=1e-12)
    np.testing.assert_array_equal(
        confusion_matrix(preds, refs, labels), skm.confusion_matrix(refs, preds, labels=labels)
    )


def test_weighted_accuracy_and_confusion_equal_sklearn() -> None:
    preds, refs, w = [0, 1, 1, 2], [0, 1, 2, 2], [0.5, 1.0, 2.0, 1.5]
    assert load_metric("accuracy").compute(predictions=preds, references=refs, sample_weight=w)[
        "accuracy"
    ] == pytest.approx(skm.accuracy_score(refs, preds, sample_weight=w))
    np.testing.assert_allclose(
        confusion_matrix(preds, refs, sample_weight=w), skm.confusion_matrix(refs, preds, sample_weight=w)
    )


def test_classification_metrics_report() -> None:
    preds, refs = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 0, 0]
    out = classification_metrics(preds, refs, ["neg", "neu", "pos"])
    assert out["acc"] == pytest.approx(skm.accuracy_score(refs, preds))
    assert out["f1_macro"] == pytest.approx(skm.f1_score(refs, preds, average="macro"))
    assert out["f1_micro"] == pytest.approx(skm.f1_score(refs, preds, average="micro"))
    assert out["precision_macro"] == pytest.approx(skm.precision_score(refs, preds, average="macro"))
    assert list(out["f1_per_class"]) == ["neg", "neu", "pos"]
    assert list(out["f1_per_class"].values()) == pytest.approx(list(skm.f1_score(refs, preds, average=None)))
    assert out["confusion_matrix"] == skm.confusion_matrix(refs, preds).tolist()
    # A label that never occurs is still scored (0) in the averages, as scikit-learn does, so subsets stay comparable;
    # per class, a ratio with nothing to divide by is None, not a score of 0 (averaged as one across cv folds).
    absent = classification_metrics([0, 0], [0, 0], ["a", "b"])
    assert absent["f1_macro"] == pytest.approx(0.5)
    assert [absent[f"{m}_per_class"]["b"] for m in ("precision", "recall", "f1")] == [None, None, None]
    never_said = classification_metrics([0, 0, 0], [0, 1, 1], ["a", "b"])
    assert never_said["precision_per_class"] == {"a": pytest.approx(1 / 3), "b": None}
    assert never_said["recall_per_class"]["b"] == 0.0 and never_said["f1_per_class"]["b"] == 0.0


def test_generation_metrics() -> None:
    assert token_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1_score("", "") == 1.0 and token_f1_score("Paris", "") == 0.0
    assert token_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match_score(" Paris\n", "Paris") == 1.0
    assert exact_match_score("paris.", "Paris", ignore_case=True, ignore_punctuation=True) == 1.0
    assert exact_match_score("Paris 2024", "Paris", regexes_to_ignore=[r"\s*\d+"]) == 1.0
    assert load_metric("exact_match").compute(predictions=[" Paris", "rome"], references=["Paris", "Rome"]) == {
        "exact_match": 0.5
    }
    assert load_metric("token_f1").compute(predictions=["the cat sat", "x"], references=["a cat sat down", "x"])[
        "token_f1"
    ] == pytest.approx(0.9)


def test_unknown_metric_is_a_user_error() -> None:
    with pytest.raises(TuneguardError, match="unknown metric 'bleu'"):
        load_metric("bleu")


def test_modules_load_offline(tmp_path) -> None:
    """A fresh process with the Hub switched off and an empty modules cache still loads every metric, writing
    nothing under HF_HOME (``evaluate.load`` would copy each script into its modules cache)."""
    hf_home, cache = tmp_path / "hf", tmp_path / "cache"
    hf_home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home),
           "TUNEGUARD_CACHE": str(cache)}
    code = (
        "from tuneguard.eval.metrics import NAMES, load_metric\n"
        "print(sorted(load_metric(n).name for n in NAMES))\n"
        "print(load_metric('f1').compute(predictions=[0, 1], references=[0, 0], average='macro'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy" in out.stdout and "token_f1" in out.stdout and "'f1': 0.333" in out.stdout
    assert not list(hf_home.rglob("*"))
