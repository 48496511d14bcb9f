"""RunDir owns a run directory: its readers tolerate what a killed run leaves, and no other module
spells the directory's file names (so renaming one is a one-line change)."""

from __future__ import annotations

import ast
import fcntl
import json
import os
from pathlib import Path

import pytest

from tuneguard import rundir
from tuneguard.errors import TuneguardError
from tuneguard.rundir import RunDir, recipe_changes

PACKAGE = Path(rundir.__file__).resolve().parent
FILES = {rundir.RECIPE, rundir.RUN, rundir.METRICS, rundir.EVAL, rundir.ADAPTER_META, *rundir.REPORTS}
"""Names no other module may spell anywhere."""
FOLDERS = {rundir.ADAPTER, rundir.CHECKPOINTS, rundir.MERGED}
"""Names too common to forbid ("adapter" is a recipe section): forbidden only as a path step, ``x / "adapter"``."""


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_metrics() == [] and run.last_metric("loss") is None
    whole = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 3, "lo')
    assert run.read_metrics() == whole
    assert run.last_metric("loss") == 1.5


def test_strict_readers_name_the_missing_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_recipe("output: {name: demo}\nadapter: {method: ia3, r: 8}\n")
    with pytest.raises(TuneguardError, match=r"run\.json: file not found"):
        run.summary()
    run.write_record({"steps": 3})
    summary = run.summary()
    assert (summary["name"], summary["adapter"], summary["r"], summary["steps"]) == ("demo", "ia3", None, 3)
    with pytest.raises(TuneguardError, match=r"no report\.json \(trained with --no-eval\?\); evaluate the run first"):
        run.read_report()
    paths = run.write_reports({"schema": 1}, "# md", "<html>")
    assert [p.name for p in paths] == list(rundir.REPORTS) and run.read_report() == {"schema": 1}


def _offenders(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        named = isinstance(node, ast.Constant) and node.value in FILES
        step = (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                and node.right.value in FOLDERS)
        if named or step:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_only_rundir_spells_run_directory_file_names() -> None:
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "rundir.py"
                 for hit in _offenders(path)]
    assert not offenders, f"spelled outside tuneguard/rundir.py (use RunDir): {', '.join(offenders)}"


def test_a_key_an_older_recipe_lacks_counts_as_its_default() -> None:
    """A checkpoint written before a recipe key existed resumes unless the key is set to something else."""
    from tuneguard.recipe import recipe_defaults

    stored = {"train": {"lr": 1e-4, "epochs": 1.0}, "adapter": {"r": 8}}
    same = {"train": {"lr": 1e-4, "epochs": 1.0, "layer_lr_decay": 1.0, "early_stopping_metric": "val_loss"},
            "adapter": {"r": 8}}
    assert recipe_changes(stored, same, recipe_defaults()) == []
    assert recipe_changes(stored, same) == ["train.early_stopping_metric", "train.layer_lr_decay"]
    other = {**same, "train": {**same["train"], "layer_lr_decay": 0.8}}
    assert recipe_changes(stored, other, recipe_defaults()) == ["train.layer_lr_decay"]


def test_what_a_killed_save_left_is_cleared_and_a_half_swapped_adapter_restored(tmp_path: Path) -> None:
    """Killed inside atomic_dir: a temporary folder stays (never read, never pruned), or, between its two renames,
    the previous adapter sits at ``.adapter.old`` with no ``adapter``. Claiming the run directory repairs both."""
    run = RunDir(tmp_path / "run")
    (run.checkpoint(2)).mkdir(parents=True)
    (run.checkpoint(2) / rundir.TRAIN_STATE).write_text("{}")
    (run.checkpoints / ".step-4.abc.tmp").mkdir()
    (run.checkpoints / ".step-4.abc.tmp" / "model.safetensors").write_bytes(b"partial")
    (run.path / ".adapter.old").mkdir()
    (run.path / ".adapter.old" / "adapter_model.safetensors").write_bytes(b"previous")
    (run.path / ".run.json.x1.tmp").write_text("{")
    (run.path / ".data.old").mkdir()  # not tuneguard's: left alone, as is a temporary file of another name
    (run.path / ".notes.txt.x2.tmp").write_text("mine")
    with pytest.raises(TuneguardError, match="already holds a"), run.claim("new"):
        pass
    assert (run.checkpoints / ".step-4.abc.tmp").exists() and (run.path / ".adapter.old").exists()  # refused: untouched
    with run.claim("resume"):
        assert (run.adapter / "adapter_model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-2"]
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == [".data.old", ".notes.txt.x2.tmp"]


def test_a_new_adapter_moves_the_earlier_evaluation_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_eval({"tuned": []})
    run.write_reports({"task": []}, "# r", "<p>r</p>")
    run.retire_evaluation()
    assert not run.eval_json.exists() and not any(p.exists() for p in run.report_paths)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["eval.json", "report.html", "report.json", "report.md"]
    assert "moved the earlier adapter's evaluation of" in capsys.readouterr().err
    run.retire_evaluation()  # nothing to move: nothing happens
    assert len(list(tmp_path.glob("run.replaced-*"))) == 1


def test_atomic_writes_take_the_umask_mode(tmp_path: Path) -> None:
    import os

    import torch
    from safetensors.torch import save_file

    from tuneguard.io import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors itself writes 0600
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_linked_lock_or_run_folder_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    """The lock file and a run's own folders never lead outside it: the holder's line would overwrite the lock's
    target, and a resumed run would write and prune checkpoints in the folder a link points to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / ".tuneguard.lock").symlink_to(victim)
    with pytest.raises(TuneguardError, match="symbolic link"), run.claim("new"):
        pass
    assert victim.read_text() == "keep me"
    (run.path / ".tuneguard.lock").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "step-1").mkdir()
    run.recipe.write_text("model: {}\n")
    (run.path / "checkpoints").symlink_to(outside)
    with pytest.raises(TuneguardError, match="checkpoints: is a symbolic link"), run.claim("resume"):
        pass
    run.run_json.write_text("{}")
    with pytest.raises(TuneguardError, match="checkpoints: is a symbolic link"):
        run.ensure_finished(writable=True)
    assert (outside / "step-1").is_dir()


def test_atomic_dir_replaces_a_link_not_what_it_points_to(tmp_path: Path) -> None:
    from tuneguard.io import atomic_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (tmp_path / "adapter").symlink_to(outside)
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "new").write_text("y")
    assert not (tmp_path / "adapter").is_symlink() and (tmp_path / "adapter" / "new").exists()
    assert (outside / "keep").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "outside"]


def test_a_killed_extension_of_a_finished_run_is_resumable(tmp_path: Path) -> None:
    """run.json stays at the old end while ``--resume-changed train.max_steps`` trains on: a checkpoint past it
    is something to resume; one at or before it, or none, is a finished run."""
    run = RunDir(tmp_path / "run")
    assert not run.finished_after(None)  # no run.json: not finished
    run.path.mkdir()
    run.write_record({"steps": 4})
    assert run.finished_after(None) and run.finished_after(run.checkpoint(4))
    assert not run.finished_after(run.checkpoint(6))


def test_eval_and_check_hold_a_finished_run_and_clear_what_a_killed_one_left(tmp_path: Path) -> None:
    """``tuneguard eval`` and ``check`` write into a finished run: they hold its lock as training does, and a
    killed one's temporary files (its names only) are gone the next time."""
    run = RunDir(tmp_path / "run")
    run.write_recipe("output: {name: demo}\n")
    with pytest.raises(TuneguardError, match="training did not finish"), run.hold_results():
        pass
    run.write_record({"steps": 3})
    left = [run.path / ".report.html.a1.tmp", run.path / ".eval.json.b2.tmp", run.scores / ".k.json.c3.tmp",
            run.checks / ".check-20261205-000000.json.d4.tmp"]
    kept = [run.path / ".run.json.e5.tmp", run.path / ".notes.txt.f6.tmp"]  # training's, and not tuneguard's
    for path in left + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("partial")
    with run.hold_results():
        assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
        fd = os.open(run.lock_file, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not run.lock_file.exists()
    fd = os.open(run.lock_file, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(TuneguardError, match="another run is writing into it"), run.hold_results():
            pass
    finally:
        os.close(fd)


def test_a_diverged_run_is_not_exported_compared_or_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only eval's guard rail refused it: export called the merge checked, compare ranked it beside healthy ones."""
    from tuneguard.cli import main as cli_main

    runs = []
    for name, record in (("ok", {"steps": 4}), ("gone", {"steps": 4, "diverged": "loss back at uniform for 5 steps"})):
        run = RunDir(tmp_path / name)
        run.write_recipe("output: {name: x}\n")
        run.write_record(record)
        runs.append(run)
    runs[0].ensure_converged()
    for argv in (["export", str(runs[1].path)], ["compare", str(runs[1].path), str(runs[0].path)],
                 ["check", str(runs[1].path), "--data", str(tmp_path / "rows.jsonl")]):
        assert cli_main(argv) == 2
        assert "training diverged (loss back at uniform for 5 steps), so its adapter is refused" in \
            capsys.readouterr().err
    assert cli_main(["compare", str(runs[0].path), str(tmp_path / "ok")]) == 2
    assert "named twice; each adapter is compared once" in capsys.readouterr().err


def test_runs_of_one_method_are_told_apart_by_what_changes_it() -> None:
    """rsLoRA (+35 pp) and plain LoRA (+5 pp) both read 'lora r16' in reports and the history."""
    assert [rundir.adapter_label(m, a) for m, a in (("lora", {}), ("lora", {"use_rslora": True}),
                                                     ("lora", {"use_dora": True, "init": "gaussian"}), ("ia3", {}))] == [
        "lora", "lora+rslora", "lora+dora (gaussian init)", "ia3"]
