"""Training fast path: speed and memory optimizations applied to the adapter model before training.

On by default; ``TUNEGUARD_FASTPATH=0`` (or ``enabled=False``) turns them off, which is what the
reference runs and the equivalence tests compare against. Each one, and why it changes nothing
that matters (tests/test_fastpath.py checks every claim against the plain path; in fp32 each is exact up to
rounding order, under bf16 autocast the loss stays within bf16's rounding of the plain path's and no further
from fp32's):

* **Fused LoRA layers** (:class:`_LoraLinearFn`). PEFT's LoRA layer on a 4-bit (or plain) base runs,
  under CPU autocast, about ten ops, each with its own dtype cast, an fp32 dropout mask and an fp32
  copy of the dropped input kept for backward. The fused layer computes the same
  ``base(x) + scaling * B(A(dropout(x)))`` with one cast of ``x`` to the compute dtype (shared by
  the q/k/v and gate/up siblings that read the same tensor, so saved once), the 4-bit weight
  dequantized from a cached fp32 ``absmax`` (double quantization decoded once per run, not per
  call), and only ``x`` in the compute dtype, the ``r``-wide ``A x`` and the dropped positions
  saved for backward. Same matmuls in the same dtypes: with dropout off, loss and gradients are
  bit-identical to PEFT's under bf16 autocast. All in fp32 (the numerics probe's choice where bf16
  is emulated), ``B h`` is accumulated into the base output by one ``addmm_`` and the LoRA scale
  goes on the r-wide products in backward: two full-width passes and a copy of the output fewer a
  layer, fp32 rounding in another order. The frozen weight's two products (forward and input gradient) go
  through :func:`tuneguard.numerics.linear`: oneDNN's fp32 kernel unless the probe measured MKL's clearly faster.
* **Cheaper dropout, same distribution** (:func:`drop_positions`). ``nn.Dropout`` draws one uniform
  per element. A Bernoulli(p) sequence is exactly a sequence of i.i.d. Geometric(p) gaps between
  its zeros, so drawing ``numel * p`` gaps (inverted float64 uniforms, as torch's ``geometric_``)
  gives the same joint distribution of dropped positions, at the 53-bit resolution of torch's CPU
  ``bernoulli_``.
  Each layer draws its own positions, as each PEFT layer has its own dropout. Kept inputs are not
  multiplied by ``1/(1-p)``: ``B A`` is linear, so scaling its output by ``scaling/(1-p)`` is the
  same function of the same masked input (only where the rounding happens moves). Backward keeps
  the positions (int32, ``p`` of the input's size) instead of a mask the size of the input.
* **Gated MLP middle** (:class:`_GatedProduct`, :class:`_GatedLoraDown`). ``act(gate) * up`` is
  computed as before; under bf16 autocast it keeps bf16 copies of ``gate`` and ``up`` for backward
  instead of fp32 ``gate``, ``act(gate)`` and ``up`` (a third of the bytes). The loss is unchanged;
  the gradients move by less than half of the plain path's own bf16 deviation from fp32. In fp32 it
  keeps fp32 (exact). Where ``down`` is a fused LoRA layer, the product (``down``'s LoRA input, as
  wide as the MLP) is not kept as well: backward rebuilds it from ``gate`` and ``up`` (bit for bit in
  fp32), and ``down``'s dropout zeroes it in place rather than in a copy, as nothing else reads it.
  That is a sixth of what a layer keeps, which on the bench configuration in fp32 lets 5 more of its
  30 layers skip recomputation under the same peak target.
* **Blocked causal attention** (:mod:`tuneguard.train.attention`), on CPU: each block
  of 64 queries attends with two batched matmuls and one softmax to the keys it can see, GQA without
  repeating k and v, probabilities recomputed in backward (flash attention's trade); packed rows use the
  one mask every layer shares instead of a float copy per layer, and skip the keys of earlier documents. In fp32,
  rounding in another order (outputs within 1e-6 of SDPA's); under bf16 autocast, fp32 products and softmax on
  SDPA's bf16 inputs (a little closer to float64 than SDPA's bf16 probabilities). Every other call (no gradient,
  dropout, a KV cache...) is SDPA's.
* **RMSNorm's backward in contiguous passes** (:mod:`tuneguard.train.norms`): the same forward, bit for bit;
  autograd's backward of transformers' RMSNorm reads a zero-stride gradient that CPU kernels do not vectorize.
* **No file-backed weights.** Weights transformers left as views of the mmapped checkpoint keep
  the whole file resident (and counted in RSS) for the life of the run; they are copied into
  ordinary memory, the mapping goes, and the allocator returns the loader's garbage to the OS.
* **Activation checkpointing by budget** (:func:`tuneguard.train.memory.checkpoint_plan`). The memory
  estimator picks how many of the lowest decoder layers to recompute so the predicted peak fits
  ``TUNEGUARD_MEMORY_BUDGET_MB`` (default: half of what the usual way, PEFT's layers without any of
  this, is predicted to need, or the memory at hand if that is less); none when it fits. Checkpointing replays the RNG, so dropout is the same in the recompute.

The loss side (chunked cross-entropy that never builds full logits and computes its gradient in
the same pass) lives in :mod:`tuneguard.train.losses` and is used with or without the fast path.

Always applied, because training is wrong without it: on CPUs with AVX512-BF16, bitsandbytes
repacks a 4-bit weight for its inference kernel the first time the layer runs in eval mode without
gradients (a validation pass). That kernel has no backward, so every later training step silently
drops the gradient through the frozen weight and the LoRA factors of all lower layers get wrong
gradients. :func:`tuneguard.backbones.keep_bnb_trainable` (applied at load) turns the repacking off.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneguard.adapters.registry import fusable_lora
from tuneguard.allocator import trim_heap
from tuneguard.backbones import decoded_absmax, dequantize_4bit, keep_bnb_trainable
from tuneguard.numerics import linear
from tuneguard.recipe import Recipe
from tuneguard.train.attention import use_blocked_attention
from tuneguard.train.memory import planned_checkpoints
from tuneguard.train.norms import is_rms_norm, rms_norm_forward
from tuneguard.train.reuse import LastResult

ENV_FLAG = "TUNEGUARD_FASTPATH"


def fastpath_enabled(enabled: bool | None = None) -> bool:
    """An explicit argument wins; otherwise on unless ``TUNEGUARD_FASTPATH`` is 0/false/off/no."""
    if enabled is not None:
        return enabled
    return os.environ.get(ENV_FLAG, "1").strip().lower() not in {"0", "false", "off", "no"}


# ----------------------------------------------------------------------------------------- dropout


def drop_positions(numel: int, p: float, seed: int) -> torch.Tensor:
    """Flat indices of the elements dropout zeroes: each independently with probability ``p``, sorted.

    A Bernoulli(p) sequence is the same thing as i.i.d. Geometric(p) gaps between its ones. A gap is drawn by
    inversion of a float64 uniform, ``ceil(log(1 - u) / log(1 - p))``, as torch's ``geometric_`` does it (the
    same 53-bit resolution as its CPU ``bernoulli_``, for ``numel * p`` draws instead of ``numel``). The
    uniforms come from numpy's PCG64 seeded with ``seed`` (itself drawn from torch's generator, so
    ``torch.manual_seed`` still fixes everything): a 576 x 1024 input's positions in 255-320 us right
    after a matmul, as in a step, where torch's mt19937 ``geometric_`` took 433-449 (AVX2 kernels, Zen 4 EPYC).
    The arithmetic is torch's: its vectorized float64 ``log1p`` ran 2.4x numpy's, which is scalar on CPUs
    without AVX-512 (a real Zen 3: 535-559 us for the whole draw instead of 968-990).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0 or numel == 0:
        return torch.empty(0, dtype=torch.long)
    rng = np.random.Generator(np.random.PCG64(seed))
    found, start = [], 0
    while start < numel:
        expected = (numel - start) * p
        u = torch.from_numpy(rng.random(int(expected + 8 * math.sqrt(expected) + 16)))
        gaps = u.neg_().log1p_().div_(math.log1p(-p)).ceil_().clamp_min_(1).long()  # u = 0 would give 0
        positions = gaps.cumsum_(0).add_(start - 1)
        found.append(positions)
        start = int(positions[-1]) + 1
    positions = torch.cat(found)
    return positions[: int(torch.searchsorted(positions, numel))]


def _dropped(x: torch.Tensor, positions: torch.Tensor | None, private: bool = False) -> torch.Tensor:
    """``x`` with the dropped elements zeroed: a copy (``x`` may be shared with sibling layers), or ``x`` itself
    where the caller says nothing else reads it (``private``: the gated MLP's product, built for this layer only)."""
    if positions is None:
        return x
    out = x if private and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, positions, 0)
    return out


def _positions(numel: int, p: float, seed: int | None) -> torch.Tensor | None:
    return None if seed is None else drop_positions(numel, p, seed)


# ----------------------------------------------------------------------------------- fused LoRA


_SHARED_CAST: LastResult[torch.Tensor] = LastResult()


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, the same copy while ``x`` is the same tensor: q/k/v (and gate/up) read the same hidden
    states, so one cast instead of three, and one saved copy for backward instead of three."""
    return x if x.dtype == dtype else _SHARED_CAST(x, dtype, lambda: x.to(dtype))


@dataclass
class _Base:
    """How to get a frozen base layer's weight in a compute dtype, without keeping that copy."""

    layer: torch.nn.Module
    absmax: torch.Tensor | None = None
    """fp32 per-block scales of a 4-bit weight (double quantization decoded once)."""

    def __post_init__(self) -> None:
        # Decoded now, before training allocates anything: ~200 small blocks made during the first forward
        # sat between its activations for good, and the second micro-batch's could not reuse the freed memory
        # around them (sst2-qlora in fp32: +310 MB at the second micro-batch; +223 MB decoded up front).
        if self.is_4bit and self.absmax is None:
            self.absmax = decoded_absmax(self.layer.weight)

    @property
    def is_4bit(self) -> bool:
        return hasattr(self.layer.weight, "quant_state")

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.layer.weight
        if not self.is_4bit:
            return w.to(dtype)
        decoded = getattr(self.layer, "decoded_weight", None)  # set for a whole evaluation by backbones.dequantized
        if decoded is not None and decoded.dtype == dtype:
            return decoded
        return dequantize_4bit(w, dtype, self.absmax)


def _lora_forward(
    ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: _Base, scale: float, p: float, seed: int | None,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], private: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``base(x) + scale * B(A(dropped(x)))``; returns it, ``x`` in the LoRA dtype, and the other tensors backward
    needs: ``A x``, the factors in the LoRA dtype and the dropped positions (int32). ``private``: nothing else
    reads ``x``, so dropout zeroes it in place once the base product has read it (the returned ``x`` then has
    the dropped elements zeroed)."""
    base_dtype, lora_dtype, out_dtype = dtypes
    bias = base.layer.bias
    out = linear(_cast(x, base_dtype), base.weight(base_dtype), None if bias is None else bias.to(base_dtype))
    xl, al, bl = _cast(x, lora_dtype), a.to(lora_dtype), b.to(lora_dtype)
    positions = _positions(x.numel(), p, seed)
    h = F.linear(_dropped(xl, positions, private), al)
    ctx.base, ctx.scale, ctx.dtypes, ctx.x_dtype = base, scale, dtypes, x.dtype
    ctx.param_dtypes = (a.dtype, b.dtype)
    saved = (h, al, bl, None if positions is None else positions.int())
    if _all_fp32(dtypes):
        # One matmul accumulating into the base output: no full-width low-rank product, scaling or add.
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), bl.t(), alpha=scale)
        return out, xl, saved
    return out.to(out_dtype).add_(F.linear(h, bl).mul_(scale)), xl, saved


def _lora_backward(
    ctx: Any, grad: torch.Tensor, xl: torch.Tensor, saved: tuple[torch.Tensor | None, ...], needs: tuple[bool, bool, bool],
    private: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for ``x``, ``A`` and ``B`` (each where ``needs`` says) from what :func:`_lora_forward` kept
    (``private``: ``xl`` is the caller's own copy, zeroed in place where dropped)."""
    h, al, bl, positions = saved
    base_dtype, lora_dtype, _ = ctx.dtypes
    a_dtype, b_dtype = ctx.param_dtypes
    positions = None if positions is None else positions.long()
    grad_base = grad.to(base_dtype)
    need_x, need_a, need_b = needs
    if _all_fp32(ctx.dtypes):  # the scale goes on the r-wide products, not on a full-width copy of grad
        g = grad_base.flatten(0, -2)
        grad_b = g.t().mm(h.flatten(0, -2)).mul_(ctx.scale).to(b_dtype) if need_b else None
        gh = g.mm(bl).mul_(ctx.scale).view(*grad.shape[:-1], -1)
    else:
        g = (grad_base if lora_dtype == base_dtype else grad.to(lora_dtype)) * ctx.scale
        grad_b = g.flatten(0, -2).t().mm(h.flatten(0, -2)).to(b_dtype) if need_b else None
        gh = g.matmul(bl)
    grad_a = gh.flatten(0, -2).t().mm(_dropped(xl, positions, private).flatten(0, -2)).to(a_dtype) if need_a else None
    grad_x = None
    if need_x:
        grad_low = gh.matmul(al)
        if positions is not None:
            grad_low.view(-1).index_fill_(0, positions, 0)
        grad_x = linear(grad_base, ctx.base.weight(base_dtype).t()).to(ctx.x_dtype).add_(grad_low)
    return grad_x, grad_a, grad_b


class _LoraLinearFn(torch.autograd.Function):
    """``base(x) + scale * B(A(dropped(x)))`` with ``scale = scaling / (1 - p)``, dropout positions from ``seed``.

    Saved for backward: ``x`` in the LoRA compute dtype (shared with sibling layers), ``A x``, the
    factors in the compute dtype and the dropped positions (int32, ``p`` of the input's size).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: _Base, scale: float, p: float,
        seed: int | None, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    ) -> torch.Tensor:
        out, xl, saved = _lora_forward(ctx, x, a, b, base, scale, p, seed, dtypes)
        ctx.save_for_backward(xl, *saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl, *saved = ctx.saved_tensors
        return *_lora_backward(ctx, grad, xl, tuple(saved), tuple(ctx.needs_input_grad[:3])), None, None, None, None, None


def _all_fp32(dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> bool:
    """Base, LoRA and output all fp32 (the numerics probe's choice where bf16 is emulated): the low-rank part
    is accumulated into the base output by one ``addmm_`` and the scale applied to the r-wide products
    (fewer full-width passes; a different but fp32 rounding). Under bf16 the plain order is kept: there it
    is bit-identical to PEFT's."""
    return dtypes[0] == dtypes[1] == dtypes[2] == torch.float32


def _compute_dtypes(layer: torch.nn.Module, base: _Base, x_dtype: torch.dtype, device_type: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(base matmul, LoRA matmul, output) dtypes for an input of ``x_dtype``: exactly those PEFT's layer ends up with."""
    a_dtype = next(iter(layer.lora_A.values())).weight.dtype
    if torch.is_autocast_enabled(device_type):
        auto = torch.get_autocast_dtype(device_type)
        return auto, auto, x_dtype if base.is_4bit else auto
    if base.is_4bit:
        return base.layer.compute_dtype or x_dtype, a_dtype, x_dtype
    return x_dtype, a_dtype, x_dtype


def _fused_args(layer: torch.nn.Module, x_dtype: torch.dtype, device_type: str) -> tuple[Any, ...] | None:
    """The fused function's arguments after ``x`` (drawing this call's dropout seed), or None where the layer is
    not fused or its state (several active adapters, merged, disabled) needs PEFT's own forward."""
    base = getattr(layer, "_tuneguard_base", None)
    if base is None:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(active) != 1 or layer.lora_variant:
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
    seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else None
    scale = float(layer.scaling[name]) / (1 - p)
    dtypes = _compute_dtypes(layer, base, x_dtype, device_type)
    return layer.lora_A[name].weight, layer.lora_B[name].weight, base, scale, p, seed, dtypes


def _fused_forward(layer: torch.nn.Module, original: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    fused = None if args or kwargs else _fused_args(layer, x.dtype, x.device.type)
    if fused is None:
        return original(x, *args, **kwargs)
    return _LoraLinearFn.apply(x, *fused)


def _reroute(model: torch.nn.Module, matches: Callable[[torch.nn.Module], bool],
             forward: Callable[[torch.nn.Module], Callable[..., torch.Tensor]]) -> int:
    """Give every module that ``matches`` (and was not rerouted before) the forward ``forward(module)`` returns;
    returns how many."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "_tuneguard_fused") and matches(module):
            module.forward = forward(module)
            module._tuneguard_fused = True
            count += 1
    return count


def _fused_lora(layer: torch.nn.Module) -> Callable[..., torch.Tensor]:
    layer._tuneguard_base = _Base(layer.get_base_layer())
    return functools.partial(_fused_forward, layer, layer.forward)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every fusable LoRA layer through :class:`_LoraLinearFn`; returns how many were fused.

    Anything the fused function does not cover (several active adapters, merged or disabled
    adapters, extra forward arguments) still goes through PEFT's own forward, call by call.
    """
    return _reroute(model, fusable_lora, _fused_lora)


def _rebuild_gated(
    act: torch.nn.Module, gate_kept: torch.Tensor, up_kept: torch.Tensor, dtypes: tuple[torch.dtype, torch.dtype]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gate`` (requiring grad), ``act(gate)`` with its graph, and ``up``, from the copies kept for backward."""
    with torch.enable_grad():
        gate = gate_kept.to(dtypes[0]).requires_grad_()
        activated = act(gate)
    return gate, activated, up_kept.to(dtypes[1])


def _gated_grads(gate: torch.Tensor, activated: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``gate`` and ``up`` given the gradient of ``act(gate) * up``."""
    (grad_gate,) = torch.autograd.grad(activated, gate, grad * up)
    return grad_gate, (grad * activated.detach()).to(up.dtype)


class _GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` (a gated MLP's middle), keeping ``gate`` and ``up`` for backward in the compute dtype.

    The forward is computed exactly as before, in the inputs' dtype. Under bf16 autocast the
    gradients that come out of here are cast to bf16 by the next matmul anyway, so reading bf16
    copies of ``gate`` and ``up`` (instead of keeping fp32 ``gate``, ``act(gate)`` and ``up``) changes
    them only within that rounding, and saves 10 of 12 bytes per intermediate value per token.
    """

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: torch.nn.Module, keep_dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate.to(keep_dtype), up.to(keep_dtype))
        ctx.act, ctx.dtypes = act, (gate.dtype, up.dtype)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return *_gated_grads(*_rebuild_gated(ctx.act, *ctx.saved_tensors, ctx.dtypes), grad), None, None


class _GatedLoraDown(torch.autograd.Function):
    """``down(act(gate) * up)`` where ``down`` is a fused LoRA layer: as :class:`_GatedProduct` then
    :class:`_LoraLinearFn`, but the product (the LoRA input of ``down``, as wide as the MLP) is rebuilt in
    backward from the kept ``gate`` and ``up`` instead of kept too. In fp32 it is rebuilt bit for bit.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: torch.nn.Module, keep_dtype: torch.dtype,
        a: torch.Tensor, b: torch.Tensor, base: _Base, scale: float, p: float, seed: int | None,
        dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    ) -> torch.Tensor:
        out, _, saved = _lora_forward(ctx, act(gate) * up, a, b, base, scale, p, seed, dtypes, private=True)
        ctx.save_for_backward(gate.to(keep_dtype), up.to(keep_dtype), *saved)
        ctx.act, ctx.gated_dtypes = act, (gate.dtype, up.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate_kept, up_kept, *saved = ctx.saved_tensors
        gate, activated, up = _rebuild_gated(ctx.act, gate_kept, up_kept, ctx.gated_dtypes)
        product = (activated.detach() * up).to(ctx.dtypes[1])
        need = ctx.needs_input_grad
        grad_product, grad_a, grad_b = _lora_backward(ctx, grad, product, tuple(saved), (need[0] or need[1], need[4], need[5]),
                                                      private=True)
        del product
        grad_gate, grad_up = (None, None) if grad_product is None else _gated_grads(gate, activated, up, grad_product)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None, None, None


def _gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return mlp.down_proj(mlp.act_fn(gate) * up)
    auto = torch.is_autocast_enabled(x.device.type)
    keep_dtype = torch.get_autocast_dtype(x.device.type) if auto else gate.dtype
    fused = _fused_args(mlp.down_proj, torch.promote_types(gate.dtype, up.dtype), x.device.type)
    if fused is not None:
        return _GatedLoraDown.apply(gate, up, mlp.act_fn, keep_dtype, *fused)
    return mlp.down_proj(_GatedProduct.apply(gate, up, mlp.act_fn, keep_dtype))


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    """``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2, ...), checked on a small input, not by name."""
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    n_in = getattr(module.gate_proj, "in_features", None)
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if n_in is None or weight is None:
        return False
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = torch.randn(1, 3, n_in, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
            return torch.equal(module(x), _gated_mlp_forward(module, x))
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        module.train(was_training)


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Route gated MLPs through :class:`_GatedProduct`; returns how many."""
    return _reroute(model, _is_gated_mlp, lambda mlp: functools.partial(_gated_mlp_forward, mlp))


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Route every RMSNorm that computes :mod:`tuneguard.train.norms`' forward through it; returns how many."""
    return _reroute(model, is_rms_norm, lambda norm: functools.partial(rms_norm_forward, norm, norm.forward))


# --------------------------------------------------------------------------------- bnb and memory


def _file_backed(t: torch.Tensor) -> bool:
    """Whether the tensor's memory is a view of an mmapped file (safetensors loads frozen weights so)."""
    try:
        return t.untyped_storage().filename is not None or not t.untyped_storage().resizable()
    except (RuntimeError, AttributeError):
        return False


def release_file_backed_weights(model: torch.nn.Module) -> int:
    """Copy weights that still point into the loaded checkpoint file into ordinary memory (bytes copied)."""
    copied = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and _file_backed(tensor):
                tensor.data = tensor.data.clone()
                copied += tensor.numel() * tensor.element_size()
    gc.collect()  # the loader's reference cycles still hold the file's storages
    trim_heap()
    return copied


# ------------------------------------------------------------------------------------ checkpoints


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers can checkpoint one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model: torch.nn.Module, n: int) -> int:
    """Checkpoint the lowest ``n`` decoder layers; returns how many.

    The lowest ones: backward reaches them last, when the kept layers above have already freed
    their activations, so recomputing one adds nothing to the peak.
    """
    layers = decoder_layers(model)[: max(n, 0)]
    func = functools.partial(checkpoint, use_reentrant=False)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = func
    return len(layers)


# ---------------------------------------------------------------------------------------- entry


def prepare_for_training(
    model: torch.nn.Module, recipe: Recipe, device: torch.device, *, enabled: bool | None = None, seq: int | None = None,
    masked: bool = True,
) -> torch.nn.Module:
    """Apply the optimizations that are exact for this model and device (``seq``: the longest training row, and
    ``masked``: whether batches carry an attention mask, which the checkpoint plan sizes activations by);
    returns the model to train."""
    keep_bnb_trainable(model)
    if not fastpath_enabled(enabled):
        return model
    if device.type == "cpu":
        release_file_backed_weights(model)
        use_blocked_attention(model)
    fuse_lora_layers(model)
    fuse_gated_mlps(model)
    fuse_rms_norms(model)
    if not recipe.train.gradient_checkpointing:
        checkpoint_layers(model, planned_checkpoints(model, recipe, fastpath=True, seq=seq, masked=masked))
    return model
