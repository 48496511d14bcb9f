"""Bench results as report blocks: rich tables in the terminal, the same blocks in HTML (matrix page)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneguard.bench.measure import Change
from tuneguard.report.blocks import DASH, Block, Cell
from tuneguard.report.terminal import print_block
from tuneguard.train.memory import MemoryEstimate

REFERENCES = ("trainer", "trainer+gc", "sft")
TARGET_TOKENS, TARGET_PEAK, TARGET_CEILING = 1.5, 0.5, 0.9
"""Targets against the plain Trainer: at least 1.5x its tokens/s (or, where both sit near the hardware's
ceiling, at least 90% of that ceiling) at no more than half its peak."""


def _num(v: Any, digits: int = 1) -> str:
    return f"{v:,.{digits}f}" if isinstance(v, int | float) else DASH


def _x(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, int | float) else DASH


def print_blocks(blocks: Sequence[Block]) -> None:
    for block in blocks:
        print_block(block)


def config_label(spec: dict[str, Any]) -> str:
    return f"{spec.get('quant')} {spec.get('adapter')} {spec.get('batch')}x{spec.get('seq')}"


def _by_round(ours: dict[str, Any], theirs: dict[str, Any]) -> list[float] | None:
    """tuneguard / reference tokens/s in each round both finished: the two ran minutes apart, so a round's
    ratio sees the same host, where the medians' ratio can pair a quiet spell with a busy one."""
    pairs = []
    for run in (ours, theirs):
        rounds, values = run.get("rounds", []), run.get("tokens_per_s_runs", [])
        if len(rounds) != len(values):  # a finished run without a speed: which value is which round is unknown
            return None
        pairs.append(dict(zip(rounds, values, strict=True)))
    a, b = pairs
    shared = sorted(a.keys() & b.keys())
    return [round(a[k] / b[k], 3) for k in shared] if len(shared) > 1 else None


def train_summary(results: list[dict[str, Any]], ceilings: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per configuration: tuneguard against each reference, as ratios (tuneguard / reference), and each
    runner's share of the configuration's speed ceiling where it was measured."""
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_config.setdefault(config_label(r["spec"]), {})[r["spec"]["runner"]] = r
    out = []
    for config, runners in by_config.items():
        ours = runners.get("tuneguard", {})
        row: dict[str, Any] = {"config": config, "tokens_per_s": ours.get("tokens_per_s"),
                               "peak_memory_mb": ours.get("peak_memory_mb"),
                               "predicted_peak_mb": ours.get("predicted_peak_mb")}
        ceiling = (ceilings or {}).get(config)
        if ceiling:
            row["ceiling"] = ceiling
            for name, run in runners.items():
                if isinstance(run.get("tokens_per_s"), int | float):
                    row[f"{name}_ceiling_share"] = round(run["tokens_per_s"] / ceiling["tokens_per_s"], 3)
        for ref in REFERENCES:
            theirs = runners.get(ref)
            if not ours or theirs is None or "error" in theirs or "error" in ours:
                continue
            row[f"{ref}_tokens_ratio"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            row[f"{ref}_peak_ratio"] = round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 3)
            if rounds := _by_round(ours, theirs):
                row[f"{ref}_tokens_ratio_rounds"] = rounds
        if "trainer_tokens_ratio" in row:
            fast = row["trainer_tokens_ratio"] >= TARGET_TOKENS or row.get("tuneguard_ceiling_share", 0) >= TARGET_CEILING
            row["meets_targets"] = fast and row["trainer_peak_ratio"] <= TARGET_PEAK
        out.append(row)
    return out


def train_blocks(results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[Block]:
    runs = Block("Training runs", ["config", "runner", "tokens/s", "peak MB", "predicted MB", "load s", "trainable",
                                   "adapter MB", "mean loss", "note"])
    for r in results:
        spec = r["spec"]
        runner = spec["runner"] + ("" if spec.get("fastpath", True) else " (no fast path)")
        runs.rows.append([
            config_label(spec), runner, _num(r.get("tokens_per_s")), _num(r.get("peak_memory_mb"), 0),
            _num(r.get("predicted_peak_mb"), 0), _num(r.get("load_seconds")), _num(r.get("trainable_params"), 0),
            _num(r.get("adapter_mb"), 2), _num(r.get("mean_loss"), 3), r.get("error", "")[:80],
        ])
    ratios = Block("tuneguard / reference (tokens/s higher is better, peak lower is better)",
                   ["config", *[f"{ref} {what}" for ref in REFERENCES for what in ("tok/s", "peak")], "targets"])
    for s in summary:
        verdict: Cell = DASH
        if "meets_targets" in s:
            verdict = ("met", "pass") if s["meets_targets"] else ("missed", "fail")
        ratios.rows.append([s["config"], *[_x(s.get(f"{ref}_{what}_ratio")) for ref in REFERENCES for what in ("tokens", "peak")],
                            verdict])
    ratios.lines.append(f"targets vs the plain Trainer: tokens/s >= {TARGET_TOKENS}x (or >= {TARGET_CEILING:.0%} of the "
                        f"ceiling) and peak <= {TARGET_PEAK}x")
    for s in summary:
        for ref in REFERENCES:
            if rounds := s.get(f"{ref}_tokens_ratio_rounds"):
                ratios.lines.append(f"{s['config']}, tokens/s against {ref} round by round (each pair minutes apart): "
                                    f"{', '.join(_x(r) for r in rounds)}; the ratio above is of the medians")
    return [runs, ratios, *[ceiling_block(s) for s in summary if "ceiling" in s]]


def ceiling_block(summary: dict[str, Any]) -> Block:
    """The configuration's speed ceiling (step FLOPs / measured matmul rate) and each runner's share of it."""
    c = summary["ceiling"]
    block = Block(f"Speed ceiling, {summary['config']} ({c['dtype']} matmuls)", ["runner", "tokens/s", "share of ceiling"])
    block.rows.append(["ceiling", _num(c["tokens_per_s"]), "100%"])
    for key, share in summary.items():
        if key.endswith("_ceiling_share"):
            block.rows.append([key.removesuffix("_ceiling_share"), _num(share * c["tokens_per_s"]), f"{share:.0%}"])
    shapes = ", ".join(f"{shape}: {rate:,.0f}" for shape, rate in c["shapes"].items())
    block.lines.append(f"{c['flops_per_token'] / 1e6:,.0f} MFLOP per token; matmul GFLOP/s at the model's shapes: {shapes}; "
                       f"effective {c['gflops']:,.1f}")
    return block


def eval_blocks(results: list[dict[str, Any]], summary: dict[str, Any], against: str = "per-choice") -> list[Block]:
    """The runs, then the speed ratio against the reference runner and whether their predictions agree."""
    runs = Block("Evaluation runs", ["runner", "items", "items/s", "generation items/s", "peak MB", "load s", "note"])
    for r in results:
        runs.rows.append([r["spec"]["runner"], _num(r.get("items"), 0), _num(r.get("items_per_s"), 2),
                          _num(r.get("generation_items_per_s"), 2), _num(r.get("peak_memory_mb"), 0),
                          _num(r.get("load_seconds")), r.get("error", "")[:80]])
    agreement = summary.get("agreement") or {}
    lines: list[Cell] = [f"multiple-choice items/s, tuneguard / {against}: {_x(summary.get('items_per_s_ratio'))}"]
    if "generation_ratio" in summary:
        lines.append(f"generation items/s, batched / one by one: {_x(summary.get('generation_ratio'))}")
    if agreement:
        same = agreement["identical_choices"]
        lines.append((f"same prediction on {agreement['same_choice']}/{agreement['docs']} items; largest log-likelihood "
                      f"gap {agreement['max_logprob_gap']}", "pass" if same else "fail"))
        if agreement["generations"]:
            lines.append(f"same generation on {agreement['same_generation']}/{agreement['generations']} items")
    return [runs, Block("Scores", lines=lines)]


def changes_block(changes: list[Change], baseline: str) -> Block:
    block = Block(f"Compared with {baseline}", ["config", "metric", "before", "after", "change", "verdict"])
    for c in changes:
        verdict: Cell = ("regressed", "regressed") if c.regressed else ("ok", "nochange")
        block.rows.append([c.config, c.metric, _num(c.before, 2), _num(c.after, 2), _x(c.ratio), verdict])
    if not changes:
        block.lines.append("no configuration in common with the saved run")
    return block


def estimate_block(est: MemoryEstimate, measured: dict[str, Any] | None) -> Block:
    fast = "fast path" if est.inputs.get("fastpath") else "fast path off"
    block = Block(f"Predicted peak memory (MB, {fast})", ["part", "MB"])
    for part, mb in est.parts.items():
        block.rows.append([part, _num(mb, 0)])
    block.rows.append([("predicted peak", ""), _num(est.peak_mb, 0)])
    if est.inputs.get("peak_at") == "loading":
        block.lines.append(f"the peak is reached while loading ({_num(est.inputs['load_peak_mb'], 0)} MB); training "
                           f"alone needs {_num(est.inputs['train_peak_mb'], 0)} MB")
    if measured:
        if "error" in measured:
            block.lines.append((f"measurement failed: {measured['error'][:200]}", "fail"))
        else:
            block.rows.append(["measured peak", _num(measured["peak_memory_mb"], 0)])
            block.lines.append(f"predicted / measured: {est.peak_mb / measured['peak_memory_mb']:.2f}; measured "
                               f"{_num(measured.get('tokens_per_s'))} tokens/s over {measured.get('steps')} steps")
    return block


MATRIX_HEADERS = ["adapter", "task before", "task after", "Δ task", "worst general task (points lost)", "peak MB",
                  "tokens/s", "adapter MB", "trainable", "val loss", "note"]


def _worst(row: dict[str, Any]) -> str:
    if row.get("general_worst_task") is None:
        return DASH
    return f"{row['general_worst_task']} ({row['general_worst_points']:+.1f})"


def matrix_block(matrix: dict[str, Any]) -> Block:
    block = Block(f"Adapter methods on {matrix['recipe']}", MATRIX_HEADERS)
    for row in matrix["rows"]:
        note = row.get("error") or row.get("note") or ""
        block.rows.append([
            row["adapter"], _num(row.get("task_before"), 3), _num(row.get("task_after"), 3), _num(row.get("task_delta"), 3),
            _worst(row), _num(row.get("peak_memory_mb"), 0), _num(row.get("tokens_per_s")), _num(row.get("adapter_mb"), 2),
            _num(row.get("trainable_params"), 0), _num(row.get("final_val_loss"), 4),
            (note, "fail") if row.get("error") else note,
        ])
    block.lines.extend(matrix.get("notes", []))
    return block
