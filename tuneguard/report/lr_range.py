"""``tuneguard lr``'s output: the loss-against-rate curve as a PNG, the data as JSON, a summary in the terminal.

It renders the dict of :class:`tuneguard.train.lr_range.LrRange` and computes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tuneguard.io import atomic_write_bytes, atomic_write_json
from tuneguard.report.blocks import Block, Cell
from tuneguard.report.plots import PALETTE, png_bytes
from tuneguard.report.terminal import print_block
from tuneguard.train.lr_range import LR_JSON, LR_PNG

TABLE_ROWS = 12
"""Steps shown in the terminal table (evenly spaced, the minimum and the last one always among them)."""


def lr_range_png(r: dict[str, Any]) -> bytes:
    """Loss against learning rate (log x): each step's loss, the smoothed curve, the minimum and the suggestion."""
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    ax.plot(r["lrs"], r["losses"], ".", color="#9aa0a6", markersize=4, label="loss at each step")
    ax.plot(r["lrs"], r["smoothed"], "-", color=PALETTE[0], linewidth=2, label="smoothed (centred average)")
    ax.axvline(r["min_loss_lr"], color="#80868b", linestyle=":", linewidth=1.2,
               label=f"minimum of the smoothed loss ({r['min_loss_lr']:.2g})")
    if r["suggestion"] is not None:
        ax.axvline(r["suggestion"], color=PALETTE[1], linewidth=1.8,
                   label=f"suggestion, {r['rule']} ({r['suggestion']:.2g})")
    low, high = r["usual_range"]
    ax.axvspan(low, high, color="#e8f0fe", zorder=0, label=f"{r['method']}'s usual range ({low:g} to {high:g})")
    ax.set_xscale("log")
    ax.set_xlim(r["start"], r["end"])
    # The fall is the part worth reading: the top is cut at 1.5x the drop above the starting loss, so a
    # diverged tail does not flatten it.
    first, lowest = r["smoothed"][0], min(r["smoothed"])
    span = max(first - lowest, 0.05 * abs(first), 1e-6)
    ax.set_ylim(min(r["losses"]) - 0.1 * span, min(max(r["losses"]), first + 1.5 * span) + 0.1 * span)
    ax.set_xlabel("learning rate (train.lr)", fontsize=9)
    ax.set_ylabel("training loss", fontsize=9)
    stop = f", stopped at step {len(r['lrs'])}" if r["stopped"] and len(r["lrs"]) < r["steps"] else ""
    ax.set_title(f"{r['recipe']}: learning-rate range test ({len(r['lrs'])} of {r['steps']} steps{stop})",
                 fontsize=10, loc="left")
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7.5, loc="best", frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


def lr_range_blocks(r: dict[str, Any]) -> list[Block]:
    """The curve at a dozen steps, then the suggestion, what to distrust in it, and the caveats."""
    n = len(r["lrs"])
    low = r["smoothed"].index(min(r["smoothed"]))
    shown = sorted({round(i * (n - 1) / (TABLE_ROWS - 1)) for i in range(TABLE_ROWS)} | {low, n - 1})
    rows = [[str(i + 1), f"{r['lrs'][i]:.3g}", f"{r['losses'][i]:.4f}",
             (f"{r['smoothed'][i]:.4f}", "improved") if i == low else f"{r['smoothed'][i]:.4f}"] for i in shown]
    curve = Block(f"lr range test: {r['recipe']}", headers=["step", "lr", "loss", "smoothed"], rows=rows)
    low_r, high_r = r["usual_range"]
    lines: list[Cell] = [(f"suggested train.lr={r['suggestion']:.2g} ({r['rule']}: the smoothed loss is lowest at "
                          f"{r['min_loss_lr']:.2g})", "improved") if r["suggestion"] is not None else
                         ("no train.lr suggested: the loss hardly fell (see the warning)", "inconclusive")]
    if r["steepest_lr"] is not None:
        lines.append(f"the smoothed loss falls fastest at {r['steepest_lr']:.2g}")
    lines.append(f"{r['method']}'s default is {r['default_lr']:g}; its usual range {low_r:g} to {high_r:g}")
    lines.append(f"measured with batch {r['batch_size']} x {r['grad_accum']} accumulation steps")
    if r["layer_lr_decay"] < 1:
        lines.append(f"rates are train.lr, the top layer's; train.layer_lr_decay={r['layer_lr_decay']:g} scales "
                     "the layers below")
    early = "stopped early" if len(r["lrs"]) < r["steps"] else "stopped at its last step"
    lines.append(f"{early} at {r['stopped']}" if r["stopped"] else f"ran all {r['steps']} steps, to {r['end']:g}")
    lines += [(f"warning: {w}", "inconclusive") for w in r["warnings"]]
    return [curve, Block("lr", lines=lines), Block("caveat", lines=list(r["caveats"]))]


def print_lr_range(r: dict[str, Any]) -> None:
    for block in lr_range_blocks(r):
        print_block(block)


def write_lr_range(folder: Path, r: dict[str, Any]) -> list[Path]:
    """lr_range.json (the data) and lr_range.png (the curve) into ``folder``, each atomically; their paths."""
    paths = [folder / LR_JSON, folder / LR_PNG]
    atomic_write_json(paths[0], r)
    atomic_write_bytes(paths[1], lr_range_png(r))
    return paths
