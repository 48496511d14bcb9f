"""``tuneguard compare`` rendered: adapters against the base and each other, and the gain-vs-forgetting chart."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    fmt_ci,
    fmt_delta,
    fmt_level,
    fmt_p_adjusted,
    fmt_verdict,
    html_block,
    html_page,
    md_block,
    verdict_class,
)
from tuneguard.report.plots import gain_forgetting_png
from tuneguard.report.terminal import print_block

_ROW_HEADERS = ["task", "Δ", "CI of Δ", "level", "p (adjusted)", "verdict"]


def _row(c: dict[str, Any]) -> list[Cell]:
    return [c["task"], fmt_delta(c), fmt_ci(c), fmt_level(c), fmt_p_adjusted(c),
            (fmt_verdict(c), verdict_class(c["verdict"]))]


def _points(v: float | None) -> str:
    return DASH if v is None else f"{v:+.1f}"


def compare_blocks(result: dict[str, Any]) -> list[Block]:
    """A summary per adapter, then every comparison: against the base, and adapter against adapter."""
    summary: list[list[Cell]] = []
    for p in result["points"]:
        counts = [c["verdict"] for c in result["vs_base"] if c["adapter"] == p["adapter"] and c["is_general"]]
        tally = ", ".join(f"{counts.count(v)} {v}" for v in ("improved", "non-inferior", "inconclusive", "regressed")
                          if counts.count(v))
        summary.append([p["adapter"], _points(p.get("gain")), p.get("worst_task") or DASH,
                        _points(p.get("forgetting")), _points(p.get("mean_forgetting")), tally or DASH,
                        ("yes", "pass") if p["pareto"] else "no"])
    families = "; ".join(f"{name}: {n} comparisons" for name, n in result["families"].items())
    blocks = [
        Block("Adapters (points: pp for accuracies, % for perplexity)",
              ["adapter", "task gain", "worst general task", "its regression", "mean regression", "general verdicts",
               "Pareto front"], summary),
        Block("How verdicts are reached", lines=[f"each family corrected by {result['correction']}: {families}"]),
        Block("Against the base", ["adapter", *_ROW_HEADERS], [[c["adapter"], *_row(c)] for c in result["vs_base"]]),
    ]
    if result["between"]:
        blocks.append(Block("Adapter against adapter (Δ = second − first)", ["first", "second", *_ROW_HEADERS],
                            [[c["a"], c["b"], *_row(c)] for c in result["between"]]))
    return blocks


def write_compare(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """compare.json, compare.md and compare.html (the chart first) in ``out_dir``."""
    blocks = compare_blocks(result)
    title = f"tuneguard: {len(result['runs'])} adapters on one base"
    chart = gain_forgetting_png(result["points"])
    img = (f'<h2>Task gain against forgetting</h2><img src="data:image/png;base64,{chart}" '
           'alt="task gain against the worst general regression">\n') if chart else ""
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.html"]
    atomic_write_json(paths[0], result)
    atomic_write_text(paths[1], f"# {title}\n\n" + "\n".join(map(md_block, blocks)))
    atomic_write_text(paths[2], html_page(title, f"<h1>{html.escape(title)}</h1>\n{img}" + "".join(map(html_block, blocks))))
    return paths


def print_compare(result: dict[str, Any]) -> None:
    for block in compare_blocks(result):
        print_block(block)
