"""Monitoring rendered: a ``tuneguard check`` result in the terminal, and the history's trend as a PNG."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter
from rich.console import Console

from tuneguard.report.blocks import Block, Cell, fmt_ci, fmt_delta, fmt_int, fmt_p, fmt_value
from tuneguard.report.plots import COLOURS, PALETTE, png_bytes, short
from tuneguard.report.terminal import print_block

_ITEMS = {"two-sample": "new items vs stored (two-sample score test)",
          "paired": "items shared with validation (paired, McNemar)"}
MAX_PANELS = 6
"""Tasks drawn at most in one trend chart: those checked first, then the recipes' own, then general ones."""
MIN_SPAN = timedelta(hours=1)
"""The narrowest time axis drawn: runs and checks within one hour sit inside it, not at its ends."""


def _drop_cell(t: dict[str, Any]) -> Cell:
    if t["flagged"]:
        return ("significant drop", "regressed")
    return ("no significant drop", "nochange")


def accuracy_block(check: dict[str, Any]) -> Block:
    a = check["accuracy"]
    rows: list[list[Cell]] = [
        [_ITEMS[t["test"]], fmt_int(t["n_fresh"]), fmt_value(t["stored"]), fmt_value(t["fresh"]), fmt_delta(t),
         fmt_ci(t), f"{100 * t['ci_level']:.3g}%", f"{fmt_p(t['p_value'])} → {fmt_p(t['p_adjusted'])}", _drop_cell(t)]
        for t in a["tests"]
    ]
    title = (f"{check['task']}: {a['metric']} on {Path(check['data']).name} against the stored result "
             f"({fmt_value(a['stored'])} of {a['stored_n']:,} items)")
    headers = ["items", "n", "stored", "fresh", "Δ", "CI of Δ", "level", "p (adjusted)", "verdict"]
    return Block(title, headers, rows)


def _shares(counts: list[int], labels: list[str]) -> str:
    total = max(sum(counts), 1)
    return " · ".join(f"{label} {100 * c / total:.0f}%" for label, c in zip(labels, counts, strict=True))


def drift_block(check: dict[str, Any]) -> Block:
    d = check["drift"]
    labels, confidence = d["labels"], d["tests"][1]
    rows: list[list[Cell]] = [
        ["predicted labels (chi-square)", _shares(d["validation_counts"], labels), _shares(d["fresh_counts"], labels),
         f"{d['tests'][0]['statistic']:.2f}"],
        ["confidence, median (Kolmogorov-Smirnov)", f"{d['validation_confidence']:.3f}", f"{d['fresh_confidence']:.3f}",
         f"{confidence['statistic']:.3f}"],
    ]
    for row, t in zip(rows, d["tests"], strict=True):
        row += [f"{fmt_p(t['p_value'])} → {fmt_p(t['p_adjusted'])}",
                ("drift", "regressed") if t["flagged"] else ("no drift", "nochange")]
    title = (f"{check['task']}: the tuned model's outputs on {Path(check['data']).name} ({d['n']:,} unlabelled rows) "
             f"against the validation set ({d['validation_n']:,} rows)")
    return Block(title, ["test", "validation", "fresh", "statistic", "p (adjusted)", "verdict"], rows)


def check_verdict(check: dict[str, Any]) -> str:
    what = "significant drop" if check["accuracy"] else "drift"
    return f"{what} (exit 1)" if check["flagged"] else f"no {what} at alpha {check['alpha']:g} (exit 0)"


def print_check(check: dict[str, Any]) -> None:
    """The check's table, then its verdict; p-values are one-sided (a drop) and Holm-adjusted across the tests."""
    print_block(accuracy_block(check) if check["accuracy"] else drift_block(check))
    print_block(Block("Check", lines=[(check_verdict(check), "regressed" if check["flagged"] else "nochange")]))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def same_items(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive runs that scored as many items (history rows before ``n`` was kept count as one count): a line
    joins only those, as a change of the task's items (general-small's WikiText, 2 -> 16) is not the model's."""
    return [list(group) for _, group in itertools.groupby(runs, key=lambda r: r.get("n"))]


def _panel(ax: Any, task: str, runs: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    segments = same_items(runs)
    for segment in segments:
        times, values = [_time(r["created"]) for r in segment], [r["tuned"] for r in segment]
        ax.plot(times, values, "o-", color=PALETTE[0], markersize=6, linewidth=1)
        if len(segments) > 1:  # say where the items changed, with room above the highest point for it
            ax.margins(y=0.15)
            ax.annotate(f"n {fmt_int(segment[0].get('n'))}", (times[0], values[0]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, color="#5f6368")
    scored = [c for c in checks if c["value"] is not None]
    for c in scored:
        colour = COLOURS["regressed"] if c["flagged"] else PALETTE[2]
        x = _time(c["created"])
        if c["value_low"] is not None:
            ax.plot([x, x], [c["value_low"], c["value_high"]], color=colour, linewidth=2)
        ax.plot(x, c["value"], "s", color=colour, markersize=7, zorder=3)
    for c in checks:
        if c["value"] is None:
            ax.plot(_time(c["created"]), 0.94, "v", color=COLOURS["regressed"] if c["flagged"] else "#80868b",
                    markersize=9, transform=ax.get_xaxis_transform(), clip_on=False)
    metric = next((r["metric"] for r in runs), None) or next((c["metric"] for c in scored), None) or "value"
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_title(short(task), fontsize=10, loc="left")
    ax.set_ylabel(metric, fontsize=9)
    if all(r.get("aggregate", "mean") == "mean" for r in runs):  # a rate: in percent, as every table shows it
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def _legend() -> list[Line2D]:
    def mark(marker: str, colour: str, label: str) -> Line2D:
        return Line2D([], [], marker=marker, color=colour, linestyle="", markersize=7, label=label)

    return [mark("o", PALETTE[0], "run (tuned)"), mark("s", PALETTE[2], "check (Wilson interval at its alpha)"),
            mark("s", COLOURS["regressed"], "check: significant drop"), mark("v", "#80868b", "drift check"),
            mark("v", COLOURS["regressed"], "drift check: drift")]


def time_limits(created: list[str]) -> tuple[datetime, datetime] | None:
    """The time axis for entries within :data:`MIN_SPAN` of each other (matplotlib spans one point over years);
    None leaves wider spans to matplotlib."""
    times = [_time(text) for text in created]
    if not times or max(times) - min(times) >= MIN_SPAN:
        return None
    middle = min(times) + (max(times) - min(times)) / 2
    return middle - MIN_SPAN / 2, middle + MIN_SPAN / 2


def trend_png(results: list[dict[str, Any]], checks: list[dict[str, Any]]) -> tuple[bytes, list[str], int]:
    """Each task's metric over time: runs' tuned values, checks' accuracies with their intervals (red where a drop
    was flagged), unlabelled drift checks as triangles along the top (red where drift was flagged).
    Returns the PNG, the tasks drawn and how many there were (at most :data:`MAX_PANELS` are drawn)."""
    ranked = ([c["task"] for c in checks] + [r["task"] for r in results if not r["is_general"]]
              + [r["task"] for r in results])
    every = list(dict.fromkeys(ranked))
    tasks = every[:MAX_PANELS]
    fig = Figure(figsize=(8, 2.6 * len(tasks) + 0.6), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False, sharex=True)[:, 0]
    for ax, task in zip(axes, tasks, strict=True):
        _panel(ax, task, [r for r in results if r["task"] == task], [c for c in checks if c["task"] == task])
    limits = time_limits([r["created"] for r in results if r["task"] in tasks]
                         + [c["created"] for c in checks if c["task"] in tasks])
    if limits:
        axes[0].set_xlim(*limits)
    fig.legend(handles=_legend(), loc="outside upper center", ncol=3, fontsize=8, frameon=False)
    return png_bytes(fig), tasks, len(every)



def _rows(check: dict[str, Any]) -> str:
    """How many rows a check scored, and how many of them the run trained on (allowed with --allow-overlap)."""
    seen = check.get("trained_on")
    return f"{fmt_int(check['n'])} ({fmt_int(seen)} trained on)" if seen else fmt_int(check["n"])


def print_checks(checks: list[dict[str, Any]], console: Console | None = None) -> None:
    """The history's checks, oldest first: what was checked on which data, and what it found."""
    rows: list[list[Cell]] = [
        [c["created"], c["recipe"] or "", c["task"], c["kind"], Path(c["data"] or "").name, _rows(c),
         fmt_value(c["value"]), fmt_delta(c), fmt_p(c["p_value"]),
         (("drop" if c["kind"] == "accuracy" else "drift"), "regressed") if c["flagged"] else ("–", "nochange")]
        for c in checks
    ]
    headers = ["time", "recipe", "task", "check", "data", "n", "after", "Δ", "p (adjusted)", "flagged"]
    print_block(Block("Checks", headers, rows), console)
