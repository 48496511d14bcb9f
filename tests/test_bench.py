"""The bench harness: its arithmetic, comparisons, estimator and one real isolated run per runner kind."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tuneguard
from tuneguard.bench import measure, reference
from tuneguard.bench.ceiling import step_flops_per_token
from tuneguard.bench.matrix import adapter_overrides, matrix_row, regression_points
from tuneguard.bench.tables import train_blocks, train_summary
from tuneguard.cli import build_parser, main
from tuneguard.data.packing import Packed
from tuneguard.recipe import load_recipe
from tuneguard.train.batches import masked_batches
from tuneguard.train.memory import AdapterShape, ModelShape, estimate, estimate_recipe, mask_bytes_per_token


def test_throughput_leaves_out_warmup_and_counts_exact_tokens() -> None:
    out = measure.throughput([100, 100, 50, 50], [10.0, 1.0, 1.0, 0.5], warmup=1)
    assert out["tokens_per_s"] == round(200 / 2.5, 2) and out["measured_tokens"] == 200 and out["measured_steps"] == 3
    with pytest.raises(Exception, match="warm-up"):
        measure.throughput([1], [1.0], warmup=1)


def result(runner: str, tokens: float, peak: float, **spec: object) -> dict:
    base = {"kind": "train", "runner": runner, "quant": "nf4", "adapter": "lora", "batch": 2, "seq": 512, **spec}
    return {"spec": base, "tokens_per_s": tokens, "peak_memory_mb": peak}


def test_compare_flags_only_regressions() -> None:
    old = [result("tuneguard", 300, 2000), result("trainer", 200, 5000)]
    new = [result("tuneguard", 250, 2000), result("trainer", 230, 6000), result("sft", 1, 1)]
    changes = {(c.config.split()[1], c.metric): c for c in measure.changes_since(new, old, tolerance=0.1)}
    assert changes[("runner=tuneguard", "tokens_per_s")].regressed
    assert not changes[("runner=tuneguard", "peak_memory_mb")].regressed
    assert not changes[("runner=trainer", "tokens_per_s")].regressed  # faster is not a regression
    assert changes[("runner=trainer", "peak_memory_mb")].regressed
    assert not any("sft" in c.config for c in changes.values())  # nothing to compare with


def test_train_summary_ratios_and_targets() -> None:
    summary = train_summary([result("tuneguard", 400, 2000), result("trainer", 250, 5000), result("sft", 100, 3000)])
    row = summary[0]
    assert row["trainer_tokens_ratio"] == 1.6 and row["trainer_peak_ratio"] == 0.4 and row["meets_targets"]
    assert row["sft_tokens_ratio"] == 4.0
    assert not train_summary([result("tuneguard", 300, 2000), result("trainer", 250, 5000)])[0]["meets_targets"]
    assert "trainer_tokens_ratio_rounds" not in row  # one round: nothing to pair
    # Rounds pair by number: round 2 of the reference failed, so its rounds 1 and 3 pair with tuneguard's.
    ours = {**result("tuneguard", 300, 2000), "rounds": [1, 2, 3], "tokens_per_s_runs": [330, 300, 240]}
    theirs = {**result("trainer", 200, 5000), "rounds": [1, 3], "tokens_per_s_runs": [200, 200]}
    paired = train_summary([ours, theirs])
    assert paired[0]["trainer_tokens_ratio_rounds"] == [1.65, 1.2]
    lines = train_blocks([ours, theirs], paired)[1].lines
    assert "nf4 lora 2x512, tokens/s against trainer round by round (each pair minutes apart): 1.65x, 1.20x; the " \
           "ratio above is of the medians" in lines
    alone = train_summary([result("trainer", 250, 5000)])[0]  # references alone: no ratios, no verdict
    assert alone["tokens_per_s"] is None and "trainer_tokens_ratio" not in alone and "meets_targets" not in alone


def test_repeated_runs_keep_their_round_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--repeat``: each runner's medians, and which round each of its runs came from (a failed run leaves a gap)."""
    from tuneguard.bench import cli as bench_cli

    speeds = {"tuneguard": iter([330.0, 300.0, 240.0]), "trainer": iter([200.0, None, 200.0])}

    def fake(spec: dict, timeout: float) -> dict:
        tokens = next(speeds[spec["runner"]])
        return {"spec": spec, "error": "exit 1"} if tokens is None else {**result(spec["runner"], tokens, 1000), "spec": spec}

    monkeypatch.setattr(measure, "run_isolated", fake)
    specs = [result("tuneguard", 0, 0)["spec"], result("trainer", 0, 0)["spec"]]
    ours, theirs = bench_cli._run_all(specs, repeat=3, timeout=1)
    assert ours["tokens_per_s"] == 300 and ours["rounds"] == [1, 2, 3] and ours["tokens_per_s_runs"] == [330, 300, 240]
    assert theirs["rounds"] == [1, 3] and theirs["repeats"] == 2 and "round" not in theirs
    assert train_summary([ours, theirs])[0]["trainer_tokens_ratio_rounds"] == [1.65, 1.2]
    # A finished run without a speed leaves rounds and values of different lengths: nothing is paired.
    assert "trainer_tokens_ratio_rounds" not in train_summary([ours, {**theirs, "rounds": [1, 2, 3]}])[0]
    failed = bench_cli._median([{"spec": specs[1], "error": "exit 1", "round": r} for r in (1, 2)])
    assert failed["error"] == "exit 1" and "round" not in failed


def test_ceiling_keeps_each_shapes_best_pass(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shape timed in a slow spell of a shared host must not set the ceiling: each shape's best of the passes."""
    from tuneguard.bench import ceiling

    readings = iter([50.0, 100.0] * 6 + [100.0, 50.0] * 6 + [75.0] * 12)  # shapes alternate slow/fast, then flip
    monkeypatch.setattr(ceiling, "linear_gflops", lambda *args: next(readings))
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    out = ceiling.effective_gflops(config, 64, torch.float32, torch.device("cpu"))
    assert ceiling.ROUNDS == 3 and set(out["shapes"].values()) == {100.0} and out["gflops"] == pytest.approx(100.0)


@pytest.mark.parametrize("seq", [1, 16])
def test_ceiling_counts_the_flops_torch_counts_on_a_lora_step(tiny_llama_dir: Path, seq: int) -> None:
    """The ceiling's FLOPs per token against torch's FLOP counter on a real LoRA step (attention by plain matmuls)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = model.config
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.enable_input_require_grads()  # the formula counts the lowest layer's input gradients too
    ids = torch.randint(3, 300, (4, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    counted = counter.get_total_flops() / ids.numel()
    parts = step_flops_per_token(config, seq=seq, r=4)
    # The counter sees attention over all seq keys (the math path masks, it does not skip); the formula
    # counts the causal half: forward two products, backward four, over (seq + 1) / 2 keys on average.
    q = config.num_attention_heads * config.head_dim
    masked_out = config.num_hidden_layers * 6 * 2 * q * (seq - (seq + 1) / 2)
    assert counted == pytest.approx(parts["total"] + masked_out, rel=1e-9)


@pytest.mark.parametrize("autocast", [False, True])
def test_masked_batches_keep_what_the_estimate_adds(tiny_llama_dir: Path, autocast: bool) -> None:
    """Packed rows (position_ids restarting) make transformers build a 4-D mask; what autograd then keeps in
    addition, per token and layer, is what the estimator adds for masked batches."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    shape = ModelShape.from_config(model.config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))

    def kept_bytes(position_ids: torch.Tensor) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, position_ids=position_ids, use_cache=False)
        return sum(storages.values())

    one_document = torch.arange(32).expand(2, 32)
    two_documents = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32)
    extra = kept_bytes(two_documents) - kept_bytes(one_document)
    assert extra == ids.numel() * shape.layers * mask_bytes_per_token(shape, 32, compute_bytes=2 if autocast else 4)
    assert masked_batches([Packed([1] * 64, [1] * 64, [*range(40), *range(24)])])
    assert masked_batches([Packed([1] * 64, [1] * 64, list(range(64))), Packed([1] * 30, [1] * 30, list(range(30)))])
    assert not masked_batches([Packed([1] * 64, [1] * 64, list(range(64)))] * 2)


def test_estimate_grows_with_tokens_and_shrinks_with_checkpointing(tiny_llama_dir: Path) -> None:
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    assert shape.linear_params == linear
    adapter = AdapterShape(10_000, rank=8, per_layer=7, dropout=0.05, fused=True)

    def peak(**kw: object) -> float:
        args = {"quant": "nf4", "batch": 8, "seq": 1024, "fastpath": True, **kw}
        return estimate(shape, adapter, **args).peak_mb

    assert peak(seq=2048) > peak() > peak(seq=512)
    assert peak(fastpath=False) > peak()
    assert peak(checkpointed_layers=1) < peak()
    assert peak(quant="none", device_type="cuda") < peak(quant="none")  # no runtime RSS on CUDA


def test_estimate_recipe_builds_the_adapter_on_meta(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Sized by the widest batch the data makes (rounded up as batches are), not by data.max_length."""
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"row {i} " + "word " * 20}) + "\n" for i in range(4)))
    (tmp_path / "r.yaml").write_text(
        f"model: {{source: {tiny_llama_dir}}}\nquantization: {{method: nf4}}\n"
        "data: {kind: text, train: t.jsonl, max_length: 1024, pack: false}\ntrain: {batch_size: 2}\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    est = estimate_recipe(recipe)
    assert est.inputs["trainable_params"] > 0 and est.peak_mb == pytest.approx(sum(est.parts.values()), abs=0.5)
    assert est.inputs["seq"] == 64  # rows of ~25 tokens, padded to a multiple of 64
    assert estimate_recipe(recipe, seq=1024).parts["activations"] > 10 * est.parts["activations"]


def test_bench_estimate_command_writes_json_without_library_warnings(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The estimate applies the adapter in the command's own process: PEFT's use of transformers' deprecated
    ``is_gradient_checkpointing`` must not reach the user as a FutureWarning."""
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"row {i} " + "word " * 20}) + "\n" for i in range(4)))
    (tmp_path / "r.yaml").write_text(f"model: {{source: {tiny_llama_dir}}}\ndata: {{kind: text, train: t.jsonl}}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["bench", "estimate", str(tmp_path / "r.yaml"), "--json", str(tmp_path / "e.json")]) == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert json.loads((tmp_path / "e.json").read_text())["estimate"]["peak_mb"] > 0
    # An override after a flag is an override here too, as for train (README: anywhere on the line).
    assert main(["bench", "estimate", str(tmp_path / "r.yaml"), "--json", str(tmp_path / "e.json"), "train.batch_size=3"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["estimate"]["inputs"]["batch"] == 3


def test_bench_rows_are_exactly_seq_tokens(tmp_path: Path, tiny_llama_dir: Path) -> None:
    spec = {**reference.TRAIN_DEFAULTS, "model": str(tiny_llama_dir), "seq": 48, "batch": 2, "steps": 3,
            "workdir": str(tmp_path)}
    recipe, tokenizer = reference.bench_recipe(spec)
    ids, labels = reference._rows(recipe, tokenizer)
    assert len(ids) == 6 and all(len(r) == 48 for r in ids) and all(len(r) == 48 for r in labels)


def test_adapter_overrides_and_matrix_row(tmp_path: Path) -> None:
    assert "adapter.use_dora=true" in adapter_overrides("dora") and "adapter.method=\"lora\"" in adapter_overrides("dora")
    with pytest.raises(Exception, match="unknown"):
        adapter_overrides("nope")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 2**20)
    (tmp_path / "run.json").write_text(json.dumps({"peak_memory_mb": 1500, "tokens_per_s": 300, "trainable_params": 5}))
    general = [
        {"task": "arc", "delta": -0.02, "base": 0.5, "higher_is_better": True, "aggregate": "mean"},
        {"task": "wikitext", "delta": 0.5, "base": 20.0, "higher_is_better": False, "aggregate": "perplexity"},
    ]
    task = [{"task": "sst2", "metric": "acc", "base": 0.6, "tuned": 0.9, "delta": 0.3}]
    (tmp_path / "report.json").write_text(json.dumps({"task": task, "general": general}))
    row = matrix_row("lora", tmp_path)
    assert row["task_after"] == 0.9 and row["adapter_mb"] == 1.0 and row["general_worst_task"] == "wikitext"
    assert regression_points(general[1]) == pytest.approx(2.5)


def test_score_agreement() -> None:
    a = {"tasks": {"t": {"choices": [0, 1], "logprobs": [-1.0, -2.0]}}, "generations": ["x", "y"]}
    b = {"tasks": {"t": {"choices": [0, 1], "logprobs": [-1.001, -2.0]}}, "generations": ["x", "z"]}
    out = reference.score_agreement(a, b)
    assert out["identical_choices"] and out["max_logprob_gap"] == pytest.approx(0.001) and out["same_generation"] == 1


def test_cli_parses_the_bench_verbs() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "train", "--quant", "nf4", "none", "--adapter", "lora", "dora", "--seq-len", "256", "512"])
    assert args.quant == ["nf4", "none"] and args.seq_len == [256, 512] and args.runners == ["tuneguard", "trainer", "sft"]
    assert parser.parse_args(["bench", "eval", "--tasks", "general-small"]).tasks == ["general-small"]
    assert parser.parse_args(["bench", "matrix", "r.yaml", "--adapter", "lora", "ia3"]).adapter == ["lora", "ia3"]
    assert parser.parse_args(["bench", "estimate", "r.yaml", "train.batch_size=2"]).overrides == ["train.batch_size=2"]


@pytest.mark.parametrize("runner", ["tuneguard", "trainer"])
def test_isolated_training_run(tiny_llama_dir: Path, runner: str) -> None:
    spec = {"kind": "train", "runner": runner, "model": str(tiny_llama_dir), "quant": "none", "seq": 32, "batch": 2,
            "steps": 3, "warmup": 1, "r": 4, "alpha": 8}
    out = measure.run_isolated(spec, timeout=300)
    assert "error" not in out, out.get("error")
    assert out["tokens_per_s"] > 0 and out["measured_tokens"] == 2 * 2 * 32 and out["peak_memory_mb"] > 100
    assert out["trainable_params"] > 0 and out["environment"]["versions"]["torch"] == torch.__version__
    # tuneguard runs with its own OpenMP waiting; a reference with the runtime's defaults, as its users get it
    ours = runner == "tuneguard" or "GOMP_SPINCOUNT" not in tuneguard.OPENMP_SET
    assert out["environment"]["gomp_spincount"] == (os.environ["GOMP_SPINCOUNT"] if ours else None)
    if runner == "tuneguard":
        assert out["adapter_mb"] > 0 and out["predicted_peak_mb"] > 0
