"""Plots as base64 PNG strings, so report.html carries them inline and stays one self-contained file.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never pyplot: no global
backend switch and no GUI, whatever the user's matplotlib configuration says.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tuneguard.eval.verdicts import open_ended
from tuneguard.report.blocks import fmt_verdict

COLOURS = {"improved": "#188038", "non-inferior": "#1a73e8", "inconclusive": "#e37400", "regressed": "#d93025"}
_OTHER = "#80868b"
PALETTE = ["#9334e6", "#12b5cb", "#795548", "#e52592", "#3949ab", "#827717", "#00897b", "#5f6368"]
"""One colour per adapter in the gain-vs-forgetting chart: none of the verdict colours (green, blue, orange, red),
which mean improved, non-inferior, inconclusive and regressed in every other chart and table."""
LABEL_CHARS = 40
"""A task's name on a chart's axis is cut to this: one long name squeezed every panel to a sliver."""


def short(name: str, keep: int = LABEL_CHARS, *, middle: bool = False) -> str:
    """``name`` within ``keep`` characters: its end cut, or with ``middle`` its middle (a file name keeps its
    number and suffix)."""
    if len(name) <= keep:
        return name
    return f"{name[: keep // 2 - 1]}…{name[-(keep // 2):]}" if middle else name[: keep - 1] + "…"


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (no software tag, so the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _png(fig: Figure) -> str:
    return base64.b64encode(png_bytes(fig)).decode("ascii")


def _gain(c: dict[str, Any], x: float) -> float:
    """``x`` (a change in the metric's units) as improvement in budget points: pp, or % for perplexity."""
    scale = 100.0 if c.get("aggregate", "mean") == "mean" else 100.0 / max(abs(c["base"]), 1e-12)
    return scale * x if c["higher_is_better"] else -scale * x


def _forest_panel(ax: Any, rows: list[dict[str, Any]], title: str) -> None:
    arrows: list[tuple[int, float, float, str]] = []
    for y, c in enumerate(rows):
        colour = COLOURS.get(c["verdict"], _OTHER)
        if c.get("margin") is not None:
            ax.barh(y, c["margin"], left=-c["margin"], height=0.8, color="#e8f0fe", zorder=0)
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            lo, hi = sorted((_gain(c, c["ci_low"]), _gain(c, c["ci_high"])))
            ax.plot([lo, hi], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
            ax.plot([lo, hi], [y, y], "|", color=colour, markersize=9)
        elif c.get("delta") is not None and open_ended(c):  # drawn to the panel's edges once they are known
            low = -math.inf if c.get("ci_low") is None else c["ci_low"]
            high = math.inf if c.get("ci_high") is None else c["ci_high"]
            arrows.append((y, *sorted((_gain(c, low), _gain(c, high))), colour))
        if c.get("delta") is not None:
            ax.plot(_gain(c, c["delta"]), y, "o", color=colour, markersize=7, zorder=3)
    for y, lo, hi, _ in arrows:  # the finite end counts for the axis' range (a line, not drawn)
        ax.plot([v for v in (lo, hi) if math.isfinite(v)], [y] * sum(map(math.isfinite, (lo, hi))), linestyle="none")
    left, right = ax.get_xlim()
    for y, lo, hi, colour in arrows:  # an arrow where the interval has no end
        ax.plot([max(lo, left), min(hi, right)], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
        ax.plot(max(lo, left), y, "<" if math.isinf(lo) else "|", color=colour, markersize=9)
        ax.plot(min(hi, right), y, ">" if math.isinf(hi) else "|", color=colour, markersize=9)
    ax.set_xlim(left, right)
    ax.axvline(0, color="#202124", linewidth=1)
    names = [short(c.get("label") or f"{c['task']} ({c['metric']})") for c in rows]
    ax.set_yticks(range(len(rows)), [f"{name}\n{fmt_verdict(c)}" for name, c in zip(names, rows, strict=True)],
                  fontsize=8.5)
    for label, c in zip(ax.get_yticklabels(), rows, strict=True):
        label.set_color(COLOURS.get(c["verdict"], _OTHER))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def forest_png(groups: list[tuple[str, list[dict[str, Any]]]]) -> str | None:
    """Every task's change with its interval, the zero line and the margin band, coloured by verdict.

    Changes are drawn as improvement (right is better, whichever way the metric runs) in budget
    points, so accuracies and perplexities share one axis. Each group (the recipe's task, the
    general suite; or one task across several runs) gets its own panel and x scale: a +25 pp task
    gain would flatten a ±2 pp suite. A row's ``label`` replaces "task (metric)" on its line.
    """
    groups = [(title, rows) for title, rows in groups if rows]
    if not groups:
        return None
    heights = [len(rows) + 1.2 for _, rows in groups]
    fig = Figure(figsize=(8.5, 0.42 * sum(heights) + 0.9))
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (title, rows) in zip(axes, groups, strict=True):
        _forest_panel(ax, rows, title)
    axes[-1].set_xlabel("change, points (pp for accuracies, % for perplexity): ← worse · better →", fontsize=8.5)
    handles = [Patch(color=c, label=v) for v, c in COLOURS.items()] + [Patch(color="#e8f0fe", label="accepted margin")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _png(fig)


def confusion_png(labels: list[str], matrices: list[tuple[str, list[list[int]]]]) -> str:
    """Small heatmaps side by side (rows: true label, columns: predicted), each cell its count."""
    fig = Figure(figsize=(2.1 * len(matrices) + 0.8, 2.2 + 0.12 * len(labels)))
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    top = max((max(map(max, m)) for _, m in matrices if m), default=1) or 1
    for ax, (title, matrix) in zip(axes, matrices, strict=True):
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 * top else "#202124")
        ax.set_xticks(range(len(labels)), labels, fontsize=7.5, rotation=30 if len(labels) > 2 else 0)
        ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("true", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_curves_png(curves: dict[str, list[list[float]]]) -> str | None:
    """Training loss per logged step, and validation loss where it was measured."""
    train, val = curves.get("train") or [], curves.get("val") or []
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    if train:
        few = "o-" if len(train) < 8 else "-"  # a line of one logged point is invisible; a marker is not
        ax.plot(*zip(*train, strict=True), few, label="train loss", color="#4285f4", linewidth=1.2, markersize=4)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#ea4335", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def gain_forgetting_png(points: list[dict[str, Any]]) -> str | None:
    """Task gain against the worst general regression, one colour per adapter with both intervals as
    error bars, named in the legend (labels beside close points would overlap); the Pareto front
    (nothing else gains more and forgets less) is joined, and dominated adapters are drawn hollow."""
    points = [p for p in points if "gain" in p and "forgetting" in p]
    if not points:
        return None
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    arrows: list[tuple[dict[str, Any], str]] = []
    for i, p in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        if None in (*p["gain_interval"], *p["forgetting_interval"]):  # a test that could not bound it: arrows, below
            arrows.append((p, colour))
        (g_lo, g_hi), (f_lo, f_hi) = ([p[k] if v is None else v for v in p[f"{k}_interval"]]
                                      for k in ("gain", "forgetting"))
        hidden = next((q["adapter"] for q in points[:i] if (q["gain"], q["forgetting"]) == (p["gain"], p["forgetting"])),
                      None)  # drawn on top of an earlier point: the legend says so
        ax.errorbar(p["gain"], p["forgetting"], xerr=[[p["gain"] - g_lo], [g_hi - p["gain"]]],
                    yerr=[[p["forgetting"] - f_lo], [f_hi - p["forgetting"]]], fmt="o", color=colour, capsize=4,
                    markersize=9, elinewidth=1.4, markerfacecolor=colour if p["pareto"] else "white",
                    label=f"{short(p['adapter'])} (worst: {short(p['worst_task'])})" + ("" if p["pareto"] else ", dominated")
                    + (f", on top of {hidden}" if hidden else ""))
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["gain"])
    if len(front) > 1:
        ax.plot([p["gain"] for p in front], [p["forgetting"] for p in front], "--", color="#202124", linewidth=1,
                label="Pareto front", zorder=3)
    left, right = ax.get_xlim()
    bottom, top = ax.get_ylim()
    for p, colour in arrows:  # each unbounded end runs to the plot's edge, with an arrow
        x, y = p["gain"], p["forgetting"]
        (g_lo, g_hi), (f_lo, f_hi) = p["gain_interval"], p["forgetting_interval"]
        for unbounded, edge, marker in ((g_lo is None, (left, y), "<"), (g_hi is None, (right, y), ">"),
                                        (f_lo is None, (x, bottom), "v"), (f_hi is None, (x, top), "^")):
            if unbounded:
                ax.plot([x, edge[0]], [y, edge[1]], color=colour, linewidth=1.4)
                ax.plot(*edge, marker, color=colour, markersize=7, clip_on=False)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.axhline(0, color="#202124", linewidth=0.8)
    ax.set_xlabel("task gain, points (→ better)", fontsize=9)
    ax.set_ylabel("worst general regression, points (↑ forgets more)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def selection_png(curves: dict[str, list[list[float]]], selection: dict[str, Any] | None) -> str | None:
    """The task metric per validation above, the general-text perplexity rise below with the allowed bound
    (shaded past it), the kept step marked on both: why ``train.select`` kept the adapter it kept."""
    task, forgetting = curves.get("task") or [], curves.get("forgetting") or []
    if not selection or not task:
        return None
    panels = 2 if forgetting else 1
    fig = Figure(figsize=(7, 2.4 * panels + 0.6))
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    kept = selection.get("step")
    metric = selection["metric"]
    ax = axes[0]
    ax.plot(*zip(*task, strict=True), "o-", color="#1a73e8", linewidth=1.2, markersize=4, label=metric)
    ax.set_ylabel(metric, fontsize=9)
    curves_to_mark = [(axes[0], dict(map(tuple, task)))]
    if forgetting:
        bound = selection.get("forgetting_bound")
        ax = axes[1]
        ax.plot(*zip(*forgetting, strict=True), "o-", color="#e37400", linewidth=1.2, markersize=4,
                label="general-text perplexity vs base")
        if bound is not None:
            ax.axhline(bound, color="#d93025", linestyle="--", linewidth=1, label=f"bound +{bound:g}%")
            top = max(max(v for _, v in forgetting), bound) * 1.15 + 0.1
            ax.axhspan(bound, top, color="#fce8e6", zorder=0)
            ax.set_ylim(top=top)
        ax.axhline(0, color="#202124", linewidth=0.8)
        ax.set_ylabel("perplexity rise, %", fontsize=9)
        curves_to_mark.append((ax, dict(map(tuple, forgetting))))
    for ax, values in curves_to_mark:
        if kept in values:
            ax.axvline(kept, color="#188038", linewidth=1, alpha=0.6)
            ax.plot(kept, values[kept], "*", color="#188038", markersize=14, zorder=4, label=f"kept: step {kept}")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step (0: base model)", fontsize=9)
    fig.tight_layout()
    return _png(fig)
