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

_COLS = 4


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def before_after_png(comparisons: list[dict[str, Any]], labels: tuple[str, str] = ("base", "tuned")) -> str | None:
    """One small panel per task (metrics have different scales): before and after bars.

    The error bar on the after bar is the 95% CI of the paired delta placed around the after
    value, i.e. where the after value could lie given the before value.
    """
    if not comparisons:
        return None
    cols = min(_COLS, len(comparisons))
    rows = math.ceil(len(comparisons) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.6 * rows))
    for i, c in enumerate(comparisons):
        ax = fig.add_subplot(rows, cols, i + 1)
        ci = None
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            ci = [[max(c["delta"] - c["ci_low"], 0.0)], [max(c["ci_high"] - c["delta"], 0.0)]]
        ax.bar([0], [c["base"]], color="#9aa0a6", label=labels[0])
        ax.bar([1], [c["tuned"]], yerr=ci, capsize=4, label=labels[1],
               color={"improved": "#34a853", "regressed": "#ea4335"}.get(c["verdict"], "#4285f4"))
        ax.set_xticks([0, 1], list(labels))
        ax.set_title(f"{c['task']} ({c['metric']})", fontsize=9)
        ax.tick_params(labelsize=8)
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
        ax.plot(*zip(*train, strict=True), label="train loss", color="#4285f4", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#ea4335", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
