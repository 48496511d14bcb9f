"""End-to-end on the real bundled models (SmolLM2-135M-Instruct from GGUF in nf4, all-MiniLM-L6-v2).

Slow but honest: the same commands a user runs, on the same weights, with a handful of steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tuneguard.backbones import load_backbone
from tuneguard.recipe import QuantizationConfig, load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few nf4 LoRA steps on SST-2 through ``accelerate launch``, with a small before/after evaluation."""
    out = tmp_path_factory.mktemp("e2e")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml")]
    run([*launcher, "-m", "tuneguard.run", str(ROOT / "recipes/quickstart.yaml"),
         "train.max_steps=6", "train.eval_every=3", "train.save_every=3", "data.max_train_samples=64",
         "data.max_val_samples=24", "eval.suites=[arc_easy]", "eval.limit=12", f"output.dir={out}/{{name}}"], cwd=out)
    return out / "quickstart"


def test_accelerate_launch_trains_and_reports(smollm_run: Path) -> None:
    record = json.loads((smollm_run / "run.json").read_text())
    assert record["steps"] == 6 and record["quantization"] == "nf4" and record["tokens_per_s"] > 0
    assert record["peak_memory_mb"] > 0 and 0 < record["trainable_params"] < record["total_params"]
    evaluation = json.loads((smollm_run / "eval.json").read_text())
    assert all(g["passed"] for g in evaluation["guards"])
    assert [r["task"] for r in evaluation["tuned"]] == ["quickstart (validation)", "arc_easy"]
    report = (smollm_run / "report.md").read_text()
    assert "arc_easy" in report and "quickstart (validation)" in report


def test_saved_adapter_reloads_and_changes_outputs(smollm_run: Path) -> None:
    recipe = load_recipe(smollm_run / "recipe.yaml")
    backbone = load_backbone(recipe.model, recipe.quantization)
    ids = backbone.tokenizer("The movie was wonderful. Sentiment:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = backbone.model(ids).logits
        model = PeftModel.from_pretrained(backbone.model, str(smollm_run / "adapter"))
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3
    meta = json.loads((smollm_run / "adapter/tuneguard.json").read_text())
    assert meta["fingerprint"] == backbone.fingerprint


def test_export_merges_into_plain_model(smollm_run: Path) -> None:
    result = run([sys.executable, "-m", "tuneguard.cli", "export", str(smollm_run), "--out", str(smollm_run / "merged")],
                 cwd=smollm_run)
    assert result.stdout == ""  # the result is the folder; what export says goes to standard error, as every note
    saved, note = result.stderr.strip().splitlines()[-2:]
    assert saved == f"merged model saved to {smollm_run / 'merged'}"
    assert note.startswith("note: the adapter was trained and evaluated on the nf4 backbone; it is merged here into")
    assert "Warning" not in result.stderr and "Loading weights" not in result.stderr, result.stderr[-1000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(smollm_run / "merged", dtype=torch.float32)
    recipe = load_recipe(smollm_run / "recipe.yaml")
    backbone = load_backbone(recipe.model.model_copy(update={"dtype": "float32"}), QuantizationConfig(method="none"))
    peft_model = PeftModel.from_pretrained(backbone.model, str(smollm_run / "adapter"))
    ids = torch.tensor([[1, 504, 3153, 314, 2365, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=2e-3, rtol=1e-3)


def test_minilm_encoder_recipe(tmp_path: Path) -> None:
    run([sys.executable, "-m", "tuneguard.cli", "train", str(ROOT / "recipes/minilm-sst2-lora.yaml"), "train.max_steps=40",
         "train.eval_every=20", "data.max_train_samples=640", "data.max_val_samples=64", f"output.dir={tmp_path}/{{name}}"],
        cwd=tmp_path)
    evaluation = json.loads((tmp_path / "minilm-sst2-lora/eval.json").read_text())
    base, tuned = evaluation["base"][0], evaluation["tuned"][0]
    assert base["n"] == tuned["n"] == 64 and tuned["value"] > base["value"]


def test_base_model_scores_above_chance() -> None:
    """The general-suite prompts and scorer are sane on the real model (ARC-Easy: 4 choices, chance 25%)."""
    from tuneguard.eval.stage import evaluate_base_model

    [arc] = evaluate_base_model("bundled:smollm2-135m-instruct", ["arc_easy"], limit=60, quant="none", batch_size=8)
    assert arc.n == 60 and arc.value > 0.35


@pytest.mark.parametrize("recomputed", [0, 8])
def test_memory_estimate_is_within_ten_percent_of_a_measured_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  recomputed: int) -> None:
    """The estimator against a real run: the bench's configuration (nf4 SmolLM2, LoRA r16 all-linear, batch
    2 x 512 packed tokens), 3 steps in a fresh process, peak RSS from run.json; with the default budget (no
    layer recomputed) and with a budget the checkpoint plan meets by recomputing 8 of the 30 layers."""
    from tuneguard.bench import reference
    from tuneguard.bench.measure import measure_recipe
    from tuneguard.recipe import dump_recipe
    from tuneguard.train.memory import ENV_BUDGET, estimate_recipe

    recipe, _ = reference.bench_recipe({**reference.TRAIN_DEFAULTS, "steps": 3, "workdir": str(tmp_path)})
    (tmp_path / "bench.yaml").write_text(dump_recipe(recipe))
    if recomputed:
        monkeypatch.setenv(ENV_BUDGET, str(estimate_recipe(recipe, checkpointed_layers=recomputed).peak_mb))
    estimate = estimate_recipe(recipe)
    assert estimate.inputs["checkpointed_layers"] == recomputed
    predicted = estimate.peak_mb
    measured = measure_recipe(tmp_path / "bench.yaml", [], steps=3)
    assert "error" not in measured, measured
    assert 0.9 <= predicted / measured["peak_memory_mb"] <= 1.1, (predicted, measured)
