"""The ``tuneguard bench`` verbs: train, eval, matrix, estimate.

Every configuration runs in a fresh process (see :mod:`tuneguard.bench.measure`); references run
in the same invocation, interleaved with tuneguard's runs when ``--repeat`` > 1, and are reported as
ratios. ``--json`` saves everything; ``--compare`` flags regressions against a saved run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
from pathlib import Path
from typing import Any

from rich.markup import escape

from tuneguard.args import positive_int
from tuneguard.errors import TuneguardError

TRAIN_RUNNERS = ["tuneguard", "trainer", "sft"]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure memory and speed against the usual Trainer + PEFT way")
    verbs = bench.add_subparsers(dest="bench_verb", required=True)

    p = verbs.add_parser("train", help="training tokens/s and peak memory: tuneguard vs Trainer + PEFT vs TRL")
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--quant", nargs="+", default=["nf4"], choices=["none", "nf4", "fp4", "int8"])
    p.add_argument("--adapter", nargs="+", default=["lora"], help="lora dora rslora ia3 loha lokr adalora")
    p.add_argument("--seq-len", nargs="+", type=int, default=[512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--runners", nargs="+", default=TRAIN_RUNNERS, help="tuneguard trainer trainer+gc sft")
    p.add_argument("--no-fastpath", action="store_true", help="run tuneguard with TUNEGUARD_FASTPATH=0")
    _common(p)
    p.set_defaults(func=_train)

    p = verbs.add_parser("eval", help="multiple-choice items/s: shared-context scorer vs one pass per choice")
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--quant", default="nf4", choices=["none", "nf4", "fp4", "int8"])
    p.add_argument("--tasks", nargs="+", default=["general-small"])
    p.add_argument("--limit", type=positive_int, default=40, help="first N items of each task")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--generation-items", type=int, default=16)
    _common(p)
    p.set_defaults(func=_eval)

    p = verbs.add_parser("lm-eval", help="lm-eval's pipeline: its HF model vs tuneguard's, items/s and predictions")
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tasks", nargs="+", help="lm_eval:NAME or lm_eval:path.yaml (default: the vendored "
                   "multiple-choice tasks, lm_eval:arc_easy@vendored ...)")
    p.add_argument("--limit", type=positive_int, default=40, help="first N items of each task")
    p.add_argument("--batch", type=int, default=8)
    _common(p)
    p.set_defaults(func=_lm_eval)

    p = verbs.add_parser("matrix", help="every adapter method on one recipe: task metric, regression, memory, speed")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run")
    p.add_argument("--adapter", nargs="+", default=["lora", "dora", "rslora", "ia3", "loha", "lokr"])
    p.add_argument("--out", default="runs/bench-matrix", help="folder for the runs, matrix.json and matrix.html")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    p.set_defaults(func=_matrix)

    p = verbs.add_parser("estimate", help="predicted peak memory of a recipe (and, with --measure, the measured one)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--measure", type=int, metavar="STEPS", help="also train STEPS steps in a fresh process and compare")
    p.add_argument("--json", dest="json_out", help="write the estimate as JSON here")
    p.set_defaults(func=_estimate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeat", type=int, default=1, help="run every configuration N times, interleaved; medians")
    p.add_argument("--threads", type=int, help="torch threads in each measured process (default: torch's)")
    p.add_argument("--json", dest="json_out", help="save the results here")
    p.add_argument("--compare", help="a saved --json to compare with; regressions exit with 1")
    p.add_argument("--tolerance", type=float, default=0.1, help="relative change counted as a regression")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measured process")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available); CUDA peaks are allocated/reserved bytes")


# ------------------------------------------------------------------------------------------ runs


def _run_all(specs: list[dict[str, Any]], repeat: int, timeout: float) -> list[dict[str, Any]]:
    """Each spec ``repeat`` times, round-robin (so load drifts hit every runner alike); medians merged."""
    from tuneguard.bench.measure import run_isolated
    from tuneguard.progress import console

    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(specs))}
    for round_, (i, spec) in itertools.product(range(repeat), enumerate(specs)):
        label = " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("kind",))
        console.print(f"[dim]bench ({round_ + 1}/{repeat}): {label}[/dim]")
        result = run_isolated(spec, timeout=timeout)
        if "error" in result:
            console.print(f"[red]  failed: {escape(result['error'])}[/red]")
        runs[i].append({**result, "round": round_ + 1})
    return [_median(results) for results in runs.values()]


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    out = {k: v for k, v in (ok or results)[0].items() if k != "round"}
    if not ok:
        return out
    if len(ok) > 1:
        out["rounds"] = [r["round"] for r in ok]  # which rounds the ``*_runs`` lists hold, to pair runners by round
    for key in ("tokens_per_s", "items_per_s", "peak_memory_mb", "load_seconds", "generation_items_per_s"):
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values:
            out[key] = statistics.median(values)
            if len(values) > 1:
                out[f"{key}_runs"] = values
    out["repeats"] = len(ok)
    return out


def _finish(args: argparse.Namespace, results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> int:
    from tuneguard.bench.measure import changes_since, environment, load_results
    from tuneguard.io import atomic_write_json
    from tuneguard.progress import say

    if args.json_out:
        atomic_write_json(Path(args.json_out), {"environment": environment(), "summary": summary, "results": results})
        say(f"results saved to {args.json_out}")
    if not args.compare:
        return 0
    changes = changes_since(results, load_results(args.compare), args.tolerance)
    from tuneguard.bench.tables import changes_block, print_blocks

    print_blocks([changes_block(changes, args.compare)])
    return 1 if any(c.regressed for c in changes) else 0


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _loaded(threshold: float = 0.5) -> str | None:
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > threshold * cpus:
        return f"the machine is busy (load average {load:.1f} on {cpus} CPUs): timings will be noisy; --repeat helps"
    return None


def _train(args: argparse.Namespace) -> int:
    from tuneguard.bench.tables import print_blocks, train_blocks, train_summary
    from tuneguard.progress import console

    if note := _loaded():
        console.print(f"[yellow]{escape(note)}[/yellow]")
    unknown = set(args.runners) - {"tuneguard", "trainer", "trainer+gc", "sft"}
    if unknown:
        raise TuneguardError(f"bench train --runners: unknown {sorted(unknown)}; choose tuneguard trainer trainer+gc sft")
    specs = []
    for quant, adapter, seq in itertools.product(args.quant, args.adapter, args.seq_len):
        for runner in args.runners:
            spec = {"kind": "train", "runner": runner, "model": args.model, "quant": quant, "adapter": adapter,
                    "seq": seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "r": args.r,
                    "alpha": 2 * args.r, "dropout": args.dropout, "threads": args.threads, "device": _device(args)}
            if runner == "tuneguard":
                spec["fastpath"] = not args.no_fastpath
            specs.append(spec)
    results = _run_all(specs, args.repeat, args.timeout)
    ceilings = {_config_of(spec): _ceiling(spec) for spec in specs if spec["runner"] == "tuneguard"}
    summary = train_summary(results, ceilings)
    print_blocks(train_blocks(results, summary))
    return _finish(args, results, summary)


def _config_of(spec: dict[str, Any]) -> str:
    from tuneguard.bench.tables import config_label

    return config_label(spec)


def _ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """The configuration's speed ceiling here, in the dtype tuneguard computes in (measured after the runs)."""
    from tuneguard.bench.ceiling import training_ceiling
    from tuneguard.numerics import resolve_dtype

    return training_ceiling(spec, resolve_dtype("auto", spec["device"]))


def _eval(args: argparse.Namespace) -> int:
    from tuneguard.bench.reference import score_agreement
    from tuneguard.bench.tables import eval_blocks, print_blocks
    from tuneguard.progress import console

    if note := _loaded():
        console.print(f"[yellow]{escape(note)}[/yellow]")
    base = {"kind": "eval", "model": args.model, "quant": args.quant, "tasks": args.tasks, "limit": args.limit,
            "batch": args.batch, "generation_items": args.generation_items, "threads": args.threads,
            "device": _device(args)}
    results = _run_all([{**base, "runner": "tuneguard"}, {**base, "runner": "per-choice"}], args.repeat, args.timeout)
    ours, reference = results
    summary = [{"agreement": score_agreement(ours, reference) if "error" not in ours and "error" not in reference else None,
                "items_per_s_ratio": _ratio(ours.get("items_per_s"), reference.get("items_per_s")),
                "generation_ratio": _ratio(ours.get("generation_items_per_s"), reference.get("generation_items_per_s"))}]
    print_blocks(eval_blocks(results, summary[0]))
    return _finish(args, results, summary)


def _lm_eval(args: argparse.Namespace) -> int:
    from tuneguard.bench.lm_eval_runs import LM_EVAL_DEFAULTS
    from tuneguard.bench.reference import score_agreement
    from tuneguard.bench.tables import eval_blocks, print_blocks
    from tuneguard.errors import require_lm_eval
    from tuneguard.progress import console

    require_lm_eval("tuneguard bench lm-eval")
    if note := _loaded():
        console.print(f"[yellow]{escape(note)}[/yellow]")
    base = {"kind": "lm-eval", "model": args.model, "dtype": args.dtype, "tasks": args.tasks or LM_EVAL_DEFAULTS["tasks"],
            "limit": args.limit, "batch": args.batch, "threads": args.threads, "device": _device(args)}
    results = _run_all([{**base, "runner": "tuneguard"}, {**base, "runner": "hf"}], args.repeat, args.timeout)
    ours, reference = results
    summary = [{"agreement": score_agreement(ours, reference) if "error" not in ours and "error" not in reference else None,
                "items_per_s_ratio": _ratio(ours.get("items_per_s"), reference.get("items_per_s"))}]
    print_blocks(eval_blocks(results, summary[0], against="lm-eval hf"))
    return _finish(args, results, summary)


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _matrix(args: argparse.Namespace) -> int:
    from tuneguard.bench.matrix import run_matrix
    from tuneguard.bench.tables import matrix_block, print_blocks
    from tuneguard.progress import say

    matrix = run_matrix(Path(args.recipe), args.adapter, args.overrides, Path(args.out), timeout=args.timeout)
    print_blocks([matrix_block(matrix)])
    say(f"matrix written to {Path(args.out) / 'matrix.html'} and matrix.json")
    return 0 if all("error" not in row for row in matrix["rows"]) else 1


def _estimate(args: argparse.Namespace) -> int:
    from tuneguard.bench.measure import measure_recipe
    from tuneguard.bench.tables import estimate_block, print_blocks
    from tuneguard.io import atomic_write_json
    from tuneguard.progress import quiet_libraries
    from tuneguard.recipe import load_recipe
    from tuneguard.train.fastpath import fastpath_enabled
    from tuneguard.train.memory import estimate_recipe

    quiet_libraries()  # the estimate applies the adapter in this process
    recipe = load_recipe(args.recipe, args.overrides)
    fast = estimate_recipe(recipe, fastpath=fastpath_enabled())
    measured = measure_recipe(Path(args.recipe), args.overrides, args.measure) if args.measure else None
    print_blocks([estimate_block(fast, measured)])
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"estimate": fast.to_dict(), "measured": measured})
    return 0
