"""``tuneguard select``'s ranking: one table of the candidates, in the terminal and as select.md, beside select.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneguard.io import atomic_write_json, atomic_write_text
from tuneguard.report.blocks import (
    DASH,
    Block,
    Cell,
    count_of,
    fmt_float,
    fmt_memory,
    fmt_p,
    fmt_value,
    md_block,
)
from tuneguard.report.layout import picked_among
from tuneguard.report.terminal import print_block

SELECT_JSON, SELECT_MD = "select.json", "select.md"
HEADERS = ["rank", "backbone", "kind", "untuned", "after fine-tune", "vs #1 (95% CI, p)", "general", "footprint",
           "peak RSS", "scoring items/s", "training tokens/s"]


def _general(row: dict[str, Any]) -> str:
    """The mean of the suite's accuracies (perplexity-like tasks are listed in select.json only)."""
    if row.get("kind") == "encoder":
        return "n/a (encoder)"
    accs = [g["value"] for g in (row.get("general") or {}).values() if g.get("aggregate") == "mean"]
    return f"{fmt_value(sum(accs) / len(accs))} ({count_of(len(accs), 'task')})" if accs else DASH


def _versus(v: dict[str, Any] | None) -> str:
    if not v:
        return DASH
    return (f"{100 * v['delta']:+.1f} pp [{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}], "
            f"p {fmt_p(v['p_value'])}")


def _tuned(row: dict[str, Any], steps: int | None) -> Cell:
    if row.get("tune_error"):
        return (f"failed: {row['tune_error']}", "fail")
    if not steps:
        return DASH
    looks = picked_among(row.get("selection"))
    if looks:  # picked on the rows this cell scores: optimistic, and not the last step
        return (f"{fmt_value(row.get('tuned'))}, step {row['selection']['step']} of {looks} validations", "inconclusive")
    return fmt_value(row.get("tuned"))


def select_row(row: dict[str, Any], steps: int | None) -> list[Cell]:
    if row.get("error"):
        cells: list[Cell] = [DASH, row["source"], row.get("kind") or DASH, (f"failed: {row['error']}", "fail")]
        cells += [DASH] * (len(HEADERS) - len(cells))
        cells[HEADERS.index("peak RSS")] = fmt_memory(row.get("peak_rss_mb"))
        return cells
    return [
        str(row["rank"]) if row.get("rank") else DASH, row["source"], row["kind"],
        f"{fmt_value(row.get('score'))} ({row['how']})", _tuned(row, steps), _versus(row.get("versus_leader")),
        _general(row), fmt_memory(row.get("footprint_mb")), fmt_memory(row.get("peak_rss_mb")),
        fmt_float(row.get("items_per_s")), fmt_float(row.get("train_tokens_per_s")),
    ]


def select_lines(summary: dict[str, Any]) -> list[Cell]:
    """How the table was made, so a reader can tell what each number is."""
    s = summary["settings"]
    rows = [r for r in summary["candidates"] if not r.get("error")]
    n = {r.get("tuned_n" if s.get("steps") else "n") for r in rows} - {None}
    probe = next((r["probe"] for r in rows if r.get("probe")), None)
    lines: list[Cell] = [
        f"ranked by accuracy on the recipe's validation data ({', '.join(map(str, sorted(n))) or DASH} items) "
        + (f"after {s['steps']} steps of {s['adapter']}" if s.get("steps") else "untuned")
        + f"; every backbone at quantization '{s['quantization']}'",
        "untuned: a decoder zero-shot (the log-likelihood of each verbalized label); an encoder has a new head, "
        "so zero-shot has no meaning: a linear probe, the head trained alone on the frozen backbone"
        + (f" ({probe['steps']:,} steps of {probe['batch_size']} from {probe['train_rows']:,} training rows, lr "
           f"{probe['lr']:g})" if probe else ""),
        "vs #1: the difference from the leader on the same items, Tango's paired 95% interval and McNemar's p",
        "general: mean accuracy over eval.suites (" + (", ".join(s.get("suites") or []) or "none") + "); an encoder "
        "has no language-model head to score them with",
        "footprint: parameters and buffers as loaded; peak RSS: the candidate's own process (Python and torch "
        "included), scoring and any fine-tune",
    ]
    picked = [r["source"] for r in rows if picked_among(r.get("selection"))]
    if picked:
        lines.append((f"{', '.join(picked)}: the fine-tune kept the step train.select picked among validations on the "
                      "rows this table scores, so its 'after' score, its rank and its 'vs #1' are optimistic by that "
                      "choice; rank on rows none of them chose on (train.select=last)", "inconclusive"))
    reused = [r["source"] for r in rows if r.get("reused")]
    if reused:
        lines.append(f"fine-tunes reused from an earlier call (same recipe), so peak RSS is scoring only: {', '.join(reused)}")
    return lines


def select_blocks(summary: dict[str, Any]) -> list[Block]:
    steps = summary["settings"].get("steps")
    return [Block(f"Backbones for {summary['name']}", HEADERS, [select_row(r, steps) for r in summary["candidates"]]),
            Block("How to read it", lines=select_lines(summary))]


def print_select(summary: dict[str, Any]) -> None:
    for block in select_blocks(summary):
        print_block(block)


def write_select(out: Path, summary: dict[str, Any]) -> list[Path]:
    """select.json (every measurement, per-item outcomes included) and select.md, each written atomically."""
    md = f"# tuneguard select: {summary['name']}\n\n_{summary['created']}_\n\n" + "\n".join(
        map(md_block, select_blocks(summary)))
    atomic_write_json(out / SELECT_JSON, summary)
    atomic_write_text(out / SELECT_MD, md)
    return [out / SELECT_JSON, out / SELECT_MD]

