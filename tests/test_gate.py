"""``tuneguard gate`` and ``tuneguard plan`` on synthetic reports: exit codes, JUnit, markdown, baselines."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.eval import gate, stats
from tuneguard.eval.gate import plan
from tuneguard.eval.records import TaskResult
from tuneguard.eval.verdicts import compare_results
from tuneguard.io import atomic_write_json
from tuneguard.report.files import build_report, write_reports

from .test_report import _flip, _report, make_run


def _hashed(eval_data: dict[str, Any]) -> dict[str, Any]:
    for side in ("base", "tuned"):
        for r in eval_data[side]:
            r["item_hashes"] = [f"{r['task']}-{i}" for i in range(r["n"])]
    return eval_data


@pytest.fixture()
def report_path(tmp_path: Path) -> Path:
    run_dir, eval_data = make_run(tmp_path, "sst2-lora")
    write_reports(run_dir, _report(run_dir, _hashed(eval_data)))
    return run_dir / "report.json"


def test_regression_beyond_the_margin_fails_with_junit_and_markdown(report_path: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    assert cli_main(["gate", str(report_path), "--junit", str(junit), "--markdown", str(md)]) == 1
    said = capsys.readouterr()  # the result on standard output, so `tuneguard gate ... > gate.txt` keeps it
    assert "FAIL: regressed beyond the margin" in said.out and "arc_easy" in said.out and said.err == ""
    suite = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["sst2", "arc_easy", "wikitext"] and suite.get("failures") == "1"
    failure = cases["arc_easy"].find("failure")
    assert failure is not None and "-8.0 pp" in failure.get("message", "") and "margin 2.0 pp" in failure.get("message", "")
    assert cases["sst2"].find("failure") is None and cases["sst2"].get("classname") == "tuneguard.task"
    summary = md.read_text()
    assert summary.startswith("### tuneguard gate: FAIL") and "| arc_easy | -8.0 pp |" in summary
    assert "corrected by holm" in summary and len(summary) < 2000


def test_junit_stays_well_formed_with_control_characters_in_a_task_name(tmp_path: Path) -> None:
    """A task YAML may name a task with a character XML 1.0 forbids: the file must still parse in CI."""
    from tuneguard.report.gate import gate_junit

    results = [TaskResult("odd\x1bname\x07", "acc", 0.5, True, 4, [1.0, 0.0, 1.0, 0.0])]
    rows = compare_results(results, results, general_tasks={"odd\x1bname\x07"}, n_boot=100)
    suite = ET.fromstring(gate_junit(rows, False, "its base").split("\n", 1)[1])
    assert [c.get("name") for c in suite.iter("testcase")] == ["odd\ufffdname\ufffd"]


def test_a_margin_of_zero_is_a_margin(tmp_path: Path) -> None:
    """``eval.margin: 0`` (no regression accepted) is kept by the gate, not replaced by the default 2."""
    n = 3000
    base, tuned = [1.0] * n, [1.0] * (n - 30) + [0.0] * 30  # -1 pp on 3,000 items: significant, past 0
    row = compare_results([TaskResult("h", "acc", 1.0, True, n, base)], [TaskResult("h", "acc", 0.99, True, n, tuned)],
                          general_tasks={"h"}, margin=0.0)[0]
    assert row.verdict == "regressed" and row.beyond_margin
    rows = gate.report_rows({"general": [row.to_dict()]})
    assert rows[0].margin == 0.0 and gate.decide(rows, require_power=False) == gate.EXIT_REGRESSED
    assert gate.report_rows({"general": [row.to_dict()]}, margin=2.0)[0].beyond_margin is False


def test_a_wider_margin_passes(report_path: Path) -> None:
    assert cli_main(["gate", str(report_path.parent), "--margin", "20"]) == 0


def _inconclusive_report(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    base = (rng.random(200) < 0.5).astype(float)
    tuned = _flip(base, 3, 8)                          # -2.5 pp on 200 items: not significant, reaches past 2
    row = compare_results([TaskResult("arc_easy", "acc", 0.5, True, 200, list(base))],
                          [TaskResult("arc_easy", "acc", 0.5, True, 200, list(tuned))], general_tasks={"arc_easy"})[0]
    assert row.verdict == "inconclusive" and row.items_to_decide
    path = tmp_path / "inconclusive.json"
    atomic_write_json(path, {"task": [], "general": [row.to_dict()]})
    return path


def test_inconclusive_passes_unless_power_is_required(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _inconclusive_report(tmp_path)
    assert cli_main(["gate", str(path)]) == 0
    junit = tmp_path / "g.xml"
    assert cli_main(["gate", str(path), "--require-power", "--junit", str(junit)]) == 3
    assert "UNDECIDED" in capsys.readouterr().out
    failure = ET.parse(junit).getroot().find("testcase/failure")
    assert failure is not None and failure.get("type") == "undecided" and "items)" in failure.get("message", "")


def test_baseline_is_compared_item_by_item(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old_dir, old_data = make_run(tmp_path / "old[x]", "sst2-lora")  # a path rich would read as markup
    write_reports(old_dir, _report(old_dir, _hashed(old_data)))
    same_dir, same_data = make_run(tmp_path / "same", "sst2-lora")
    write_reports(same_dir, _report(same_dir, _hashed(same_data)))
    assert cli_main(["gate", str(same_dir), "--baseline", str(old_dir / "report.json")]) == 0
    assert f"against baseline {old_dir / 'report.json'}" in capsys.readouterr().out

    worse_dir, worse_data = make_run(tmp_path / "worse", "sst2-lora")
    sst2 = np.asarray(worse_data["tuned"][0]["per_item"])
    worse_data["tuned"][0]["per_item"] = [float(x) for x in _flip(sst2, 0, 60)]
    write_reports(worse_dir, _report(worse_dir, _hashed(worse_data)))
    assert cli_main(["gate", str(worse_dir), "--baseline", str(old_dir)]) == 1


def test_a_baseline_from_another_run_of_the_recipe_pairs_its_own_task(tmp_path: Path) -> None:
    """The recipe's own task is named after the run ("NAME (validation)"); two runs of one recipe differ there."""
    old_dir, old_data = make_run(tmp_path / "old", "sst2-lora")
    write_reports(old_dir, _report(old_dir, _hashed(old_data)))
    new_dir, new_data = make_run(tmp_path / "new", "sst2-lora")
    _hashed(new_data)  # the same items as the baseline's
    for side in ("base", "tuned", "original"):
        new_data[side][0]["task"] = "sst2-lora-r8 (validation)"
    write_reports(new_dir, _report(new_dir, new_data))
    rows = gate.against_baseline(json.loads((new_dir / "report.json").read_text()),
                                 json.loads((old_dir / "report.json").read_text()))
    assert [c.task for c in rows] == ["sst2-lora-r8 (validation)", "arc_easy", "wikitext"]
    assert rows[0].n == 400 and rows[0].delta == 0  # the same tuned outcomes: paired item by item
    new_data["tuned"][0]["item_hashes"][0] = "another item"
    write_reports(new_dir, _report(new_dir, new_data))
    with pytest.raises(TuneguardError, match="task 'sst2-lora-r8 \\(validation\\)': the items differ"):
        gate.against_baseline(json.loads((new_dir / "report.json").read_text()),
                              json.loads((old_dir / "report.json").read_text()))


def test_baseline_on_other_items_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old_dir, old_data = make_run(tmp_path / "old", "sst2-lora")
    write_reports(old_dir, _report(old_dir, _hashed(old_data)))
    new_dir, new_data = make_run(tmp_path / "new", "sst2-lora")
    _hashed(new_data)["tuned"][1]["item_hashes"][7] = "another item"
    write_reports(new_dir, _report(new_dir, new_data))
    assert cli_main(["gate", str(new_dir), "--baseline", str(old_dir)]) == 2
    assert "task 'arc_easy': the items differ from the baseline's (500 vs 500 items, first difference at item 8)" in \
        capsys.readouterr().err
    bare_dir, bare_data = make_run(tmp_path / "bare", "sst2-lora")
    report = build_report(bare_dir, bare_data, [])
    report.pop("items")
    atomic_write_json(bare_dir / "report.json", report)
    assert cli_main(["gate", str(new_dir), "--baseline", str(bare_dir)]) == 2
    assert "no per-item outcomes" in capsys.readouterr().err


def test_baseline_scored_another_way_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Same items, other shots (or chat template, delimiter...): the prompt's change would read as the adapter's."""
    dirs = []
    for name, config, setup in (("old", "aaaa", "lm-eval 0.4.13 · 0-shot"), ("new", "bbbb", "lm-eval 0.4.13 · 5-shot")):
        run_dir, data = make_run(tmp_path / name, "sst2-lora")
        for r in _hashed(data)["tuned"]:
            r["config"], r["setup"] = (config, setup) if r["task"] == "arc_easy" else ("same", "")
        write_reports(run_dir, _report(run_dir, data))
        dirs.append(run_dir)
    assert cli_main(["gate", str(dirs[1]), "--baseline", str(dirs[0])]) == 2
    assert ("task 'arc_easy': scored another way than in the baseline (lm-eval 0.4.13 · 5-shot vs the baseline's "
            "lm-eval 0.4.13 · 0-shot)") in capsys.readouterr().err


def test_gate_usage_errors(tmp_path: Path, report_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["gate", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such run directory or report.json" in capsys.readouterr().err
    assert cli_main(["gate", str(report_path), "--margin", "-1"]) == 2
    assert "--margin must be >= 0" in capsys.readouterr().err


def test_plan_from_a_stated_discordance() -> None:
    tasks = [{"task": "arc_easy", "kind": "multiple_choice", "available": 250},
             {"task": "wikitext", "kind": "perplexity", "available": 2}]
    rows = plan(tasks, 2.0, discordance=0.1)
    assert rows[0]["needed"] == stats.binary_items_needed(0.1, 0.02, 0.05 / 2) and rows[0]["enough"] is False
    z = norm.ppf(1 - 0.05 / 2 / 2) + norm.ppf(0.8)  # the spread at no change alone asked for fewer: 67% power
    assert rows[0]["needed"] > math.ceil((z * math.sqrt(0.1) * 100 / 2.0) ** 2)
    assert rows[1]["needed"] is None and "needs --pilot" in rows[1]["source"]
    assert plan(tasks[:1], 4.0, discordance=0.1)[0]["needed"] < rows[0]["needed"] / 3
    assert plan(tasks[:1], 150.0, discordance=0.2)[0]["needed"] == 1  # no 0/1 task can lose 150 points
    assert plan(tasks[:1], 1e-7, discordance=0.2)[0]["needed"] is None  # past any benchmark: no count


@pytest.mark.parametrize(("discordance", "margin"), [(0.05, 0.05), (0.02, 0.02)])
def test_a_planned_0_1_task_has_the_power_it_promises(discordance: float, margin: float) -> None:
    """Exact power of the verdict's own check (Tango's interval clear of the margin) at the planned n, when nothing
    changed: at least 80% (the normal approximation at no change gave 67% here)."""
    from scipy.stats import binom

    n = plan([{"task": "t", "kind": "multiple_choice"}], 100 * margin, discordance=discordance)[0]["needed"]
    power = 0.0
    for k in np.flatnonzero(binom.pmf(np.arange(n + 1), n, discordance) > 1e-9):
        for won in np.flatnonzero(binom.pmf(np.arange(k + 1), k, 0.5) > 1e-9):
            chance = binom.pmf(k, n, discordance) * binom.pmf(won, k, 0.5)
            power += chance * (stats.tango_interval(int(won), int(k - won), n)[0] >= -margin)
    assert 0.8 <= power < 0.86, (n, power)


def test_plan_cli(report_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["plan", "--margin", "2", "--tasks", "arc_easy", "boolq", "--discordance", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "arc_easy" in out and "boolq" in out and "discordance 0.1" in out
    assert cli_main(["plan", "--pilot", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "pilot, n 500, discordance 0.080" in out and "wikitext" in out
    assert cli_main(["plan", "--tasks", "arc_easy"]) == 2
    assert "--discordance" in capsys.readouterr().err
    assert cli_main(["plan", "--tasks", "arc_easy", "--discordance", "2"]) == 2
    json.dumps(plan([], 2.0, discordance=0.1))


def test_a_pilot_plan_says_what_it_assumed_and_what_it_lacks() -> None:
    """No discordant item seen: the plan uses one in n (it printed 'discordance 0.000' beside a plan of 1,189);
    a task the pilot never scored is named as such, not as a missing --pilot."""
    pilot = {"general": [{"task": "arc_easy", "n": 20, "won": 0, "lost": 0, "sd_item": 22.4}], "task": []}
    rows = plan([{"task": "arc_easy", "kind": "multiple_choice", "available": 500},
                 {"task": "piqa", "kind": "multiple_choice", "available": 500}], 2.0, pilot=pilot)
    assert [r["source"] for r in rows] == ["pilot, n 20, discordance 1/20 assumed (none seen)", "not in the pilot report"]
    assert rows[0]["needed"] and rows[1]["needed"] is None
    # Two WikiText pages with a tiny spread: the normal approximation asks for 1 item, the sign-flip test at
    # alpha / 2 cannot reject on fewer than 7 (its smallest p is 2 / 2^n).
    pilot["general"].append({"task": "wikitext", "n": 2, "won": None, "lost": None, "sd_item": 0.01})
    wiki = plan([{"task": "wikitext", "kind": "perplexity", "available": 10},
                 {"task": "arc_easy", "kind": "multiple_choice", "available": 500}], 2.0, pilot=pilot)[0]
    assert wiki["needed"] == 7 and wiki["enough"]
