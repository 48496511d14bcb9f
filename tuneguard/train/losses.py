"""Training losses that return (summed loss, number of targets).

Summed, not averaged: the train loop divides by the targets of the whole accumulation window (and
of every process), so the gradient is the true per-token mean however the tokens fall in batches.

The causal-LM loss only projects hidden states to the vocabulary where there is a target, a few
hundred rows at a time, so the full fp32 ``batch x seq x vocab`` logits are never materialized
(49k-entry vocabularies make them the largest tensor of a small model's step), and computes the
loss's gradient in the same pass (see :class:`_ChunkedCrossEntropy`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from tuneguard.data.examples import IGNORE
from tuneguard.numerics import linear
from tuneguard.train.reuse import LastResult

CHUNK_BYTES = 30 * 2**20
"""fp32 logits per chunk: small enough to stay out of the peak and under glibc's largest mmap threshold (32 MB,
so chunks reuse heap memory instead of faulting in fresh pages), large enough that the head's matmuls
run near full speed (the 49k x 576 head: 85-row chunks ~25% slower than 160-row ones, fp32 and bf16)."""


ROW_MULTIPLE = 16
"""The last chunk is padded to a multiple of this many rows (zeros, left out of the loss), so the head's products
come in a few shapes. Its row count otherwise changes with every batch's target count, and each new shape makes
oneDNN build and cache a kernel whose memory stays between the activations: gsm8k-sft's peak crept 1,841 -> 2,436
MB over 120 micro-batches (bf16), 1,939 -> 1,998 over 48 with oneDNN's cache off."""


def chunk_rows(vocab: int) -> int:
    return max(ROW_MULTIPLE, CHUNK_BYTES // (4 * vocab))


def _padded_rows(n: int) -> int:
    return n + -n % ROW_MULTIPLE


def _padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero rows appended up to a multiple of :data:`ROW_MULTIPLE`."""
    extra = _padded_rows(t.shape[0]) - t.shape[0]
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here, autocast included."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


_HEAD_CAST: LastResult[torch.Tensor] = LastResult()


class _Workspace:
    """The chunk's fp32 logits and its gradient in the compute dtype, kept from call to call when the head
    computes in a lower precision (bf16: casts each way), grown to the most rows a chunk has needed.

    Made afresh for every chunk, these ~47 MB of casts (160 rows of a 49k vocabulary) were allocated on CPU
    when the activations are at their peak, at wherever glibc's heap had a gap that wide, and the next
    micro-batch's activations could not reuse the gaps they left: the bench configuration in bf16 (3 steps, 8
    of 30 layers recomputed) peaked at 1,712-1,919 MB over 21 runs, and at 1,744-1,832 over 13 with the casts
    kept (bench/README.md, "The loss's casts and the run-to-run spread"). In fp32 the logits need no cast (one
    block a chunk, reused in place) and nothing is kept.
    """

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.buffers
        if held is None or held[0].shape[0] < rows or (held[0].shape[1], held[1].dtype, held[0].device) != (vocab, dtype, device):
            self.buffers = None  # the old pair freed before the new one is allocated
            self.buffers = (torch.empty(rows, vocab, device=device), torch.empty(rows, vocab, dtype=dtype, device=device))
        return self.buffers


_WORKSPACE = _Workspace()


def release_kept() -> None:
    """Drop the head's cast and the chunks' workspace (~100 MB for a 49k vocabulary in bf16) when training ends:
    the evaluation that follows in the same process uses neither."""
    _HEAD_CAST.clear()
    _WORKSPACE.buffers = None


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, kept while the weight is unchanged: the head is cast once per run, not per step.

    The copy would be alive at the loss anyway (that is where the peak is), so keeping it costs no peak memory.
    """
    return weight if weight.dtype == dtype else _HEAD_CAST(weight, dtype, lambda: weight.detach().to(dtype))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    The same arithmetic as ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")``:
    the projection in the autocast (or input) dtype; max-shifted log-sum-exp, softmax and loss in fp32,
    in place in the chunk's logits. The loss is the last node of the graph, so its gradient is fixed
    up to the incoming scalar: it is computed here from the same softmax, and backward only scales it.
    The logits are never recomputed; under a low-precision compute dtype the chunk's casts go to a kept
    :class:`_Workspace`, otherwise nothing outlives its loop iteration.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        w = _cast_weight(weight, dtype)
        rows = chunk_rows(weight.shape[0])
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        cast = dtype != torch.float32
        if cast:
            kept_logits, kept_grad = _WORKSPACE(_padded_rows(min(rows, hidden.shape[0])), weight.shape[0], dtype,
                                                hidden.device)
        for start in range(0, hidden.shape[0], rows):
            real = min(rows, hidden.shape[0] - start)
            h = _padded(hidden[start : start + real].to(dtype))  # padded rows are zero: no part in grad_w
            t = _padded(targets[start : start + real, None])
            logits = kept_logits[: h.shape[0]].copy_(linear(h, w)) if cast else linear(h, w)
            picked = logits.gather(1, t)
            shift = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(shift).exp_().sum(dim=-1, keepdim=True)
            total += (shift + sums.log() - picked)[:real].sum()
            if want_h or want_w:
                # d loss / d logits = softmax - one_hot, built in place in the logits.
                probs = logits.div_(sums)
                probs.scatter_add_(1, t, torch.full_like(picked, -1.0))
                g = kept_grad[: h.shape[0]].copy_(probs) if cast else probs
                del logits, probs
                if grad_h is not None:
                    grad_h[start : start + real] = linear(g, w.t())[:real]
                if grad_w is not None:
                    grad_w.add_(g.t().mm(h))
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad), (None if grad_w is None else grad_w * grad), None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over rows of ``hidden`` (N x d) against ``targets`` (N), chunk by chunk."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, _matmul_dtype(hidden, weight))


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The transformer body and LM head inside a (PEFT-wrapped) causal LM; None for prompt learning.

    LoRA-family adapters are injected into the body's layers, so running the body directly keeps
    them active; prompt tuning prepends virtual tokens in PeftModel.forward and must go through it.
    """
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


class CausalLMLoss(torch.nn.Module):
    """Wraps the model so the whole loss runs inside ``forward`` (and so inside DDP/FSDP's forward)."""

    def __init__(self, model: torch.nn.Module, fast: bool = True) -> None:
        super().__init__()
        self.model = model
        self.parts = decoder_parts(model) if fast else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        n = keep.sum()
        if self.parts is None:
            # Prompt tuning: PeftModel prepends virtual tokens (rows are unpacked and right-padded,
            # so plain causal attention is exact) and returns their logits too; drop them.
            out = self.model(input_ids=input_ids, use_cache=False)
            logits = out.logits[:, -input_ids.shape[1] : -1][keep].float()
            return F.cross_entropy(logits, targets[keep], reduction="sum"), n
        body, head = self.parts
        hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return chunked_lm_loss(hidden[:, :-1][keep], head.weight, targets[keep]), n


class ClassificationLoss(torch.nn.Module):
    """Classification head loss: text encoders (``input_ids``, ``attention_mask``) and image backbones
    (``pixel_values``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # The frozen backbone's batch norms: their running statistics are frozen weights too (train mode would
        # update them, and change the base the adapter is compared with), so they always run in eval mode.
        self.norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for norm in self.norms:  # here, not in train(): scoring during training switches the whole model back
            norm.eval()
        logits = self.model(**inputs).logits
        n = torch.tensor(labels.numel(), device=labels.device)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), n
