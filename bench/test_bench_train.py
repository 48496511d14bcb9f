"""Training: tuneguard against plain Trainer + PEFT and TRL's SFTTrainer, same model, rows, adapter and batch."""

from __future__ import annotations

from typing import Any

import pytest

from tuneguard.bench.measure import run_isolated

KEYS = ("tokens_per_s", "peak_memory_mb", "load_seconds", "trainable_params", "predicted_peak_mb", "mean_loss")


def measure(benchmark: Any, spec: dict[str, Any], measured: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    result = benchmark.pedantic(run_isolated, args=(spec,), rounds=1, iterations=1)
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update({k: result[k] for k in KEYS if result.get(k) is not None})
    benchmark.extra_info["threads"] = result["environment"]["threads"]
    measured[name] = result
    return result


@pytest.mark.parametrize("runner", ["trainer", "sft"])
def test_reference(benchmark: Any, train_spec: dict[str, Any], measured: dict, runner: str) -> None:
    measure(benchmark, {**train_spec, "runner": runner}, measured, runner)


def test_tuneguard_plain_path(benchmark: Any, train_spec: dict[str, Any], measured: dict) -> None:
    measure(benchmark, {**train_spec, "runner": "tuneguard", "fastpath": False}, measured, "tuneguard-plain")


def test_tuneguard(benchmark: Any, train_spec: dict[str, Any], measured: dict) -> None:
    ours = measure(benchmark, {**train_spec, "runner": "tuneguard", "fastpath": True}, measured, "tuneguard")
    for name, theirs in measured.items():
        if name != "tuneguard" and "tokens_per_s" in theirs:
            benchmark.extra_info[f"tokens_ratio_vs_{name}"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            benchmark.extra_info[f"peak_ratio_vs_{name}"] = round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 3)
    benchmark.extra_info["predicted_over_measured_peak"] = round(ours["predicted_peak_mb"] / ours["peak_memory_mb"], 3)
