"""Evaluation: the shared-context scorer against one forward pass per (context, choice) pair."""

from __future__ import annotations

from typing import Any

from tuneguard.bench.measure import run_isolated
from tuneguard.bench.reference import score_agreement


def test_per_choice_reference(benchmark: Any, eval_spec: dict[str, Any], measured: dict) -> None:
    result = benchmark.pedantic(run_isolated, args=({**eval_spec, "runner": "per-choice"},), rounds=1, iterations=1)
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update(items_per_s=result["items_per_s"], generation_items_per_s=result["generation_items_per_s"],
                                peak_memory_mb=result["peak_memory_mb"])
    measured["eval-per-choice"] = result


def test_tuneguard_scorer(benchmark: Any, eval_spec: dict[str, Any], measured: dict) -> None:
    result = benchmark.pedantic(run_isolated, args=({**eval_spec, "runner": "tuneguard"},), rounds=1, iterations=1)
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update(items_per_s=result["items_per_s"], generation_items_per_s=result["generation_items_per_s"],
                                peak_memory_mb=result["peak_memory_mb"])
    reference = measured.get("eval-per-choice")
    if reference is not None:
        agreement = score_agreement(result, reference)
        benchmark.extra_info.update(items_ratio=round(result["items_per_s"] / reference["items_per_s"], 3), **agreement)
        assert agreement["identical_choices"], agreement
