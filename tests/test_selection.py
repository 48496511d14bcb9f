"""Early stopping on the task metric and the choice of checkpoint under a forgetting bound (train.select)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.eval.harness import evaluate_tasks
from tuneguard.eval.stage import recipe_task
from tuneguard.eval.validation import validation_scorer
from tuneguard.recipe import load_recipe
from tuneguard.report.files import build_report, render_html, render_markdown
from tuneguard.train.loop import train
from tuneguard.train.selection import (
    forgetting_pct,
    metric_improves,
    select_point,
    selection_note,
    selection_record,
)

from .test_train import make_run, run_train

CURVE = [
    {"step": 4, "val_loss": 0.9, "val_f1_macro": 0.50, "forgetting_pct": 0.5},
    {"step": 8, "val_loss": 0.7, "val_f1_macro": 0.70, "forgetting_pct": 1.5},
    {"step": 12, "val_loss": 0.6, "val_f1_macro": 0.80, "forgetting_pct": 3.0},
    {"step": 16, "val_loss": 0.8, "val_f1_macro": 0.70, "forgetting_pct": 1.0},
]
"""The task keeps improving until step 12, but past step 8 the general text is forgotten beyond 2%."""


def test_task_within_forgetting_keeps_the_best_task_inside_the_bound() -> None:
    kept = select_point(CURVE, "task_within_forgetting", "f1_macro", 2.0)
    assert kept is CURVE[1]  # step 16 ties step 8's F1: the earlier one stays
    record = selection_record(CURVE, kept, "task_within_forgetting", "f1_macro", 2.0, last_step=16)
    assert record["step"] == 8 and record["val_f1_macro"] == 0.70 and record["forgetting_pct"] == 1.5
    assert "among the 3 of 4 validations" in record["reason"]
    assert select_point(CURVE, "task_within_forgetting", "f1_macro", 5.0) is CURVE[2]
    assert select_point(CURVE, "best_task", "f1_macro", None) is CURVE[2]
    assert select_point(CURVE, "best_task", "val_loss", None) is CURVE[2]  # lower is better
    assert select_point(CURVE, "task_within_forgetting", "val_loss", 1.2) is CURVE[3]
    assert select_point(CURVE, "last", "f1_macro", None) is None


def test_when_everything_forgets_too_much_the_least_forgetting_step_is_kept() -> None:
    kept = select_point(CURVE, "task_within_forgetting", "f1_macro", 0.1)
    assert kept is CURVE[0]
    reason = selection_record(CURVE, kept, "task_within_forgetting", "f1_macro", 0.1, last_step=16)["reason"]
    assert reason.startswith("step 4: no validation kept general-text perplexity within +0.1%")


def test_last_says_where_the_best_validation_was_and_early_stopping_notes_it() -> None:
    record = selection_record(CURVE, None, "last", "f1_macro", None, last_step=16)
    assert record["step"] == 16
    assert record["reason"] == ("the last step's adapter (train.select 'last'); the best of the 4 validations during "
                                "training was step 12 (f1_macro 0.8)")
    assert selection_record(CURVE[:3], None, "last", "f1_macro", None, last_step=12)["reason"].endswith("'last')")
    note = selection_note("last", 3)
    assert note is not None and "if early stopping triggers, the adapter kept is the one it stopped at, 3 validation(s) " \
        "after the best" in note
    assert selection_note(None, 3) is None and selection_note("last", None) is None
    assert selection_note("best_task", 3) is None


def test_forgetting_is_the_perplexity_rise_in_percent() -> None:
    assert forgetting_pct(2.0 + math.log(1.02), 2.0) == pytest.approx(2.0)
    assert forgetting_pct(2.0, 2.0) == 0.0
    assert metric_improves(0.51, 0.5, "f1_macro") and not metric_improves(0.50005, 0.5, "f1_macro")
    assert metric_improves(0.49, 0.5, "val_loss") and not metric_improves(0.51, 0.5, "val_loss")


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_f1_is_logged_at_each_validation_and_early_stopping_fires_on_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # A learning rate this small leaves the predictions, hence F1, as they are: patience runs out.
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 40, "eval_every": 2, "lr": 1e-9,
                                                     "early_stopping_metric": "f1_macro", "early_stopping_patience": 2})
    recipe = load_recipe(path)
    out = train(recipe, recipe.run_dir(path), scorer=validation_scorer)
    run_dir = tmp_path / "runs/recipe"
    scored = [r for r in _lines(run_dir) if "val_f1_macro" in r]
    assert [r["step"] for r in scored] == [0, 2, 4, 6] and scored[0]["base"]
    assert all(0 <= r["val_f1_macro"] <= 1 for r in scored) and all("val_loss" in r for r in scored[1:])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["steps"] == 6 and record["stopped_early"] and record["planned_steps"] == 40
    assert record["selection"]["rule"] == "best_task" and record["selection"]["step"] == 2  # patience keeps the best
    # What was logged is the evaluation's own metric on these rows.
    task = recipe_task(recipe, out.data, is_encoder=False)
    (again,) = evaluate_tasks(out.model, out.backbone.tokenizer, [task], show=False)
    assert again.metrics["f1_macro"] == pytest.approx(scored[1]["val_f1_macro"], abs=1e-6)


def _fake_scorer(values: list[dict[str, float]]) -> Any:
    """A scorer that reports a constructed curve, one entry per call (the base model's first)."""
    def factory(*_: Any) -> Any:
        return lambda model: values.pop(0)
    return factory


def _trainable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under the names the saved adapter gives them."""
    return {k.removeprefix("model.").replace(".default", ""): v for k, v in state.items()}


def test_task_within_forgetting_keeps_that_steps_adapter_across_a_resume(tmp_path: Path, tiny_llama_dir: Path) -> None:
    base = 5.0
    curve = {4: (0.50, 0.5), 8: (0.70, 1.5), 12: (0.80, 3.0), 16: (0.65, 1.0)}
    values = [{"val_f1_macro": f1, "general_loss": base + math.log1p(pct / 100)} for f1, pct in curve.values()]
    common = {"eval_every": 4, "save_every": 4, "keep_checkpoints": 10, "early_stopping_metric": "f1_macro",
              "select": "task_within_forgetting", "forgetting_bound": 2.0}
    path = make_run(tmp_path, tiny_llama_dir, train={**common, "max_steps": 14})
    recipe = load_recipe(path)
    run_dir = recipe.run_dir(path)
    train(recipe, run_dir, scorer=_fake_scorer([{"val_f1_macro": 0.4, "general_loss": base}, *values[:3]]))
    # Interrupted after step 12 as far as the selection knows: resumed from that checkpoint to step 16.
    recipe = load_recipe(path, ["train.max_steps=16"])
    out = train(recipe, run_dir, resume=True, resume_changed=["train.max_steps"], scorer=_fake_scorer(values[3:]))

    points = [r for r in _lines(run_dir) if "forgetting_pct" in r]
    assert [p["step"] for p in points] == [4, 8, 12, 16]
    assert [p["forgetting_pct"] for p in points] == pytest.approx([0.5, 1.5, 3.0, 1.0], abs=1e-3)
    record = json.loads((run_dir / "run.json").read_text())["selection"]
    assert record["step"] == select_point(points, "task_within_forgetting", "f1_macro", 2.0)["step"] == 8
    assert record["base"]["general_loss"] == base
    saved = load_file(run_dir / "adapter/adapter_model.safetensors")
    at = {step: _trainable(load_file(run_dir / f"checkpoints/step-{step}/model.safetensors")) for step in (8, 12)}
    assert saved.keys() == at[8].keys()
    assert all(torch.equal(saved[k], at[8][k]) for k in saved)
    assert not all(torch.equal(saved[k], at[12][k]) for k in saved)
    live = {n: p for n, p in out.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(live[n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")],
                           v) for n, v in saved.items())

    report = build_report(run_dir, {}, [])
    assert report["curves"]["forgetting"][0] == [0, 0.0] and len(report["curves"]["task"]) == 5
    assert "Checkpoint choice" in render_markdown(report) and "kept step 8" in render_markdown(report)
    assert "Checkpoint choice: task metric and forgetting" in render_html(report)


def test_task_within_forgetting_on_real_scores_matches_its_logged_curve(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 12, "eval_every": 4, "lr": 1e-2,
                                                     "select": "task_within_forgetting", "forgetting_bound": 1.0})
    recipe = load_recipe(path)
    train(recipe, recipe.run_dir(path), scorer=validation_scorer)
    lines = _lines(tmp_path / "runs/recipe")
    assert lines[0]["step"] == 0 and lines[0]["base"] and lines[0]["general_loss"] > 0
    points = [r for r in lines if "forgetting_pct" in r]
    assert [p["step"] for p in points] == [4, 8, 12]
    for p in points:
        assert p["forgetting_pct"] == pytest.approx(forgetting_pct(p["general_loss"], lines[0]["general_loss"]), abs=1e-3)
    selection = json.loads((tmp_path / "runs/recipe/run.json").read_text())["selection"]
    assert selection["metric"] == "val_loss"  # the default metric, judged under the bound
    assert selection["step"] == select_point(points, "task_within_forgetting", "val_loss", 1.0)["step"]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.early_stopping_metric=f1_macro"], "train.early_stopping_metric 'f1_macro' is judged at each validation: "
                                                "set train.eval_every"),
    (["train.early_stopping_metric=f1_macro", "train.eval_every=2", "data.kind=text", "data.prompt_template=null"],
     "train.early_stopping_metric 'f1_macro' needs labels: data.kind is 'text'"),
    (["train.select=task_within_forgetting", "train.eval_every=2"],
     "train.select 'task_within_forgetting' needs train.forgetting_bound"),
    (["train.select=best_task", "train.eval_every=2", "data.val_fraction=0"],
     "train.select 'best_task' needs validation rows"),
    (["train.forgetting_bound=2", "train.eval_every=2"],
     "train.forgetting_bound applies to train.select 'task_within_forgetting' only"),
    (["train.early_stopping_metric=f1"], "train.early_stopping_metric"),
])
def test_bad_selection_keys_are_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture,
                                         overrides: list[str], expected: str) -> None:
    path = make_run(tmp_path, tiny_llama_dir)
    assert cli_main(["train", str(path), "--no-eval", *overrides]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tuneguard: error:") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_forgetting_on_an_encoder_is_refused_before_training(tmp_path: Path, tiny_bert_dir: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    path = make_run(tmp_path, tiny_bert_dir)
    code = cli_main(["train", str(path), "--no-eval", "train.select=task_within_forgetting", "train.eval_every=2",
                     "train.forgetting_bound=2"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and "encoder classifier cannot score" in lines[-1], lines
    assert not (tmp_path / "runs/recipe/recipe.yaml").exists()


def test_patience_alone_still_keeps_the_best_validation_loss(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 12, "eval_every": 3, "lr": 5e-2,
                                                     "early_stopping_patience": 10})
    out = run_train(path)  # no scorer: the validation loss needs none
    points = [r for r in _lines(tmp_path / "runs/recipe") if "val_loss" in r]
    assert [p["step"] for p in points] == [3, 6, 9, 12]
    best = select_point(points, "best_task", "val_loss", None)
    assert best["val_loss"] <= min(p["val_loss"] for p in points) + 1e-4
    selection = out.record["selection"]
    assert (selection["rule"], selection["metric"], selection["step"]) == ("best_task", "val_loss", best["step"])
    assert out.record["final_val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)  # the kept adapter, scored again


def test_encoder_early_stopping_on_accuracy_scores_with_its_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    path = make_run(tmp_path, tiny_bert_dir, train={"max_steps": 8, "eval_every": 4, "lr": 1e-2,
                                                    "early_stopping_metric": "accuracy", "select": "best_task"})
    recipe = load_recipe(path)
    out = train(recipe, recipe.run_dir(path), scorer=validation_scorer)
    scored = [r for r in _lines(tmp_path / "runs/recipe") if "val_accuracy" in r]
    assert [r["step"] for r in scored] == [0, 4, 8]
    kept = max(scored[1:], key=lambda p: (p["val_accuracy"], -p["step"]))
    assert out.record["selection"]["step"] == kept["step"]
    (again,) = evaluate_tasks(out.model, out.backbone.tokenizer, [recipe_task(recipe, out.data, is_encoder=True)],
                              show=False)
    assert again.metrics["acc"] == pytest.approx(kept["val_accuracy"], abs=1e-6)


def test_training_without_a_scorer_refuses_a_task_metric_before_loading(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"eval_every": 2, "early_stopping_metric": "f1_macro"})
    recipe = load_recipe(path)
    with pytest.raises(TuneguardError, match="which this command does not run: use `tuneguard train`"):
        train(recipe, recipe.run_dir(path))
    assert not (tmp_path / "runs/recipe/recipe.yaml").exists()


def test_a_resume_with_more_patience_trains_on(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A run stopped early is judged again under the new patience (it used to stay stopped and train nothing)."""
    train_keys = {"max_steps": 10, "eval_every": 2, "save_every": 2, "lr": 1e-9, "early_stopping_metric": "f1_macro",
                  "early_stopping_patience": 2}
    path = make_run(tmp_path, tiny_llama_dir, train=train_keys)
    recipe = load_recipe(path)
    train(recipe, recipe.run_dir(path), scorer=validation_scorer)
    run_dir = tmp_path / "runs/recipe"
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 6
    longer = load_recipe(path, ["train.early_stopping_patience=10"])
    train(longer, recipe.run_dir(path), resume=True, resume_changed=["train.early_stopping_patience"],
          scorer=validation_scorer)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["steps"] == 10 and not record["stopped_early"]
