"""Cross-validation: folds disjoint and covering, stratified and seeded; refusals; ``tuneguard cv`` end to end."""

import argparse
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneguard.cli import main as cli_main
from tuneguard.cv import cv_dir, plan_folds
from tuneguard.data.folds import assign_folds, fold_split
from tuneguard.data.prepare import read_split, sample_rows
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig, load_recipe

from .test_train import WORDS, make_run


def rows_with(labels: list[int]) -> list[Row]:
    return [Row(f"train.jsonl:{i + 1}", {"text": f"review {i}", "label": label}) for i, label in enumerate(labels)]


def data_config(**keys) -> DataConfig:
    return DataConfig(train="train.jsonl", labels=["a", "b", "c"], **keys)


def all_folds(rows: list[Row], k: int, seed: int, stratify: bool) -> list[tuple[list[Row], list[Row]]]:
    return [fold_split(rows, data_config(folds=k, fold=i, stratify=stratify), seed) for i in range(k)]


@settings(max_examples=150, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=120), k=st.integers(2, 10), seed=st.integers(0, 2**16),
       stratify=st.booleans())
def test_folds_are_disjoint_and_cover_every_row(labels: list[int], k: int, seed: int, stratify: bool) -> None:
    """Label 3 is outside the label set: a bad row, which lands in a fold like any other (and is counted there)."""
    rows = rows_with(labels)
    counts = Counter(labels)
    known = [n for label, n in counts.items() if label != 3]
    if k > len(rows) or (stratify and known and min(known) < k):
        with pytest.raises(TuneguardError):
            fold_split(rows, data_config(folds=k, fold=0, stratify=stratify), seed)
        return
    folds = all_folds(rows, k, seed, stratify)
    validated = [r.where for _, val in folds for r in val]
    assert sorted(validated) == sorted(r.where for r in rows)  # every row validated exactly once: disjoint, covering
    sizes = [len(val) for _, val in folds]
    assert max(sizes) - min(sizes) <= 1
    for train, val in folds:  # training is the other folds, in file order
        assert {r.where for r in train} == {r.where for r in rows} - {r.where for r in val}
        assert train == [r for r in rows if r in train] and val == [r for r in rows if r in val]
        if stratify:  # each class within one row of its proportional share
            in_fold = Counter(r.fields["label"] for r in val)
            assert all(abs(in_fold[c] - n / k) < 1 for c, n in counts.items()), (in_fold, counts, k)


def test_stratified_folds_keep_a_rare_class_in_every_fold() -> None:
    labels = [0] * 90 + [1] * 10
    stratified = [Counter(r.fields["label"] for r in val) for _, val in all_folds(rows_with(labels), 5, 1, True)]
    assert all(c == Counter({0: 18, 1: 2}) for c in stratified)


def test_folds_are_seeded() -> None:
    rows = rows_with([i % 3 for i in range(60)])
    assert assign_folds([None] * 60, 4, seed=7) == assign_folds([None] * 60, 4, seed=7)
    assert assign_folds([None] * 60, 4, seed=7) != assign_folds([None] * 60, 4, seed=8)
    assert all_folds(rows, 3, 5, True) == all_folds(rows, 3, 5, True)


def test_too_many_folds_are_refused_in_one_line() -> None:
    with pytest.raises(TuneguardError, match=r"data.folds=6: data.train has only 5 rows, fewer than the folds; "
                                             r"use at most 5 folds"):
        fold_split(rows_with([0, 1, 0, 1, 0]), data_config(folds=6, fold=0), 0)
    with pytest.raises(TuneguardError, match=r"data.stratify: label 'b' has only 2 rows .*fewer than data.folds=3"):
        fold_split(rows_with([0, 0, 0, 1, 1, 0]), data_config(folds=3, fold=0, stratify=True), 0)
    with pytest.raises(TuneguardError, match=r"label 'b' has only 1 rows .*would validate without it; do not stratify$"):
        fold_split(rows_with([0, 0, 0, 1, 0, 0]), data_config(folds=3, fold=0, stratify=True), 0)  # not "at most 1"


@pytest.mark.parametrize(("keys", "expected"), [
    ({"folds": 3}, "data.folds and data.fold go together"),
    ({"folds": 3, "fold": 3}, "data.fold must be below data.folds=3"),
    ({"stratify": True}, "data.stratify applies to cross-validation folds"),
    ({"folds": 3, "fold": 0, "stratify": True, "kind": "text"}, "data.stratify needs labels"),
    ({"folds": 3, "fold": 0, "max_val_samples": 5},
     "data.max_val_samples would go unused; remove it (override: data.max_val_samples=null)"),
])
def test_fold_keys_are_validated(tmp_path: Path, tiny_llama_dir: Path, keys: dict, expected: str) -> None:
    path = make_run(tmp_path, tiny_llama_dir, data=keys)
    with pytest.raises(TuneguardError, match=re.escape(expected)):
        load_recipe(path)


def test_max_train_samples_is_drawn_before_folding(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, data={"max_train_samples": 30})
    everything = read_split(load_recipe(path, ["data.val_fraction=0", "data.max_train_samples=null"]).data, 42)[0]
    sample = sample_rows(everything, 30, 42)
    folds = [read_split(load_recipe(path, ["data.folds=3", f"data.fold={i}"]).data, 42) for i in range(3)]
    assert sorted(r.where for _, val in folds for r in val) == sorted(r.where for r in sample)
    assert all(len(train) == 20 and len(val) == 10 for train, val in folds)


def cv_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """48 distinct reviews (so each scored item is one row), balanced labels; the recipe's own task is scored."""
    path = make_run(tmp_path, model_dir, train={"max_steps": 3, "log_every": 1},
                    data={"allow_overlap": False}, eval={"task": True})
    rows = [{"text": f"the movie was {WORDS[i % 4]} {i}", "label": int(i % 4 < 2)} for i in range(48)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cv_end_to_end_keeps_ordinary_runs_and_resumes(tmp_path: Path, tiny_llama_dir: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    path = cv_recipe(tmp_path, tiny_llama_dir)
    assert cli_main(["cv", str(path), "--folds", "3", "--stratify"]) == 0
    runs = [tmp_path / "runs" / f"recipe-fold{i}" for i in range(3)]
    hashes = []
    for i, run in enumerate(runs):
        recipe = load_recipe(run / "recipe.yaml")  # the fold is recorded, so `tuneguard eval RUN` re-derives it
        assert (recipe.data.folds, recipe.data.fold, recipe.data.stratify, recipe.eval.suites) == (3, i, True, [])
        train, val = read_split(recipe.data, recipe.train.seed)
        assert len(val) == 16 and Counter(r.fields["label"] for r in val) == Counter({0: 8, 1: 8})
        report = json.loads((run / "report.json").read_text())
        own = next(item for item in report["items"] if item["task"] == f"recipe-fold{i} (validation)")
        assert own["n"] == 16  # the fold's rows are what its report scored...
        hashes.append(set(own["item_hashes"]))
    assert len(set.union(*hashes)) == 48 == sum(map(len, hashes))  # ...and the scored items are disjoint, covering

    cv = json.loads((tmp_path / "runs" / "recipe-cv" / "cv.json").read_text())
    assert (cv["k"], cv["stratify"], [f["val_rows"] for f in cv["folds"]]) == (3, True, [16, 16, 16])
    acc = next(m for m in cv["metrics"] if (m["task"], m["metric"]) == ("recipe (validation)", "acc"))
    tuned = [json.loads((run / "report.json").read_text())["task"][0]["tuned"] for run in runs]
    assert acc["tuned"]["values"] == tuned and acc["tuned"]["mean"] == pytest.approx(sum(tuned) / 3)
    assert {"mean", "sd", "min", "max"} <= set(acc["delta"]) and acc["tuned"]["sd"] is not None
    assert {m["metric"] for m in cv["metrics"]} >= {"acc", "f1_macro", "f1_per_class[positive]", "validation loss"}
    assert "mean ± sd across folds" in (tmp_path / "runs" / "recipe-cv" / "cv.md").read_text()

    # A killed cv: fold 1 trained but not evaluated, fold 2 killed before its first checkpoint.
    mtimes = {p: p.stat().st_mtime_ns for p in (runs[0] / "report.json", runs[1] / "run.json")}
    for name in ("eval.json", "report.json", "report.md", "report.html"):
        (runs[1] / name).unlink()
    for name in ("run.json", "eval.json", "report.json", "report.md", "report.html"):
        (runs[2] / name).unlink()
    for name in ("adapter", "scores"):
        shutil.rmtree(runs[2] / name)
    capsys.readouterr()
    assert cli_main(["cv", str(path), "--folds", "3", "--stratify"]) == 0
    said = capsys.readouterr().err
    assert "finished; skipped" in said and "trained; evaluating" in said and "resuming" in said
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # fold 0 untouched, fold 1 not retrained
    assert all((run / "report.json").exists() and (run / "run.json").exists() for run in runs)

    # Another recipe into the same fold runs is refused, naming what changed; nothing is touched.
    assert cli_main(["cv", str(path), "--folds", "3", "--stratify", "train.lr=1e-3"]) == 2
    assert "holds fold 0 of another recipe (changed: train.lr); pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--folds", "49"], "data.folds=49: data.train has only 48 rows, fewer than the folds"),
    (["--folds", "30", "--stratify"], "fold 0: data.stratify: label 'negative' has only 24 rows"),
    (["--folds", "1"], "--folds 1: at least 2 (one fold would validate on the rows it trained on)"),
    (["--folds", "3", "data.validation=train.jsonl"], "data.validation would go unused"),
    (["--folds", "3", "output.dir=runs/fixed"], "has no {name}: every fold would write into the same run directory"),
])
def test_cv_refuses_bad_input_before_training(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture,
                                              argv: list[str], expected: str) -> None:
    path = cv_recipe(tmp_path, tiny_llama_dir)
    assert cli_main(["cv", str(path), *argv]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tuneguard: error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_a_fold_recipe_is_not_a_cv_recipe(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = cv_recipe(tmp_path, tiny_llama_dir)
    spec = yaml.safe_load(path.read_text())
    spec["data"].update(folds=3, fold=1)
    path.write_text(yaml.safe_dump(spec))
    assert cli_main(["cv", str(path)]) == 2
    assert "already selects fold 1 of 3" in capsys.readouterr().err


@pytest.mark.parametrize("general", [False, True])
def test_folds_score_the_general_suite_only_when_asked(tmp_path: Path, tiny_llama_dir: Path, general: bool) -> None:
    path = make_run(tmp_path, tiny_llama_dir, eval={"task": True, "suites": ["arc_easy"]})
    args = argparse.Namespace(recipe=str(path), overrides=["train.lr=1e-3"], folds=2, stratify=False, general=general,
                              overwrite=False)
    base, folds = plan_folds(args)
    assert [f.run_dir.name for f in folds] == ["recipe-fold0", "recipe-fold1"] and cv_dir(base).name == "recipe-cv"
    assert all(f.recipe.eval.suites == (["arc_easy"] if general else []) and f.recipe.train.lr == 1e-3 for f in folds)


def test_a_cv_row_compares_the_folds_where_both_sides_are_defined() -> None:
    """A class a fold's tuned model never predicts has no precision there: before over five folds beside after over
    two gave a Δ that was neither's difference."""
    from tuneguard.report.cv import _metrics

    folds = [{"values": [{"task": "t", "metric": "precision", "aggregate": "mean", "base": b, "tuned": t}]}
             for b, t in ((0.2, None), (0.2, None), (0.3, None), (0.1, 0.2), (0.3, 0.1))]
    (row,) = _metrics(folds)
    assert row["base"]["n"] == row["tuned"]["n"] == row["delta"]["n"] == 2
    assert row["tuned"]["mean"] - row["base"]["mean"] == pytest.approx(row["delta"]["mean"])
    loss = [{"values": [{"task": "t", "metric": "validation loss", "aggregate": "loss", "base": None, "tuned": v}]}
            for v in (0.5, 0.6, 0.7)]  # one side only, in every fold: every fold counts
    assert _metrics(loss)[0]["tuned"]["mean"] == pytest.approx(0.6) and _metrics(loss)[0]["base"] is None


def test_a_folds_row_names_the_step_it_kept() -> None:
    """train.select kept step 2 of 3: the Folds table said 3."""
    from tuneguard.report.cv import _fold_row

    fold = {"fold": 0, "run_dir": "runs/x-fold0", "train_rows": 40, "val_rows": 20, "steps": 3, "planned_steps": 3,
            "stopped_early": False, "kept_step": 2, "task": None, "val_loss": 2.29795}
    assert _fold_row(fold)[4] == "3 (kept 2)"
    assert _fold_row({**fold, "kept_step": 3})[4] == "3"
