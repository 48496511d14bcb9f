"""The workloads a bench process runs: tuneguard, and the usual ways to do the same job without it.

Training: the same backbone, rows, adapter (dropout included), batch and steps for every runner.
The rows are whole ``seq``-token windows of general text (no padding anywhere), built through
tuneguard's own data stage so that every runner gets token-for-token the same batches.

* ``tuneguard``: ``tuneguard.train.loop.train`` on a generated recipe (fast path per ``spec["fastpath"]``).
* ``trainer``: ``transformers.Trainer`` + PEFT at default settings; quantized backbones go through
  ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)``.
* ``trainer+gc``: the same with ``prepare_model_for_kbit_training``'s own default (checkpointing on).
* ``sft``: TRL ``SFTTrainer`` with its defaults (bf16 autocast, gradient checkpointing) and ``peft_config``.

Each bench process is ``python -m tuneguard.bench.reference SPEC OUT`` (started by ``measure.run_isolated``).

Evaluation: ``tuneguard`` scores tasks with the shared-context scorer; ``per-choice`` runs one
forward pass per (context, choice) pair, batched longest first, as lm-evaluation-harness does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tuneguard.bench.lm_eval_runs import run_lm_eval
from tuneguard.bench.measure import (
    SCHEMA,
    current_rss_mb,
    dir_size_mb,
    environment,
    throughput,
    timed,
)
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.provenance import peak_memory
from tuneguard.recipe import Recipe, validate
from tuneguard.rundir import RunDir

ADAPTERS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "dora": {"method": "lora", "use_dora": True},
    "rslora": {"method": "lora", "use_rslora": True},
    "ia3": {"method": "ia3"},
    "loha": {"method": "loha"},
    "lokr": {"method": "lokr"},
    "adalora": {"method": "adalora"},
}
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "bundled:smollm2-135m-instruct", "quant": "nf4", "adapter": "lora", "r": 16, "alpha": 32,
    "dropout": 0.05, "batch": 2, "seq": 512, "steps": 10, "warmup": 2, "lr": 2e-4, "seed": 0, "fastpath": True,
    "device": "cpu",
}
TEXT_SOURCE = Path(__file__).resolve().parent.parent / "data" / "replay" / "wiki_passages.jsonl"


def adapter_section(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["adapter"] not in ADAPTERS:
        raise ValueError(f"unknown adapter '{spec['adapter']}'; choose from {sorted(ADAPTERS)}")
    return {**ADAPTERS[spec["adapter"]], "r": spec["r"], "alpha": spec["alpha"], "dropout": spec["dropout"],
            "target_modules": "all-linear"}


def _recipe(spec: dict[str, Any], train_path: Path) -> Recipe:
    return validate({
        "model": {"source": spec["model"]},
        "quantization": {"method": spec["quant"]},
        "adapter": adapter_section(spec),
        "data": {"kind": "text", "train": str(train_path), "val_fraction": 0.0, "max_length": spec["seq"], "pack": True},
        "train": {"lr": spec["lr"], "max_steps": spec["steps"], "batch_size": spec["batch"], "log_every": 1,
                  "warmup_ratio": 0.0, "scheduler": "constant", "seed": spec["seed"], "max_grad_norm": 1.0},
        "eval": {"task": False, "suites": []},
        "output": {"dir": str(Path(spec["workdir"]) / "runs" / "{name}"), "name": "bench"},
    }, "bench")


def exact_length_texts(tokenizer: Any, recipe: Recipe, n: int) -> list[str]:
    """``n`` texts that tuneguard's text pipeline turns into exactly ``max_length`` tokens each."""
    from tuneguard.data.examples import text_examples

    seq, cfg = recipe.data.max_length, recipe.data
    passages = [json.loads(line)["text"] for line in TEXT_SOURCE.read_text().splitlines() if line.strip()]

    def windows(text: str) -> list[int]:
        return [len(e.input_ids) for e in text_examples(Row("bench", {"text": text}), cfg, tokenizer)] if text.strip() else [0]

    def full(text: str) -> int:
        return sum(windows(text))

    texts, i = [], 0
    while len(texts) < n:
        doc = ""
        while full(doc) <= seq + 8:
            doc = f"{doc}\n\n{passages[i % len(passages)]}".strip()
            i += 1
        lo, hi = 1, len(doc)  # the shortest prefix with seq tokens
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if full(doc[:mid]) < seq else (lo, mid)
        for cut in range(lo, min(lo + 16, len(doc) + 1)):
            if windows(doc[:cut]) == [seq]:
                texts.append(doc[:cut])
                break
    return texts


def bench_recipe(spec: dict[str, Any]) -> tuple[Recipe, Any]:
    """The recipe every runner's rows come from (its data file written to the work dir), and the tokenizer."""
    from transformers import AutoTokenizer

    from tuneguard.backbones import resolve_source

    workdir = Path(spec["workdir"])
    path = workdir / "bench-train.jsonl"
    recipe = _recipe(spec, path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(recipe.model)[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = exact_length_texts(tokenizer, recipe, spec["batch"] * spec["steps"])
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return recipe, tokenizer


def _rows(recipe: Recipe, tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    from tuneguard.data.prepare import prepare_data

    data = prepare_data(recipe.data, tokenizer, is_encoder=False, seed=recipe.train.seed)
    seq = recipe.data.max_length
    if any(len(r.input_ids) != seq for r in data.train):
        raise RuntimeError("bench rows are not all exactly seq tokens long")
    return [r.input_ids for r in data.train], [r.labels for r in data.train]


def _counts(model: torch.nn.Module) -> dict[str, int]:
    from tuneguard.adapters.registry import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total}


# ------------------------------------------------------------------------------------- training


def train_tuneguard(spec: dict[str, Any]) -> dict[str, Any]:
    from tuneguard.train import loop as train_module
    from tuneguard.train.fastpath import ENV_FLAG
    from tuneguard.train.memory import estimate_recipe

    spec = {**TRAIN_DEFAULTS, **spec}
    os.environ[ENV_FLAG] = "1" if spec["fastpath"] else "0"
    recipe, _ = bench_recipe(spec)
    predicted = estimate_recipe(recipe, fastpath=spec["fastpath"])
    times: dict[str, float] = {}
    load = train_module.load_backbone

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        with timed(times, "load_seconds"):
            return load(*args, **kwargs)

    train_module.load_backbone = timed_load
    out = train_module.train(recipe, recipe.run_dir())
    run = RunDir(recipe.run_dir())
    steps = [s for s in run.read_metrics() if "tokens_per_s" in s]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *steps[:-1]], steps, strict=True)]
    seconds = [t / s["tokens_per_s"] for t, s in zip(tokens, steps, strict=True)]
    record = out.record
    return {
        **throughput(tokens, seconds, spec["warmup"]),
        "load_seconds": times.get("load_seconds"),
        "trainable_params": record["trainable_params"],
        "total_params": record["total_params"],
        "adapter_mb": dir_size_mb(run.adapter),
        "mean_loss": round(statistics.fmean(s["loss"] for s in steps), 6),
        "predicted_peak_mb": predicted.peak_mb,
        "predicted": predicted.to_dict(),
        "mixed_precision": record["mixed_precision"],
    }


class _StepTimer:
    """A TrainerCallback (duck-typed, built lazily) timing each optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer.start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timer.seconds.append(time.perf_counter() - timer.start)

        self.start = 0.0
        self.seconds: list[float] = []
        self.callback = Callback()


def _reference_model(spec: dict[str, Any], recipe: Recipe, *, kbit_prepare: bool) -> tuple[Any, Any, dict[str, float]]:
    """The backbone as a user loads it: same weights, quantization config and dtype as tuneguard's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneguard.backbones import quantization_config, resolve_source
    from tuneguard.numerics import resolve_dtype

    device = torch.device(spec["device"])
    times: dict[str, float] = {}
    with timed(times, "load_seconds"):
        source = resolve_source(recipe.model)[0]
        tokenizer = AutoTokenizer.from_pretrained(source)
        quant = quantization_config(recipe.quantization, device)
        kwargs: dict[str, Any] = {"dtype": torch.float32 if quant else resolve_dtype(recipe.model.dtype, device),
                                  "use_safetensors": True}  # as tuneguard loads it: never unpickle weights
        if quant:
            kwargs.update(quantization_config=quant, device_map={"": spec["device"]})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if quant and kbit_prepare:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["runner"] == "trainer+gc")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, times


def _peft_config(spec: dict[str, Any], recipe: Recipe, model: Any) -> Any:
    from peft import TaskType

    from tuneguard.adapters.registry import peft_config

    return peft_config(recipe.adapter, model, TaskType.CAUSAL_LM, spec["steps"])


def _trainer_arguments(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The settings both Trainer-based references share: tuneguard's batch, steps, lr, constant schedule
    and clipping, and otherwise the defaults."""
    return dict(
        output_dir=str(Path(spec["workdir"]) / name), per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", max_grad_norm=1.0,
        save_strategy="no", report_to="none", seed=spec["seed"], use_cpu=spec["device"] == "cpu", disable_tqdm=True,
    )


def _trainer_result(
    spec: dict[str, Any], timer: _StepTimer, result: Any, times: dict[str, float], model: torch.nn.Module
) -> dict[str, Any]:
    """Throughput from the timed steps (every row is exactly ``seq`` tokens) and Trainer's mean loss."""
    tokens = [spec["batch"] * spec["seq"]] * len(timer.seconds)
    return {**throughput(tokens, timer.seconds, spec["warmup"]), **times, **_counts(model),
            "mean_loss": round(float(result.training_loss), 6)}


def train_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    spec = {**TRAIN_DEFAULTS, **spec}
    recipe, _ = bench_recipe(spec)
    model, tokenizer, times = _reference_model(spec, recipe, kbit_prepare=True)
    with timed(times, "adapter_seconds"):
        model = get_peft_model(model, _peft_config(spec, recipe, model))
    ids, labels = _rows(recipe, tokenizer)
    timer = _StepTimer()
    args = TrainingArguments(**_trainer_arguments(spec, "trainer"))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
                      callbacks=[timer.callback])
    return _trainer_result(spec, timer, trainer.train(), times, model)


def train_sft(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    spec = {**TRAIN_DEFAULTS, **spec}
    recipe, _ = bench_recipe(spec)
    model, tokenizer, times = _reference_model(spec, recipe, kbit_prepare=False)
    ids, labels = _rows(recipe, tokenizer)
    timer = _StepTimer()
    args = SFTConfig(**_trainer_arguments(spec, "sft"), max_length=spec["seq"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
                         processing_class=tokenizer, peft_config=_peft_config(spec, recipe, model),
                         callbacks=[timer.callback])
    return _trainer_result(spec, timer, trainer.train(), times, trainer.model)


# ----------------------------------------------------------------------------------- evaluation

EVAL_DEFAULTS: dict[str, Any] = {
    "model": "bundled:smollm2-135m-instruct", "quant": "nf4", "tasks": ["general-small"], "limit": 40,
    "batch": 8, "device": "cpu", "generation_items": 16,
}
SCORED_KINDS = ("multiple_choice", "classification", "loglikelihood")


def _eval_model(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, float]]:
    from tuneguard.backbones import load_backbone
    from tuneguard.recipe import ModelConfig, QuantizationConfig

    times: dict[str, float] = {}
    with timed(times, "load_seconds"):
        backbone = load_backbone(ModelConfig(source=spec["model"]), QuantizationConfig(method=spec["quant"]),
                                 device=torch.device(spec["device"]))
    return backbone.model.eval(), backbone.tokenizer, times


def _encode(tokenizer: Any, context: Any, continuation: Any, delimiter: str) -> tuple[list[int], list[int]]:
    """A request's token ids, split as the harness splits them (text through ``encode_pair``)."""
    from tuneguard.eval.scoring import encode_pair

    if isinstance(context, str):
        return encode_pair(tokenizer, context, delimiter + continuation)
    return list(context), list(continuation)


def _eval_requests(spec: dict[str, Any], tokenizer: Any) -> list[tuple[str, list[tuple[list[int], list[int]]], list[int]]]:
    """Per scored task: its name, every (context, continuation) request, and the doc each belongs to."""
    from tuneguard.eval.suites import get_tasks

    out = []
    for task in get_tasks(spec["tasks"]):
        if task.kind not in SCORED_KINDS:
            continue
        requests, owner = [], []
        for i, doc in enumerate(task.docs(spec["limit"])):
            for context, continuation in doc.pairs():
                requests.append(_encode(tokenizer, context, continuation, task.delimiter))
                owner.append(i)
        out.append((task.name, requests, owner))
    return out


def _choices(logprobs: Sequence[float], owner: Sequence[int]) -> list[int]:
    """The argmax option of every doc (first maximum wins, as in lm-evaluation-harness)."""
    best: dict[int, tuple[float, int]] = {}
    counts: dict[int, int] = {}
    for lp, doc in zip(logprobs, owner, strict=True):
        k = counts.get(doc, 0)
        counts[doc] = k + 1
        if doc not in best or lp > best[doc][0]:
            best[doc] = (lp, k)
    return [best[d][1] for d in sorted(best)]


def _generation_contexts(spec: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    from tuneguard.eval.suites import get_tasks

    docs = get_tasks(["lambada_openai"])[0].docs(spec["generation_items"])
    return [tokenizer(str(d.context), add_special_tokens=False)["input_ids"] for d in docs]


def _timed_choices(
    spec: dict[str, Any], tokenizer: Any, score: Callable[[list[tuple[list[int], list[int]]]], list[float]]
) -> tuple[dict[str, Any], int, float]:
    """Each task's requests scored by ``score`` (log-probabilities) and timed: per-task results, items, seconds."""
    tasks, n_items, seconds = {}, 0, 0.0
    for name, requests, owner in _eval_requests(spec, tokenizer):
        start = time.perf_counter()
        logprobs = score(requests)
        elapsed = time.perf_counter() - start
        tasks[name] = {"items": len(set(owner)), "requests": len(requests), "seconds": round(elapsed, 3),
                       "logprobs": logprobs, "choices": _choices(logprobs, owner)}
        n_items, seconds = n_items + len(set(owner)), seconds + elapsed
    return tasks, n_items, seconds


def eval_tuneguard(spec: dict[str, Any]) -> dict[str, Any]:
    from tuneguard.backbones import dequantized
    from tuneguard.eval.scoring import generate_until, loglikelihood

    spec = {**EVAL_DEFAULTS, **spec}
    model, tokenizer, times = _eval_model(spec)
    with dequantized(model) as held:
        tasks, n_items, seconds = _timed_choices(
            spec, tokenizer, lambda requests: [s.logprob for s in loglikelihood(model, requests, spec["batch"])]
        )
        contexts = _generation_contexts(spec, tokenizer)
        start = time.perf_counter()
        generations = generate_until(model, tokenizer, contexts, ["\n"], max_new_tokens=16, batch_size=spec["batch"])
        gen_seconds = time.perf_counter() - start
    return {"decoded_weights_mb": round(held / 2**20, 1),"items_per_s": round(n_items / seconds, 3), "items": n_items, "seconds": round(seconds, 3), "tasks": tasks,
            "generation_items_per_s": round(len(contexts) / gen_seconds, 3), "generations": generations,
            "rss_after_mb": round(current_rss_mb(), 1), **times}


def _per_choice_logprobs(model: Any, requests: list[tuple[list[int], list[int]]], batch: int, max_length: int) -> list[float]:
    """lm-evaluation-harness's loop: one row per request, longest first, right-padded, log-softmax at the continuation."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out = [0.0] * len(requests)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            rows = [(list(requests[i][0]) + list(requests[i][1]))[-(max_length + 1):][:-1] for i in chunk]
            width = max(map(len, rows))
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for b, i in enumerate(chunk):
                cont = requests[i][1]
                end = len(rows[b])
                picked = logp[b, end - len(cont) : end].gather(1, torch.tensor(cont, device=device)[:, None])
                out[i] = float(picked.sum())
    return out


def eval_per_choice(spec: dict[str, Any]) -> dict[str, Any]:
    from tuneguard.eval.scoring import max_model_length

    spec = {**EVAL_DEFAULTS, **spec}
    model, tokenizer, times = _eval_model(spec)
    tasks, n_items, seconds = _timed_choices(
        spec, tokenizer, lambda requests: _per_choice_logprobs(model, requests, spec["batch"], max_model_length(model))
    )
    contexts = _generation_contexts(spec, tokenizer)
    start = time.perf_counter()
    generations = []
    with torch.inference_mode():
        for ctx in contexts:
            ids = torch.tensor([ctx])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, len(ctx):], skip_special_tokens=True)
            generations.append(text.split("\n")[0])
    gen_seconds = time.perf_counter() - start
    return {"items_per_s": round(n_items / seconds, 3), "items": n_items, "seconds": round(seconds, 3), "tasks": tasks,
            "generation_items_per_s": round(len(contexts) / gen_seconds, 3), "generations": generations,
            "rss_after_mb": round(current_rss_mb(), 1), **times}


def score_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far two eval results' scores are apart: same argmax per doc, and the largest log-prob gap."""
    same, total, gap = 0, 0, 0.0
    for name, ta in a.get("tasks", {}).items():
        tb = b.get("tasks", {}).get(name)
        if tb is None:
            continue
        same += sum(x == y for x, y in zip(ta["choices"], tb["choices"], strict=True))
        total += len(ta["choices"])
        gap = max(gap, max((abs(x - y) for x, y in zip(ta["logprobs"], tb["logprobs"], strict=True)), default=0.0))
    gens = list(zip(a.get("generations", []), b.get("generations", []), strict=True))
    return {"same_choice": same, "docs": total, "identical_choices": same == total,
            "max_logprob_gap": round(gap, 4) if math.isfinite(gap) else None,
            "same_generation": sum(x == y for x, y in gens), "generations": len(gens)}


# ----------------------------------------------------------------------------------- the process


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    runners = {
        ("train", "tuneguard"): train_tuneguard,
        ("train", "trainer"): train_trainer,
        ("train", "trainer+gc"): train_trainer,
        ("train", "sft"): train_sft,
        ("eval", "tuneguard"): eval_tuneguard,
        ("eval", "per-choice"): eval_per_choice,
        ("lm-eval", "hf"): run_lm_eval,
        ("lm-eval", "tuneguard"): run_lm_eval,
    }
    key = (spec["kind"], spec["runner"])
    if key not in runners:
        raise TuneguardError(f"unknown bench runner {key}")
    Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
    result = runners[key](spec)
    device = spec.get("device", "cpu")
    return {"schema": SCHEMA, "spec": spec, **result, **peak_memory(device), "environment": environment(device)}


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    result = _worker(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
