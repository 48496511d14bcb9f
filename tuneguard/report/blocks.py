"""Formatting shared by the terminal, markdown and HTML reports, so each cell is defined once.

Everything here takes the plain dicts of a report (``Comparison.to_dict()`` rows, the run
summary), so a report can be re-rendered from ``report.json`` alone.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tuneguard.eval.verdicts import open_ended

COMPARISON_HEADERS = [
    "task", "metric", "n", "before", "after", "Δ", "CI of Δ", "level", "p (adjusted)", "test", "detectable", "margin",
    "verdict",
]
"""``level``: the interval's confidence, above 95% where a correction spreads the error over a family;
``detectable``: the smallest regression the row could see with 80% power; ``margin``: the regression accepted."""
TEST_NAMES = {"mcnemar": "McNemar", "mcnemar-exact": "McNemar exact", "paired-bootstrap": "bootstrap",
              "sign-flip-exact": "sign-flip, exact", "sign-flip": "sign-flip"}
DASH = "–"
Cell = str | tuple[str, str]
"""A table cell or a line: its text, optionally with a style class (a verdict, ``pass`` or ``fail``)."""


def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def count_of(n: int, noun: str) -> str:
    """``1 task``, ``3 tasks``."""
    return f"{n} {noun}{'s' * (n != 1)}"


def fmt_value(v: float | None, how: str = "mean") -> str:
    """Mean metrics (in [0, 1]) as percentages, perplexity-like ones in their own units."""
    if missing(v):
        return DASH
    return f"{100 * v:.1f}%" if how == "mean" else f"{v:.3f}"


def _fmt_change(v: float, how: str) -> str:
    return f"{100 * v:+.1f}" if how == "mean" else f"{v:+.3f}"


def fmt_delta(c: dict[str, Any]) -> str:
    """``+3.1 pp`` for means; ``+0.420 (+2.1%)`` for perplexity-like metrics (the budget's units)."""
    if missing(c.get("delta")):
        return DASH
    how = c.get("aggregate", "mean")
    if how == "mean":
        return f"{_fmt_change(c['delta'], how)} pp"
    return f"{_fmt_change(c['delta'], how)} ({100 * c['delta'] / max(abs(c['base']), 1e-12):+.1f}%)"


def fmt_ci(c: dict[str, Any]) -> str:
    """The interval in the Δ column's units."""
    how = c.get("aggregate", "mean")
    if open_ended(c):  # an end the test cannot bound (too few items for the interval's level), drawn as ∞
        low, high = (("−∞" if missing(c.get("ci_low")) else _fmt_change(c["ci_low"], how)),
                     ("+∞" if missing(c.get("ci_high")) else _fmt_change(c["ci_high"], how)))
        return f"[{low}, {high}]"
    if missing(c.get("ci_low")) or missing(c.get("ci_high")):
        return DASH
    return f"[{_fmt_change(c['ci_low'], how)}, {_fmt_change(c['ci_high'], how)}]"


def fmt_level(c: dict[str, Any]) -> str:
    """The interval's level, with as many digits as it takes not to round up to 100% (a level of 1 - 0.05/171)."""
    level = 100 * (1 - (c.get("alpha") or 0.05))
    digits = 3
    while f"{level:.{digits}g}" == "100" and digits < 12:
        digits += 1
    return f"{level:.{digits}g}%"


def fmt_p(p: float | None) -> str:
    if missing(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_p_adjusted(c: dict[str, Any]) -> str:
    """``0.076 → 0.530``: the test's p, then the family's adjusted p where a correction applies."""
    raw, adj = c.get("p_value"), c.get("p_adjusted")
    if missing(adj) or c.get("correction", "none") == "none":
        return fmt_p(raw)
    return f"{fmt_p(raw)} → {fmt_p(adj)}"


def fmt_points(v: float | None, unit: str) -> str:
    """A dash where there is no number, or none that could be reached (a detectable change of infinity)."""
    return DASH if missing(v) or not math.isfinite(v) else f"{v:.1f} {unit}"


def points_unit(c: dict[str, Any]) -> str:
    return "pp" if c.get("aggregate", "mean") == "mean" else "%"


def fmt_verdict(c: dict[str, Any]) -> str:
    """The verdict with what it needs said next to it: beyond the margin, or the items that would decide."""
    verdict = c.get("verdict") or DASH
    if verdict == "regressed" and c.get("beyond_margin"):
        return "regressed, beyond margin"
    if verdict in ("inconclusive", "regressed") and c.get("items_to_decide"):
        return f"{verdict} (~{c['items_to_decide']:,} items)"
    return verdict


def fmt_int(n: int | None) -> str:
    return DASH if missing(n) else f"{int(n):,}"


def fmt_memory(mb: float | None) -> str:
    if missing(mb):
        return DASH
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def fmt_float(v: float | None, digits: int = 1) -> str:
    return DASH if missing(v) else f"{v:,.{digits}f}"


def fmt_adapter(summary: dict[str, Any]) -> str:
    method = summary.get("adapter") or DASH
    return f"{method} r{summary['r']}" if summary.get("r") else method


def fmt_steps(summary: dict[str, Any]) -> str:
    """Optimizer steps, and where early stopping (train.early_stopping_patience) ended training short of the plan
    (patience can run out at the last step too: then nothing was cut short)."""
    steps, planned = summary.get("steps"), summary.get("planned_steps")
    if not summary.get("stopped_early") or (planned is not None and steps is not None and steps >= planned):
        return fmt_int(steps)
    return f"{fmt_int(steps)} of {fmt_int(planned)}, stopped early" if planned else f"{fmt_int(steps)}, stopped early"


def comparison_row(c: dict[str, Any]) -> list[Cell]:
    how, unit = c.get("aggregate", "mean"), points_unit(c)
    return [
        c["task"], c["metric"], fmt_int(c.get("n")), fmt_value(c.get("base"), how), fmt_value(c.get("tuned"), how),
        fmt_delta(c), fmt_ci(c), fmt_level(c), fmt_p_adjusted(c), TEST_NAMES.get(c.get("test") or "", c.get("test") or DASH),
        fmt_points(c.get("mdr"), unit),
        fmt_points(c.get("margin"), unit), (fmt_verdict(c), verdict_class(c["verdict"])),
    ]


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's identity and cost, as (label, value) pairs."""
    return [
        ("model", str(summary.get("model") or DASH)),
        ("quantization", str(summary.get("quantization") or DASH)),
        ("adapter", fmt_adapter(summary)),
        ("trainable params", fmt_int(summary.get("trainable_params"))),
        ("steps", fmt_steps(summary)),
        ("tokens trained", fmt_int(summary.get("tokens_trained"))),
        ("tokens/s", fmt_float(summary.get("tokens_per_s"))),
        ("peak memory", fmt_memory(summary.get("peak_memory_mb"))),
        ("wall time", DASH if missing(summary.get("wall_time_s")) else f"{summary['wall_time_s']:.0f} s"),
        ("fingerprint", str(summary.get("fingerprint") or DASH)),
    ]


def verdict_class(verdict: str | None) -> str:
    """The style of a verdict; reports written before margins existed say "no significant change"."""
    return {"improved": "improved", "regressed": "regressed", "non-inferior": "noninferior",
            "inconclusive": "inconclusive"}.get(verdict or "", "nochange")


def cell_text(cell: Cell) -> str:
    return cell[0] if isinstance(cell, tuple) else cell


def cell_class(cell: Cell) -> str:
    return cell[1] if isinstance(cell, tuple) else ""


@dataclass
class Block:
    """One section of a report: a table, or lines of text; rendered alike to markdown, HTML and rich."""

    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    lines: list[Cell] = field(default_factory=list)


def _md_escape(text: str) -> str:
    """A cell or list line as literal markdown text: a backslash, pipe or ``<`` in a task name or label must not
    end a table cell or start HTML."""
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("\n", " ")):
        text = text.replace(char, escaped)
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)  # only where HTML could start: "<0.001" stays as it is


def md_block(block: Block) -> str:
    out = [f"## {block.title}\n"]
    if block.headers:
        def line(cells: list[Cell]) -> str:
            return "| " + " | ".join(_md_escape(cell_text(c)) for c in cells) + " |"

        out += [line(block.headers), "|" + "---|" * len(block.headers), *map(line, block.rows)]
    out += [f"- {_md_escape(cell_text(c))}" for c in block.lines]
    return "\n".join(out) + "\n"


def _td(cell: Cell, tag: str = "td") -> str:
    """A cell. A table cell without digits (a metric's or a test's name) may wrap, after a comma too
    (``exact_match,strict-match``), so a wide table keeps its verdict column in view; numbers and intervals
    (``[-∞, +∞]`` too) do not."""
    raw = cell_text(cell)
    text, classes = html.escape(raw), [cell_class(cell)] if cell_class(cell) else []
    if tag == "td" and not re.search(r"[\d∞]", raw):
        classes.append("words")
        text = re.sub(r",(?=\S)", ",<wbr>", text)
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f"<{tag}{cls}>{text}</{tag}>"


def html_block(block: Block) -> str:
    out = [f"<h2>{html.escape(block.title)}</h2>"]
    if block.headers:
        head = "".join(_td(h, "th") for h in block.headers)
        body = "".join("<tr>" + "".join(map(_td, row)) + "</tr>" for row in block.rows)
        out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    if block.lines:
        out.append("<ul>" + "".join(_td(c, "li") for c in block.lines) + "</ul>")
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:80rem;
color:#1d1d1f;padding:0 1rem}td{white-space:nowrap}td.words,td:last-child{white-space:normal}td:last-child{min-width:8rem}
td:first-child{white-space:normal;overflow-wrap:anywhere;min-width:8rem;max-width:22rem}.scroll{overflow-x:auto}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.8rem}
th,td{border:1px solid #ddd;padding:.2rem .35rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f5f5f7}
.improved,.pass{color:#137333;font-weight:600}.regressed,.fail{color:#c5221f;font-weight:600}
.nochange{color:#80868b}.noninferior{color:#1a73e8}.inconclusive{color:#b06000;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
"""


def html_page(title: str, body: str) -> str:
    """A complete page with inline CSS and nothing fetched from elsewhere."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n"
    )
