"""The measuring harness: one fresh process per configuration, and records that can be compared.

Peak memory is a property of a whole process (what was imported, loaded and freed before), so each
configuration runs in its own interpreter (``python -m tuneguard.bench.reference SPEC OUT``) and
reports its own high-water mark: ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` on CUDA. Throughput counts exact tokens (no padding exists in the bench
data) over the optimizer steps after a warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tuneguard
from tuneguard.errors import TuneguardError
from tuneguard.numerics import cpu_model, numerics_record
from tuneguard.provenance import git_commit, versions
from tuneguard.rundir import RunDir

SCHEMA = 1
HIGHER_IS_BETTER = {"tokens_per_s": True, "items_per_s": True, "peak_memory_mb": False, "load_seconds": False}


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a number depends on besides the code: versions, hardware, threads, commit, machine load."""
    env: dict[str, Any] = {
        "versions": versions(),
        "device": device,
        "cpu": cpu_model(),
        "numerics": numerics_record(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(),
        "git_commit": git_commit(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(step_tokens: Sequence[int], step_seconds: Sequence[float], warmup: int) -> dict[str, float]:
    """Tokens per second over the steps after ``warmup`` (total tokens / total time), and the median step."""
    tokens, seconds = step_tokens[warmup:], step_seconds[warmup:]
    if not seconds:
        raise TuneguardError(f"no steps left after {warmup} warm-up steps; ask for more steps")
    return {
        "tokens_per_s": round(sum(tokens) / sum(seconds), 2),
        "median_step_s": round(statistics.median(seconds), 4),
        "measured_steps": len(seconds),
        "measured_tokens": int(sum(tokens)),
    }


@contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[key] = round(time.perf_counter() - start, 3)


def dir_size_mb(path: Path, pattern: str = "*.safetensors") -> float:
    return round(sum(p.stat().st_size for p in Path(path).glob(pattern)) / 2**20, 3)


# ---------------------------------------------------------------------------------------- runner


def runner_environment(runner: str) -> dict[str, str]:
    """The environment a runner's process starts with: tuneguard's own OpenMP waiting for tuneguard, the libraries'
    defaults for a reference (a user of plain Trainer, TRL or lm-eval sets none); variables the user set pass to all."""
    if runner == "tuneguard":
        return dict(os.environ)
    return {**{k: v for k, v in os.environ.items() if k not in tuneguard.OPENMP_SET}, "TUNEGUARD_OPENMP": "library"}


def run_isolated(spec: dict[str, Any], *, timeout: float = 1800) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its record (with ``error`` on failure)."""
    with tempfile.TemporaryDirectory(prefix="tuneguard-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec = {**spec, "workdir": spec.get("workdir") or str(Path(tmp) / "work")}
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tuneguard.bench.reference", str(spec_path), str(out_path)],
                capture_output=True, text=True, timeout=timeout, env=runner_environment(spec["runner"]),
            )
        except subprocess.TimeoutExpired:
            return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            return {"spec": spec, "error": f"exit {proc.returncode}: {tail}"}
        result = json.loads(out_path.read_text())
        result["process_seconds"] = round(time.perf_counter() - started, 2)
        return result


# -------------------------------------------------------------------------------------- compare


@dataclass
class Change:
    """One metric of one configuration against a saved earlier run."""

    config: str
    metric: str
    before: float
    after: float
    regressed: bool

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("nan")


def config_key(result: dict[str, Any]) -> str:
    """What identifies a configuration across runs (the spec without paths)."""
    spec = result.get("spec", {})
    keep = ("kind", "runner", "model", "quant", "adapter", "batch", "seq", "steps", "tasks", "limit", "fastpath")
    return " ".join(f"{k}={spec[k]}" for k in keep if k in spec)


def changes_since(current: list[dict[str, Any]], baseline: list[dict[str, Any]], tolerance: float = 0.1) -> list[Change]:
    """Every shared metric of every shared configuration; a regression is a change worse than ``tolerance``."""
    before = {config_key(r): r for r in baseline if "error" not in r}
    changes = []
    for result in current:
        old = before.get(config_key(result))
        if old is None or "error" in result:
            continue
        for metric, higher in HIGHER_IS_BETTER.items():
            a, b = old.get(metric), result.get(metric)
            if not isinstance(a, int | float) or not isinstance(b, int | float) or not a:
                continue
            worse = b < a * (1 - tolerance) if higher else b > a * (1 + tolerance)
            changes.append(Change(config_key(result), metric, float(a), float(b), worse))
    return changes


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Results saved by ``tuneguard bench ... --json``: a list, or a dict with ``results``."""
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) else data


def measure_recipe(recipe_path: Path, overrides: list[str], steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of the recipe in a fresh process (no evaluation); its run.json's peak and speed."""
    with tempfile.TemporaryDirectory(prefix="tuneguard-estimate-") as tmp:
        cmd = [sys.executable, "-m", "tuneguard.cli", "train", str(recipe_path), *overrides, f"train.max_steps={steps}",
               "train.save_every=null", "train.eval_every=null", f"output.dir={tmp}/{{name}}", "output.name=measure",
               "--no-eval"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        run = RunDir(Path(tmp) / "measure").record()
        if proc.returncode != 0 or not run:
            return {"error": "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])}
    return {k: run.get(k) for k in ("peak_memory_mb", "tokens_per_s", "steps", "trainable_params", "mixed_precision")}
