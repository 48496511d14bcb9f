"""CI decisions from reports: ``tuneguard gate`` (pass, regressed, undecided) and ``tuneguard plan`` (items needed).

Works on plain report.json data, so a gate needs no model: it re-judges stored rows under another
margin, or pairs a new report with a stored baseline item by item (the items must be the same,
checked by hash) and compares their tuned sides with the same statistics as base vs tuned.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tuneguard.errors import TuneguardError
from tuneguard.eval import stats
from tuneguard.eval.records import TaskResult
from tuneguard.eval.verdicts import DEFAULT_MARGIN, Comparison, compare_results

EXIT_PASS, EXIT_REGRESSED, EXIT_UNDECIDED = 0, 1, 3


def report_rows(report: dict[str, Any], margin: float | None = None) -> list[Comparison]:
    """The task and general-suite rows, judged again under ``margin`` when one is given."""
    rows = [Comparison.from_dict(c) for c in (report.get("task") or []) + (report.get("general") or [])]
    return [c.with_margin(margin if margin is not None else DEFAULT_MARGIN if c.margin is None else c.margin)
            for c in rows]


def _results(report: dict[str, Any], where: str) -> dict[str, TaskResult]:
    items = report.get("items")
    if not items:
        raise TuneguardError(f"{where}: no per-item outcomes (a report written before tuneguard stored them); "
                             "re-run `tuneguard eval` on its run to write one")
    return {i["task"]: TaskResult(i["task"], i["metric"], 0.0, i["higher_is_better"], i["n"], i["per_item"],
                                  i.get("weights"), i.get("aggregate", "mean"), item_hashes=i.get("item_hashes"),
                                  setup=i.get("setup") or "", config=i.get("config") or "")
            for i in items}


def _check_same_items(task: str, new: TaskResult, old: TaskResult) -> None:
    if not new.item_hashes or not old.item_hashes:
        raise TuneguardError(f"task '{task}': no item hashes on both sides, so the items cannot be checked to match")
    if new.item_hashes != old.item_hashes:
        diff = next((i for i, (a, b) in enumerate(zip(new.item_hashes, old.item_hashes, strict=False)) if a != b),
                    min(len(new.item_hashes), len(old.item_hashes)))
        raise TuneguardError(f"task '{task}': the items differ from the baseline's ({len(new.item_hashes)} vs "
                             f"{len(old.item_hashes)} items, first difference at item {diff + 1}); "
                             "evaluate both on the same items (same eval.limit and task data)")
    if new.config and old.config and new.config != old.config:  # reports before session 34 carry none
        how = f" ({new.setup or '?'} vs the baseline's {old.setup or '?'})" if new.setup != old.setup else ""
        raise TuneguardError(f"task '{task}': scored another way than in the baseline{how}: shots, chat template, "
                             "prompt options or metric differ, and the difference would read as the adapter's; "
                             "evaluate both the same way")


def against_baseline(report: dict[str, Any], baseline: dict[str, Any], margin: float | None = None) -> list[Comparison]:
    """The new run's tuned outcomes against the baseline report's, item by item, with the new report's correction."""
    new, old = _results(report, "report"), _results(baseline, "baseline")
    own_new, own_old = ([c["task"] for c in r.get("task") or []] for r in (report, baseline))
    if len(own_new) == len(own_old) == 1 and own_old[0] in old and own_new[0] not in old:
        # The recipe's own task is named after its run ("NAME (validation)"): another run of the recipe names it
        # otherwise, and its items (checked below) say whether it is the same task.
        old[own_new[0]] = replace(old.pop(own_old[0]), task=own_new[0])
    one_sided = sorted(set(new) ^ set(old))
    if one_sided:
        raise TuneguardError(f"tasks in only one of report and baseline: {', '.join(one_sided)}")
    for task in new:
        _check_same_items(task, new[task], old[task])
    general = {c["task"] for c in report.get("general") or []}
    correction = next((c.get("correction") for c in report.get("general") or []), "holm")
    margins = {c["task"]: c.get("margin") for c in (report.get("task") or []) + (report.get("general") or [])}
    chosen = margin if margin is not None else {t: m for t, m in margins.items() if m is not None}
    return compare_results([old[t] for t in new], list(new.values()), general_tasks=general,
                           margin=DEFAULT_MARGIN if chosen == {} else chosen,
                           correction=correction if correction in ("holm", "bh") else "holm")


def undecided(c: Comparison) -> bool:
    """Neither shown within the margin nor shown past it: more items would decide."""
    worst, _ = c.gain_interval
    return c.verdict == "inconclusive" or (c.verdict == "regressed" and not c.beyond_margin
                                           and worst < -(c.margin or 0.0))


def decide(rows: list[Comparison], require_power: bool) -> int:
    """1 when a task regressed beyond its margin; 3 when one is undecided and power is required; else 0."""
    if any(c.verdict == "regressed" and c.beyond_margin for c in rows):
        return EXIT_REGRESSED
    if require_power and any(map(undecided, rows)):
        return EXIT_UNDECIDED
    return EXIT_PASS


def plan(tasks: list[dict[str, Any]], margin: float, *, discordance: float | None = None,
         pilot: dict[str, Any] | None = None, power: float = stats.POWER, alpha: float = stats.ALPHA) -> list[dict[str, Any]]:
    """Items each task needs for ``power`` to show non-inferiority at ``margin`` points if nothing changed.

    ``tasks`` are ``{"task", "kind", "available"}``; the per-item spread comes from the pilot report's row
    for that task, else from ``discordance`` (0/1 tasks only). The family is planned at ``alpha / m``,
    the level Holm's first test runs at, so the plan holds under either correction.
    """
    if margin <= 0:
        raise TuneguardError("--margin must be > 0 points")
    if discordance is not None and not 0 < discordance <= 1:
        raise TuneguardError(f"--discordance must be in (0, 1], the share of items on which base and tuned "
                             f"disagree; got {discordance:g}")
    rows = {c["task"]: c for c in (pilot or {}).get("general", []) + (pilot or {}).get("task", [])}
    level = alpha / max(len(tasks), 1)
    out = []
    for t in tasks:
        row = rows.get(t["task"])
        sd, share, source = None, None, ("needs --pilot (not a 0/1 task)" if t["kind"] == "perplexity"
                                         else "needs --discordance or --pilot")
        if pilot is not None and row is None:
            source = "not in the pilot report"
        if row is not None and row.get("sd_item"):
            sd, source = float(row["sd_item"]), f"pilot, n {row['n']}"
            if row.get("won") is not None:
                seen = row["won"] + row["lost"]  # none seen: one in n assumed (binary_sd), not none
                share = max(seen, 1) / row["n"]
                source += f", discordance {seen / row['n']:.3f}" if seen else f", discordance 1/{row['n']} assumed (none seen)"
        elif discordance is not None and t["kind"] != "perplexity":
            share, source = discordance, f"discordance {discordance:g}"
        if share is not None:  # a 0/1 task: as Tango's interval, which the verdict uses, decides
            needed = stats.binary_items_needed(share, margin / 100, level, power)
        else:
            needed = stats.items_needed(sd, margin, level, power) if sd else None
            if needed is not None:  # a sign-flip test: it cannot reject on fewer items than its smallest p allows
                needed = max(needed, stats.sign_flip_min_items(level))
        out.append({**t, "source": source, "needed": needed, "alpha": level,
                    "enough": None if needed is None or t.get("available") is None else t["available"] >= needed})
    return out
