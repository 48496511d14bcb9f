"""Reading a run directory's contract files, with errors that name the file that is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tuneguard.errors import TuneguardError

_NO_RANK = {"ia3", "prompt_tuning"}
"""Adapter methods for which ``adapter.r`` means nothing, so reports leave it blank."""


def _require(path: Path) -> None:
    if not path.is_file():
        raise TuneguardError(f"{path}: file not found (is {path.parent} a finished run directory?)")


def read_json(path: Path) -> dict[str, Any]:
    _require(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TuneguardError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise TuneguardError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_recipe(run_dir: Path) -> dict[str, Any]:
    """The resolved recipe as plain data (not re-validated: an old run must stay readable)."""
    path = run_dir / "recipe.yaml"
    _require(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TuneguardError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TuneguardError(f"{path}: expected a mapping of recipe sections")
    return data


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What identifies a run and what it cost, from recipe.yaml and run.json."""
    recipe, run = read_recipe(run_dir), read_json(run_dir / "run.json")
    adapter = recipe.get("adapter") or {}
    method = adapter.get("method") or run.get("adapter_method")
    return {
        "name": run.get("recipe") or (recipe.get("output") or {}).get("name") or run_dir.name,
        "run_dir": str(run_dir),
        "model": (recipe.get("model") or {}).get("source"),
        "fingerprint": run.get("fingerprint"),
        "quantization": run.get("quantization") or (recipe.get("quantization") or {}).get("method"),
        "adapter": method,
        "r": None if method in _NO_RANK else adapter.get("r"),
        "max_regression": (recipe.get("eval") or {}).get("max_regression"),
        **{k: run.get(k) for k in (
            "seed", "steps", "tokens_trained", "wall_time_s", "tokens_per_s", "peak_memory_mb",
            "trainable_params", "total_params",
        )},
    }
