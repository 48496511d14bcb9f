"""``tuneguard check``: a trained run scored on new data (a drop against its stored result, or drift of its
outputs), the two-sample statistics behind it, the check's file and history, and ``history --plot``."""

import json
import random
import re
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from scipy.stats import chi2_contingency, norm

from tuneguard.cli import main as cli_main
from tuneguard.data.prepare import read_split
from tuneguard.eval.monitor import accuracy_check, choice_probabilities, drift_check
from tuneguard.eval.records import TaskResult
from tuneguard.eval.stats import two_sample_interval, two_sample_z, wilson_interval
from tuneguard.recipe import load_recipe
from tuneguard.report.history import list_checks, record_check
from tuneguard.report.monitor import print_checks, same_items, time_limits, trend_png
from tuneguard.run import evaluate
from tuneguard.train.loop import train

from .test_train import WORDS, make_run

FILLERS = ["and so", "a film", "because", "therefore", "sports", "science", "world", "business", "question", "so"]


def reviews(n: int, seed: int) -> list[dict]:
    """Reviews whose last word decides the label (great, wonderful: positive), each with a different opening."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        out.append({"text": f"{rng.choice(FILLERS)} {rng.choice(FILLERS)} the movie was {word}",
                    "label": int(word in WORDS[:2])})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, list[dict], list[dict]]:
    """A tiny trained and evaluated run: its directory, its validation rows and its stored tuned outcomes."""
    root = tmp_path_factory.mktemp("check")
    path = make_run(root, tiny_llama_dir, eval={"task": True})
    write_jsonl(root / "train.jsonl", reviews(160, seed=0))
    recipe = load_recipe(path)
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, train(recipe, run_dir)) == 0
    _, val = read_split(recipe.data, recipe.train.seed)
    tuned = json.loads((run_dir / "eval.json").read_text())["tuned"][0]
    return run_dir, [r.fields for r in val], tuned


def run_check(run_dir: Path, data: Path, *extra: str) -> tuple[int, dict]:
    code = cli_main(["check", str(run_dir), "--data", str(data), *extra])
    latest = sorted((run_dir / "checks").glob("check-*.json"), key=lambda p: p.stat().st_mtime_ns)[-1]
    return code, json.loads(latest.read_text())


# ------------------------------------------------------------------------------------------- statistics


@settings(max_examples=200, deadline=None)
@given(n1=st.integers(2, 300), n2=st.integers(2, 300), data=st.data(), alpha=st.sampled_from([0.01, 0.05, 0.1]))
def test_two_sample_score_test_is_scipys_chi_square_and_its_interval_agrees(n1, n2, data, alpha) -> None:
    x1, x2 = data.draw(st.integers(0, n1)), data.draw(st.integers(0, n2))
    table = np.array([[x1, n1 - x1], [x2, n2 - x2]])
    z = two_sample_z(x1, n1, x2, n2)
    if (table.sum(axis=0) == 0).any():  # both samples all right or all wrong: nothing to test
        assert z == 0.0
        return
    expected = chi2_contingency(table, correction=False)
    assert z**2 == pytest.approx(expected.statistic, rel=1e-9, abs=1e-9)
    p = 2 * norm.sf(abs(z))
    assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)
    low, high = two_sample_interval(x1, n1, x2, n2, alpha)
    assert low <= x1 / n1 - x2 / n2 <= high
    if abs(p - alpha) > 1e-6:  # the interval excludes zero exactly when the test rejects
        assert (low > 0 or high < 0) == (p < alpha)


@pytest.mark.parametrize("case", [(30, 50, 40, 50, 0.1), (5, 20, 18, 25, -0.3), (10, 10, 3, 12, 0.5), (7, 40, 9, 13, -0.4)])
def test_two_sample_variance_uses_the_restricted_maximum_likelihood(case) -> None:
    """The closed form of the estimates under H0: p1 - p2 = d0 equals maximizing the likelihood numerically."""
    import math

    from scipy.optimize import minimize_scalar

    x1, n1, x2, n2, d0 = case

    def nll(p2: float) -> float:
        p1 = p2 + d0
        return -(x1 * math.log(p1) + (n1 - x1) * math.log(1 - p1) + x2 * math.log(p2) + (n2 - x2) * math.log(1 - p2))

    p2 = minimize_scalar(nll, bounds=(max(0, -d0) + 1e-9, min(1, 1 - d0) - 1e-9), method="bounded",
                         options={"xatol": 1e-12}).x
    p1 = p2 + d0
    numeric = (x1 / n1 - x2 / n2 - d0) / math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    assert two_sample_z(x1, n1, x2, n2, d0) == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (170, 200), (1, 1000)])
def test_wilson_interval_is_scipys(k: int, n: int) -> None:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def result(per_item: list[float], hashes: list[str]) -> TaskResult:
    return TaskResult("t (validation)", "acc", sum(per_item) / len(per_item), True, len(per_item), per_item,
                      item_hashes=hashes)


def test_accuracy_check_pairs_shared_items_and_compares_new_ones_as_a_second_sample() -> None:
    stored = result([1.0] * 80 + [0.0] * 20, [f"v{i}" for i in range(100)])
    same = accuracy_check(stored, result(stored.per_item[:50], stored.item_hashes[:50]), 0.05)
    assert [t["test"] for t in same["tests"]] == ["paired"] and same["tests"][0]["p_value"] == 1.0
    assert not same["flagged"] and same["shared_items"] == 50
    # The same items, now wrong on 15 the stored result had right: a paired drop (McNemar's 15 lost, 0 won).
    worse = accuracy_check(stored, result([0.0] * 15 + stored.per_item[15:50], stored.item_hashes[:50]), 0.05)
    t = worse["tests"][0]
    assert (t["won"], t["lost"], t["delta"]) == (0, 15, -0.3) and worse["flagged"] and t["ci_high"] < 0
    assert t["p_value"] == pytest.approx(norm.cdf(-15 / 15**0.5))
    # New items: two independent samples; 60% right against the stored 80% on 100 is a drop, 78% is not.
    new = accuracy_check(stored, result([1.0] * 60 + [0.0] * 40, [f"n{i}" for i in range(100)]), 0.05)
    t = new["tests"][0]
    assert t["test"] == "two-sample" and new["flagged"] and t["ci_high"] < 0 and t["ci_level"] == pytest.approx(0.9)
    assert t["p_value"] == pytest.approx(norm.cdf(two_sample_z(60, 100, 80, 100)))
    fine = accuracy_check(stored, result([1.0] * 78 + [0.0] * 22, [f"n{i}" for i in range(100)]), 0.05)
    assert not fine["flagged"] and fine["tests"][0]["ci_high"] > 0
    # Both kinds at once: Holm across the two tests.
    mixed = accuracy_check(stored, result([1.0] * 78 + [0.0] * 22 + stored.per_item[:10], [f"n{i}" for i in range(100)]
                                          + stored.item_hashes[:10]), 0.05)
    assert [t["test"] for t in mixed["tests"]] == ["two-sample", "paired"]
    ps = sorted(t["p_value"] for t in mixed["tests"])
    assert sorted(t["p_adjusted"] for t in mixed["tests"]) == pytest.approx([min(1, 2 * ps[0]), max(min(1, 2 * ps[0]), ps[1])])


def probabilities(rng: np.random.Generator, n: int, share_positive: float) -> np.ndarray:
    positive = rng.random(n) < share_positive
    confidence = rng.uniform(0.55, 0.99, n)
    p1 = np.where(positive, confidence, 1 - confidence)
    return np.stack([1 - p1, p1], axis=1)


def test_drift_check_fires_on_a_label_shift_and_not_on_a_resample() -> None:
    rng = np.random.default_rng(0)
    validation = probabilities(rng, 200, 0.5)
    resample = validation[rng.integers(0, 200, 300)]
    assert not drift_check(validation, resample, ["negative", "positive"], 0.05)["flagged"]
    shifted = drift_check(validation, probabilities(rng, 300, 0.1), ["negative", "positive"], 0.05)
    labels, confidence = shifted["tests"]
    assert shifted["flagged"] and labels["flagged"] and not confidence["flagged"]
    assert shifted["fresh_counts"][0] > 250 and sum(shifted["validation_counts"]) == 200
    # Less sure on the same labels: the confidence test fires, the label test does not.
    unsure = 0.5 + (probabilities(rng, 300, 0.5) - 0.5) * 0.3
    vague = drift_check(validation, unsure, ["negative", "positive"], 0.05)
    assert vague["flagged"] and vague["tests"][1]["flagged"] and not vague["tests"][0]["flagged"]
    assert vague["tests"][1]["p_adjusted"] == pytest.approx(min(1, 2 * vague["tests"][1]["p_value"]))


# ------------------------------------------------------------------------------------------ end to end


def test_drift_check_fires_on_a_shifted_set_and_not_on_a_resample(finished, tmp_path: Path) -> None:
    run_dir, val, _ = finished
    rng = random.Random(1)
    resample = [{"text": rng.choice(val)["text"]} for _ in range(60)]
    code, check = run_check(run_dir, write_jsonl(tmp_path / "resample.jsonl", resample))
    assert code == 0 and not check["flagged"] and not check["labelled"] and check["accuracy"] is None
    assert check["drift"]["n"] == 60 and check["drift"]["validation_n"] == len(val)
    code, check = run_check(run_dir, tmp_path / "resample.jsonl", "--limit", "25")
    assert check["limit"] == 25 and check["rows"] == check["drift"]["n"] == 25
    # Another kind of text altogether: the tuned model's confidence on it moves (the tiny model is sure of
    # "positive" for every review, so its predicted labels do not; the label test is checked above).
    shifted = [{"text": "what is two plus two ? the answer is four " * (1 + i % 3)} for i in range(60)]
    code, check = run_check(run_dir, write_jsonl(tmp_path / "shifted.jsonl", shifted))
    assert code == 1 and check["flagged"] and check["drift"]["tests"][1]["flagged"]
    assert [(c["kind"], c["flagged"]) for c in list_checks()][-2:] == [("drift", False), ("drift", True)]


def test_labelled_check_pairs_validation_items_and_flags_a_drop(finished, tmp_path: Path) -> None:
    run_dir, val, tuned = finished
    # The validation rows themselves: every item is shared and scores as stored: no drop, exit 0.
    code, check = run_check(run_dir, write_jsonl(tmp_path / "same.jsonl", val))
    assert code == 0 and check["labelled"]
    (paired,) = check["accuracy"]["tests"]
    assert paired["test"] == "paired" and (paired["won"], paired["lost"]) == (0, 0) and not check["flagged"]
    assert check["accuracy"]["fresh"] == pytest.approx(tuned["value"])
    # The same texts, each labelled with the answer the model does not give: items it got right become new items
    # (the label is part of an item's hash), every one wrong: a two-sample drop, exit 1, its interval below zero.
    wrong = [{**row, "label": 1 - row["label"]} if hit else row for row, hit in zip(val, tuned["per_item"], strict=True)]
    code, check = run_check(run_dir, write_jsonl(tmp_path / "wrong.jsonl", wrong), "--alpha", "0.01")
    assert code == 1 and check["alpha"] == 0.01 and check["accuracy"]["fresh"] == 0.0
    tests = {t["test"]: t for t in check["accuracy"]["tests"]}
    assert tests["two-sample"]["flagged"] and tests["two-sample"]["ci_high"] < 0
    assert tests["two-sample"]["n_fresh"] == sum(tuned["per_item"])


def test_a_stored_result_better_than_now_is_a_paired_drop(finished, tmp_path: Path) -> None:
    run_dir, val, tuned = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checks"))
    eval_json = json.loads((copy / "eval.json").read_text())
    eval_json["tuned"][0]["per_item"] = [1.0] * tuned["n"]
    (copy / "eval.json").write_text(json.dumps(eval_json))
    code, check = run_check(copy, write_jsonl(tmp_path / "same.jsonl", val))
    (paired,) = check["accuracy"]["tests"]
    assert code == 1 and paired["lost"] == tuned["n"] - sum(tuned["per_item"]) and paired["ci_high"] < 0


def test_rows_the_run_trained_on_are_refused_unless_allowed(finished, tmp_path: Path, capsys, monkeypatch) -> None:
    """Rows the model learned score better and surer than new ones: they would hide a drop and fake drift."""
    import yaml

    import tuneguard.check as check_module

    run_dir = finished[0]
    strict = tmp_path / "strict"
    shutil.copytree(run_dir, strict, ignore=shutil.ignore_patterns("checks"))
    recipe = yaml.safe_load((strict / "recipe.yaml").read_text())
    recipe["data"]["allow_overlap"] = False
    (strict / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(strict / "recipe.yaml")
    trained, validated = read_split(recipe.data, recipe.train.seed)
    seen = {r.fields["text"] for r in trained}
    rows = [{"text": r.fields["text"].upper() + " !", "label": r.fields["label"], "id": i}  # normalized alike; a column
            for i, r in enumerate(trained[:7])]                                          # the training file lacks
    rows += [next({"text": r.fields["text"], "label": r.fields["label"]} for r in validated if r.fields["text"] not in seen)]
    rows += [{"text": f"a review never seen before, number {i}: the movie was great", "label": 1} for i in range(12)]
    data = write_jsonl(tmp_path / "fresh.jsonl", rows)
    def reached_the_model(*args: object) -> None:
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(check_module, "load_run", reached_the_model)
    assert cli_main(["check", str(strict), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "fresh.jsonl: 7 of 20 rows also occur in the run's training rows" in err and "\n" not in err
    assert "fresh.jsonl:1" in err and err.endswith("Remove them, or pass --allow-overlap")
    assert not (strict / "checks").exists()
    with pytest.raises(RuntimeError, match="the model was loaded"):  # --allow-overlap: past the refusal
        check_module.check(strict, data, allow_overlap=True)
    monkeypatch.undo()
    code, check = run_check(run_dir, data)  # the run's own recipe allows overlap (data.allow_overlap: true)
    assert check["trained_on_rows"] == 7 and check["rows"] == 20
    assert "7 of the 20 rows were training rows of this run" in "".join(capsys.readouterr())


@pytest.mark.parametrize(("rows", "error"), [
    ([{"text": "a film the movie was great", "label": 1}, {"text": "so the movie was dull", "label": "maybe"}],
     r"bad\.jsonl:2: label 'maybe' is not in the label set"),
    ([{"text": "a film the movie was great", "label": 1}, {"review": "so the movie was dull", "label": 0}],
     r"bad\.jsonl:2: missing field 'text'"),
    ([{"text": "a film the movie was great", "label": 1}, {"text": "so the movie was dull"}],
     r"bad\.jsonl:2: no 'label' field, but .*bad\.jsonl:1 has one"),
])
def test_bad_rows_are_one_line_naming_file_and_line(finished, tmp_path: Path, capsys, rows, error) -> None:
    run_dir = finished[0]
    before = sorted((run_dir / "checks").glob("*")) if (run_dir / "checks").exists() else []
    assert cli_main(["check", str(run_dir), "--data", str(write_jsonl(tmp_path / "bad.jsonl", rows))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneguard: error: ") and "\n" not in err and re.search(error, err), err
    assert (sorted((run_dir / "checks").glob("*")) if (run_dir / "checks").exists() else []) == before


def test_unfinished_read_only_or_wrong_runs_are_refused_before_the_model_loads(finished, tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    import tuneguard.check as check_module
    import tuneguard.rundir as rundir_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(check_module, "load_run", no_model)
    run_dir, val, _ = finished
    data = write_jsonl(tmp_path / "fresh.jsonl", val)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("checks", "run.json"))
    assert cli_main(["check", str(unfinished), "--data", str(data)]) == 2
    assert "training did not finish" in capsys.readouterr().err
    no_eval = tmp_path / "no-eval"
    shutil.copytree(run_dir, no_eval, ignore=shutil.ignore_patterns("checks", "eval.json"))
    assert cli_main(["check", str(no_eval), "--data", str(data)]) == 2
    assert "no stored result to compare with" in capsys.readouterr().err
    assert cli_main(["check", str(run_dir), "--data", str(data), "--alpha", "0.7"]) == 2
    assert "--alpha must be between 0 and 0.5" in capsys.readouterr().err
    assert cli_main(["check", str(run_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
    monkeypatch.setattr(rundir_module.os, "access", lambda *a: False)
    assert cli_main(["check", str(run_dir), "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip().endswith("not writable; results could not be saved")
    assert not (unfinished / "checks").exists() and not (no_eval / "checks").exists()


# ------------------------------------------------------------------------------------------ history


def test_history_plot_draws_runs_and_checks_and_refuses_nothing(finished, tmp_path: Path, capsys) -> None:
    run_dir, val, _ = finished
    assert cli_main(["history", "--plot", str(tmp_path / "empty.png"), "--task", "no such task"]) == 2
    assert "--task 'no such task': no run or check in the history has it" in capsys.readouterr().err
    assert not (tmp_path / "empty.png").exists()
    run_check(run_dir, write_jsonl(tmp_path / "same.jsonl", val))
    run_check(run_dir, write_jsonl(tmp_path / "drift.jsonl", [{"text": r["text"]} for r in val]))
    out = tmp_path / "trend.png"
    assert cli_main(["history", "--plot", str(out), "--task", "recipe (validation)"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    capsys.readouterr()
    assert cli_main(["history", "--task", "recipe (validation)"]) == 0
    tables = capsys.readouterr().out  # standard output: `tuneguard history | grep ...` sees the rows
    assert "History" in tables and "Checks" in tables and "drift" in tables and "accuracy" in tables


def test_a_trend_of_moments_spans_an_hour_around_them() -> None:
    """matplotlib draws a lone point on a time axis years wide; within an hour the axis is that hour."""
    assert time_limits(["2026-12-05T06:40:00+00:00"]) == (datetime(2026, 12, 5, 6, 10, tzinfo=timezone.utc),
                                                          datetime(2026, 12, 5, 7, 10, tzinfo=timezone.utc))
    assert time_limits(["2026-12-05T06:40:00+00:00", "2026-12-05T06:50:00+00:00"])[0].minute == 15
    assert time_limits(["2026-12-05T06:40:00+00:00", "2026-12-06T06:40:00+00:00"]) is None


def test_a_trend_of_rates_reads_in_percent() -> None:
    """An accuracy's axis in percent, as every table shows it; a perplexity's in its own units."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    from tuneguard.report.monitor import _panel

    run = {"created": "2026-12-05T06:40:00+00:00", "metric": "acc", "aggregate": "mean", "tuned": 0.65}
    axes = Figure().subplots(1, 2)
    _panel(axes[0], "t", [run], [])
    _panel(axes[1], "w", [{**run, "metric": "perplexity", "aggregate": "perplexity", "tuned": 20.0}], [])
    assert isinstance(axes[0].yaxis.get_major_formatter(), PercentFormatter)
    assert not isinstance(axes[1].yaxis.get_major_formatter(), PercentFormatter)


def test_an_older_history_database_gains_the_checks_table(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    with sqlite3.connect(db) as con:  # the schema before checks existed, with one run in it
        con.executescript("CREATE TABLE runs (id INTEGER PRIMARY KEY, run_key TEXT UNIQUE NOT NULL, created TEXT NOT "
                          "NULL, run_dir TEXT NOT NULL, recipe TEXT, model TEXT, fingerprint TEXT, quantization TEXT, "
                          "adapter_method TEXT, adapter_r INTEGER, trainable_params INTEGER, tokens_per_s REAL, "
                          "peak_memory_mb REAL); INSERT INTO runs (run_key, created, run_dir) VALUES ('k', 't', 'd');")
    check = {"created": "2026-01-01T00:00:00+00:00", "run_dir": "d", "run": "r", "task": "r (validation)",
             "data": "x.jsonl", "rows": 5, "flagged": True, "accuracy": None,
             "drift": {"tests": [{"p_adjusted": 0.01}, {"p_adjusted": 0.5}]}}
    record_check(check, tmp_path / "check.json", db=db)
    (row,) = list_checks(db=db)
    assert row["kind"] == "drift" and row["flagged"] and row["p_value"] == 0.01 and row["value"] is None
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_an_older_checks_table_gains_trained_on_and_the_table_shows_it(tmp_path: Path, capsys) -> None:
    db = tmp_path / "history.sqlite"
    with sqlite3.connect(db) as con:  # the checks table before trained_on, with one check in it
        con.executescript("CREATE TABLE checks (id INTEGER PRIMARY KEY, created TEXT NOT NULL, run_dir TEXT NOT NULL, "
                          "recipe TEXT, task TEXT NOT NULL, metric TEXT, kind TEXT NOT NULL, data TEXT, n INTEGER, "
                          "value REAL, value_low REAL, value_high REAL, delta REAL, ci_low REAL, ci_high REAL, "
                          "p_value REAL, flagged INTEGER NOT NULL, path TEXT); INSERT INTO checks (created, run_dir, "
                          "task, kind, n, flagged) VALUES ('2025-12-01T00:00:00+00:00', 'd', 't', 'drift', 7, 0);")
    check = {"created": "2026-01-01T00:00:00+00:00", "run_dir": "d", "run": "r", "task": "t", "data": "x.jsonl",
             "rows": 40, "trained_on_rows": 3, "flagged": False, "accuracy": None, "drift": {"tests": []}}
    record_check(check, tmp_path / "check.json", db=db)
    older, newer = list_checks(db=db)
    assert (older["n"], older["trained_on"]) == (7, None) and (newer["n"], newer["trained_on"]) == (40, 3)
    capsys.readouterr()
    print_checks([older, newer], Console(width=200))
    lines = capsys.readouterr().out.splitlines()
    assert any("40 (3 trained on)" in line for line in lines)
    assert not any("trained on" in line for line in lines if "2025-12-01" in line)


def test_class_probabilities_predict_what_the_scorer_predicts(tiny_llama, tiny_bert_dir: Path) -> None:
    """The drift check's probabilities (softmax over the verbalized labels' log-likelihoods, or over a head's
    logits) sum to one, and their argmax is the prediction the task's own scoring makes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneguard.eval.kinds import KINDS
    from tuneguard.eval.records import Doc, Task

    texts = [r["text"] for r in reviews(12, seed=3)]
    model, tokenizer = tiny_llama
    docs = [Doc(context=f"Review: {t}", choices=["negative", "positive"]) for t in texts]
    task = Task("t", "classification", lambda: docs, "acc", labels=["negative", "positive"])
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    bert_tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    head_docs = [Doc(context=t) for t in texts]
    head_task = Task("h", "classification", lambda: head_docs, "acc", labels=["negative", "positive"])
    for m, tok, t, d in ((model, tokenizer, task, docs), (bert, bert_tokenizer, head_task, head_docs)):
        probs = choice_probabilities(m, tok, t, d, batch_size=4)
        assert probs.shape == (12, 2) and np.allclose(probs.sum(axis=1), 1)
        outcomes = KINDS["classification"].score(m, tok, t, d, 4)
        predicted = [o if isinstance(o, int) else int(np.argmax([s.logprob for s in o])) for o in outcomes]
        assert probs.argmax(axis=1).tolist() == predicted


def test_sparse_label_tables_hold_the_level() -> None:
    """With a rare class or a small fresh set the chi-square approximation rejects too often (7.6% at 5% in the
    review's simulation); those tables get a permutation p of the same statistic. Same-distribution pairs, seeded."""
    from tuneguard.eval.monitor import _homogeneity

    rng = np.random.default_rng(1)
    shares = np.array([0.7, 0.2, 0.05, 0.03, 0.01, 0.01])
    permuted = approximated = 0
    for _ in range(300):
        table = np.stack([np.bincount(rng.choice(6, n, p=shares), minlength=6) for n in (20, 200)])
        table = table[:, table.sum(axis=0) > 0]
        result = _homogeneity(table)
        assert result["method"] == "chi-square, permutation p (sparse cells)"
        permuted += result["p_value"] < 0.05
        approximated += chi2_contingency(table, correction=False).pvalue < 0.05
    assert permuted / 300 <= 0.05 < 0.07 <= approximated / 300
    dense = np.array([[40, 60], [400, 600]])
    assert _homogeneity(dense)["method"] == "chi-square"


def test_the_trend_line_breaks_where_a_tasks_items_changed(tmp_path: Path) -> None:
    """general-small's WikiText went from 2 articles to 16: one line through both would read as the model's change."""
    runs = [{"created": f"2026-12-0{day}T00:00:00+00:00", "task": "wikitext", "metric": "perplexity", "aggregate":
             "perplexity", "is_general": True, "tuned": value, "n": n}
            for day, value, n in ((1, 18.7, 2), (2, 18.9, 2), (3, 21.5, 16), (4, 21.3, 16))]
    assert [[r["n"] for r in segment] for segment in same_items(runs)] == [[2, 2], [16, 16]]
    assert [len(s) for s in same_items([{**r, "n": None} for r in runs[:2]] + runs[2:])] == [2, 2]  # older rows: no n
    png, drawn, total = trend_png(runs, [])
    assert png[:4] == b"\x89PNG" and drawn == ["wikitext"] and total == 1
    (tmp_path / "trend.png").write_bytes(png)
