"""Reports from synthetic run directories: files, terminal, history and runs side by side."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from tuneguard.errors import TuneguardError
from tuneguard.eval.records import TaskResult, aggregate
from tuneguard.eval.verdicts import Comparison, compare_quantization, compare_results
from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report.blocks import Block, fmt_level, fmt_steps, md_block
from tuneguard.report.cv import render_cv_markdown, summarize_folds
from tuneguard.report.files import build_report, render_markdown, write_reports
from tuneguard.report.history import list_history, record_run, unknown_filter
from tuneguard.report.side_by_side import compare_run_dirs, print_run_comparison
from tuneguard.report.terminal import print_block, print_history, print_report
from tuneguard.train.selection import selection_record

GENERAL = {"arc_easy", "wikitext"}


def _acc(task: str, items: np.ndarray) -> dict[str, Any]:
    values = [float(x) for x in items]
    mean = sum(values) / len(values)
    return TaskResult(task, "acc", mean, True, len(values), values, metrics={"acc": mean, "f1_macro": mean - 0.01},
                      fingerprint="fp-123").to_dict()


def _classes(items_base: np.ndarray, items_tuned: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-class metrics and confusion matrices as classification_metrics leaves them (values made up)."""
    def side(items: np.ndarray, shift: float) -> dict[str, Any]:
        right = int(items.sum())
        return {"labels": ["negative", "positive"], "confusion_matrix": [[right // 2, 30], [20, right - right // 2]],
                "precision_per_class": {"negative": 0.2950819672131147 + shift, "positive": 0.7 + shift},
                "recall_per_class": {"negative": 0.61 + shift, "positive": 0.55 + shift},
                "f1_per_class": {"negative": 0.4 + shift, "positive": 0.62 + shift}}
    return {"base": side(items_base, 0.0), "tuned": side(items_tuned, 0.2)}


def _ppl(task: str, nll: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    value = aggregate(list(nll), list(tokens), "perplexity")
    return TaskResult(task, "perplexity", value, False, len(nll), [float(x) for x in nll], [float(x) for x in tokens],
                      "perplexity").to_dict()


def _flip(items: np.ndarray, wins: int, losses: int) -> np.ndarray:
    out = items.copy()
    out[np.flatnonzero(items == 0)[:wins]] = 1
    out[np.flatnonzero(items == 1)[:losses]] = 0
    return out


def make_run(root: Path, name: str, *, method: str = "lora", r: int = 16, quant: str = "nf4", wins: int = 60,
             max_regression: float | None = 2.0, with_general: bool = True) -> tuple[Path, dict[str, Any]]:
    """A run directory as the training and eval sides leave it, before the report is written."""
    rng = np.random.default_rng(len(name))
    run_dir = root / name
    recipe = {
        "model": {"source": "bundled:smollm2-135m-instruct"}, "quantization": {"method": quant},
        "adapter": {"method": method, "r": r}, "data": {"kind": "classification", "train": "train.jsonl"},
        "eval": {"max_regression": max_regression, "suites": ["general-small"]}, "output": {"name": name},
    }
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe))
    atomic_write_json(run_dir / "run.json", {
        "recipe": name, "fingerprint": "fp-123", "adapter_method": method, "quantization": quant, "seed": 42,
        "steps": 20, "tokens_trained": 40960, "wall_time_s": 200.5, "tokens_per_s": 204.3,
        "peak_memory_mb": 3890.0, "trainable_params": 4_884_480, "total_params": 139_000_000,
    })
    metrics = [{"step": s, "loss": 2.5 - 0.05 * s, "lr": 1e-4, "tokens_per_s": 200.0} for s in range(1, 21)]
    metrics += [{"step": 10, "val_loss": 2.2}, {"step": 20, "val_loss": 2.0}]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    sst2 = (rng.random(400) < 0.6).astype(float)
    arc = (rng.random(500) < 0.5).astype(float)
    nll, tokens = rng.gamma(2.0, 20.0, 300), rng.integers(10, 60, 300).astype(float)
    classes = _classes(sst2, _flip(sst2, wins, 5))
    eval_data = {
        "base": [_acc("sst2", sst2) | {"metrics": {"acc": 0.6, **classes["base"]}}],
        "tuned": [_acc("sst2", _flip(sst2, wins, 5)) | {"metrics": {"acc": 0.7, **classes["tuned"]}}],
        "original": [_acc("sst2", _flip(sst2, 1, 0))],
        "general_text_loss": {"base": 2.91, "tuned": 2.95},
        "guards": [{"name": "adapter-fingerprint", "passed": True, "detail": "matches fp-123"},
                   {"name": "label-leak", "passed": False, "detail": "3 validation rows also in train"}],
        "seconds": 12.5,
    }
    if with_general:
        eval_data["base"] += [_acc("arc_easy", arc), _ppl("wikitext", nll, tokens)]
        eval_data["tuned"] += [_acc("arc_easy", _flip(arc, 0, 40)), _ppl("wikitext", nll, tokens)]
    atomic_write_json(run_dir / "eval.json", eval_data)
    return run_dir, eval_data


def _report(run_dir: Path, eval_data: dict[str, Any]) -> dict[str, Any]:
    def results(side: str) -> list[TaskResult]:
        return [TaskResult.from_dict(d) for d in eval_data[side]]

    comparisons = compare_results(results("base"), results("tuned"), general_tasks=GENERAL, n_boot=500)
    original = compare_quantization(results("original"), results("base"), general_tasks=GENERAL, n_boot=500)
    return build_report(run_dir, eval_data, comparisons, original)


@pytest.fixture()
def run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    run_dir, eval_data = make_run(tmp_path, "sst2-lora")
    return run_dir, _report(run_dir, eval_data)


def test_report_content(run: tuple[Path, dict[str, Any]]) -> None:
    _, report = run
    assert [c["task"] for c in report["task"]] == ["sst2"]
    assert [c["task"] for c in report["general"]] == ["arc_easy", "wikitext"]
    verdicts = {c["task"]: c["verdict"] for c in report["task"] + report["general"]}
    assert verdicts == {"sst2": "improved", "arc_easy": "regressed", "wikitext": "non-inferior"}
    assert report["general"][0]["beyond_margin"] and report["general"][0]["correction"] == "holm"
    assert report["budget"] == {"max_regression": 2.0, "exceeded": ["arc_easy"]}
    assert report["quantization"][0]["verdict"] == "non-inferior"
    assert [i["task"] for i in report["items"]] == ["sst2", "arc_easy", "wikitext"]
    assert len(report["items"][1]["per_item"]) == 500 and report["items"][1]["higher_is_better"]
    assert report["summary"]["adapter"] == "lora" and report["summary"]["r"] == 16
    assert report["train_val_gap"]["val_loss"] == 2.0
    assert len(report["curves"]["train"]) == 20 and report["curves"]["val"] == [[10, 2.2], [20, 2.0]]
    assert report["task_metrics"]["sst2"]["tuned"]["f1_per_class"]["positive"] == pytest.approx(0.82)


def test_write_reports(run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, report = run
    paths = write_reports(run_dir, report)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert not list(run_dir.glob(".*.tmp"))

    loaded = json.loads(paths[0].read_text())
    assert loaded == report
    assert Comparison.from_dict(loaded["general"][0]).to_dict() == report["general"][0]

    md = paths[1].read_text()
    assert re.search(r"^\| sst2 \| acc \| 400 \| .* \| improved \|$", md, re.M)
    assert re.search(r"^\| arc_easy \| acc \| 500 \| .* \| regressed, beyond margin \|$", md, re.M)
    assert re.search(r"^\| wikitext \| perplexity \| 300 \| .* \| non-inferior \|$", md, re.M)
    assert "## General suite" in md and "FAIL label-leak" in md and "exceeded (max 2 points) by: arc_easy" in md
    assert "2 tasks tested as one family, corrected by Holm" in md and "margin (regression accepted): 2 points" in md
    assert re.search(r"^\| sst2 \| negative \| 0\.295 → 0\.495 \| 0\.610 → 0\.810 \| 0\.400 → 0\.600 \|$", md, re.M)
    assert re.search(r"^\| negative \| \d+ → \d+ \| 30 → 30 \|$", md, re.M)             # confusion matrix, as a table

    page = paths[2].read_text()
    assert page.count('<img src="data:image/png;base64,') == 4        # forest, confusion, quantization, loss curves
    assert page.index("<img") < page.index("<table")                # the forest plot comes first
    assert "Confusion matrix: sst2" in page and "true / predicted" not in page    # a heatmap in HTML, not a table
    for text in (md, page):
        assert not re.search(r"\{'|\[\[|0\.29508", text)          # no dict reprs, nested lists or 16 digits
    assert not re.search(r"https?://|(?:src|href)\s*=\s*[\"']?//", page)
    assert "<link" not in page and "<script" not in page
    assert '<td class="regressed words">regressed, beyond margin</td>' in page


def test_print_report_colours_verdicts(run: tuple[Path, dict[str, Any]]) -> None:
    _, report = run
    out = io.StringIO()
    print_report(report, Console(file=out, force_terminal=True, color_system="standard", width=220))
    text = out.getvalue()
    assert "\x1b[32mimproved" in text and "\x1b[31mregressed" in text
    assert "\x1b[34mnon-inferior" in text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for expected in ("Task", "General suite", "General-text loss", "PASS adapter-fingerprint", "FAIL label-leak",
                     "sst2", "arc_easy", "wikitext", "Regression budget", "corrected by Holm", "Per-class metrics",
                     "Confusion matrix: sst2"):
        assert expected in plain
    assert not re.search(r"\{'|\[\[", plain)


def test_report_in_a_log_file_is_not_cut_at_80_columns(run: tuple[Path, dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    print_report(run[1], Console(file=out))  # not a terminal: rich alone would wrap at 80
    rows = [line for line in out.getvalue().splitlines() if "arc_easy" in line]
    assert rows and "non-inferior" in out.getvalue() and "…" not in out.getvalue()


def test_a_checkpoint_chosen_on_the_scored_rows_is_flagged(run: tuple[Path, dict[str, Any]]) -> None:
    _, report = run
    assert "Checkpoint choice" not in render_markdown(report)  # the last step kept: nothing was chosen
    points = [{"step": 20, "val_loss": 0.9}, {"step": 40, "val_loss": 0.7}, {"step": 60, "val_loss": 0.8}]
    chosen = {**report, "selection": selection_record(points, points[1], "best_task", "val_loss", None, 60)}
    text = render_markdown(chosen)
    assert "kept step 40: best val_loss 0.7 of 3 validations" in text
    assert re.search(r"^\| steps \| 20 \|$", text, re.M)  # the run's own step count, nothing stopped it
    assert "pick of 3 validations on the task's validation rows" in text and "tuneguard check RUN --data ROWS" in text
    assert "optimistic" not in render_markdown({**chosen, "task": []})  # no task score to qualify
    none_scored = selection_record([], None, "best_task", "val_loss", None, 60)  # patience, no validation ran
    assert "optimistic" not in render_markdown({**report, "selection": none_scored})
    forgetting = [{**p, "val_f1_macro": 0.5 + p["step"] / 100, "forgetting_pct": 1.0} for p in points]
    within = selection_record(forgetting, forgetting[2], "task_within_forgetting", "f1_macro", 2.0, 60)
    assert "task score and general-text loss are optimistic" in render_markdown({**report, "selection": within})


def test_a_narrow_table_keeps_its_title_on_one_line() -> None:
    out = io.StringIO()
    block = Block("Predicted peak memory (MB, fast path)", ["part", "MB"], rows=[["runtime", "500"]])
    print_block(block, Console(file=out, width=120))
    assert out.getvalue().splitlines()[0].strip() == "Predicted peak memory (MB, fast path)"


def test_history_records_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("TUNEGUARD_HOME", str(tmp_path / "home"))
    run_dir, report = run
    record_run(run_dir, report)
    record_run(run_dir, report)          # the same run again replaces, not duplicates
    monkeypatch.chdir(run_dir.parent)    # nor when its directory is spelled another way, in the report too
    record_run(Path(run_dir.name), {**report, "summary": {**report["summary"], "run_dir": run_dir.name}})
    legacy = {**report, "summary": {**report["summary"], "run_dir": "./" + run_dir.name}}
    with closing(sqlite3.connect(tmp_path / "home" / "history.sqlite")) as con, con:  # keyed by an older version
        con.execute("UPDATE runs SET run_key = 'older'")
    record_run(run_dir, legacy)
    assert (tmp_path / "home" / "history.sqlite").is_file()
    rows = list_history()
    assert [r["task"] for r in rows] == ["sst2", "arc_easy", "wikitext"]
    row = rows[0]
    assert (row["recipe"], row["fingerprint"], row["adapter_method"], row["adapter_r"]) == ("sst2-lora", "fp-123",
                                                                                            "lora", 16)
    assert row["run_dir"] == str(run_dir.resolve()) and row["verdict"] == "improved" and not row["is_general"]
    assert row["delta"] == pytest.approx(report["task"][0]["delta"])

    other_dir, eval_data = make_run(tmp_path, "sst2-ia3", method="ia3", wins=0)
    record_run(other_dir, _report(other_dir, eval_data))
    assert len(list_history()) == 6
    sst2 = list_history(task="sst2")
    # 5 items lost, none won, on the recipe's own task (a family of its own): McNemar p = 0.025.
    assert [(r["recipe"], r["verdict"]) for r in sst2] == [("sst2-lora", "improved"), ("sst2-ia3", "regressed")]
    assert sst2[1]["adapter_r"] is None
    assert {r["recipe"] for r in list_history(last=1)} == {"sst2-ia3"}
    assert len(list_history(recipe="sst2-lora", last=1)) == 3  # the newest run *of that recipe*
    from tuneguard.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["history", "--last", "1"]) == 0
    assert "the newest 1 of 2 runs; --last N shows more" in capsys.readouterr().err
    assert cli_main(["history"]) == 0
    assert "--last N" not in capsys.readouterr().err
    assert len(list_history(recipe="sst2-lora")) == 3
    assert unknown_filter("sst2", "sst2-ia3") is None
    assert unknown_filter("arc_easyy", None) == ("--task 'arc_easyy': no run or check in the history has it; did you "
                                                 "mean 'arc_easy'? 3 known: arc_easy, sst2, wikitext")
    assert unknown_filter(None, "agnews").startswith("--recipe 'agnews': no run or check in the history has it; 2 known")

    out = io.StringIO()
    print_history(sst2, Console(file=out, width=200))
    assert "sst2-ia3" in out.getvalue() and "ia3" in out.getvalue()
    # how many items each result scored, beside it: a suite whose items changed does not pass for a trend
    assert [r["n"] for r in list_history(recipe="sst2-lora")] == [c["n"] for c in report["task"] + report["general"]]
    assert re.search(r"┃ +n ┃", out.getvalue()) and re.search(rf"│ +{sst2[0]['n']} │", out.getvalue())
    with closing(sqlite3.connect(tmp_path / "home" / "history.sqlite")) as con, con:  # a results table before n
        columns = ("run_id, task, metric, aggregate, is_general, base, tuned, delta, ci_low, ci_high, p_value, verdict, "
                   "p_adjusted, margin, beyond_margin, items_to_decide")
        con.executescript(f"ALTER TABLE results RENAME TO old; CREATE TABLE results (run_id INTEGER NOT NULL REFERENCES "
                          "runs(id) ON DELETE CASCADE, task TEXT NOT NULL, metric TEXT NOT NULL, aggregate TEXT NOT NULL, "
                          "is_general INTEGER NOT NULL, base REAL, tuned REAL, delta REAL, ci_low REAL, ci_high REAL, "
                          "p_value REAL, verdict TEXT, p_adjusted REAL, margin REAL, beyond_margin INTEGER, "
                          f"items_to_decide INTEGER, PRIMARY KEY (run_id, task)); INSERT INTO results SELECT {columns} "
                          "FROM old; DROP TABLE old;")
    assert {r["n"] for r in list_history()} == {None}  # an older database gains the column, empty in its rows
    record_run(other_dir, _report(other_dir, eval_data))
    assert all(r["n"] for r in list_history(recipe="sst2-ia3"))
    # what the report's verdict says, beyond the margin included, is in the history too
    stored = {k: sst2[1][k] for k in ("p_adjusted", "margin", "beyond_margin", "items_to_decide")}
    reported = _report(other_dir, eval_data)["task"][0]
    assert stored == {k: reported[k] for k in stored} and stored["margin"] is not None


def test_an_older_results_table_gains_the_verdict_columns(tmp_path: Path, run: tuple[Path, dict[str, Any]]) -> None:
    db = tmp_path / "history.sqlite"
    with sqlite3.connect(db) as con:  # the results table before p_adjusted, margin, beyond_margin, items_to_decide
        con.executescript("CREATE TABLE results (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE, "
                          "task TEXT NOT NULL, metric TEXT NOT NULL, aggregate TEXT NOT NULL, is_general INTEGER NOT NULL, "
                          "base REAL, tuned REAL, delta REAL, ci_low REAL, ci_high REAL, p_value REAL, verdict TEXT, "
                          "PRIMARY KEY (run_id, task));")
    run_dir, report = run
    record_run(run_dir, report, db=db)
    rows = list_history(db=db)
    assert [r["margin"] for r in rows] == [c["margin"] for c in report["task"] + report["general"]]


def test_markdown_cells_stay_literal_and_levels_never_read_100() -> None:
    """A backslash or pipe in a task name must not split its table cell, nor ``<`` start HTML; ``<0.001`` stays."""
    md = md_block(Block("t", ["task", "p"], rows=[["a\\|b <img src=x>", "<0.001"]], lines=["x\ny <script>"]))
    lines = md.splitlines()
    assert lines[4] == "| a\\\\\\|b &lt;img src=x> | <0.001 |"
    assert lines[5] == "- x y &lt;script>"
    assert [fmt_level({"alpha": a}) for a in (0.05, 0.01, 0.005, 0.05 / 171)] == ["95%", "99%", "99.5%", "99.97%"]


def test_compare_runs_side_by_side(tmp_path: Path) -> None:
    dirs = []
    for name, method, r, quant, general in (("lora-r16", "lora", 16, "nf4", True), ("lora-r8", "lora", 8, "none", True),
                                             ("ia3", "ia3", 16, "nf4", False)):
        run_dir, eval_data = make_run(tmp_path / "runs", name, method=method, r=r, quant=quant, with_general=general)
        write_reports(run_dir, _report(run_dir, eval_data))
        dirs.append(run_dir)
    comparison = compare_run_dirs(dirs, tmp_path / "out")
    assert [r["label"] for r in comparison["runs"]] == ["lora-r16", "lora-r8", "ia3"]
    assert [r["quantization"] for r in comparison["runs"]] == ["nf4", "none", "nf4"]
    tasks = {t["task"]: t for t in comparison["tasks"]}
    assert list(tasks) == ["sst2", "arc_easy", "wikitext"]
    assert all(cell is not None for cell in tasks["sst2"]["cells"])
    assert tasks["arc_easy"]["cells"][2] is None and tasks["arc_easy"]["cells"][0]["verdict"] == "regressed"

    files = [Path(p) for p in comparison["files"]]
    assert [p.name for p in files] == ["comparison.json", "comparison.md", "comparison.html"]
    assert json.loads(files[0].read_text())["runs"][1]["r"] == 8
    md = files[1].read_text()
    assert "|  | lora-r16 | lora-r8 | ia3 |" in md
    assert re.search(r"^\| r \| 16 \| 8 \| – \|$", md, re.M)
    assert re.search(r"^\| peak memory \| 3\.80 GB \| 3\.80 GB \| 3\.80 GB \|$", md, re.M)
    assert re.search(r"^\| arc_easy \(acc\) · general \| .*\(-8\.0 pp\) \| .* \| – \|$", md, re.M)
    assert re.search(r"^\| steps · tokens trained \| 20 · 40,960 \| 20 · 40,960 \| 20 · 40,960 \|$", md, re.M)
    assert re.search(r"^\| general-text loss \(Δ vs base\) \| 2\.950 \(\+0\.040\) \|", md, re.M)
    page = files[2].read_text()
    assert "https://" not in page and page.count('<img src="data:image/png;base64,') == 1  # each run against its base
    assert "coloured by the verdict on that change" in page

    out = io.StringIO()
    print_run_comparison(comparison, Console(file=out, width=200))
    assert "lora-r8" in out.getvalue() and "tokens/s" in out.getvalue()
    assert "files" not in compare_run_dirs(dirs[:1], None)


def test_side_by_side_keeps_a_task_on_other_items_apart(tmp_path: Path) -> None:
    """arc_easy on 500 items and on its first 100 (another --limit, or general-tiny beside general-small) are not
    one row: each is said with its item count."""
    dirs = []
    for name, n in (("all", 500), ("first", 100)):
        run_dir, eval_data = make_run(tmp_path / "runs", name)
        for side in ("base", "tuned"):
            for result in eval_data[side]:
                if result["task"] == "arc_easy":
                    result["per_item"] = result["per_item"][:n]
                    result["n"], result["item_hashes"] = n, [f"h{i}" for i in range(n)]
        atomic_write_json(run_dir / "eval.json", eval_data)
        write_reports(run_dir, _report(run_dir, eval_data))
        dirs.append(run_dir)
    tasks = {t["task"]: t["cells"] for t in compare_run_dirs(dirs, None)["tasks"]}
    assert tasks["arc_easy (500 items)"][1] is None and tasks["arc_easy (100 items)"][0] is None
    assert tasks["arc_easy (100 items)"][1]["n"] == 100 and all(tasks["wikitext"])


def _kept_step(run_dir: Path, selection: dict[str, Any]) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    atomic_write_json(run_dir / "run.json", {**record, "selection": selection})


POINTS = [{"step": 10, "val_loss": 2.2}, {"step": 20, "val_loss": 2.0}, {"step": 30, "val_loss": 2.1}]


def test_side_by_side_flags_an_adapter_picked_on_the_rows_it_is_scored_on(tmp_path: Path) -> None:
    """A run whose kept step was the best of its validations scores its own task optimistically: comparing it
    with a run that kept its last step is not like for like, and the comparison says which run it is."""
    dirs = []
    for name, selection in (("picked", selection_record(POINTS, POINTS[1], "best_task", "val_loss", None, 30)),
                            ("last", selection_record(POINTS, None, "last", "val_loss", None, 30))):
        run_dir, eval_data = make_run(tmp_path, name, with_general=False)
        _kept_step(run_dir, selection)
        write_reports(run_dir, _report(run_dir, eval_data))
        dirs.append(run_dir)
    record = json.loads((dirs[0] / "run.json").read_text())
    atomic_write_json(dirs[0] / "run.json", {**record, "planned_steps": 60, "stopped_early": True})
    md = (Path(compare_run_dirs(dirs, tmp_path / "out")["files"][1])).read_text()
    assert re.search(r"^\| steps · tokens trained \| 20 of 60, stopped early · 40,960 \| 20 · 40,960 \|$", md, re.M)
    assert re.search(r"^\| adapter kept \| step 20, the pick of 3 validations \| step 30 \|$", md, re.M)
    assert "- picked: the adapter kept is the pick of 3 validations (train.select) on rows this table scores again, " \
           "so its own task row is optimistic" in md and md.count("optimistic") == 1
    forgetting = [{**p, "val_f1_macro": 0.5, "forgetting_pct": 1.0} for p in POINTS]
    run_dir, eval_data = make_run(tmp_path, "within", with_general=False)
    _kept_step(run_dir, selection_record(forgetting, forgetting[0], "task_within_forgetting", "f1_macro", 2.0, 30))
    write_reports(run_dir, _report(run_dir, eval_data))
    md = Path(compare_run_dirs([*dirs, run_dir], tmp_path / "out3")["files"][1]).read_text()
    assert "- within: the adapter kept is the pick of 3 validations" in md
    assert "so its own task row and general-text loss are optimistic" in md
    plain = compare_run_dirs(dirs[1:], tmp_path / "out2")
    assert "pick of" not in Path(plain["files"][1]).read_text()


def test_steps_say_when_early_stopping_cut_training_short() -> None:
    assert fmt_steps({"steps": 40, "planned_steps": 120, "stopped_early": True}) == "40 of 120, stopped early"
    assert fmt_steps({"steps": 40, "planned_steps": 40, "stopped_early": True}) == "40"  # patience ran out at the end
    assert fmt_steps({"steps": 6, "stopped_early": True}) == "6, stopped early"  # a run.json before planned_steps
    assert fmt_steps({"steps": 1200, "planned_steps": 1200, "stopped_early": False}) == "1,200"
    assert fmt_steps({}) == "–"


def test_cv_summary_flags_folds_whose_step_was_picked_on_their_own_rows(tmp_path: Path) -> None:
    dirs = []
    for fold, kept in enumerate((POINTS[1], None, POINTS[0])):
        run_dir, eval_data = make_run(tmp_path, f"fold{fold}", with_general=False)
        _kept_step(run_dir, selection_record(POINTS[: 3 - fold], kept, "best_task" if kept else "last", "val_loss",
                                             None, 30))
        write_reports(run_dir, _report(run_dir, eval_data))
        dirs.append(run_dir)
    cv = summarize_folds("sst2", dirs, {"k": 3, "seed": 42})
    assert [f["picked_among"] for f in cv["folds"]] == [3, 0, 0]  # fold 2 kept the one validation it had
    md = render_cv_markdown(cv)
    assert "optimistic by that choice" in md and "(fold 0: 3 validations)" in md and "fold 2" not in md
    assert "optimistic" not in render_cv_markdown(summarize_folds("sst2", dirs[1:], {"k": 2, "seed": 42}))


def test_missing_files_are_named(tmp_path: Path, run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = run
    with pytest.raises(TuneguardError, match="no report.json \\(trained with --no-eval\\?\\); evaluate the run first"):
        compare_run_dirs([run_dir], None)
    with pytest.raises(TuneguardError, match="not a directory"):
        compare_run_dirs([tmp_path / "nope"], None)
    (run_dir / "run.json").unlink()
    with pytest.raises(TuneguardError, match="run.json: file not found"):
        build_report(run_dir, {}, [], None)
    (run_dir / "recipe.yaml").unlink()
    with pytest.raises(TuneguardError, match="recipe.yaml: file not found"):
        compare_run_dirs([run_dir], None)


def test_side_by_side_matches_own_tasks_by_their_items(tmp_path: Path) -> None:
    """Runs of one recipe under other names share the own-task row; another validation set gets its own."""
    dirs = []
    for name, hashes in (("with-replay", "abc"), ("wout-replay", "abc"), ("other-data", "xyz")):
        run_dir, eval_data = make_run(tmp_path, name, with_general=False)
        for side in ("base", "tuned", "original"):
            own = eval_data[side][0]
            own["task"] = f"{name} (validation)"
            own["item_hashes"] = [f"{hashes}{i}" for i in range(own["n"])]
        write_reports(run_dir, _report(run_dir, eval_data))
        dirs.append(run_dir)
    rows = compare_run_dirs(dirs, None)["tasks"]
    assert [r["task"] for r in rows] == ["own task (validation, the same 400 items)", "other-data (validation)"]
    assert [c is not None for c in rows[0]["cells"]] == [True, True, False]
    assert [c is not None for c in rows[1]["cells"]] == [False, False, True]


def test_a_note_goes_to_standard_error_as_written(capsys: pytest.CaptureFixture) -> None:
    """Notes name paths, and a path may hold what rich would read as markup or an emoji code."""
    from tuneguard.progress import say

    say("written: runs/[exp]/:rocket:/report.md, " + "x" * 150)
    say("said by another process", main=False)
    out, err = capsys.readouterr()
    assert out == "" and err == "written: runs/[exp]/:rocket:/report.md, " + "x" * 150 + "\n"
