"""Settings of the bench suite: small by default so ``pytest bench/ --benchmark-only`` takes minutes on a CPU.

Every measurement runs in a fresh process (``tuneguard.bench.measure.run_isolated``); pytest-benchmark
times that whole process, and the numbers that matter (tokens/s over the steps after warm-up, peak
memory, ratios to the references) are attached to each benchmark as ``extra_info``, so
``--benchmark-autosave`` keeps them and ``--benchmark-compare`` shows them side by side.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tuneguard bench")
    group.addoption("--bench-model", default="bundled:smollm2-135m-instruct")
    group.addoption("--bench-quant", default="nf4")
    group.addoption("--bench-seq", type=int, default=128)
    group.addoption("--bench-batch", type=int, default=2)
    group.addoption("--bench-steps", type=int, default=4, help="optimizer steps, the first left out as warm-up")
    group.addoption("--bench-eval-limit", type=int, default=10, help="items per general-small task")


@pytest.fixture(scope="session")
def train_spec(request: pytest.FixtureRequest) -> dict[str, Any]:
    opt = request.config.getoption
    return {"kind": "train", "model": opt("--bench-model"), "quant": opt("--bench-quant"), "adapter": "lora",
            "seq": opt("--bench-seq"), "batch": opt("--bench-batch"), "steps": opt("--bench-steps"), "warmup": 1,
            "r": 16, "alpha": 32, "dropout": 0.05}


@pytest.fixture(scope="session")
def eval_spec(request: pytest.FixtureRequest) -> dict[str, Any]:
    opt = request.config.getoption
    return {"kind": "eval", "model": opt("--bench-model"), "quant": opt("--bench-quant"), "tasks": ["general-small"],
            "limit": opt("--bench-eval-limit"), "batch": 8, "generation_items": 4}


@pytest.fixture(scope="session")
def measured() -> dict[str, dict[str, Any]]:
    """Results by runner, shared across the session so later benchmarks can report ratios."""
    return {}
