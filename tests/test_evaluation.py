"""The evaluation stage on a tiny trained run: guards, base vs tuned, eval.json and reports."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tuneguard.backbones import first_fingerprint
from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.recipe import load_recipe
from tuneguard.run import evaluate
from tuneguard.rundir import ADAPTER_META
from tuneguard.train.loop import train

from .test_train import make_run


def trained(tmp_path: Path, model_dir: Path, **sections) -> tuple:
    path = make_run(tmp_path, model_dir, **sections)
    recipe = load_recipe(path)
    return path, recipe, train(recipe, recipe.run_dir(path))


def test_after_training_writes_eval_and_reports(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path, recipe, result = trained(tmp_path, tiny_llama_dir, train={"max_steps": 10},
                                   eval={"task": True, "suites": ["arc_easy", "wikitext"], "limit": 6})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    data = json.loads((run_dir / "eval.json").read_text())
    assert [r["task"] for r in data["base"]] == ["recipe (validation)", "arc_easy", "wikitext"]
    assert all(g["passed"] for g in data["guards"])
    assert data["base"][1]["n"] == 6 and len(data["base"][1]["per_item"]) == 6
    assert data["general_text_loss"]["base"] != data["general_text_loss"]["tuned"]
    for name in ("report.json", "report.md", "report.html"):
        assert (run_dir / name).stat().st_size > 0
    # Every task result was kept, base and tuned apart; re-evaluation from disk takes them from there...
    kept = sorted((run_dir / "scores").glob("*.json"))
    assert len(kept) == 2 * 3
    assert cli_main(["eval", str(run_dir)]) == 0
    again = json.loads((run_dir / "eval.json").read_text())
    assert [r["seconds"] for r in again["tuned"]] == [r["seconds"] for r in data["tuned"]]
    # ...and scoring again from the reloaded adapter gives the same tuned scores on the same items.
    for path in kept:
        path.unlink()
    assert cli_main(["eval", str(run_dir)]) == 0
    fresh = json.loads((run_dir / "eval.json").read_text())
    assert [r["per_item"] for r in fresh["tuned"]] == [r["per_item"] for r in data["tuned"]]
    assert [r["seconds"] for r in fresh["tuned"]] != [r["seconds"] for r in data["tuned"]]
    # Another task list replaces the report's: the earlier evaluation, with the tasks now dropped, is moved aside.
    assert cli_main(["eval", str(run_dir), "--tasks", "arc_easy", "--limit", "6"]) == 0
    assert [r["task"] for r in json.loads((run_dir / "eval.json").read_text())["tuned"]] == [
        "recipe (validation)", "arc_easy"]
    (aside,) = run_dir.parent.glob(f"{run_dir.name}.replaced-*")
    assert [r["task"] for r in json.loads((aside / "eval.json").read_text())["tuned"]][-1] == "wikitext"
    assert sorted(p.name for p in aside.iterdir()) == ["eval.json", "report.html", "report.json", "report.md"]


def test_untrained_adapter_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """LoRA starts as a no-op (B = 0); with no update the 'adapter applied' guard must fail."""
    path, recipe, result = trained(tmp_path, tiny_llama_dir, train={"max_steps": 1, "lr": 1e-30},
                                   eval={"task": True})
    run_dir = recipe.run_dir(path)
    with torch.no_grad():
        for name, p in result.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    with pytest.raises(TuneguardError, match="guard rail failed.*adapter applied"):
        evaluate(recipe, run_dir, result)
    assert not (run_dir / "report.md").exists()


def test_fingerprint_guard_takes_earlier_versions_adapters(tmp_path: Path, tiny_llama_dir: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """An adapter saved before fingerprint version 2 carries the first version's fingerprint: its run is evaluated
    again as before; an adapter trained on other weights is refused in one line, nothing reported or exported."""
    path, recipe, _ = trained(tmp_path, tiny_llama_dir, train={"max_steps": 4}, eval={"task": True, "suites": []})
    run_dir = recipe.run_dir(path)
    meta = run_dir / "adapter" / ADAPTER_META
    earlier = first_fingerprint(str(tiny_llama_dir), False, None, recipe.quantization)
    assert json.loads(meta.read_text())["fingerprint"] != earlier
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": earlier}))
    assert cli_main(["eval", str(run_dir)]) == 0
    guard = next(g for g in json.loads((run_dir / "eval.json").read_text())["guards"] if g["name"] == "backbone fingerprint")
    assert guard["passed"] and f"{earlier} (the first version's fingerprint of the same files)" in guard["detail"]
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "0123456789abcdef"}))
    capsys.readouterr()
    for verb in (["eval"], ["export"]):  # check, compare and lm-eval's run= load a run's adapter the same way
        assert cli_main([*verb, str(run_dir)]) == 2
        assert f"{run_dir}: its adapter was trained on backbone 0123456789abcdef; the recipe's model.source" in \
            capsys.readouterr().err
    assert not (run_dir / "merged").exists()


def test_encoder_scored_by_its_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    # Three classes where the saved head has two: a fresh head, drawn at load.
    path, recipe, result = trained(tmp_path, tiny_bert_dir, train={"max_steps": 10, "lr": 1e-2}, eval={"task": True},
                                   data={"labels": ["negative", "positive", "neutral"]})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    data = json.loads((run_dir / "eval.json").read_text())
    assert [r["task"] for r in data["tuned"]] == ["recipe (validation)"]
    assert {"acc", "f1_macro"} <= set(data["tuned"][0]["metrics"])
    # Evaluated again from disk: the head the adapter disables ("base") is drawn as training drew it, not anew.
    shutil.rmtree(run_dir / "scores")
    assert cli_main(["eval", str(run_dir)]) == 0
    again = json.loads((run_dir / "eval.json").read_text())
    assert [r["per_item"] for r in again["base"]] == [r["per_item"] for r in data["base"]]
    assert [g["detail"] for g in again["guards"]] == [g["detail"] for g in data["guards"]]


def test_base_model_eval_cli(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores.json"
    assert cli_main(["eval", "--model", str(tiny_llama_dir), "--tasks", "piqa", "--limit", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["n"] == 4


def test_frozen_checksum_sees_backbone_edits_only(tiny_llama) -> None:
    from peft import LoraConfig, get_peft_model

    from tuneguard.adapters.state import frozen_checksum

    model = get_peft_model(tiny_llama[0], LoraConfig(r=2, target_modules=["q_proj"]))
    before = frozen_checksum(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
        assert frozen_checksum(model) == before  # adapter weights are not part of the frozen checksum
        model.get_base_model().model.embed_tokens.weight[3, 5] += 0.5
    assert frozen_checksum(model) != before


def test_pickled_adapter_is_refused(tmp_path: Path, tiny_llama) -> None:
    from tuneguard.adapters.registry import load_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TuneguardError, match="no adapter_model.safetensors .tuneguard does not unpickle weights"):
        load_adapter(tiny_llama[0], tmp_path)
    with pytest.raises(TuneguardError, match="adapter_config.json missing"):
        load_adapter(tiny_llama[0], tmp_path / "nowhere")
