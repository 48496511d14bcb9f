"""Several processes on the CPU (torchrun + gloo): training runs on both, evaluation splits and gathers.

``accelerate launch --cpu --num_processes 2`` starts a single process on CPU (see README), so
these tests launch with torchrun and assert the process count.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from .test_crash_loop import adapter, last_step
from .test_train import make_run


def torchrun_command(*args: str) -> list[str]:
    with socket.socket() as s:  # a free port each launch: a killed group's port may linger
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]


def torchrun(*args: str, cwd: Path) -> None:
    done = subprocess.run(torchrun_command(*args), cwd=cwd, capture_output=True, text=True, timeout=600)
    said = [ln for ln in done.stderr.splitlines() if "tuneguard: error" in ln]  # the ranks' own line, if any
    assert done.returncode == 0, "\n".join(said or (done.stderr or done.stdout).strip().splitlines()[-30:])


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


def test_two_process_run_killed_resumes_to_the_same_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """kill -9 to both workers and torchrun after a checkpoint: ``--resume`` under torchrun restores each
    process's random state and its share of the batches, and ends with the uninterrupted run's adapter."""
    sections = {"train": {"max_steps": 8, "save_every": 3, "log_every": 1}, "adapter": {"dropout": 0.1}}  # dropout draws from each process's random state
    reference = make_run(tmp_path / "reference", tiny_llama_dir, **sections)
    torchrun("-m", "tuneguard.run", str(reference), "--no-eval", cwd=tmp_path / "reference")
    recipe = make_run(tmp_path / "killed", tiny_llama_dir, **sections)
    run_dir = tmp_path / "killed" / "runs" / "recipe"
    proc = subprocess.Popen(torchrun_command("-m", "tuneguard.run", str(recipe), "--no-eval"), cwd=tmp_path / "killed",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_step(run_dir) < 5 and proc.poll() is None:
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.kill()  # torchrun starts each worker in a session of its own
    proc.wait()
    assert not (run_dir / "adapter").exists() and (run_dir / "checkpoints" / "step-3").is_dir()
    torchrun("-m", "tuneguard.run", str(recipe), "--no-eval", "--resume", cwd=tmp_path / "killed")
    assert json.loads((run_dir / "run.json").read_text())["num_processes"] == 2
    expected, got = adapter(tmp_path / "reference" / "runs" / "recipe"), adapter(run_dir)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
