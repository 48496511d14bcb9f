"""The linear probe: an encoder's head trained alone on the frozen backbone, the honest "before"."""

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from tuneguard.adapters.registry import apply_adapter
from tuneguard.backbones import load_backbone
from tuneguard.data.prepare import prepare_data
from tuneguard.errors import TuneguardError
from tuneguard.recipe import load_recipe
from tuneguard.run import evaluate
from tuneguard.train.batches import eval_batches
from tuneguard.train.probe import fit_probe, frozen_head, head_inputs

from .test_evaluation import trained
from .test_train import make_run


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny BERT whose first-token features differ between sentences (at the usual init scale they barely do)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, pad_token_id=tokenizer.pad_token_id, num_labels=2,
                        initializer_range=0.5)
    path = tmp_path_factory.mktemp("probe-bert")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _setup(tmp_path: Path, model_dir: Path, **sections) -> tuple:
    recipe = load_recipe(make_run(tmp_path, model_dir, **sections))
    backbone = load_backbone(recipe.model, recipe.quantization, num_labels=2)
    data = prepare_data(recipe.data, backbone.tokenizer, is_encoder=True, seed=recipe.train.seed)
    model = apply_adapter(backbone.model, recipe.adapter, is_encoder=True, total_steps=8)
    return recipe, backbone, data, model


def _accuracy(head: torch.nn.Module, model: torch.nn.Module, rows: list, pad_id: int) -> float:
    features = head_inputs(model, eval_batches(rows, 8, pad_id))
    predicted = head(features.to(next(head.parameters()).dtype)).argmax(-1)
    return float((predicted == torch.tensor([r.label for r in rows])).float().mean())


def test_probe_trains_only_the_head_and_beats_chance(tmp_path: Path, bert_dir: Path) -> None:
    recipe, backbone, data, model = _setup(tmp_path, bert_dir, train={"max_steps": 30})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pad = backbone.tokenizer.pad_token_id
    probe = fit_probe(model, data.train, recipe, pad)
    # Backbone, adapter and PEFT's trainable head copy are exactly as they were; the probe is a head of its own.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert probe.head is not frozen_head(model)
    assert not any(torch.equal(a, b) for a, b in zip(probe.head.parameters(), frozen_head(model).parameters(),
                                                      strict=True))
    assert probe.steps == 30 and probe.batch_size == 4 and probe.lr == 5e-3  # the recipe's budget; its lr > 1e-3
    # Four distinct reviews, two per class: the random head is near chance, the probe separates them.
    assert _accuracy(probe.head, model, data.val, pad) == 1.0
    assert _accuracy(probe.head, model, data.val, pad) > _accuracy(frozen_head(model), model, data.val, pad)


def test_probe_is_deterministic_under_the_seed(tmp_path: Path, bert_dir: Path) -> None:
    recipe, backbone, data, model = _setup(tmp_path, bert_dir, train={"max_steps": 6, "lr": 1e-4})
    first = fit_probe(model, data.train, recipe, backbone.tokenizer.pad_token_id)
    torch.manual_seed(123)  # the global RNG does not matter: the head is initialised under train.seed
    second = fit_probe(model, data.train, recipe, backbone.tokenizer.pad_token_id)
    assert first.lr == 1e-3  # a recipe lr below the usual probe lr is raised to it
    assert all(torch.equal(a, b) for a, b in zip(first.head.parameters(), second.head.parameters(), strict=True))
    other = fit_probe(model, data.train, recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": 7})}),
                      backbone.tokenizer.pad_token_id)
    assert not torch.equal(next(first.head.parameters()), next(other.head.parameters()))


def test_encoder_report_compares_with_the_probe(tmp_path: Path, bert_dir: Path) -> None:
    path, recipe, result = trained(tmp_path, bert_dir, train={"max_steps": 30, "lr": 1e-2},
                                   eval={"task": True})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    data = json.loads((run_dir / "eval.json").read_text())
    baseline, probe = data["baseline"], data["base"][0]
    assert baseline["kind"] == "linear_probe" and baseline["steps"] == 30
    chance = baseline["chance"]
    assert probe["item_hashes"] == chance["item_hashes"] == data["tuned"][0]["item_hashes"]
    assert probe["value"] == 1.0 and probe["value"] > chance["value"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"][0]["base"] == probe["value"]  # the comparison's "before" is the probe
    assert report["baseline"]["chance"]["value"] == chance["value"]
    md = (run_dir / "report.md").read_text()
    assert "## Task (before = linear probe)" in md
    assert f"chance level: {100 * chance['value']:.1f}% acc with the untrained random head" in md
    # random_head: "before" is the untrained head again, and nothing is said about a probe.
    recipe = load_recipe(path, ["eval.encoder_baseline=random_head"])
    assert evaluate(recipe, run_dir, result) == 0
    data = json.loads((run_dir / "eval.json").read_text())
    assert "baseline" not in data and data["base"][0]["per_item"] == chance["per_item"]
    assert "linear probe" not in (run_dir / "report.md").read_text()


def test_decoder_eval_has_no_probe(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path, recipe, result = trained(tmp_path, tiny_llama_dir, train={"max_steps": 4}, eval={"task": True})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    assert "baseline" not in json.loads((run_dir / "eval.json").read_text())
    assert "chance level" not in (run_dir / "report.md").read_text()


def test_encoder_baseline_key_is_validated(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir)
    assert load_recipe(path).eval.encoder_baseline == "linear_probe"
    with pytest.raises(TuneguardError, match="'eval.encoder_baseline': Input should be 'linear_probe' or 'random_head'"):
        load_recipe(path, ["eval.encoder_baseline=probe"])
