"""``tuneguard bench lm-eval``: lm-eval's own pipeline with its HF model against the same pipeline with tuneguard's.

Both runners build their requests with lm-eval (same tasks, prompts, filters, metrics) from one
unquantized local copy of the model in the same dtype; only the model answering ``loglikelihood``
differs: lm-eval's ``HFLM`` (one row per choice) or tuneguard's (choices of one context share one pass).
Items/s counts lm-eval's whole evaluation of each task, request building included.
"""

from __future__ import annotations

import time
from typing import Any

from tuneguard.bench.measure import current_rss_mb, timed

LM_EVAL_DEFAULTS: dict[str, Any] = {
    "model": "bundled:smollm2-135m-instruct", "dtype": "float32", "limit": 40, "batch": 8, "device": "cpu",
    "tasks": ["lm_eval:arc_easy@vendored", "lm_eval:arc_challenge@vendored", "lm_eval:hellaswag@vendored",
              "lm_eval:piqa@vendored", "lm_eval:winogrande@vendored", "lm_eval:boolq@vendored"],
}


def _model(spec: dict[str, Any]) -> Any:
    """The runner's lm-eval model over the same local weights (a GGUF source is converted once, cached)."""
    from tuneguard.backbones import resolve_source
    from tuneguard.recipe import ModelConfig

    path, _ = resolve_source(ModelConfig(source=spec["model"]))
    if spec["runner"] == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=path, dtype=spec["dtype"], batch_size=spec["batch"], device=spec["device"],
                    use_safetensors=True)  # passed on to from_pretrained: never unpickle weights
    from tuneguard.lm_eval_model import TuneguardCommandLineLM

    return TuneguardCommandLineLM(pretrained=path, dtype=spec["dtype"], batch_size=spec["batch"])


def run_lm_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Every task of the spec evaluated by lm-eval with the runner's model: items/s, per-doc choices and log-likelihoods."""
    from lm_eval.evaluator import evaluate

    from tuneguard.eval.kinds import argmax
    from tuneguard.eval.lm_eval_bridge import load_lm_eval
    from tuneguard.recipe import LmEvalConfig

    spec = {**LM_EVAL_DEFAULTS, **spec}
    times: dict[str, float] = {}
    with timed(times, "load_seconds"):
        lm = _model(spec)
    tasks: dict[str, Any] = {}
    n_items, seconds = 0, 0.0
    for name_spec in spec["tasks"]:
        for name, task in load_lm_eval(name_spec, LmEvalConfig(apply_chat_template=False)).items():
            start = time.perf_counter()
            out = evaluate(lm, {"tasks": {name: task}, "groups": {}}, limit=spec["limit"], bootstrap_iters=0,
                           log_samples=True)
            elapsed = time.perf_counter() - start
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            resps = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
            tasks[name] = {"items": len(samples), "seconds": round(elapsed, 3), "requests": sum(map(len, resps)),
                           "choices": [argmax(r) for r in resps], "logprobs": [x for r in resps for x in r],
                           "acc": sum(float(s["acc"]) for s in samples) / max(len(samples), 1)}
            n_items, seconds = n_items + len(samples), seconds + elapsed
    return {"items_per_s": round(n_items / seconds, 3), "items": n_items, "seconds": round(seconds, 3), "tasks": tasks,
            "rss_after_mb": round(current_rss_mb(), 1), **times}
