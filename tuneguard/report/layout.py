"""The sections of a single-run report, laid out once for the terminal, markdown and HTML alike."""

from __future__ import annotations

from typing import Any

from tuneguard.report.blocks import (
    COMPARISON_HEADERS,
    DASH,
    Block,
    Cell,
    comparison_row,
    count_of,
    fmt_value,
    missing,
    summary_rows,
)
from tuneguard.train.selection import metric_key


def _text_loss(loss: dict[str, Any]) -> str:
    base, tuned = loss.get("base"), loss.get("tuned")
    text = f"base {_plain(base)} → tuned {_plain(tuned)}"
    return text if missing(base) or missing(tuned) else f"{text} ({tuned - base:+.4g})"


def _gap(gap: dict[str, Any]) -> Cell:
    """The gap as :func:`tuneguard.eval.verdicts.train_val_gap` describes it; any other shape as key-value pairs."""
    if "best_val_loss" not in gap:
        return ", ".join(f"{k} {_plain(v)}" for k, v in gap.items())
    text = (
        f"at step {gap['step']}: validation loss {gap['val_loss']:.4f} vs train loss {gap['train_loss']:.4f} "
        f"(mean of the last logs): gap {gap['gap']:+.4f} ({100 * gap['relative_gap']:+.1f}%); "
        f"best validation loss {gap['best_val_loss']:.4f} at step {gap['best_val_step']}"
    )
    if gap.get("overfitting"):
        return (text + " — validation loss is rising above its best: likely overfitting", "fail")
    return text


def picked_among(selection: dict[str, Any] | None) -> int:
    """How many validations run.json's ``selection`` picked the kept step from (by train.early_stopping_metric),
    0 where nothing was picked (rule ``last``, one validation, none scored). The validations score the rows the
    task is then reported on (and, under ``task_within_forgetting``, half the general-text sample), so a pick
    among several makes those scores optimistic, the more looks the more: the report, ``tuneguard report A B``
    and ``tuneguard cv`` say so."""
    selection = selection or {}
    looks = selection.get("validations", 0)
    picked = selection.get("rule", "last") != "last" and looks >= 2 and metric_key(selection["metric"]) in selection
    return looks if picked else 0


def _chosen_on_scored_rows(report: dict[str, Any]) -> Cell | None:
    """The caveat of a step chosen among several validations on the rows the report scores; None where none was."""
    selection = report.get("selection") or {}
    looks = picked_among(selection) if report.get("task") else 0
    if not looks:
        return None
    scored = "the task's validation rows"
    optimistic = "the tuned task score is"
    if selection["rule"] == "task_within_forgetting":
        scored += " and on half the general-text sample"
        optimistic = "the tuned task score and general-text loss are"
    return (f"the kept step is the pick of {looks} validations on {scored} the report scores, so {optimistic} "
            "optimistic by that choice; rows kept aside give a score no choice saw (a text classifier: "
            "tuneguard check RUN --data ROWS)", "inconclusive")


def _selection(selection: dict[str, Any]) -> Cell:
    """Which validation's adapter was kept, by which rule, and why (run.json's ``selection``)."""
    text = f"train.select {selection['rule']} on {selection['metric']}: kept {selection['reason']}"
    forgetting, bound = selection.get("forgetting_pct"), selection.get("forgetting_bound")
    return (text, "fail") if forgetting is not None and bound is not None and forgetting > bound else text


def _budget(budget: dict[str, Any]) -> Cell:
    limit = budget["max_regression"]
    if budget["exceeded"]:
        return (f"exceeded (max {limit:g} points) by: {', '.join(budget['exceeded'])}", "fail")
    return (f"no general task regressed significantly by more than {limit:g} points "
            "(percentage points for accuracies, relative % for perplexity)", "pass")


def _metric_rows(task_metrics: dict[str, dict[str, dict[str, Any]]]) -> list[list[Cell]]:
    """Scalar metrics only: per-class values and confusion matrices have tables of their own."""
    rows: list[list[Cell]] = []
    for task, sides in task_metrics.items():
        base, tuned = sides.get("base") or {}, sides.get("tuned") or {}
        for name in dict.fromkeys([*base, *tuned]):
            if not isinstance(base.get(name, tuned.get(name)), dict | list):
                rows.append([task, name, _plain(base.get(name)), _plain(tuned.get(name))])
    return rows


PER_CLASS = "Per-class metrics (base → tuned)"
_FAMILY = {
    "holm": "Holm (family-wise error at most 5%)",
    "bh": "Benjamini-Hochberg (false discovery rate at most 5%)",
}
VERDICT_KEY = (
    "improved / regressed: significantly better / worse (beyond margin: the whole interval lies past the margin); "
    "non-inferior: not significant, the interval's worst end is within the margin; inconclusive (~N items): the "
    "interval reaches past the margin and the test does not reject, N items would decide it with 80% power. Points are pp for accuracies, relative % for "
    "perplexity; detectable: the smallest regression the row finds with 80% power at its n and observed discordance"
)


def verdict_lines(report: dict[str, Any], *, key_too: bool = True) -> list[Cell]:
    """How the verdicts were reached: the family, its correction, the margins (stated in every report),
    and with ``key_too`` what each verdict means."""
    general, task = report.get("general") or [], report.get("task") or []
    if not any("correction" in c for c in general + task):
        return []
    lines: list[Cell] = []
    if general:
        how = _FAMILY.get(general[0].get("correction"), general[0].get("correction") or "no correction")
        lines.append(f"general suite: {count_of(len(general), 'task')} tested as one family, corrected by {how}; p-values are "
                     "adjusted and each interval is drawn at the level its test was run at")
    if task:
        lines.append("the recipe's task: a family of its own, 95% intervals")
    margins = {c["task"]: c.get("margin") for c in general + task if c.get("margin") is not None}
    if margins:
        common = max(set(margins.values()), key=list(margins.values()).count)
        others = ", ".join(f"{t} {m:g}" for t, m in margins.items() if m != common)
        lines.append(f"margin (regression accepted): {common:g} points" + (f"; {others}" if others else ""))
    return lines + [VERDICT_KEY] if key_too else lines


def baseline_lines(baseline: dict[str, Any]) -> list[Cell]:
    """What an encoder's "before" is: a linear probe with the run's budget; the untrained head as chance level."""
    chance = baseline.get("chance") or {}
    return [
        f"before = a linear probe: the new head trained alone on the frozen backbone, {baseline['steps']:,} steps "
        f"of {baseline['batch_size']} rows from the same {baseline['train_rows']:,} training rows and schedule, "
        f"lr {baseline['lr']:g} (final loss {_plain(baseline.get('final_loss'))}, {baseline['seconds']:.1f} s)",
        f"chance level: {fmt_value(chance.get('value'), chance.get('aggregate') or 'mean')} {chance.get('metric', '')} "
        "with the untrained random head (not a baseline: no one would ship it)",
    ]


def _three(v: Any) -> str:
    return DASH if missing(v) else f"{v:.3f}"


def _per_class_rows(task_metrics: dict[str, dict[str, dict[str, Any]]]) -> list[list[Cell]]:
    """One row per task and class: precision, recall and F1, base → tuned, three digits."""
    rows: list[list[Cell]] = []
    for task, sides in task_metrics.items():
        base, tuned = sides.get("base") or {}, sides.get("tuned") or {}
        labels = tuned.get("labels") or base.get("labels") or list(tuned.get("f1_per_class") or {})
        for label in labels:
            rows.append([task, str(label), *(
                f"{_three((base.get(f'{m}_per_class') or {}).get(label))} → "
                f"{_three((tuned.get(f'{m}_per_class') or {}).get(label))}"
                for m in ("precision", "recall", "f1")
            )])
    return rows


def confusion_matrices(report: dict[str, Any]) -> list[tuple[str, list[str], dict[str, list[list[int]]]]]:
    """``(task, labels, {side: matrix})`` for every classification task that has one."""
    out = []
    for task, sides in (report.get("task_metrics") or {}).items():
        found = {side: m["confusion_matrix"] for side, m in sides.items() if (m or {}).get("confusion_matrix")}
        if found:
            labels = next(m.get("labels") for m in sides.values() if m and m.get("labels"))
            out.append((task, [str(x) for x in labels], found))
    return out


def _confusion_block(task: str, labels: list[str], sides: dict[str, list[list[int]]]) -> Block:
    base, tuned = sides.get("base"), sides.get("tuned")
    rows: list[list[Cell]] = []
    for i, label in enumerate(labels):
        rows.append([label, *(
            " → ".join(f"{m[i][j]:,}" for m in (base, tuned) if m is not None) for j in range(len(labels))
        )])
    sides_text = " → ".join(s for s in ("base", "tuned") if s in sides)
    return Block(f"Confusion matrix: {task}, {sides_text} (rows: true label)",
                 ["true / predicted", *labels], rows)


def _plain(v: Any) -> str:
    if missing(v):
        return DASH
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _health_blocks(report: dict[str, Any]) -> list[Block]:
    """General-text loss, train vs validation, guards and the regression budget, where present."""
    blocks = []
    if report.get("general_text_loss"):
        blocks.append(Block("General-text loss", lines=[_text_loss(report["general_text_loss"])]))
    if report.get("train_val_gap"):
        blocks.append(Block("Train vs validation", lines=[_gap(report["train_val_gap"])]))
    selection = report.get("selection") or {}
    if selection.get("rule", "last") != "last":
        caveat = _chosen_on_scored_rows(report)
        blocks.append(Block("Checkpoint choice", lines=[_selection(selection), *([caveat] if caveat else [])]))
    if report.get("guards"):
        blocks.append(Block("Guards", lines=[
            (f"{'PASS' if g['passed'] else 'FAIL'} {g['name']}: {g.get('detail') or ''}".rstrip(": "),
             "pass" if g["passed"] else "fail")
            for g in report["guards"]
        ]))
    if report.get("budget"):
        blocks.append(Block("Regression budget", lines=[_budget(report["budget"])]))
    return blocks


def report_blocks(report: dict[str, Any], *, detail: bool = True, confusion_tables: bool = True) -> list[Block]:
    """Sections in reading order; ``detail`` adds the run summary and every secondary metric (files only).

    ``confusion_tables`` off leaves the confusion matrices to the caller (the HTML draws heatmaps).
    """
    summary = report["summary"]
    blocks = []
    if detail:
        blocks.append(Block("Run", ["", summary["name"]], [list(r) for r in summary_rows(summary)]))
    for key, title in (
        ("task", "Task (before = linear probe)" if report.get("baseline") else "Task"),
        ("general", "General suite"),
        ("quantization", "Cost of quantization (unquantized original → quantized base)"),
    ):
        if report.get(key):
            blocks.append(Block(title, COMPARISON_HEADERS, [comparison_row(c) for c in report[key]]))
        if key == "task" and report.get("baseline"):
            blocks.append(Block("Baseline", lines=baseline_lines(report["baseline"])))
        if key == "general" and verdict_lines(report, key_too=detail):
            blocks.append(Block("How verdicts are reached", lines=verdict_lines(report, key_too=detail)))
    if report.get("setups"):
        blocks.append(Block("How lm-eval tasks were run", ["task", "setup"],
                            [[task, setup] for task, setup in report["setups"].items()]))
    per_class = _per_class_rows(report.get("task_metrics") or {})
    if per_class:
        blocks.append(Block(PER_CLASS, ["task", "class", "precision", "recall", "F1"], per_class))
    if confusion_tables:
        blocks += [_confusion_block(*c) for c in confusion_matrices(report)]
    blocks += _health_blocks(report)
    if detail and report.get("task_metrics"):
        blocks.append(Block("All metrics", ["task", "metric", "before", "after"], _metric_rows(report["task_metrics"])))
    return blocks
