"""``tuneguard gate`` and ``tuneguard plan`` rendered: a terminal table, JUnit XML for CI, a pull-request summary."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from tuneguard.errors import TuneguardError
from tuneguard.eval.gate import (
    EXIT_REGRESSED,
    EXIT_UNDECIDED,
    against_baseline,
    decide,
    plan,
    report_rows,
    undecided,
)
from tuneguard.eval.verdicts import Comparison
from tuneguard.io import atomic_write_text
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    count_of,
    fmt_ci,
    fmt_delta,
    fmt_int,
    fmt_p_adjusted,
    fmt_points,
    fmt_verdict,
    md_block,
    points_unit,
    verdict_class,
)
from tuneguard.report.terminal import print_block
from tuneguard.rundir import RunDir, read_json

GATE_HEADERS = ["task", "metric", "n", "Δ", "interval", "p (adjusted)", "detectable", "margin", "verdict", "gate"]
_HEADLINE = {0: "PASS", EXIT_REGRESSED: "FAIL: regressed beyond the margin", EXIT_UNDECIDED: "UNDECIDED: not enough items"}


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json, or the run directory holding one."""
    path = Path(path)
    if not path.exists():
        raise TuneguardError(f"{path}: no such run directory or report.json")
    return RunDir(path).read_report() if path.is_dir() else read_json(path)


def _gate_cell(c: Comparison, require_power: bool) -> Cell:
    if c.verdict == "regressed" and c.beyond_margin:
        return ("fail", "fail")
    if undecided(c):
        return ("undecided", "fail" if require_power else "inconclusive")
    return ("pass", "pass")


def gate_block(rows: list[Comparison], require_power: bool, against: str) -> Block:
    table: list[list[Cell]] = []
    for c in rows:
        d = c.to_dict()
        unit = points_unit(d)
        table.append([c.task, c.metric, fmt_int(c.n), fmt_delta(d), fmt_ci(d), fmt_p_adjusted(d),
                      fmt_points(c.mdr, unit), fmt_points(c.margin, unit), (fmt_verdict(d), verdict_class(c.verdict)),
                      _gate_cell(c, require_power)])
    return Block(f"Gate: {against}", GATE_HEADERS, table)


def _summary(rows: list[Comparison], against: str) -> str:
    general = [c for c in rows if c.is_general]
    family = f"{len(general)} general tasks corrected by {general[0].correction}" if general else "no general suite"
    return f"{against}; {family}; margins in points (pp for accuracies, % for perplexity)"


def gate_markdown(rows: list[Comparison], require_power: bool, against: str) -> str:
    """A summary sized for a pull-request comment: the decision, then one short row per task."""
    code = decide(rows, require_power)
    block = gate_block(rows, require_power, against)
    keep = [0, 3, 4, 7, 8, 9]   # task, Δ, interval, margin, verdict, gate
    short = Block("", [block.headers[i] for i in keep], [[r[i] for i in keep] for r in block.rows])
    table = md_block(short).split("\n", 2)[2]
    return f"### tuneguard gate: {_HEADLINE[code]}\n\n{_summary(rows, against)}\n\n{table}"


XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def gate_junit(rows: list[Comparison], require_power: bool, against: str) -> str:
    """One test case per task; a failure carries the row's numbers (undecided fails only with --require-power)."""
    suite = ET.Element("testsuite", name="tuneguard gate", tests=str(len(rows)))
    failures = 0
    for c in rows:
        d = c.to_dict()
        case = ET.SubElement(suite, "testcase", classname="tuneguard.general" if c.is_general else "tuneguard.task",
                             name=c.task)
        numbers = (f"{c.metric} {c.base:.4g} -> {c.tuned:.4g}, delta {fmt_delta(d)} {fmt_ci(d)}, "
                   f"p {fmt_p_adjusted(d)}, margin {fmt_points(c.margin, points_unit(d))}, "
                   f"detectable {fmt_points(c.mdr, points_unit(d))}, n {c.n}: {fmt_verdict(d)}")
        state = _gate_cell(c, require_power)[0]
        if state == "fail" or (state == "undecided" and require_power):
            failures += 1
            ET.SubElement(case, "failure", type=state, message=numbers)
        ET.SubElement(case, "system-out").text = numbers
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    props = ET.Element("properties")
    ET.SubElement(props, "property", name="against", value=_summary(rows, against))
    suite.insert(0, props)
    # A task name (a YAML's) may hold characters XML 1.0 forbids, which ElementTree writes as they are: CI's parser
    # would then refuse the whole file.
    return '<?xml version="1.0" encoding="utf-8"?>\n' + XML_FORBIDDEN.sub("\ufffd", ET.tostring(suite, encoding="unicode")) + "\n"


def write_gate(rows: list[Comparison], require_power: bool, against: str, *, junit: str | None,
               markdown: str | None) -> int:
    """Print the gate, write the files asked for, and return the exit code."""
    code = decide(rows, require_power)
    print_block(gate_block(rows, require_power, against))
    # Text, not markup: a baseline's path in the summary may hold "[x]"
    Console().print(Text(f"gate: {_HEADLINE[code]} ({_summary(rows, against)})"), soft_wrap=True)
    if junit:
        atomic_write_text(junit, gate_junit(rows, require_power, against))
    if markdown:
        atomic_write_text(markdown, gate_markdown(rows, require_power, against))
    return code


def plan_block(rows: list[dict[str, Any]], margin: float, power: float) -> Block:
    table: list[list[Cell]] = []
    for r in rows:
        enough: Cell = DASH if r["enough"] is None else (("yes", "pass") if r["enough"] else ("no", "fail"))
        table.append([r["task"], r["source"], fmt_int(r["needed"]), fmt_int(r.get("available")), enough])
    level = rows[0]["alpha"] if rows else 0.05
    return Block(f"Items for {100 * power:.0f}% power to show non-inferiority at a {margin:g}-point margin "
                 f"(each task at alpha {level:.3g}: {count_of(len(rows), 'task')}, Holm's first step)",
                 ["task", "spread from", "items needed", "items available", "enough"], table)


def run_gate(report_path: str, *, baseline: str | None, margin: float | None, require_power: bool,
             junit: str | None, markdown: str | None) -> int:
    """``tuneguard gate``: the report's own verdicts, or the report against a baseline, as an exit code."""
    if margin is not None and margin < 0:
        raise TuneguardError(f"--margin must be >= 0 points; got {margin:g}")
    report = load_report(report_path)
    if baseline:
        rows, against = against_baseline(report, load_report(baseline), margin), f"against baseline {baseline}"
    else:
        rows, against = report_rows(report, margin), "tuned against its own base"
    if not rows:
        raise TuneguardError(f"{report_path}: the report has no task or general-suite rows to gate on")
    return write_gate(rows, require_power, against, junit=junit, markdown=markdown)


def run_plan(task_names: list[str] | None, margin: float, *, discordance: float | None, pilot: str | None,
             power: float) -> int:
    """``tuneguard plan``: items per task for ``power`` at ``margin``, from a pilot report or a stated discordance."""
    from tuneguard.eval.suites import get_tasks

    if not 0 < power < 1:
        raise TuneguardError(f"--power must be between 0 and 1; got {power:g}")
    if discordance is None and pilot is None:
        raise TuneguardError("give --discordance D (share of items base and tuned disagree on) or --pilot REPORT")
    pilot_report = load_report(pilot) if pilot else None
    names = task_names or [c["task"] for c in (pilot_report or {}).get("general", [])]
    if not names:
        raise TuneguardError("give --tasks (task or suite names), or a --pilot report with a general suite")
    tasks = [{"task": t.name, "kind": t.kind, "available": len(t.docs())} for t in get_tasks(names)]
    rows = plan(tasks, margin, discordance=discordance, pilot=pilot_report, power=power)
    print_block(plan_block(rows, margin, power))
    return 0
