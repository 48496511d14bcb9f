"""The native HellaSwag and WikiText against lm-evaluation-harness's own on the bundled SmolLM2, in float32.

The tiny-model checks (``tests/test_lm_eval_agreement.py``) cover every task and several windows per
page; this one runs the real tokenizer, prefix token and context length on the first WikiText article
(1,434 tokens), which keeps it under a minute on two cores. The 10 articles, with windows of up to
8,192 tokens, take about 18 minutes for both sides in float32 there and were compared by hand (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneguard.backbones import load_backbone
from tuneguard.eval.kinds import KINDS
from tuneguard.eval.scoring import max_model_length
from tuneguard.eval.tasks import TASKS
from tuneguard.recipe import ModelConfig, QuantizationConfig

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")


def test_native_tasks_agree_with_lm_eval_on_smollm2(tmp_path: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    from tuneguard.eval.lm_eval_local import local_task_config, task_manager

    backbone = load_backbone(ModelConfig(dtype="float32"), QuantizationConfig(method="none"))
    model, tok = backbone.model, backbone.tokenizer
    assert max_model_length(model, tok) == 8192 and model.dtype == torch.float32
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    sizes = {"hellaswag": 6, "wikitext": 1}
    configs = [local_task_config(name, tmp_path, limit=n) for name, n in sizes.items()]
    results = lm_eval.simple_evaluate(model=hflm, tasks=configs, log_samples=True, bootstrap_iters=0,
                                      task_manager=task_manager())
    for name, n in sizes.items():
        task = TASKS[name]
        docs = task.docs(n)
        outcomes = KINDS[task.kind].score(model, tok, task, docs, 8)
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        if name == "hellaswag":
            assert [s["doc"]["query"] for s in samples] == [d.context for d in docs]
            for sample, scores in zip(samples, outcomes, strict=True):
                assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx([s.logprob for s in scores], abs=2e-3)
        else:
            for sample, score in zip(samples, outcomes, strict=True):
                assert sample["word_perplexity"][0] == pytest.approx(-score.nll, rel=1e-6)
