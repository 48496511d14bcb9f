"""kill -9 at seeded random steps of a tiny run, again and again: every trial, resumed until it
finishes, ends with the same adapter as a run that was never interrupted."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .test_train import make_run

TRIALS = 3
KILLS_PER_TRIAL = 2
TRAIN = {"max_steps": 16, "save_every": 3, "log_every": 1}


def command(recipe: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tuneguard.run", str(recipe), "--no-eval", *flags]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(ln)["step"] for ln in lines if ln.endswith("}")), default=0)


def run_killed_at(cmd: list[str], run_dir: Path, step: int, delay: float) -> bool:
    """Start ``cmd``, SIGKILL it ``delay`` seconds after it logged ``step``; whether it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_step(run_dir) < step:
        if proc.poll() is not None:
            return proc.returncode == 0
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    time.sleep(delay)  # anywhere in the next step: forward, backward, a checkpoint or the final save
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == 0


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_kill_9_at_random_steps_always_resumes_to_the_same_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    reference = make_run(tmp_path / "reference", tiny_llama_dir, train=TRAIN)
    subprocess.run(command(reference), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = adapter(tmp_path / "reference/runs/recipe")

    rng = random.Random(0)
    kills = 0
    for trial in range(TRIALS):
        recipe = make_run(tmp_path / f"trial-{trial}", tiny_llama_dir, train=TRAIN)
        run_dir = tmp_path / f"trial-{trial}/runs/recipe"
        for kill in range(KILLS_PER_TRIAL):  # the first start, then resumes, each killed at a later step
            if last_step(run_dir) >= TRAIN["max_steps"] - 1:
                break
            step = rng.randint(last_step(run_dir) + 1, TRAIN["max_steps"] - 1)
            cmd = command(recipe, *(["--resume"] if kill else []))
            if run_killed_at(cmd, run_dir, step, rng.uniform(0, 0.05)):
                break
            kills += 1
        subprocess.run(command(recipe, "--resume"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = adapter(run_dir)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=f"trial {trial}: {name}")
    assert kills >= TRIALS


def test_sigterm_releases_the_lock_and_the_run_resumes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """What a scheduler sends before it kills: the lock file goes (a requeue on another host would be refused by a
    left one, which names this host), temporary folders too, and ``--resume`` continues to the same adapter."""
    reference = make_run(tmp_path / "reference", tiny_llama_dir, train=TRAIN)
    subprocess.run(command(reference), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recipe = make_run(tmp_path / "stopped", tiny_llama_dir, train=TRAIN)
    run_dir = tmp_path / "stopped/runs/recipe"
    proc = subprocess.Popen(command(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while last_step(run_dir) < 7 and proc.poll() is None:
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().endswith("tuneguard: terminated (SIGTERM)"), err
    assert not (run_dir / ".tuneguard.lock").exists() and not list(run_dir.rglob(".*.tmp"))
    subprocess.run(command(recipe, "--resume"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got, expected = adapter(run_dir), adapter(tmp_path / "reference/runs/recipe")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
