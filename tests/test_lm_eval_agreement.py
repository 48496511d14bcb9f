"""Every built-in task agrees item by item with lm-evaluation-harness's own definition of it.

lm-eval's shipped task config is run over the same vendored items (``tuneguard.eval.lm_eval_local``)
with lm-eval's own Hugging Face model, and tuneguard's native task is scored on the same tiny Llama,
both in float32: the prompts, every option's log-likelihood, the per-item metrics, the summed
log-likelihood of each WikiText page and GSM8K's generations and extracted answers must agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from tuneguard.eval.kinds import KINDS  # noqa: E402
from tuneguard.eval.lm_eval_local import local_task_config, task_manager  # noqa: E402
from tuneguard.eval.records import Doc, Task  # noqa: E402
from tuneguard.eval.tasks import TASKS  # noqa: E402

MULTIPLE_CHOICE = {"arc_easy": 8, "arc_challenge": 8, "hellaswag": 8, "piqa": 8, "winogrande": 8, "boolq": 4}
"""Items per task: BoolQ's passages are longer than the tiny model's 512 positions, so both cut them."""


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def hflm(tiny: tuple[LlamaForCausalLM, PreTrainedTokenizerFast]) -> HFLM:
    """lm-eval's HF model around the same weights (given as a model, it starts no Accelerate state)."""
    model, tok = tiny
    return HFLM(pretrained=model, tokenizer=tok, batch_size=1)


def lm_eval_run(name: str, n: int, hflm: HFLM, data_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """lm-eval's logged samples for the first ``n`` vendored items (by document, then filter) and its metrics."""
    results = lm_eval.simple_evaluate(model=hflm, tasks=[local_task_config(name, data_dir, limit=n)], log_samples=True,
                                      bootstrap_iters=0, task_manager=task_manager())
    samples = sorted(results["samples"][name], key=lambda s: (s["doc_id"], s["filter"]))
    assert len({s["doc_id"] for s in samples}) == n
    return samples, results["results"][name]


def native(name: str, n: int, tiny: Any, batch_size: int = 4) -> tuple[Task, list[Doc], list[Any]]:
    model, tok = tiny
    task = TASKS[name]
    docs = task.docs(n)
    return task, docs, KINDS[task.kind].score(model, tok, task, docs, batch_size)


def per_item(task: Task, docs: list[Doc], outcomes: list[Any], tokenizer: Any, metric: str) -> list[float]:
    return KINDS[task.kind].result(replace(task, metric=metric), docs, outcomes, tokenizer).per_item


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_multiple_choice_agrees_per_item(name: str, hflm: HFLM, tiny: Any, tmp_path: Path) -> None:
    n = MULTIPLE_CHOICE[name]
    samples, _ = lm_eval_run(name, n, hflm, tmp_path)
    task, docs, outcomes = native(name, n, tiny)
    metrics = {m: per_item(task, docs, outcomes, tiny[1], m) for m in samples[0]["metrics"]}
    for i, (sample, doc, scores) in enumerate(zip(samples, docs, outcomes, strict=True)):
        assert [tuple(a) for a in sample["arguments"]] == [(c, task.delimiter + o) for c, o in doc.pairs()]
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx([s.logprob for s in scores], abs=1e-4)
        assert {m: float(sample[m]) for m in metrics} == {m: values[i] for m, values in metrics.items()}


def test_hellaswag_prompt_is_lm_evals_query(hflm: HFLM, tmp_path: Path) -> None:
    """lm-eval capitalizes ``ctx_b`` ("... on a roof. He"); the vendored text has it lower case."""
    samples, _ = lm_eval_run("hellaswag", 3, hflm, tmp_path)
    assert samples[0]["doc"]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert [s["doc"]["query"] for s in samples] == [d.context for d in TASKS["hellaswag"].docs(3)]


def test_lambada_agrees_per_item(hflm: HFLM, tiny: Any, tmp_path: Path) -> None:
    samples, _ = lm_eval_run("lambada_openai", 8, hflm, tmp_path)
    task, docs, outcomes = native("lambada_openai", 8, tiny)
    for sample, doc, [score] in zip(samples, docs, outcomes, strict=True):
        assert [tuple(a) for a in sample["arguments"]] == [(doc.context, " " + doc.choices[0])]
        assert sample["perplexity"] == pytest.approx(score.logprob, abs=1e-4)
        assert bool(sample["acc"]) is score.is_greedy


def test_wikitext_agrees_per_page(hflm: HFLM, tiny: Any, tmp_path: Path) -> None:
    """Windows of the model's full context (512 positions here, several per page), the first from BOS."""
    samples, metrics = lm_eval_run("wikitext", 2, hflm, tmp_path)
    task, docs, outcomes = native("wikitext", 2, tiny)
    for sample, doc, score in zip(samples, docs, outcomes, strict=True):
        assert sample["arguments"][0][0] == doc.text and score.n_tokens > 2 * 512
        loglikelihood, _ = sample["word_perplexity"]
        # lm-eval sums each window's log-probabilities in float32: on a page of -22,000 nats that rounds by
        # about 2e-4 (float32's spacing there), so the sums are compared to float32's relative precision.
        assert loglikelihood == pytest.approx(-score.nll, rel=1e-7)
        assert tuple(sample["bits_per_byte"]) == (loglikelihood, len(doc.raw.encode()))
    ours = KINDS[task.kind].result(task, docs, outcomes, tiny[1]).metrics
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(metrics[f"{metric},none"], rel=1e-6)


def test_gsm8k_agrees_per_item(hflm: HFLM, tiny: Any, tmp_path: Path) -> None:
    """Five shots, then the question; until "Question:" or 256 tokens; strict and flexible answers."""
    samples, _ = lm_eval_run("gsm8k", 3, hflm, tmp_path)
    task, docs, outputs = native("gsm8k", 3, tiny, batch_size=1)
    by_filter = {f.name: [s for s in samples if s["filter"] == f.name] for f in task.answer.filters}
    metrics = {f"exact_match,{name}": per_item(task, docs, outputs, tiny[1], f"exact_match,{name}")
               for name in by_filter}
    for flt in task.answer.filters:
        for i, (sample, doc, output) in enumerate(zip(by_filter[flt.name], docs, outputs, strict=True)):
            [(prompt, options)] = sample["arguments"]
            assert prompt == doc.context and options["until"] == task.until
            assert options.get("max_gen_toks", hflm.max_gen_toks) == task.max_new_tokens
            assert sample["resps"] == [[output]] and sample["filtered_resps"] == [flt.extract(output)]
            assert float(sample["exact_match"]) == metrics[f"exact_match,{flt.name}"][i]


GENERATIONS = [
    "She sells 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18",
    "so 16 - 3 - 4 = 9, and 9 * 2 = 18 dollars.",
    "The answer is $18.00.",
    "#### 1,8",
    "#### -18.\n\nand then 7",
    "It is 18",
    "no number at all",
    "1,234 and 5. and 3.",
    "#### 18 ",
]


def test_gsm8k_answers_are_scored_as_lm_eval_scores_them(tmp_path: Path) -> None:
    """tuneguard's filters and exact match against lm-eval's own filter pipelines and metric, on set outputs."""
    [lm_task] = task_manager().load([local_task_config("gsm8k", tmp_path, limit=1)])["tasks"].values()
    doc = lm_task.eval_docs[0]
    target = TASKS["gsm8k"].docs(1)[0].target
    assert lm_task.doc_to_target(doc) == target
    texts = GENERATIONS + [g.replace("18", "$18") for g in GENERATIONS]
    task = TASKS["gsm8k"]
    assert [f.name for f in task.answer.filters] == [f.name for f in lm_task._filters]
    for flt, ensemble in zip(task.answer.filters, lm_task._filters, strict=True):
        resps: list[Any] = [[text] for text in texts]
        for step in ensemble.filters:
            resps = list(step().apply(resps, [doc] * len(texts)))
        assert resps == [flt.extract(t) for t in texts]
        expected = [float(lm_task.process_results(doc, [answer])["exact_match"]) for answer in resps]
        outcomes = per_item(replace(task, metric=f"exact_match,{flt.name}"), [Doc(target=target)] * len(texts), texts,
                            None, f"exact_match,{flt.name}")
        assert outcomes == expected and 0 < sum(expected) < len(texts)


@pytest.fixture(scope="module")
def bos_tiny(tiny: tuple[LlamaForCausalLM, PreTrainedTokenizerFast]) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The same weights with a tokenizer that prepends BOS, as Llama's, Mistral's and Gemma's do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    model, tok = tiny
    bos = copy.deepcopy(tok)
    bos._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return model, bos


def test_a_tokenizer_that_prepends_bos_is_scored_as_lm_eval_scores_it(bos_tiny: Any, tmp_path: Path) -> None:
    """lm-eval 0.4 encodes contexts with the tokenizer's own special tokens; tuneguard dropped the BOS."""
    from tuneguard.eval.scoring import encode_text

    model, tok = bos_tiny
    assert encode_text(tok, "the movie")[0] == tok.bos_token_id  # the precondition: BOS is really prepended
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    samples, _ = lm_eval_run("arc_easy", 3, hflm, tmp_path / "arc")
    _, _, outcomes = native("arc_easy", 3, bos_tiny)
    for sample, scores in zip(samples, outcomes, strict=True):
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx([s.logprob for s in scores], abs=1e-4)
    samples, _ = lm_eval_run("wikitext", 1, hflm, tmp_path / "wiki")
    _, _, [page] = native("wikitext", 1, bos_tiny)
    assert samples[0]["word_perplexity"][0] == pytest.approx(-page.nll, rel=1e-7)
