"""Several processes on the CPU (torchrun + gloo): training runs on both, evaluation splits and gathers.

``accelerate launch --cpu --num_processes 2`` starts a single process on CPU (see README), so
these tests launch with torchrun and assert the process count.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_train import make_run


def torchrun(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "\n".join((done.stderr or done.stdout).strip().splitlines()[-30:])


def test_two_process_training_and_eval_equal_single_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 4, "scheduler": "linear", "warmup_ratio": 0.25},
                    eval={"task": True, "suites": ["piqa"], "limit": 7})
    torchrun("-m", "tuneguard.run", str(path), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "recipe"
    assert json.loads((run_dir / "run.json").read_text())["num_processes"] == 2
    lrs = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == pytest.approx([5e-3 * f for f in (1 / 2, 1, 2 / 3, 1 / 3)])  # each step's own rate, one schedule
    two = json.loads((run_dir / "eval.json").read_text())
    shutil.copy(run_dir / "eval.json", tmp_path / "eval-2proc.json")
    subprocess.run([sys.executable, "-m", "tuneguard.cli", "eval", str(run_dir)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    one = json.loads((run_dir / "eval.json").read_text())
    for side in ("base", "tuned"):
        assert [(r["task"], r["n"], r["per_item"]) for r in one[side]] == [(r["task"], r["n"], r["per_item"]) for r in two[side]]
