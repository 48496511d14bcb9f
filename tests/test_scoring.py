"""The scoring engine against direct computations from full logits on the tiny models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import BertForSequenceClassification, LlamaForCausalLM, PreTrainedTokenizerFast

from tuneguard.eval import scoring
from tuneguard.eval.harness import general_text_loss
from tuneguard.eval.scoring import (
    encode_pair,
    generate_until,
    head_logits,
    loglikelihood,
    max_model_length,
    rolling_loglikelihood,
    rolling_windows,
    split_head,
)
from tuneguard.eval.tasks import wikitext_detokenize, wikitext_text

ITEMS = [
    ("the movie was", [" great", " boring film", " a dull , boring film with nothing to say"]),
    ("what is two plus two ?", [" four", " the answer is four"]),
    ("question", [" answer"]),
    ("a dull , boring film with nothing to say because", [" positive", " negative", " world sports"]),
]


def _requests(tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, ctx, ch) for ctx, choices in ITEMS for ch in choices]


def _direct(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Log-likelihood and greediness of ``cont`` from the full logits of one unpadded sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    # init_lora_weights=False makes B non-zero, so the adapter really changes the scores.
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).eval()


def test_encode_pair_moves_trailing_spaces(tokenizer: PreTrainedTokenizerFast) -> None:
    assert encode_pair(tokenizer, "the answer is ", "four") == encode_pair(tokenizer, "the answer is", " four")
    ctx, cont = encode_pair(tokenizer, "", "the movie")
    assert ctx == [tokenizer.bos_token_id] and tokenizer.decode(cont) == "the movie"


def test_loglikelihood_equals_full_logits(tiny_llama) -> None:
    model, tok = tiny_llama
    requests = _requests(tok)
    # A continuation that is greedy by construction: the model's own argmax tokens.
    ctx = tok("the movie was", add_special_tokens=False)["input_ids"]
    greedy = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, len(ctx):].tolist()
    requests.append((ctx, greedy))
    scores = loglikelihood(model, requests, batch_size=3)
    for (c, k), score in zip(requests, scores, strict=True):
        logprob, is_greedy = _direct(model, c, k)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.is_greedy == is_greedy and score.n_tokens == len(k)
    assert scores[-1].is_greedy


@pytest.mark.parametrize("adapter", ["none", "lora", "lora-disabled"])
def test_shared_context_batching_equals_one_by_one(tiny_llama, adapter: str) -> None:
    model, tok = tiny_llama
    requests = _requests(tok)
    base = loglikelihood(model, requests, batch_size=1) if adapter == "lora-disabled" else None
    if adapter != "none":
        model = _lora(model)
    if adapter == "lora-disabled":
        with model.disable_adapter():
            packed = loglikelihood(model, requests, batch_size=4)
            single = [loglikelihood(model, [r], batch_size=1)[0] for r in requests]
        assert [s.logprob for s in packed] == pytest.approx([s.logprob for s in base], abs=1e-4)
    else:
        packed = loglikelihood(model, requests, batch_size=4)
        single = [loglikelihood(model, [r], batch_size=1)[0] for r in requests]
        direct = [_direct(model, c, k)[0] for c, k in requests]
        assert [s.logprob for s in packed] == pytest.approx(direct, abs=1e-4)
    assert [s.logprob for s in packed] == pytest.approx([s.logprob for s in single], abs=1e-4)
    assert [s.is_greedy for s in packed] == [s.is_greedy for s in single]


def test_batches_do_not_pad_short_rows_to_a_long_one() -> None:
    """Longest first, at most batch_size rows, none padded below MIN_FILL of its batch's width; and one long row
    (PIQA's) no longer makes seven short ones pay its length."""
    lengths = [231, 120, 110, 104, 100, 98, 96, 90, 88, 60, 59, 30, 12, 11]
    rows = [scoring._Row(list(range(n)), [i], [list(range(n))], [[0]]) for i, n in enumerate(lengths)]
    batches = scoring._batches(rows, 4)
    assert [len(r) for b in batches for r in b] == lengths
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert all(len(r) >= scoring.MIN_FILL * len(batch[0]) for r in batch)
    padded = sum(len(b) * len(b[0]) for b in batches)
    by_count = sum(len(rows[i : i + 4]) * lengths[i] for i in range(0, len(rows), 4))
    assert sum(lengths) <= padded < by_count
    assert [len(b) for b in batches][:2] == [1, 4]  # the 231-token row alone, then four rows of 100-120


def test_prefixes_beyond_the_context_are_shared_exactly(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Choices that begin alike (PIQA) and contexts that differ after a common start (WinoGrande) share a row."""
    model, tok = tiny_llama
    start = "the movie was great and the acting was wonderful because the"
    requests = [
        encode_pair(tok, "question answer", " the movie was great and the acting was wonderful"),
        encode_pair(tok, "question answer", " the movie was great and the acting was boring"),
        encode_pair(tok, start + " movie", " was great"),
        encode_pair(tok, start + " acting", " was great"),
        encode_pair(tok, "what is two plus two ?", " four"),
    ]
    rows = scoring._pack(requests, 64)
    assert sorted(len(r.requests) for r in rows) == [1, 2, 2]
    assert all(len(r.prefix) >= scoring.MIN_SHARED for r in rows if len(r.requests) > 1)
    packed = loglikelihood(model, requests, batch_size=2)
    assert [s.logprob for s in packed] == pytest.approx([_direct(model, c, k)[0] for c, k in requests], abs=1e-4)
    assert [s.is_greedy for s in packed] == [_direct(model, c, k)[1] for c, k in requests]
    monkeypatch.setattr(scoring, "MIN_SHARED", 10_000)  # only a same context shares: the same scores
    assert sorted(len(r.requests) for r in scoring._pack(requests, 64)) == [1, 1, 1, 2]
    alone = loglikelihood(model, requests, batch_size=2)
    assert [s.logprob for s in alone] == pytest.approx([s.logprob for s in packed], abs=1e-4)


def test_lora_changes_scores(tiny_llama) -> None:
    model, tok = tiny_llama
    requests = _requests(tok)[:3]
    base = loglikelihood(model, requests)
    tuned = loglikelihood(_lora(model), requests)
    assert all(abs(a.logprob - b.logprob) > 1e-3 for a, b in zip(base, tuned, strict=True))


def test_prompt_tuning_scores_include_the_soft_prompt(tiny_llama) -> None:
    model, tok = tiny_llama
    torch.manual_seed(2)
    peft = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)).eval()
    requests = _requests(tok)
    packed = loglikelihood(peft, requests, batch_size=4)
    for (c, k), score in zip(requests, packed, strict=True):
        with torch.no_grad():
            logits = peft(input_ids=torch.tensor([c + k])).logits[0, 3:]  # drop the virtual positions
        logp = torch.log_softmax(logits.double(), -1)[len(c) - 1 : len(c) + len(k) - 1]
        assert score.logprob == pytest.approx(float(logp.gather(1, torch.tensor(k)[:, None]).sum()), abs=1e-4)
    with peft.disable_adapter():
        assert [s.logprob for s in loglikelihood(peft, requests)] == pytest.approx(
            [_direct(model, c, k)[0] for c, k in requests], abs=1e-4
        )


def test_long_contexts_are_left_truncated(tiny_llama) -> None:
    model, tok = tiny_llama
    ctx, cont = encode_pair(tok, "the movie was great and the acting was wonderful " * 3, " positive negative")
    score = loglikelihood(model, [(ctx, cont)], max_length=12)[0]
    kept = ctx[-(12 - len(cont) + 1):]
    assert score.logprob == pytest.approx(_direct(model, kept, cont)[0], abs=1e-4)


def test_rolling_windows_cover_every_token_once() -> None:
    tokens = list(range(100, 123))
    for max_length, context_len in [(5, 1), (5, 3), (8, 8), (30, 1)]:
        windows = rolling_windows(tokens, 0, max_length, context_len)
        assert [t for _, pred in windows for t in pred] == tokens
        for ctx, pred in windows:
            assert len(ctx) + len(pred) - 1 <= max_length and ctx
        for (ctx, _), (_, prev) in zip(windows[1:], windows, strict=False):
            assert len(ctx) >= min(context_len, len(tokens)) and ctx[-1] == prev[-1]


def test_rolling_loglikelihood_equals_direct(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_llama
    texts = ["the movie was great and the acting was wonderful . what is two plus two ? the answer is four", "a dull film"]
    # Windows are the model's whole context by default; logits are projected a few positions at a time.
    assert max_model_length(model, tok) == 512
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 5)
    whole = rolling_loglikelihood(model, tok, texts)
    for text, score in zip(texts, whole, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert score.n_tokens == len(ids) and score.n_bytes == len(text.encode())
        assert -score.nll == pytest.approx(_direct(model, [tok.bos_token_id], ids)[0], abs=1e-4)
    # Small windows: each window is an independent forward pass over its own context.
    windowed = rolling_loglikelihood(model, tok, texts[:1], max_length=8, context_len=4)[0]
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    expected = sum(_direct(model, c, p)[0] for c, p in rolling_windows(ids, tok.bos_token_id, 8, 4))
    assert -windowed.nll == pytest.approx(expected, abs=1e-4)


class HalvedLogits(LlamaForCausalLM):
    """A model that changes its logits after the LM head, as soft-capping does."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 2
        return out


def test_the_head_is_split_off_only_where_logits_are_just_its_projection(tiny_llama_dir, tiny_llama) -> None:
    model, tok = tiny_llama
    assert split_head(model) is not None and split_head(_lora(model)) is not None
    halved = HalvedLogits.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert split_head(halved) is None
    requests = _requests(tok)
    for score, (ctx, cont) in zip(loglikelihood(halved, requests, batch_size=3), requests, strict=True):
        assert score.logprob == pytest.approx(_direct(halved, ctx, cont)[0], abs=1e-4)


def test_general_text_loss_is_the_shifted_cross_entropy(tiny_llama) -> None:
    model, tok = tiny_llama
    loss = general_text_loss(model, tok, n_tokens=64, window=64)
    ids = tok(wikitext_detokenize(wikitext_text()), add_special_tokens=False)["input_ids"][:64]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert loss == pytest.approx(float(expected), abs=1e-4)


def test_generate_until_matches_unbatched_greedy(tiny_llama) -> None:
    model, tok = tiny_llama
    contexts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["the movie", "what is two plus two ? the", "a"]]
    batched = generate_until(model, tok, contexts, until=[], max_new_tokens=6, batch_size=3)
    for ctx, text in zip(contexts, batched, strict=True):
        out = model.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, len(ctx):], skip_special_tokens=True)
    stop = batched[0][2:4]
    cut = generate_until(model, tok, contexts[:1], until=[stop], max_new_tokens=6)[0]
    assert cut == batched[0][: batched[0].index(stop)]


def test_a_stop_string_counts_only_in_the_generated_text(tiny_llama) -> None:
    """As lm-eval decides it: a stop string straddling the prompt's end and the first generated text does not stop
    the generation (transformers' stop_strings matched it there and returned almost nothing)."""
    model, tok = tiny_llama
    ctx = tok("four", add_special_tokens=False)["input_ids"]
    free = generate_until(model, tok, [ctx], until=[], max_new_tokens=8)[0]
    straddling = "four"[-2:] + free[:1]
    assert free and straddling not in free  # the precondition: it occurs only across the boundary
    assert generate_until(model, tok, [ctx], until=[straddling], max_new_tokens=8)[0] == free


def test_head_logits_are_the_heads(tiny_bert_dir) -> None:
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_bert_dir)
    texts = ["the movie was great", "a dull , boring film with nothing to say", "four"]
    preds = head_logits(model, tok, texts, batch_size=2).argmax(-1).tolist()
    with torch.no_grad():
        expected = [int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]
    assert preds == expected


def test_a_head_scores_text_cut_as_training_cut_it(tiny_bert_dir) -> None:
    """A recipe's encoder task carries data.max_length: validation and checks read what training read, not 512."""
    from tuneguard.eval.monitor import choice_probabilities
    from tuneguard.eval.records import Doc, Task

    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_bert_dir)
    texts = ["a dull , boring film with nothing to say and nothing to show for it", "the movie was great"]
    task = Task("own", "classification", lambda: [Doc(context=t, gold=0) for t in texts], "acc",
                labels=["neg", "pos"], max_length=5)
    got = choice_probabilities(model, tok, task, task.docs(), batch_size=2)
    cut = torch.softmax(head_logits(model, tok, texts, max_length=5).double(), -1).numpy()
    whole = torch.softmax(head_logits(model, tok, texts).double(), -1).numpy()
    assert got == pytest.approx(cut, abs=1e-6) and got[0] != pytest.approx(whole[0], abs=1e-6)
