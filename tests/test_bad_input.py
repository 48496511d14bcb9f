"""Nothing lost, nothing silent: each bad input is one line, exit 2, and nothing written or lost.

The table runs ``tuneguard train`` in-process on a tiny model; each case prepares the run directory,
names the line it must print, and checks what must (not) have changed on disk.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.report.history import list_history, record_run
from tuneguard.rundir import LOCK
from tuneguard.train.divergence import STUCK_STEPS, DivergenceWatch, non_finite

from .test_train import make_run


def tuneguard(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of one in-process command (stdout is left in ``capsys``)."""
    try:
        code = cli_main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    print(out, end="")
    return code, [ln for ln in err.splitlines() if ln.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, pid: int, host: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00"}))


def finished_run(tmp_path: Path, model_dir: Path, **sections) -> tuple[Path, Path]:
    """A recipe and its run directory after a short training run (a note of the user's inside it)."""
    sections.setdefault("train", {}).setdefault("max_steps", 2)
    path = make_run(tmp_path, model_dir, **sections)
    run_dir = tmp_path / "runs" / "recipe"
    assert cli_main(["train", str(path), "--no-eval"]) == 0
    (run_dir / "adapter" / "NOTES.txt").write_text("mine")
    return path, run_dir


# Each case: set-up (tmp_path, recipe path, run dir) -> extra command-line words; the expected line;
# and whether the run directory must be unchanged afterwards.
Setup = Callable[[Path, Path, Path], list[str]]


def _existing(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "NOTES.txt").write_text("mine")
    (run_dir / "run.json").write_text("{}")
    return []


_LIVE_LOCKS: list[int] = []
"""fds holding test locks (an flock held through another open file conflicts, even in this process)."""


def _live_lock(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    write_lock(run_dir, os.getppid(), socket.gethostname())
    fd = os.open(run_dir / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _LIVE_LOCKS.append(fd)
    return []


def _foreign_lock(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    write_lock(run_dir, 1, "another-host")
    return []


def _killed(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2" / "train_state.json").write_text("{}")
    (run_dir / "recipe.yaml").write_text(path.read_text())
    return []


def _finished_with_checkpoint(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    """Finished, with the checkpoint of an earlier step kept: --resume would train again from it."""
    _killed(tmp, path, run_dir)
    _existing(tmp, path, run_dir)
    (run_dir / "run.json").write_text('{"steps": 3}')  # finished after the kept checkpoint (step 2)
    return ["--resume"]


def _no_checkpoint(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    _existing(tmp, path, run_dir)  # a finished run that kept no checkpoint
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return ["--resume"]


def _data_dir(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    (tmp / "folder").mkdir()
    return ["data.train=folder"]


def _overlap(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    return ["data.allow_overlap=false"]


def _headerless(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    return ["data.header=false"]


def _output_under_file(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"output.dir={tmp}/afile/{{name}}"]


def _random_gguf(tmp: Path, path: Path, run_dir: Path) -> list[str]:
    (tmp / "model.gguf").write_bytes(os.urandom(4096))
    return [f"model.source={tmp}/model.gguf"]


def _truncated_weights(tmp: Path, path: Path, run_dir: Path, model_dir: Path) -> list[str]:
    broken = tmp / "broken-model"
    broken.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return [f"model.source={broken}"]


def _unknown_model_type(tmp: Path, path: Path, run_dir: Path, model_dir: Path) -> list[str]:
    odd = tmp / "odd-model"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "auto_map": {"AutoConfig": "x.Y"}}))
    return [f"model.source={odd}"]


CASES: dict[str, tuple[Setup, str, bool]] = {
    "output.name escapes the output root": (lambda t, p, r: ["output.name=../../x"],
                                            "'output.name': '../../x' is not a plain folder name", True),
    "new run into a directory holding one": (_existing, "already holds a finished run; evaluate it with tuneguard eval, "
                                             "train it longer with --resume-changed train.max_steps", True),
    "new run into a killed one": (_killed, "already holds a run; pass --resume to continue it", True),
    "--resume where no run is": (lambda t, p, r: ["--resume"], "nothing to resume (no run there: is output.name right?)",
                                 True),
    "--resume of a finished run": (_finished_with_checkpoint, "training already finished, nothing to resume; evaluate "
                                   "it with tuneguard eval", True),
    "a live run holds the lock": (_live_lock, f"another run is writing into it (pid {os.getppid()} on", True),
    "a run on another host holds the lock": (_foreign_lock, "another run holds it (pid 1 on host another-host", True),
    "--resume without a checkpoint": (_no_checkpoint, "no checkpoint to resume from (it holds adapter, metrics.jsonl, run.json)", True),
    "--resume and --overwrite": (lambda t, p, r: ["--resume", "--overwrite"], "give --resume or --overwrite", True),
    "data.train is a directory": (_data_dir, "is a directory; name a JSONL, CSV, TSV or Parquet file", True),
    "train/validation overlap": (_overlap, "validation rows also occur in the training rows", True),
    "header: false without columns": (_headerless, "data.header: false needs data.columns", True),
    "output dir cannot be created": (_output_under_file, "cannot write the run directory (Not a directory)", True),
    "diverging learning rate": (lambda t, p, r: ["train.lr=1e30", "train.save_every=1"],
                                "step 2: the training loss is nan (lr 1e+30); stopped before the update, adapter/ "
                                "not written, the last checkpoint is", False),
    "random-bytes GGUF": (_random_gguf, "damaged weight file (it does not start with the GGUF magic bytes", True),
    "data.max_length past the positions": (lambda t, p, r: ["data.max_length=1024"],
                                           "data.max_length=1024 is past the backbone's 512 positions", True),
}
MODEL_CASES: dict[str, tuple[Callable[..., list[str]], str]] = {
    "truncated model.safetensors": (_truncated_weights, "damaged weight file ("),
    "config with an unknown model type": (_unknown_model_type, "has a config transformers cannot use"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_training_input_is_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys, case: str) -> None:
    setup, expected, unchanged = CASES[case]
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 3})
    run_dir = tmp_path / "runs" / "recipe"
    extra = setup(tmp_path, path, run_dir)
    before = snapshot(tmp_path)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", *extra)
    assert code == 2, lines
    assert lines and lines[-1].startswith("tuneguard: error: ") and expected in lines[-1], lines
    if unchanged:
        assert snapshot(tmp_path) == before
    assert not (run_dir / "adapter").exists() or "NOTES.txt" in snapshot(run_dir / "adapter")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_bad_model_files_are_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys, case: str) -> None:
    setup, expected = MODEL_CASES[case]
    path = make_run(tmp_path, tiny_llama_dir)
    extra = setup(tmp_path, path, tmp_path / "runs" / "recipe", tiny_llama_dir)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", *extra)
    assert code == 2 and expected in lines[-1], lines
    assert not (tmp_path / "runs").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "-1"], ["--limit", "x"]])
def test_limit_must_be_positive(tmp_path: Path, capsys, args: list[str]) -> None:
    code, lines = tuneguard(capsys, "eval", str(tmp_path), *args)
    assert code == 2 and "--limit" in lines[-1] and ("at least 1" in lines[-1] or "whole number" in lines[-1])


def test_unknown_words_are_refused(tmp_path: Path, capsys) -> None:
    code, lines = tuneguard(capsys, "train", "r.yaml", "--frobnicate")
    assert code == 2 and "unrecognized arguments: --frobnicate" in lines[-1]
    code, lines = tuneguard(capsys, "history", "train.lr=1")
    assert code == 2 and "unrecognized arguments: train.lr=1" in lines[-1]


def test_unfinished_run_is_not_evaluated(tmp_path: Path, capsys) -> None:
    (tmp_path / "recipe.yaml").write_text("data: {train: x.jsonl}\n")
    code, lines = tuneguard(capsys, "eval", str(tmp_path))
    assert code == 2 and "training did not finish (no run.json)" in lines[-1]


# ------------------------------------------------------------------------------ what is kept


def test_overrides_anywhere_and_overwrite_moves_aside(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path, run_dir = finished_run(tmp_path, tiny_llama_dir)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "train.max_steps=3", "--overwrite")
    assert code == 0, lines
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 3
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("recipe.replaced-")]
    assert len(aside) == 1 and (aside[0] / "adapter" / "NOTES.txt").read_text() == "mine"
    assert json.loads((aside[0] / "run.json").read_text())["steps"] == 2
    assert not (run_dir / LOCK).exists()


def test_stale_lock_is_taken_over(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    run_dir = tmp_path / "runs" / "recipe"
    write_lock(run_dir, dead_pid(), socket.gethostname())
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval")
    assert code == 0, lines
    assert (run_dir / "run.json").exists() and not (run_dir / LOCK).exists()


def test_resume_refuses_a_changed_recipe_unless_named(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 4, "save_every": 2})
    run_dir = tmp_path / "runs" / "recipe"
    assert cli_main(["train", str(path), "--no-eval"]) == 0
    before = snapshot(run_dir)
    code, lines = tuneguard(capsys, "train", str(path), "--resume", "--no-eval", "train.lr=1e-3")
    assert code == 2 and "the recipe changed since this checkpoint (train.lr)" in lines[-1], lines
    assert "--resume-changed train.lr" in lines[-1] and snapshot(run_dir) == before
    (run_dir / "eval.json").write_text("{}")  # an evaluation of the adapter the resumed run will replace
    (run_dir / "report.json").write_text("{}")
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "train.lr=1e-3", "--resume-changed", "train.lr")
    assert code == 0, lines
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 4
    assert not (run_dir / "eval.json").exists() and not (run_dir / "report.json").exists()  # gate cannot pass on them
    (aside,) = run_dir.parent.glob("recipe.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["eval.json", "report.json"]


def test_only_a_change_that_makes_another_backbone_accepts_another_fingerprint(tmp_path: Path) -> None:
    """Naming model.dtype (not in the fingerprint) must not let other files under model.source through; a changed
    quantization.method makes another fingerprint, which it then accepts."""
    from tuneguard.train.checkpoints import TrainState, check_same_run

    state = TrainState(step=2, processes=1, inputs={"model.source": "aaaa"})
    for named, changed in ((["model.dtype"], ["model.dtype"]), (["quantization.method"], []), ([], [])):
        with pytest.raises(TuneguardError, match="the contents of model.source changed since this checkpoint"):
            check_same_run(tmp_path, state, 1, {"model.source": "bbbb"}, named, changed, 4)
    check_same_run(tmp_path, state, 1, {"model.source": "bbbb"}, ["quantization.method"], ["quantization.method"], 4)
    check_same_run(tmp_path, state, 1, {"model.source": "bbbb"}, ["model.source"], [], 4)  # named by the user


def test_an_adapter_that_cannot_be_applied_writes_nothing(tmp_path: Path, tiny_llama_dir: Path,
                                                          tiny_bert_dir: Path, capsys) -> None:
    """Refused while the adapter is built (targets, a method the backbone cannot take): no run directory, so the
    corrected command needs no --overwrite."""
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    run_dir = tmp_path / "runs" / "recipe"
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "adapter.target_modules=[qury]")
    assert code == 2 and "no linear layer named ['qury']" in lines[-1] and not run_dir.exists(), lines
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", r"adapter.target_modules=[.*\.q_proj$]")
    assert code == 2 and "not a regular expression" in lines[-1] and not run_dir.exists(), lines
    bert = make_run(tmp_path / "bert", tiny_bert_dir, train={"max_steps": 1})
    code, lines = tuneguard(capsys, "train", str(bert), "--no-eval", "adapter.method=prompt_tuning")
    assert code == 2 and "adapter.method 'prompt_tuning' adapts a language model" in lines[-1], lines
    assert not (tmp_path / "bert" / "runs").exists()
    assert tuneguard(capsys, "train", str(path), "--no-eval", "adapter.target_modules=[q_proj]")[0] == 0


def test_resume_refuses_what_the_recipe_does_not_show(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    """Same recipe, other run: other data under the same file name, another process count, a checkpoint past a
    shortened run; and --resume-changed that changes nothing does not retrain a finished run."""
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 6, "save_every": 2})
    run_dir = tmp_path / "runs" / "recipe"
    assert cli_main(["train", str(path), "--no-eval"]) == 0
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume-changed", "train.max_steps")
    assert code == 2 and "training already finished, nothing to resume" in lines[-1], lines
    shutil.rmtree(run_dir / "adapter")  # killed after its step-4 checkpoint
    (run_dir / "run.json").unlink()
    before = snapshot(run_dir)
    data = tmp_path / "train.jsonl"
    rows = data.read_text()
    data.write_text(rows.replace("the movie was", "this film was"))
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume")
    assert code == 2 and "step-4: the contents of data.train changed since this checkpoint" in lines[-1], lines
    assert "--resume-changed data.train" in lines[-1] and snapshot(run_dir) == before
    data.write_text(rows)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume-changed", "train.max_steps",
                            "train.max_steps=3")
    assert code == 2 and "step-4: step 4 is past the run's 3 steps" in lines[-1], lines
    state = run_dir / "checkpoints" / "step-4" / "train_state.json"
    saved = json.loads(state.read_text())
    assert saved["processes"] == 1 and set(saved["inputs"]) == {"model.source", "data.train"}
    state.write_text(json.dumps({**saved, "processes": 2}))
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume")
    assert code == 2 and "saved by 2 processes, resumed with 1" in lines[-1], lines
    state.write_text(json.dumps(saved))
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume")
    assert code == 0 and json.loads((run_dir / "run.json").read_text())["steps"] == 6, lines


def test_non_finite_step_keeps_the_previous_adapter_and_checkpoint(tmp_path: Path, tiny_llama_dir: Path,
                                                                   capsys) -> None:
    path, run_dir = finished_run(tmp_path, tiny_llama_dir, train={"save_every": 1})
    adapter = snapshot(run_dir / "adapter")
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "--resume-changed", "train.lr,train.max_steps",
                            "train.lr=1e30", "train.max_steps=6")
    assert code == 2 and "the training loss is nan" in lines[-1] and "checkpoints/step-" in lines[-1], lines
    assert snapshot(run_dir / "adapter") == adapter


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tmp_path: Path, tiny_llama_dir: Path, monkeypatch,
                                                          capsys) -> None:
    import tuneguard.train.checkpoints as train_module

    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 4, "save_every": 1})
    run_dir = tmp_path / "runs" / "recipe"
    write = train_module.atomic_write_json

    def full_disk(target, data) -> None:
        if Path(target).name == "train_state.json" and data["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        write(target, data)

    monkeypatch.setattr(train_module, "atomic_write_json", full_disk)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval")
    assert code == 2 and lines[-1].endswith("train_state.json: No space left on device"), lines
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-1"] and not (run_dir / "adapter").exists()
    monkeypatch.setattr(train_module, "atomic_write_json", write)
    assert tuneguard(capsys, "train", str(path), "--no-eval", "--resume")[0] == 0
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 4


def test_torch_serializer_out_of_space_is_one_line(tmp_path: Path, tiny_llama_dir: Path, monkeypatch,
                                                  capsys) -> None:
    """torch.save reports a full disk as a RuntimeError, not an OSError: one line naming the checkpoint, not an
    internal error; the checkpoint before it is kept."""
    from accelerate import Accelerator

    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 4, "save_every": 1})
    run_dir = tmp_path / "runs" / "recipe"
    save = Accelerator.save_state

    def full_disk(self, output_dir, **kwargs):
        if (run_dir / "checkpoints" / "step-1").exists():
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48576 vs 48464")
        return save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval")
    assert code == 2 and "checkpoints/step-2: could not be written (RuntimeError: [enforce fail" in lines[-1], lines
    assert "MB free on its disk; the checkpoints before it are kept" in lines[-1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-1"]


def test_divergence_watch() -> None:
    uniform = 6.0
    watch = DivergenceWatch(uniform)
    assert all(watch.update(6.0, 1.0) is None for _ in range(10))  # never learned: a random model, not divergence
    watch = DivergenceWatch(uniform)
    assert watch.update(3.0, 1.0) is None
    reasons = [watch.update(6.01, 1.0) for _ in range(STUCK_STEPS)]
    assert reasons[:-1] == [None] * (STUCK_STEPS - 1) and "uniform guess" in reasons[-1]
    watch = DivergenceWatch(uniform)  # learned, then past a uniform guess (a too-high rate), not pinned at it
    assert [watch.update(loss, 1.0) for loss in (2.4, 60.0, 40.0, 20.0, 13.8)][:-1] == [None] * 4
    assert "at or above the value of a uniform guess" in watch.update(13.8, 1.0)
    chance = DivergenceWatch(math.log(2))  # a binary classifier near chance: noisy steps above ln 2 are not stuck
    assert all(chance.update(loss, 1.0) is None for loss in [0.6, 0.75, 0.8, 0.72, 0.71, 0.9, 0.7] * 3)
    watch = DivergenceWatch(uniform)
    assert all(watch.update(2.0, 1.0 + i / 10) is None for i in range(6))
    saved = json.loads(json.dumps(watch.to_state()))  # a checkpoint keeps the history: a resumed run still sees it
    assert "gradient norm jumped" in DivergenceWatch.from_state(uniform, saved).update(2.0, 5e3)
    assert DivergenceWatch.from_state(uniform, DivergenceWatch(uniform).to_state()) == DivergenceWatch(uniform)
    assert "gradient norm jumped" in watch.update(2.0, 5e3)
    assert non_finite(float("nan"), 1.0) == "the training loss is nan"
    assert non_finite(1.0, float("inf")) == "the gradient norm is inf" and non_finite(1.0, None) is None


def test_divergence_stops_training_and_is_recorded(tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys) -> None:
    import tuneguard.train.loop as train_module

    def diverges_at_step_3(self, loss: float, grad_norm: float | None) -> str | None:
        self.norms.append(grad_norm)
        return "the loss has been 5.991 for 5 steps" if len(self.norms) == 3 else None

    monkeypatch.setattr(train_module.DivergenceWatch, "update", diverges_at_step_3)
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 8})
    code, lines = tuneguard(capsys, "train", str(path))
    assert code == 2 and "training diverged at step 3: the loss has been 5.991" in lines[-1], lines
    record = json.loads((tmp_path / "runs/recipe/run.json").read_text())
    assert record["steps"] == 3 and record["diverged"] == "the loss has been 5.991 for 5 steps"
    assert not (tmp_path / "runs/recipe/eval.json").exists()  # evaluation never ran


def test_diverged_adapter_is_refused_by_the_guards(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path, run_dir = finished_run(tmp_path, tiny_llama_dir)
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "diverged": "the loss has been 5.991 for 5 steps"}))
    code, lines = tuneguard(capsys, "eval", str(run_dir), "--tasks", "piqa", "--limit", "2")
    assert code == 2 and "guard rail failed" in lines[-1] and "training converged" in lines[-1], lines
    assert not (run_dir / "eval.json").exists()


# ------------------------------------------------------------------------------- adapters, exports


def _corrupt_adapter(run_dir: Path, how: str) -> None:
    path = run_dir / "adapter" / "adapter_model.safetensors"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "random":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        tensors = load_file(str(path))
        name = next(iter(tensors))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(path))


@pytest.mark.parametrize("how", ["truncated", "random", "nan"])
def test_corrupt_adapter_is_refused_by_export_and_eval(tmp_path: Path, tiny_llama_dir: Path, capsys, how: str) -> None:
    _, run_dir = finished_run(tmp_path, tiny_llama_dir)
    _corrupt_adapter(run_dir, how)
    for verb in (["export", str(run_dir)], ["eval", str(run_dir), "--tasks", "piqa", "--limit", "2"]):
        code, lines = tuneguard(capsys, *verb)
        assert code == 2 and "adapter_model.safetensors: damaged weight file" in lines[-1], (verb, lines)
    assert not (run_dir / "merged").exists() and not (run_dir / "eval.json").exists()


def test_the_model_card_says_how_instruction_rows_were_prompted() -> None:
    """Prompt/response rows train on the prompt field as written (no template), and no chat template is used where
    the tokenizer has none, whatever data.use_chat_template says."""
    from tuneguard.export import model_card
    from tuneguard.recipe import validate

    recipe = validate({"data": {"kind": "instruction", "train": "x.jsonl"}}, "r.yaml")
    card = model_card(recipe, chat_template=False)
    assert "- chat template: not used (plain text)" in card and "`prompt` field as written" in card
    assert "{text}" not in card
    templated = validate({"data": {"kind": "instruction", "train": "x.jsonl", "prompt_template": "Q: {q}"}}, "r.yaml")
    assert "Q: {q}" in model_card(templated, chat_template=True) and "used (the tokenizer" in model_card(templated, True)
    assert "note:" not in card  # an unquantized backbone: the export is what was scored
    quantized = validate({"data": {"kind": "instruction", "train": "x.jsonl"}, "quantization": {"method": "nf4"}}, "r.yaml")
    assert ("- note: the adapter was trained and evaluated on the nf4 backbone; it is merged here into the unquantized "
            "one (these weights)") in model_card(quantized, chat_template=False)


def test_export_carries_labels_and_prompt_and_is_verified(tmp_path: Path, tiny_llama_dir: Path,
                                                          tiny_bert_dir: Path, capsys) -> None:
    from transformers import AutoConfig

    _, run_dir = finished_run(tmp_path / "enc", tiny_bert_dir, quantization={"method": "nf4"})
    capsys.readouterr()
    assert cli_main(["export", str(run_dir)]) == 0
    note = capsys.readouterr().err.strip().splitlines()[-1]
    assert note.startswith("note: the adapter was trained and evaluated on the nf4 backbone"), note
    assert note.endswith("score it on your validation rows before relying on the report")
    config = AutoConfig.from_pretrained(run_dir / "merged")
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    card = (run_dir / "merged" / "README.md").read_text()  # an encoder's export says what it takes, too
    assert "a sequence classifier" in card and "Review: {text}" in card and "`negative`, `positive`" in card
    assert "chat template" not in card and "nf4 backbone" in card

    _, run_dir = finished_run(tmp_path / "dec", tiny_llama_dir)
    assert tuneguard(capsys, "export", str(run_dir))[0] == 0
    assert "Review: {text}" in (run_dir / "merged" / "README.md").read_text()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    code, lines = tuneguard(capsys, "export", str(run_dir), "--out", str(user))
    assert code == 2 and "is not a tuneguard export" in lines[-1] and (user / "keep.txt").exists()


def test_export_check_catches_a_wrong_merge(tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys) -> None:
    from peft.tuners.lora import LoraModel

    _, run_dir = finished_run(tmp_path, tiny_llama_dir)
    merge = LoraModel.merge_and_unload

    def bad_merge(self, *args, **kwargs):
        model = merge(self, *args, **kwargs)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(3)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", bad_merge)
    code, lines = tuneguard(capsys, "export", str(run_dir))
    assert code == 2 and "export check failed, nothing saved" in lines[-1], lines
    assert not (run_dir / "merged").exists()


# ------------------------------------------------------------------------------- data, history


def test_headerless_tsv_with_columns(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    (tmp_path / "train.tsv").write_text("".join(f"the movie was {w}\t{i % 2}\n" for i, w in enumerate(["a", "b"] * 8)))
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "data.train=train.tsv", "data.header=false",
                            "data.columns=[text,label]")
    assert code == 0, lines
    stats = json.loads((tmp_path / "runs/recipe/run.json").read_text())["data"]
    assert stats["train_rows"] + stats["val_rows"] == 16


def test_bad_rows_are_counted_and_named(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    with (tmp_path / "train.jsonl").open("a") as fh:
        fh.write("{broken\n")
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval", "data.max_bad_fraction=0.1")
    assert code == 0, lines
    stats = json.loads((tmp_path / "runs/recipe/run.json").read_text())["data"]
    assert stats["bad_train_rows"] + stats["bad_val_rows"] == 1
    assert "train.jsonl:49: invalid JSON" in stats["bad_rows_named"][0]
    assert any("1 bad rows skipped" in line for line in lines)  # a note: standard error


def test_default_prompt_follows_text_field(tmp_path: Path) -> None:
    from tuneguard.recipe import DataConfig

    assert DataConfig(train="x", text_field="question").template == "{question}"
    assert DataConfig(train="x", text_field="question", prompt_template="Q: {question}").template == "Q: {question}"


def test_damaged_history_is_moved_aside_and_never_fails(tmp_path: Path, capsys) -> None:
    db = tmp_path / "history.sqlite"
    db.write_bytes(os.urandom(2048))
    report = {"created": "2026-01-01T00:00:00", "summary": {"name": "r"}, "task": [], "general": []}
    record_run(tmp_path, report, db=db)
    err = capsys.readouterr().err
    assert "is not a readable history database" in err and "moved it to" in err
    assert list(tmp_path.glob("history.sqlite.damaged-*"))
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert list_history(db=db) == []
    (tmp_path / "ro").write_text("a file, so the database cannot be created under it")
    record_run(tmp_path, report, db=tmp_path / "ro" / "history.sqlite")  # a warning, not an exception
    assert "was not added to the history" in capsys.readouterr().err


def test_recipe_yaml_is_a_plain_name(tmp_path: Path) -> None:
    from tuneguard.errors import TuneguardError
    from tuneguard.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"kind": "text", "train": "t.jsonl"}, "output": {"name": "a/b"}}))
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(TuneguardError, match="'output.name': 'a/b' is not a plain folder name"):
        load_recipe(path)


def test_damaged_weight_files_are_named(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    from tuneguard.errors import TuneguardError
    from tuneguard.weights import check_gguf, check_safetensors

    path = tmp_path / "w.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", torch.ones(16, 16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert check_gguf(path) == 1  # its tensor count: the dequantization's progress line counts in it
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(TuneguardError, match="w.gguf: damaged weight file .ValueError"):
        check_gguf(path)
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, str(weights))
    check_safetensors(weights, finite=True)
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(TuneguardError, match=r"w.safetensors: damaged weight file \(\d+ bytes, but its header describes"):
        check_safetensors(weights)
    weights.write_bytes(b"\x01")
    with pytest.raises(TuneguardError, match="shorter than a safetensors header"):
        check_safetensors(weights)


def test_two_runs_started_together_one_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 6})
    cmd = [sys.executable, "-m", "tuneguard.run", str(path), "--no-eval"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((proc.wait(timeout=300), proc.stderr.read()) for proc in procs)
    assert [code for code, _ in results] == [0, 2], results
    refusal = results[1][1].strip().splitlines()[-1]
    assert "another run is writing into it" in refusal or "already holds a finished run" in refusal, refusal
    assert "Traceback" not in results[1][1]
    lines = map(json.loads, (tmp_path / "runs/recipe/metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))  # one run's lines, not two interleaved


def test_read_only_places_are_refused_before_the_model_loads(tmp_path: Path, tiny_llama_dir: Path, monkeypatch,
                                                             capsys) -> None:
    import tuneguard.rundir as rundir_module
    import tuneguard.train.loop as train_module

    _, run_dir = finished_run(tmp_path, tiny_llama_dir)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(LOCK):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_backbone", no_model)
    monkeypatch.setattr(rundir_module.os, "open", read_only)
    path = make_run(tmp_path / "other", tiny_llama_dir)
    code, lines = tuneguard(capsys, "train", str(path), "--no-eval")
    assert code == 2 and "cannot write the run directory (Read-only file system)" in lines[-1], lines
    monkeypatch.setattr(rundir_module.os, "open", real_open)
    monkeypatch.setattr(rundir_module.os, "access", lambda *a: False)
    code, lines = tuneguard(capsys, "eval", str(run_dir))
    assert code == 2 and lines[-1].endswith("not writable; results could not be saved"), lines
