"""The scoring engine every task reduces to: log-likelihoods, rolling perplexity, greedy generation.

Requests share what they feed the model in common: the context and every choice are packed into one
row with a block mask (each choice sees the shared prefix and itself, never the other choices) and
position ids that continue the prefix for each choice. One forward pass then scores all choices, which
is exact and about ``n_choices`` times cheaper than re-running the context per choice; the prefix
extends past the context where choices begin alike, and covers the start of differing contexts
(WinoGrande's partial scoring). Logits are computed only at the positions that predict a scored token, a chunk of positions at a time, so memory
does not grow with the vocabulary, the window length, the task or the number of items.

The functions take any causal LM, including a ``PeftModel`` with its adapter on or under
``disable_adapter()``: the caller picks which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from tuneguard.errors import TuneguardError
from tuneguard.numerics import linear
from tuneguard.progress import Advance

DEFAULT_MAX_LENGTH = 2048
"""The context length when neither the model's config nor its tokenizer gives one (lm-evaluation-harness's)."""
LOGIT_CHUNK = 512
"""Positions projected to the vocabulary at once: 100 MB of float32 logits for a 49k vocabulary."""
Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Score:
    """The log-likelihood of one continuation given its context."""

    logprob: float
    is_greedy: bool
    """Every continuation token is the argmax of its position (LAMBADA's accuracy)."""
    n_tokens: int


@dataclass(frozen=True)
class RollingScore:
    """Negative log-likelihood of a whole text, with the units perplexities are normalised by."""

    nll: float
    n_tokens: int
    n_bytes: int


@dataclass
class _Row:
    """One packed sequence: a token prefix its requests share, then each request's remaining inputs.

    A request feeds the model its context and continuation but the continuation's last token (which
    is predicted, never fed back in). Requests share the longest prefix of what they feed: a whole
    context (ARC, HellaSwag), and beyond it the words before the choices first differ (PIQA's
    near-identical solutions) or before the option (WinoGrande's partial scoring, whose contexts differ).
    """

    prefix: list[int]
    requests: list[int] = field(default_factory=list)
    fed: list[list[int]] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(f) - len(self.prefix) for f in self.fed)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no autograd while scoring; the training mode is restored afterwards.

    ``no_grad`` rather than ``inference_mode``: inference tensors carry no version counter, which
    adapter layers that cache casts by ``tensor._version`` (tuneguard.train.fastpath) rely on.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def max_model_length(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The model's context length, resolved as lm-evaluation-harness's HF model resolves it.

    The (text) config's ``n_positions``, ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's
    ``model_max_length`` unless that is transformers' "unset" value, else :data:`DEFAULT_MAX_LENGTH`;
    rolling perplexity windows are this long, so the two agree page by page.
    """
    config = _base(model).config
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != VERY_LARGE_INTEGER:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty context starts from (lm-evaluation-harness: BOS, else EOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise TuneguardError("the tokenizer has neither a BOS nor an EOS token to start an empty context from")
    return token


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A context's token ids as lm-evaluation-harness's Hugging Face model encodes them: with the tokenizer's own
    special tokens (the BOS that Llama, Mistral and Gemma tokenizers prepend), unless the text already starts with
    the BOS token (a chat-templated prompt)."""
    bos = tokenizer.bos_token
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split the way lm-evaluation-harness splits them.

    The whole string is encoded once so the continuation's tokens are those the model would see in
    running text; trailing spaces of the context move to the continuation (``"Answer: " + "yes"``
    and ``"Answer:" + " yes"`` score the same). An empty context starts from the prefix token, unless the
    continuation already does.
    """
    if not context:
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = prefix_token_id(tokenizer)
        return ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    return ctx, whole[len(ctx):]


MIN_SHARED = 8
"""Tokens two rows must save by sharing a prefix before they become one (a block mask costs a few tokens' work)."""
MIN_FILL = 0.75
"""A row joins a batch only if it is at least this fraction of the batch's width (its first, longest row): a
batch is padded to its longest row. On the first 40 PIQA items (2,060 tokens in 40 rows, the longest 231),
batches of 8 by count ran 3,264 positions, these 2,242; BoolQ 7,120 and 6,580 (6,145 real)."""


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _merged(a: _Row, b: _Row) -> _Row:
    """``a`` and ``b`` as one row over the prefix common to all their members."""
    common = _common_length(a.prefix, b.prefix)
    return _Row(a.prefix[:common], a.requests + b.requests, a.fed + b.fed, a.continuations + b.continuations)


def _pack(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, share: bool = True) -> list[_Row]:
    """Rows of at most ``max_length`` tokens; with ``share``, requests that start alike share a prefix.

    Requests with the same context form one row (its prefix reaches into the choices where they begin
    alike). Rows in the order of their contexts then join their neighbour when the prefix common to
    both saves at least :data:`MIN_SHARED` tokens, which puts WinoGrande's two contexts, equal up to
    the option, in one row and leaves unrelated items apart.
    """
    singles: list[_Row] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i} has an empty context; start it with prefix_token_id(tokenizer)")
        if not cont:
            raise ValueError(f"request {i} has an empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: the continuation ({len(cont)} tokens) is longer than max_length={max_length}")
        # Too long: drop the oldest context tokens, as lm-evaluation-harness does.
        fed = [*ctx, *cont][-(max_length + 1):-1]
        singles.append(_Row(list(fed), [i], [fed], [list(cont)]))
    if not share:
        return singles
    rows: list[_Row] = []
    for i in sorted(range(len(requests)), key=lambda i: (tuple(requests[i][0]), i)):
        same_context = rows and tuple(requests[rows[-1].requests[-1]][0]) == tuple(requests[i][0])
        joined = _merged(rows[-1], singles[i]) if same_context else None
        if joined is not None and len(joined) <= max_length:
            rows[-1] = joined
        else:
            rows.append(singles[i])
    packed: list[_Row] = []
    for row in rows:
        joined = _merged(packed[-1], row) if packed else None
        if joined is not None and len(joined) <= max_length and len(packed[-1]) + len(row) - len(joined) >= MIN_SHARED:
            packed[-1] = joined
        else:
            packed.append(row)
    return packed


def _batches(rows: list[_Row], batch_size: int) -> list[list[_Row]]:
    """Rows sorted longest first, in batches of at most ``batch_size`` rows that each pad no row below
    :data:`MIN_FILL` of their width."""
    batches: list[list[_Row]] = []
    for row in rows:
        if batches and len(batches[-1]) < batch_size and len(row) >= MIN_FILL * len(batches[-1][0]):
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _virtual_prefix(model: torch.nn.Module, batch_size: int) -> torch.Tensor | None:
    """The soft-prompt embeddings of an active prompt-tuning adapter (prepended to every row), else None."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or getattr(model, "_adapters_disabled", False):
        return None
    from peft import PeftType

    if cfg.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        raise TuneguardError(f"scoring a {cfg.peft_type} adapter is not supported (prompt tuning and LoRA-family are)")
    return model.get_prompt(batch_size=batch_size)


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


def _projection(head: torch.nn.Module) -> Head:
    """A plain ``nn.Linear`` head through :func:`tuneguard.numerics.linear` (the probe's fp32 kernel: the
    49k-row head is the largest matmul of a small model's scoring); any other head as it is."""
    if type(head) is not torch.nn.Linear:
        return head
    return lambda rows: linear(rows, head.weight, head.bias)


def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The causal LM's body and its projection to the vocabulary, when its logits are just ``head(body(x))``.

    Scoring then projects the hidden states a chunk at a time, so a perplexity window of the model's
    full context never holds its ``length x vocab`` logits at once (1.6 GB in float32 for 8,192 tokens
    and a 49k vocabulary). A model that changes its logits after the projection (soft-capping,
    scaling) fails the probe and is scored through its own forward.
    """
    base = _base(model)
    body, head = base.get_decoder(), base.get_output_embeddings()
    if head is None or body is base:
        return None
    probe = torch.arange(8, device=model_device(model))[None]
    with eval_mode(model):
        own = base(input_ids=probe, use_cache=False).logits
        split = head(body(input_ids=probe, use_cache=False)[0])
    same = own.shape == split.shape and torch.allclose(own.float(), split.float(), rtol=1e-3, atol=1e-3)
    return (body, head) if same else None


def _forward_kept(
    model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor, keep: torch.Tensor,
    parts: tuple[torch.nn.Module, torch.nn.Module] | None,
) -> tuple[torch.Tensor, Head]:
    """Rows ``(n_kept, ...)`` at the ``keep`` positions of packed rows, and what makes them logits.

    With ``parts`` (:func:`split_head`) the rows are hidden states and the head projects them; else
    they are the model's own logits. ``seg`` is 0 for context, ``j + 1`` for the inputs of
    continuation ``j`` and -1 for padding: a token attends causally to the context and to its own segment.
    """
    batch, _ = ids.shape
    prefix = _virtual_prefix(model, batch)
    embeds = None
    if prefix is not None:
        n_virtual = prefix.shape[1]
        embeds = torch.cat([prefix.to(model.word_embeddings.weight.dtype), model.word_embeddings(ids)], dim=1)
        seg = F.pad(seg, (n_virtual, 0), value=0)
        pos = torch.cat([torch.arange(n_virtual, device=pos.device).expand(batch, -1), pos + n_virtual], dim=1)
        keep = F.pad(keep, (n_virtual, 0), value=False)
    if prefix is None and int(seg.max()) <= 1:
        # No row shares its context: plain causal attention is the same mask for every real token
        # (padding is on the right, after them), so none is passed and the kernel takes its causal
        # path without materialising one (much faster on long windows and one-token answers).
        mask = None
    else:
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        allowed = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg == 0)[:, None, :])
        dtype = _base(model).get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]
    kwargs: dict = {"attention_mask": mask, "position_ids": pos, "use_cache": False}
    inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    if parts is not None:
        body, head = parts
        return body(**inputs, **kwargs)[0][keep], _projection(head)
    if _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = (model if embeds is None else model.base_model)(**inputs, **kwargs).logits
    return (logits[keep] if logits.dim() == 3 else logits), _identity


def _target_logprobs(
    rows: torch.Tensor, head: Head, index: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and whether it is the argmax, :data:`LOGIT_CHUNK` rows at a time.

    The float32 logits and log-softmax then never hold more than ``LOGIT_CHUNK x vocab`` values, even
    for a perplexity window of the model's full context.
    """
    logprobs, hits = [], []
    for lo in range(0, len(index), LOGIT_CHUNK):
        logits, targets = head(rows[index[lo : lo + LOGIT_CHUNK]]).float(), tokens[lo : lo + LOGIT_CHUNK]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1))
        hits.append(logits.argmax(dim=-1) == targets)
    return torch.cat(logprobs), torch.cat(hits)


def loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    share: bool = True,
    advance: Advance | None = None,
) -> list[Score]:
    """Score ``(context_ids, continuation_ids)`` pairs; with ``share``, requests with the same context share one pass.

    Rows are sorted longest first, so an out-of-memory shows up on the first batch rather than the last, and
    batched so that no row is padded far beyond its length (:func:`_batches`).
    """
    max_length = max_length or max_model_length(model)
    rows = sorted(_pack(requests, max_length, share), key=len, reverse=True)
    device = model_device(model)
    parts = split_head(model)
    pad = 0
    logprob = torch.zeros(len(requests), dtype=torch.float64)
    misses = torch.zeros(len(requests), dtype=torch.long)
    done = 0
    with eval_mode(model):
        for batch in _batches(rows, batch_size):
            width = len(batch[0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            pos = torch.zeros((len(batch), width), dtype=torch.long)
            seg = torch.full((len(batch), width), -1, dtype=torch.long)
            t_row: list[int] = []
            t_pos: list[int] = []
            t_tok: list[int] = []
            t_req: list[int] = []
            for b, row in enumerate(batch):
                shared = len(row.prefix)
                ids[b, :shared] = torch.tensor(row.prefix, dtype=torch.long)
                pos[b, :shared] = torch.arange(shared)
                seg[b, :shared] = 0
                offset = shared
                for j, (req, fed, cont) in enumerate(zip(row.requests, row.fed, row.continuations, strict=True)):
                    tail = fed[shared:]
                    ids[b, offset : offset + len(tail)] = torch.tensor(tail, dtype=torch.long)
                    pos[b, offset : offset + len(tail)] = torch.arange(shared, len(fed))
                    seg[b, offset : offset + len(tail)] = j + 1
                    # Continuation token t is predicted at input position len(fed) - len(cont) + t: in the
                    # shared prefix, or in this request's own tail.
                    first = len(fed) - len(cont)
                    t_row += [b] * len(cont)
                    t_pos += [q if q < shared else offset + q - shared for q in range(first, len(fed))]
                    t_tok += cont
                    t_req += [req] * len(cont)
                    offset += len(tail)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            keep[t_row, t_pos] = True
            index = (keep.flatten().cumsum(0) - 1).view(keep.shape)[t_row, t_pos]
            kept, head = _forward_kept(model, ids.to(device), pos.to(device), seg.to(device), keep.to(device), parts)
            lp, hit = _target_logprobs(kept, head, index.to(device), torch.tensor(t_tok, device=device))
            req = torch.tensor(t_req)
            logprob.index_add_(0, req, lp.double().cpu())
            misses.index_add_(0, req, (~hit).long().cpu())
            done += len(batch)
            if advance:
                advance(done, len(rows))
    return [
        Score(float(logprob[i]), bool(misses[i] == 0), len(cont)) for i, (_, cont) in enumerate(requests)
    ]


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, scored)`` windows covering every token once (lm-evaluation-harness's rolling windows).

    The first window is scored from ``prefix_token``; each later one predicts up to
    ``max_length - context_len + 1`` new tokens with at least ``context_len`` tokens of context,
    and the last one takes as much context as fits.
    """
    if not 1 <= context_len <= max_length:
        raise ValueError(f"context_len must be in [1, max_length={max_length}], got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        inputs = tokens[max(end - max_length - 1, 0) : end - 1]
        windows.append((inputs[: len(inputs) - n + 1], tokens[end - n : end]))
        done = end
    return windows


def rolling_loglikelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 4,
    max_length: int | None = None,
    context_len: int = 1,
    advance: Advance | None = None,
) -> list[RollingScore]:
    """Summed NLL of each whole text over rolling windows, for token/word/byte perplexities.

    Windows are the model's full context unless ``max_length`` says otherwise, as lm-evaluation-harness
    cuts them; each is its own row (sharing the one-token prefix would only force a block mask).
    """
    max_length = max_length or max_model_length(model, tokenizer)
    prefix = prefix_token_id(tokenizer)
    requests: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    n_tokens: list[int] = []
    for i, text in enumerate(texts):
        tokens = encode_text(tokenizer, text)
        n_tokens.append(len(tokens))
        for window in rolling_windows(tokens, prefix, max_length, context_len):
            requests.append(window)
            owner.append(i)
    scores = loglikelihood(model, requests, batch_size, max_length=max_length, share=False, advance=advance)
    nll = [0.0] * len(texts)
    for i, score in zip(owner, scores, strict=True):
        nll[i] -= score.logprob
    return [RollingScore(nll[i], n_tokens[i], len(t.encode("utf-8"))) for i, t in enumerate(texts)]


class _StopInGenerated(StoppingCriteria):
    """A row is done once its generated text holds a stop string, as lm-eval decides it: transformers' own
    ``stop_strings`` also match text that straddles the prompt's end (a prompt ending in a newline and a first
    generated newline would stop a ``"\n\n"`` task at once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, [s for s in stops if s], start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def generate_until(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Sequence[int]],
    until: Sequence[str] = ("\n",),
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    advance: Advance | None = None,
) -> list[str]:
    """Greedy continuations of token-id contexts, cut at the first stop string (batched, left-padded)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    out: list[str] = [""] * len(contexts)
    device = model_device(model)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(contexts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, i in enumerate(chunk):
                ctx = list(contexts[i])
                ids[b, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
                attn[b, width - len(ctx) :] = 1
            stop = StoppingCriteriaList([_StopInGenerated(tokenizer, until, width)] if any(until) else [])
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config, stopping_criteria=stop
            )
            for b, i in enumerate(chunk):
                text = tokenizer.decode(generated[b, width:], skip_special_tokens=True)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out[i] = text[:cut]
            if advance:
                advance(start + len(chunk), len(order))
    return out


def head_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    advance: Advance | None = None,
) -> torch.Tensor:
    """Class logits (``len(texts)`` x classes, float32) from a sequence-classification head (encoders such as
    BERT or MiniLM): their argmax is the prediction, their softmax what a drift check compares."""
    out: list[torch.Tensor] = []
    device = model_device(model)
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            ).to(device)
            out.append(model(**enc).logits.float().cpu())
            if advance:
                advance(start + len(enc["input_ids"]), len(texts))
    return torch.cat(out) if out else torch.zeros(0, 0)
