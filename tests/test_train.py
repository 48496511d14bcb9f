"""Training on tiny models: every adapter method, the loop's bookkeeping, resume after SIGKILL."""

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.conftest import write_recipe_file
from tuneguard.adapters.registry import apply_adapter, load_adapter
from tuneguard.adapters.state import frozen_checksum
from tuneguard.backbones import load_backbone
from tuneguard.errors import TuneguardError
from tuneguard.eval.guards import adapter_weight_delta
from tuneguard.recipe import load_recipe
from tuneguard.train.batches import epoch_batches
from tuneguard.train.loop import train

WORDS = ["great", "wonderful", "dull", "boring"]


def make_run(tmp_path: Path, model_dir: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"the movie was {WORDS[i % 4]}", "label": int(i % 4 < 2)} for i in range(48)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"source": str(model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"kind": "classification", "train": "train.jsonl", "labels": ["negative", "positive"],
                 "prompt_template": "Review: {text}", "max_length": 64, "val_fraction": 0.25,
                 "allow_overlap": True},  # four distinct reviews, repeated
        "train": {"lr": 5e-3, "max_steps": 8, "batch_size": 4, "log_every": 1, "warmup_ratio": 0.0,
                  "scheduler": "constant"},
        "eval": {"task": False},
        "output": {"dir": str(tmp_path / "runs" / "{name}")},
    }
    return write_recipe_file(tmp_path, recipe, sections)


def run_train(path: Path, *overrides: str) -> dict:
    recipe = load_recipe(path, list(overrides))
    return train(recipe, recipe.run_dir(path))


def test_training_lowers_loss_and_writes_run_dir(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 24, "eval_every": 12})
    out = run_train(path)
    run_dir = tmp_path / "runs" / "recipe"
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    record = json.loads((run_dir / "run.json").read_text())
    for key in ("tokens_per_s", "peak_memory_mb", "trainable_params", "total_params", "wall_time_s", "seed",
                "fingerprint", "versions", "tokens_trained"):
        assert record[key], key
    assert record["trainable_params"] == out.record["trainable_params"] < record["total_params"]
    assert load_recipe(run_dir / "recipe.yaml").train.max_steps == 24
    # The saved adapter loads with plain PEFT and changes the model's outputs.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter"))(ids).logits
    assert not torch.allclose(before, tuned)
    assert not list(run_dir.glob(".*tmp"))  # no half-written leftovers


def test_logged_speed_counts_training_steps_only(tmp_path: Path, tiny_llama_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation between two logs is not training: the quickstart logged 37 tokens/s after each validation
    against ~100 around it. Here validation moves the loop's clock on by 1000 s."""
    from tuneguard.train import loop

    clock = {"offset": 0.0}
    monkeypatch.setattr(loop, "time", type("Clock", (), {"time": staticmethod(lambda: time.time() + clock["offset"])}))
    validate = loop.validate

    def slow_validate(*args: object, **kwargs: object) -> object:
        clock["offset"] += 1000.0
        return validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", slow_validate)
    run_train(make_run(tmp_path, tiny_llama_dir, train={"max_steps": 6, "eval_every": 2, "log_every": 2}))
    lines = (tmp_path / "runs/recipe/metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4, 6] and clock["offset"] == 3000.0
    tokens = [r["tokens"] for r in logged]
    seconds = [(now - before) / r["tokens_per_s"] for now, before, r in zip(tokens, [0, *tokens], logged, strict=False)]
    assert max(seconds) < 100, seconds  # windows 2 and 3 each follow a validation: they would read > 1000 s


def test_validation_trims_the_heap_and_batches_no_larger_than_training(tmp_path: Path, tiny_llama_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise validation grew glibc's heap past what training holds (see validation_loss); a smaller
    eval.batch_size stays."""
    from tuneguard.train import loop

    events: list[str | int] = []
    batches = loop.eval_batches

    def recorded(rows: list, batch_size: int, pad_id: int | None) -> object:
        events.append(batch_size)
        return batches(rows, batch_size, pad_id)

    monkeypatch.setattr(loop, "trim_heap", lambda: events.append("trim"))
    monkeypatch.setattr(loop, "eval_batches", recorded)
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 2, "eval_every": 2, "batch_size": 3})
    run_train(path)  # eval.batch_size: 8 by default
    run_train(path, "eval.batch_size=2", "output.name=small")
    assert events == ["trim", 3, "trim", 3, "trim", 2, "trim", 2]  # step 2's validation and the final one, each run


@pytest.mark.parametrize(
    "adapter",
    [
        {"method": "lora", "use_dora": True},
        {"method": "lora", "use_rslora": True},
        {"method": "lora", "init": "gaussian"},
        {"method": "lora", "target_modules": "attention", "layers_to_transform": [1]},
        {"method": "ia3"},
        {"method": "loha"},
        {"method": "lokr"},
        {"method": "adalora"},
        {"method": "prompt_tuning", "num_virtual_tokens": 4},
    ],
    ids=lambda a: "-".join(str(v) for v in a.values()),
)
def test_every_adapter_method_trains(tmp_path: Path, tiny_llama_dir: Path, adapter: dict) -> None:
    path = make_run(tmp_path, tiny_llama_dir, adapter=adapter, train={"max_steps": 3})
    out = run_train(path)
    assert out.record["steps"] == 3
    assert 0 < out.record["trainable_params"] < out.record["total_params"]
    assert (tmp_path / "runs" / "recipe" / "adapter" / "adapter_config.json").exists()
    if adapter.get("layers_to_transform"):
        names = [n for n, p in out.model.named_parameters() if p.requires_grad]
        assert names and all(".layers.1." in n and "self_attn" in n for n in names)


def test_adalora_rank_count_stays_constant_and_reloads(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # On a bf16 backbone PEFT re-creates AdaLoRA's ``ranknum`` as trainable; left so, AdamW moves it.
    path = make_run(tmp_path, tiny_llama_dir, adapter={"method": "adalora", "r": 4}, train={"max_steps": 20})
    out = run_train(path)
    model = out.model
    ranknums = {float(p) for n, p in model.named_parameters() if ".ranknum." in n}
    assert ranknums == {6.0}  # init_r for target r 4
    assert adapter_weight_delta(model).passed
    assert frozen_checksum(model) == out.checksum_at_load  # ranknum is adapter state, not backbone
    recipe = load_recipe(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT's spurious rank_pattern warning is hidden
        reloaded = load_adapter(load_backbone(recipe.model, recipe.quantization).model, tmp_path / "runs/recipe/adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        tuned, again = model(input_ids=ids).logits.float(), reloaded(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    assert (tuned - base).abs().max() > 0.05
    assert torch.allclose(tuned, again, atol=0.02)  # bf16 logits; the saved adapter is rank-pruned
    # PEFT rebuilds the layers in a bf16 backbone's dtype before loading, which rounded the saved fp32 weights.
    bf16 = recipe.model.model_copy(update={"dtype": "bfloat16"})
    reloaded = load_adapter(load_backbone(bf16, recipe.quantization).model, tmp_path / "runs/recipe/adapter")
    named = dict(reloaded.named_parameters())
    saved = load_file(str(tmp_path / "runs/recipe/adapter/adapter_model.safetensors"))
    assert all(torch.equal(named[f"{key}.default"].detach(), value) for key, value in saved.items())


def test_a_short_adalora_run_ends_at_its_target_rank(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The rank schedule is scaled to the run: 4 steps still reach the final allocation, r 4 of init_r 6 per layer
    (a 10-step floor left such runs at 6)."""
    path = make_run(tmp_path, tiny_llama_dir, adapter={"method": "adalora", "r": 4}, train={"max_steps": 4})
    run_train(path)
    config = json.loads((tmp_path / "runs/recipe/adapter/adapter_config.json").read_text())
    assert config["total_step"] == 4
    ranks = [sum(mask) for mask in config["rank_pattern"].values()]
    assert ranks and sum(ranks) == 4 * len(ranks)  # the budget: target_r per adapted layer, spread as it chose


def test_an_adalora_classifier_reloads_with_its_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The head is saved under its module's name (modules_to_save), not an AdaLoRA layer's: both come back."""
    path = make_run(tmp_path, tiny_bert_dir, adapter={"method": "adalora", "r": 4}, train={"max_steps": 3})
    run_train(path)
    recipe = load_recipe(path)
    reloaded = load_adapter(load_backbone(recipe.model, recipe.quantization, num_labels=2).model,
                            tmp_path / "runs/recipe/adapter")
    named = dict(reloaded.named_parameters())
    saved = load_file(str(tmp_path / "runs/recipe/adapter/adapter_model.safetensors"))
    heads = [key for key in saved if "lora_" not in key and "ranknum" not in key]
    assert heads and all(torch.equal(named[f"{key}.default"].detach(), value)
                         for key, value in saved.items() if key not in heads)


def test_encoder_classifier_trains_head_and_adapter(tmp_path: Path, tiny_bert_dir: Path) -> None:
    path = make_run(tmp_path, tiny_bert_dir, train={"max_steps": 20, "lr": 1e-2})
    out = run_train(path)
    trainable = [n for n, p in out.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "runs/recipe/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_encoder_trains_its_full_precision_head(tmp_path: Path, tiny_bert_dir: Path, quant: str) -> None:
    # The new classifier head stays unquantized (it trains), and a validation pass must not leave 4-bit
    # weights in bitsandbytes' inference-only layout: encoders skip the fast path, not that fix.
    path = make_run(tmp_path, tiny_bert_dir, quantization={"method": quant},
                    train={"max_steps": 24, "eval_every": 8, "lr": 1e-2})
    out = run_train(path)
    model = out.model
    head = [m for n, m in model.named_modules() if n.endswith("classifier.modules_to_save.default")]
    assert head and type(head[0]) is torch.nn.Linear and head[0].weight.requires_grad
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "runs/recipe/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


def test_layer_freezing_keeps_low_layers_fixed(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, adapter={"freeze_layers_below": 1})
    recipe = load_recipe(path)
    backbone = load_backbone(recipe.model, recipe.quantization)
    set_seed(recipe.train.seed)  # train() seeds the same way right before it applies the adapter
    initial = {n: p.detach().clone() for n, p in
               apply_adapter(backbone.model, recipe.adapter, is_encoder=False, total_steps=8).named_parameters()
               if p.requires_grad}
    trained = {n: p for n, p in run_train(path).model.named_parameters() if p.requires_grad}
    moved = {n for n in trained if not torch.equal(trained[n], initial[n])}
    assert moved and all(".layers.1." in n for n in moved)
    assert any(".layers.0." in n for n in trained)


@pytest.mark.parametrize("adapter", [{"method": "lora"}, {"method": "lora", "freeze_layers_below": 1, "unfreeze_every": 2}],
                         ids=["lora", "unfreezing"])
def test_kept_gradient_buffers_train_the_same(tmp_path: Path, tiny_llama_dir: Path, adapter: dict,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients allocated up front and zeroed in place give bit-identical weights to fresh ones every step
    (accumulation, weight decay and the unfreezing schedule's skipped layers included)."""
    import tuneguard.train.loop as loop

    sections = {"adapter": {"r": 4, "alpha": 8, **adapter}, "train": {"max_steps": 4, "grad_accum": 2, "weight_decay": 0.1}}
    kept = run_train(make_run(tmp_path / "kept", tiny_llama_dir, **sections))
    monkeypatch.setattr(loop, "keep_grad_buffers", lambda accelerator, params: False)
    fresh = run_train(make_run(tmp_path / "fresh", tiny_llama_dir, **sections))
    a = dict(kept.model.named_parameters())
    b = dict(fresh.model.named_parameters())
    trained = [n for n, p in b.items() if p.requires_grad]
    assert trained and all(torch.equal(a[n], b[n]) for n in trained)
    assert all(p.grad is not None for n, p in a.items() if p.requires_grad and ".layers.1." in n)  # kept for the run


def test_epoch_batches_split_processes_and_reshuffle() -> None:
    a = epoch_batches(10, 3, seed=1, epoch=0, rank=0, world=2)
    b = epoch_batches(10, 3, seed=1, epoch=0, rank=1, world=2)
    seen = [i for batch in a + b for i in batch]
    assert len(a) == len(b) and set(seen) == set(range(10))
    assert epoch_batches(10, 3, 1, 1, 0, 1) != epoch_batches(10, 3, 1, 0, 0, 1)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    common = {"max_steps": 60, "save_every": 15, "eval_every": 20, "log_every": 5}
    full = make_run(tmp_path / "full", tiny_llama_dir, train=common, adapter={"dropout": 0.1})
    run_train(full)
    expected = (tmp_path / "full/runs/recipe/metrics.jsonl").read_text().splitlines()

    path = make_run(tmp_path / "killed", tiny_llama_dir, train=common, adapter={"dropout": 0.1})
    run_dir = tmp_path / "killed/runs/recipe"
    cmd = [sys.executable, "-m", "tuneguard.run", str(path), "--no-eval"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints/step-15/train_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "run.json").exists()
    subprocess.run([*cmd, "--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = (run_dir / "metrics.jsonl").read_text().splitlines()

    def losses(lines: list[str]) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, lines)]

    assert [s for s, *_ in losses(got)] == [s for s, *_ in losses(expected)]
    for (_, a, va), (_, b, vb) in zip(losses(got), losses(expected), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) if a is not None else va == pytest.approx(vb, rel=1e-5)


def test_tensorboard_tracker_receives_metrics(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 3, "trackers": ["tensorboard"]})
    run_train(path)
    events = list((tmp_path / "runs" / "recipe").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_checkpoint_is_restored_only_from_safetensors_and_a_readable_random_state(
        tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Accelerate would load a pickled ``pytorch_model.bin`` in place of the adapter's safetensors, resume with
    fresh random state when its RNG file does not load (dropout masks and batches then differ, silently), and
    leave untrained any weight the state lacks (strict=False)."""
    import shutil

    from tuneguard.train.checkpoints import check_checkpoint

    run_train(make_run(tmp_path, tiny_llama_dir, train={"max_steps": 3, "save_every": 2}))
    saved = tmp_path / "runs/recipe/checkpoints/step-2"
    trainable = set(load_file(str(saved / "model.safetensors")))
    assert len(trainable) == 28 and all("lora_" in k for k in trainable)  # the adapter alone
    check_checkpoint(saved, 0, trainable)  # what save_checkpoint writes passes
    capsys.readouterr()
    check_checkpoint(saved, 1, trainable, sharded=False)  # an earlier version's process 1 had no file: a warning
    assert "holds no random state of process 1" in capsys.readouterr().err
    pickled = shutil.copytree(saved, tmp_path / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(TuneguardError, match="no model.safetensors"):
        check_checkpoint(pickled, 0, trainable)
    broken = shutil.copytree(saved, tmp_path / "broken")
    (broken / "random_states_0.pkl").write_bytes(b"not a random state")
    with pytest.raises(TuneguardError, match="random_states_0.pkl: the random state cannot be restored"):
        check_checkpoint(broken, 0, trainable)
    empty = shutil.copytree(saved, tmp_path / "empty")  # what a multi-process run of an earlier version saved
    save_file({}, str(empty / "model.safetensors"))
    with pytest.raises(TuneguardError, match="model.safetensors lacks 28 of the adapter's 28 trained weights"):
        check_checkpoint(empty, 0, trainable)


def test_an_epoch_trains_each_row_once_whatever_the_accumulation(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A step never reaches into the next epoch (the last one takes what is left), so ``epochs: 2`` with
    gradient accumulation trains every row twice, and a resumed stream goes on where the killed one was."""
    from tuneguard.rundir import RunDir
    from tuneguard.train.batches import planned_steps, step_windows
    from tuneguard.train.loop import setup

    path = make_run(tmp_path, tiny_llama_dir, data={"pack": False},
                    train={"max_steps": None, "epochs": 2, "batch_size": 4, "grad_accum": 4})
    recipe = load_recipe(path)
    s = setup(recipe, RunDir(recipe.run_dir(path)))
    steps, per_epoch = planned_steps(recipe, len(s.data.train), 1)
    assert per_epoch % 4 and steps == 2 * -(-per_epoch // 4)  # 9 micro-batches an epoch: steps of 4, 4 and 1
    windows = [next(w) for w in [step_windows(s.data, recipe, 0, 1, s.pad_id)] for _ in range(steps)]
    sizes = [len(w) for w in windows]
    assert sizes == ([4] * (per_epoch // 4) + [per_epoch % 4]) * 2
    rows = [tuple(b["input_ids"][i].tolist()) for w in windows for b, _ in w for i in range(len(b["input_ids"]))]
    first = sorted(rows[: len(rows) // 2])
    assert first == sorted(rows[len(rows) // 2:]) and len(first) == len(s.data.train)  # each row once an epoch
    resumed = step_windows(s.data, recipe, 0, 1, s.pad_id, start=3)
    for window in windows[3:]:
        assert [torch.equal(a["input_ids"], b["input_ids"]) for (a, _), (b, _) in zip(window, next(resumed),
                                                                                      strict=True)] == [True] * len(window)


def test_adalora_resumes_to_the_ranks_an_uninterrupted_run_keeps(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The rank allocator's importance averages live outside the parameters and the optimizer: a checkpoint keeps
    them, so a resumed run prunes the same singular values (before, 12 of 42 tensors ended another shape)."""
    import shutil

    sections = {"adapter": {"method": "adalora", "dropout": 0.0}, "train": {"max_steps": 20, "save_every": 8}}
    path = make_run(tmp_path, tiny_llama_dir, **sections)
    whole, resumed = tmp_path / "runs/whole", tmp_path / "runs/resumed"
    for name in ("whole", "resumed"):
        run_train(path, f"output.name={name}")
    for name in ("adapter", "run.json", "checkpoints/step-16"):  # as if killed after the step-8 checkpoint
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    state = load_file(str(resumed / "checkpoints/step-8/method_state.safetensors"))
    assert any(k.startswith("exp_avg_ipt/") for k in state) and any(k.startswith("rank_pattern/") for k in state)
    train(load_recipe(path, ["output.name=resumed"]), resumed, resume=True)
    config = [json.loads((d / "adapter/adapter_config.json").read_text())["rank_pattern"] for d in (whole, resumed)]
    assert config[0] and config[0] == config[1]
    expected, got = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (whole, resumed))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
