"""Learning rate: the method's default, the far-outside warning, layer-wise decay, and ``tuneguard lr``."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_train import make_run, run_train
from tuneguard.adapters.capabilities import CAPABILITIES, lr_warning
from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.recipe import dump_recipe, load_recipe
from tuneguard.rundir import RunDir
from tuneguard.train.batches import step_windows
from tuneguard.train.checkpoints import TrainState
from tuneguard.train.loop import resume, setup, train, train_step
from tuneguard.train.lr_range import LrRange, read_curve


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama with four layers, so a decay has more than two rates to spread."""
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.num_hidden_layers = 4
    path = tmp_path_factory.mktemp("tiny-llama-4")
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_llama_dir / name).exists():
            (path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    return path


def without_lr(path: Path) -> Path:
    data = yaml.safe_load(path.read_text())
    del data["train"]["lr"]
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------ defaults and warning


@pytest.mark.parametrize("method", sorted(CAPABILITIES))
def test_a_recipe_without_lr_trains_at_its_methods_default(tmp_path: Path, tiny_llama_dir: Path, method: str) -> None:
    path = without_lr(make_run(tmp_path, tiny_llama_dir))
    recipe = load_recipe(path, [f"adapter.method={method}"])
    assert recipe.train.lr == CAPABILITIES[method].lr
    low, high = CAPABILITIES[method].lr_range
    assert low <= recipe.train.lr <= high
    # The resolved recipe (what a run writes as recipe.yaml) records the rate, and reloads with it.
    assert yaml.safe_load(dump_recipe(recipe))["train"]["lr"] == CAPABILITIES[method].lr
    # An explicit rate is kept whatever the method.
    assert load_recipe(path, [f"adapter.method={method}", "train.lr=7e-4"]).train.lr == 7e-4


def test_defaults_follow_published_practice() -> None:
    lr = {m: c.lr for m, c in CAPABILITIES.items()}
    assert lr["lora"] == 2e-4  # QLoRA's and the LoRA paper's GPT-2 rate
    assert lr["prompt_tuning"] > lr["ia3"] > lr["adalora"] > lr["lora"]
    assert lr["ia3"] >= 10 * lr["lora"]


def test_the_warning_names_the_usual_range_only_far_outside_it() -> None:
    assert lr_warning("lora", 2e-4) is None
    assert lr_warning("lora", 5e-3) is None  # 10x the range's top: still no warning
    above = lr_warning("lora", 3e-2)
    assert above and "more than 10x above" in above and "0.0001 to 0.0005" in above and "default is 0.0002" in above
    below = lr_warning("lora", 1e-6)
    assert below and "below" in below
    assert lr_warning("ia3", 3e-3) is None and lr_warning("prompt_tuning", 3e-2) is None
    assert "'prompt_tuning'" in (lr_warning("prompt_tuning", 2e-4) or "")  # LoRA's rate on prompt tuning


def test_a_run_warns_at_its_start(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = run_train(make_run(tmp_path / "far", tiny_llama_dir, train={"max_steps": 1}), "train.lr=0.2")
    assert out.record["lr"] == 0.2  # run.json records the rate it trained at
    assert "warning: train.lr=0.2 is more than 10x above the usual range for adapter.method 'lora'" in capsys.readouterr().err
    run_train(make_run(tmp_path / "usual", tiny_llama_dir, train={"max_steps": 1}), "train.lr=3e-4")
    assert "warning: train.lr" not in "".join(capsys.readouterr())


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "fast"])
def test_layer_lr_decay_outside_0_1_is_refused(tmp_path: Path, tiny_llama_dir: Path, value: str,
                                               capsys: pytest.CaptureFixture) -> None:
    path = make_run(tmp_path, tiny_llama_dir)
    assert cli_main(["train", str(path), f"train.layer_lr_decay={value}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tuneguard: error:") and "'train.layer_lr_decay'" in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- layer-wise decay


def session(tmp_path: Path, model_dir: Path, *overrides: str, **sections):
    path = make_run(tmp_path, model_dir, **sections)
    recipe = load_recipe(path, list(overrides))
    return setup(recipe, RunDir(recipe.run_dir(path)))


def one_step(s) -> dict[str, torch.Tensor]:
    """One optimizer step; each trainable parameter's change."""
    before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    ((batch, tokens),) = next(step_windows(s.data, s.recipe, 0, 1, s.pad_id))
    s.loss_model.train()
    train_step(s, TrainState(), (batch,), tokens)
    return {n: (p.detach() - before[n]) for n, p in s.model.named_parameters() if n in before}


def test_each_layer_trains_at_lr_times_decay_to_its_depth(tmp_path: Path, four_layer_llama: Path) -> None:
    lr, decay = 1e-2, 0.5
    s = session(tmp_path, four_layer_llama, f"train.lr={lr}", f"train.layer_lr_decay={decay}")
    groups = s.optimizer.param_groups
    assert [g["layer"] for g in groups] == [0, 1, 2, 3]
    ids = {id(p): n for n, p in s.model.named_parameters()}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * decay ** (3 - g["layer"]), rel=1e-12)
        assert all(f".layers.{g['layer']}." in ids[id(p)] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in s.model.parameters())
    # AdamW's first step moves each weight by about its group's rate (m / sqrt(v) = sign of the gradient);
    # LoRA's B starts at zero and is what the first step moves.
    moved = one_step(s)
    for layer in range(4):
        steps = [d.abs().max().item() for n, d in moved.items() if f".layers.{layer}." in n and "lora_B" in n]
        assert steps and max(steps) == pytest.approx(lr * decay ** (3 - layer), rel=1e-3), layer


def test_no_decay_is_one_group_as_before(tmp_path: Path, tiny_llama_dir: Path) -> None:
    s = session(tmp_path, tiny_llama_dir, "train.lr=1e-3")
    assert len(s.optimizer.param_groups) == 1 and s.optimizer.param_groups[0]["lr"] == 1e-3


def test_a_classifier_head_trains_at_the_full_rate(tmp_path: Path, tiny_bert_dir: Path) -> None:
    s = session(tmp_path, tiny_bert_dir, "train.lr=1e-2", "train.layer_lr_decay=0.25")
    ids = {id(p): n for n, p in s.model.named_parameters()}
    by_layer = {g["layer"]: g for g in s.optimizer.param_groups}
    assert set(by_layer) == {None, 0, 1}
    assert all("classifier" in ids[id(p)] for p in by_layer[None]["params"])
    assert by_layer[None]["lr"] == 1e-2 and by_layer[1]["lr"] == 1e-2 and by_layer[0]["lr"] == pytest.approx(2.5e-3)
    moved = one_step(s)
    head = max(d.abs().max().item() for n, d in moved.items() if "classifier" in n)
    assert head == pytest.approx(1e-2, rel=2e-2)  # the head is a copy in the backbone's dtype (bf16 here)


@pytest.mark.parametrize("adapter", [{"method": "adalora", "r": 4}, {"method": "prompt_tuning", "num_virtual_tokens": 4}],
                         ids=lambda a: a["method"])
def test_decay_with_adalora_and_prompt_tuning(tmp_path: Path, four_layer_llama: Path, adapter: dict,
                                              capsys: pytest.CaptureFixture) -> None:
    s = session(tmp_path, four_layer_llama, "train.layer_lr_decay=0.5", "train.lr=1e-2", adapter=adapter)
    layers = [g["layer"] for g in s.optimizer.param_groups]
    if adapter["method"] == "adalora":  # its A, E, B in every layer, each layer at its rate
        assert layers == [0, 1, 2, 3]
        assert [g["lr"] for g in s.optimizer.param_groups] == pytest.approx([1.25e-3, 2.5e-3, 5e-3, 1e-2])
    else:  # virtual tokens sit in no layer: the full rate, and the run says the decay does nothing
        assert layers == [None] and s.optimizer.param_groups[0]["lr"] == 1e-2
        assert "train.layer_lr_decay=0.5 has no effect" in capsys.readouterr().err
    one_step(s)  # the method's hooks (AdaLoRA's budget) run with grouped parameters


def test_resume_with_a_changed_lr_keeps_the_layer_ratios(tmp_path: Path, four_layer_llama: Path) -> None:
    path = make_run(tmp_path, four_layer_llama, train={"max_steps": 4, "save_every": 2, "layer_lr_decay": 0.5,
                                                       "lr": 1e-2})
    run_train(path)
    run_dir = tmp_path / "runs" / "recipe"
    recipe = load_recipe(path, ["train.lr=4e-2"])
    s = setup(recipe, RunDir(run_dir))
    resume(s, RunDir(run_dir).latest_checkpoint(), ["train.lr"], ["train.lr"])
    assert [g["lr"] for g in s.optimizer.param_groups] == pytest.approx([4e-2 * 0.5 ** (3 - i) for i in range(4)])
    # The whole resume path: the optimizer's grouped state restores, and the log shows the new rate.
    train(recipe, run_dir, resume=True, resume_changed=["train.lr"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "lr" in r] == pytest.approx([1e-2, 1e-2, 4e-2, 4e-2])
    with pytest.raises(TuneguardError, match="--resume-changed train.layer_lr_decay: cannot resume"):
        train(load_recipe(path, ["train.layer_lr_decay=0.8"]), run_dir, resume=True,
              resume_changed=["train.layer_lr_decay"])
    with pytest.raises(TuneguardError, match="--resume-changed train.select: cannot resume .*old rule"):
        train(load_recipe(path, ["train.select=last"]), run_dir, resume=True, resume_changed=["train.select"])


# ----------------------------------------------------------------------------------------- tuneguard lr


def test_reading_the_curve() -> None:
    lrs = [1e-5 * 10 ** (i / 10) for i in range(41)]  # 1e-5 .. 1e-1
    losses = [2.0 - 0.3 * math.tanh(2 * (math.log10(x) + 3.5)) + 20 * x for x in lrs]  # falls fastest near 3e-4, lowest near 2e-3
    r = LrRange(recipe="r", method="lora", start=1e-5, end=1e-1, steps=41, lrs=lrs, losses=losses)
    read_curve(r)
    true_min = lrs[min(range(41), key=losses.__getitem__)]
    assert r.min_loss_lr == pytest.approx(true_min, rel=0.6)
    assert r.suggestion == pytest.approx(r.min_loss_lr / 10)
    assert 1e-4 <= r.steepest_lr <= 1e-3 and not r.warnings
    flat = LrRange(recipe="r", method="lora", start=1e-5, end=1e-1, steps=41, lrs=lrs, losses=[1 + x for x in lrs])
    read_curve(flat)  # the loss only rises: nothing is suggested, and one warning says why
    assert flat.suggestion is None and len(flat.warnings) == 1 and "fell by only 0.0%" in flat.warnings[0]
    drift = [2.0 - 0.0002 * i for i in range(41)]  # still falling at the end, but by 0.4% in all: no reading of it
    slight = LrRange(recipe="r", method="lora", start=1e-5, end=1e-1, steps=41, lrs=lrs, losses=drift)
    read_curve(slight)
    assert slight.suggestion is None and [w.split(" (")[0] for w in slight.warnings] == [
        "the smoothed loss fell by only 0.4%"]
    from tuneguard.report.lr_range import lr_range_blocks, lr_range_png

    assert lr_range_png(slight.to_dict())[:4] == b"\x89PNG"
    assert "no train.lr suggested" in lr_range_blocks(slight.to_dict())[1].lines[0][0]
    rising = LrRange(recipe="r", method="lora", start=1e-5, end=1e-1, steps=41, lrs=lrs,
                     losses=[1.5 if i in (1, 2, 3) else 2.0 + 0.01 * i for i in range(41)])  # lowest at its start
    read_curve(rising)
    assert rising.suggestion == 1e-5 and rising.warnings == [  # one line, not a second one that says it again
        "the loss hardly fell before rising: the suggestion sits at the range's start (minimum / 10 = 1.26e-06 lies "
        "below --start); try a lower --start"]
    narrow = LrRange(recipe="r", method="lora", start=1e-3, end=5e-3, steps=41, lrs=[1e-3 * 5 ** (i / 40) for i in range(41)],
                     losses=[2.0 - 0.01 * i for i in range(41)])  # still falling at --end of a range under 10x wide
    read_curve(narrow)
    assert narrow.suggestion == 1e-3 and [w.split(":")[0] for w in narrow.warnings] == [
        "the loss was still falling at --end", "minimum / 10 (0.0005) lies below --start"]


def test_lr_range_test_on_a_tiny_recipe(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_run(tmp_path, tiny_llama_dir)
    assert cli_main(["lr", str(path), "--start", "1e-5", "--end", "1", "--steps", "24", "train.batch_size=2"]) == 0
    said = capsys.readouterr()
    out = said.out + said.err
    folder = tmp_path / "runs" / "recipe-lr"
    r = json.loads((folder / "lr_range.json").read_text())
    assert 1e-5 <= r["suggestion"] <= 1 and r["suggestion"] == pytest.approx(max(r["min_loss_lr"] / 10, 1e-5))
    assert r["lrs"][0] == pytest.approx(1e-5) and len(r["lrs"]) == len(r["losses"]) == len(r["smoothed"]) <= 24
    ratios = [b / a for a, b in zip(r["lrs"], r["lrs"][1:], strict=False)]
    assert ratios == pytest.approx([(1 / 1e-5) ** (1 / 23)] * len(ratios))  # exponential growth
    assert r["batch_size"] == 2 and r["caveats"] and r["rule"] == "minimum / 10"
    assert (folder / "lr_range.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested train.lr=" in out and "caveat: A short test" in out
    assert "warning: train.lr" not in out  # the sweep goes far outside the usual range on purpose
    assert not (tmp_path / "runs" / "recipe").exists()  # the recipe's run directory is not touched
    assert not list(folder.glob(".*tmp")) and not (folder / "adapter").exists()


@pytest.mark.parametrize(("model", "why"), [("tiny_llama_dir", "value of a uniform guess"),  # bounded logits
                                             ("tiny_bert_dir", "x its lowest")])  # a classifier head's are not
def test_a_diverging_range_stops_early(tmp_path: Path, model: str, why: str, request: pytest.FixtureRequest) -> None:
    path = make_run(tmp_path, request.getfixturevalue(model))
    assert cli_main(["lr", str(path), "--start", "1e-3", "--end", "1e5", "--steps", "40"]) == 0
    r = json.loads((tmp_path / "runs" / "recipe-lr" / "lr_range.json").read_text())
    assert why in r["stopped"] and len(r["lrs"]) < 40 and r["lrs"][-1] < 1e5
    if r["suggestion"] is None:  # a random tiny model whose loss hardly fell before it diverged: said so
        assert any(w.startswith("the smoothed loss fell by only") for w in r["warnings"])
    else:
        assert r["start"] <= r["suggestion"] < r["lrs"][-1]


def test_lr_refuses_bad_ranges_and_the_run_directory(tmp_path: Path, tiny_llama_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    path = make_run(tmp_path, tiny_llama_dir)
    for args, message in [(["--start", "1e-2", "--end", "1e-3"], "need 0 < start < end"),
                          (["--steps", "3"], "at least 8 steps"),
                          (["--out", str(tmp_path / "runs" / "recipe")], "the recipe's run directory"),
                          (["--out", str(tmp_path / "train.jsonl")], "train.jsonl is a file, not a folder"),
                          (["--out", str(tmp_path / "train.jsonl" / "sub")], "train.jsonl is a file, not a folder")]:
        assert cli_main(["lr", str(path), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_range_test_never_writes_into_a_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """``--out`` naming another run would rewrite its recipe.yaml; only an empty folder or an earlier test's."""
    from tuneguard.train.lr_range import LR_JSON, lr_folder

    recipe = load_recipe(make_run(tmp_path, tiny_llama_dir))
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "recipe.yaml").write_text("model: {}\n")
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(TuneguardError, match="not an earlier range test's output"):
        lr_folder(recipe, other)
    (other / "metrics.jsonl").unlink()
    assert lr_folder(recipe, other) == other  # what a test that stopped early leaves
    (other / LR_JSON).write_text("{}")
    assert lr_folder(recipe, other) == other  # an earlier test's folder is written again
    (other / "run.json").write_text("{}")
    with pytest.raises(TuneguardError, match="holds lr_range.json, recipe.yaml, run.json"):
        lr_folder(recipe, other)
