"""The training fast path computes what the plain path computes: same loss, gradients, dropout law."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tuneguard.train.fastpath as fastpath
import tuneguard.train.losses as losses
from tuneguard.recipe import validate
from tuneguard.train.attention import use_blocked_attention
from tuneguard.train.losses import CausalLMLoss, chunked_lm_loss
from tuneguard.train.memory import (
    ModelShape,
    activation_bytes_per_token,
    adapter_shape,
    checkpoint_plan,
    estimate_model,
)

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
POS = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two packed documents per row


def nf4_lora(model_dir: Path, dropout: float = 0.0, compute: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The tiny Llama in 4-bit with LoRA on every linear layer (B random, so every path matters)."""
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    fastpath.keep_bnb_trainable(model)
    return model.train()


def loss_and_grads(model: torch.nn.Module, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = CausalLMLoss(model)(input_ids=IDS, position_ids=POS, labels=IDS)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)) for k in a)


def recipe(batch: int = 2, seq: int = 24):
    return validate({"data": {"kind": "text", "train": "x.jsonl", "max_length": seq}, "train": {"batch_size": batch}}, "t")


def test_fused_lora_is_exact_under_bf16_autocast(tiny_llama_dir: Path) -> None:
    plain = nf4_lora(tiny_llama_dir)
    fused = nf4_lora(tiny_llama_dir)
    assert fastpath.fuse_lora_layers(fused) == 14  # 2 layers x 7 projections
    loss_a, grads_a = loss_and_grads(plain, autocast=True)
    loss_b, grads_b = loss_and_grads(fused, autocast=True)
    assert loss_a == loss_b
    assert rel_err(grads_a, grads_b) < 1e-6


def test_fast_path_matches_plain_path_in_fp32(tiny_llama_dir: Path) -> None:
    plain = nf4_lora(tiny_llama_dir, compute=torch.float32)
    fast = fastpath.prepare_for_training(nf4_lora(tiny_llama_dir, compute=torch.float32), recipe(), torch.device("cpu"))
    loss_a, grads_a = loss_and_grads(plain, autocast=False)
    loss_b, grads_b = loss_and_grads(fast, autocast=False)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert rel_err(grads_a, grads_b) < 1e-5


def test_fast_path_stays_within_bf16_rounding(tiny_llama_dir: Path) -> None:
    """Under bf16 autocast the fast path rounds elsewhere (bf16 copies kept for the gated MLP's backward; attention in
    fp32 on the bf16 q, k, v, where SDPA rounds its probabilities to bf16): loss and gradients stay within bf16's
    rounding of the plain path's, and no further from fp32's."""
    plain = nf4_lora(tiny_llama_dir)
    fast = fastpath.prepare_for_training(nf4_lora(tiny_llama_dir), recipe(), torch.device("cpu"))
    exact = nf4_lora(tiny_llama_dir, compute=torch.float32)
    loss_a, grads_a = loss_and_grads(plain, autocast=True)
    loss_b, grads_b = loss_and_grads(fast, autocast=True)
    loss_fp32, grads_fp32 = loss_and_grads(exact, autocast=False)
    assert loss_b == pytest.approx(loss_a, rel=2**-8)  # bf16's precision
    assert abs(loss_b - loss_fp32) <= max(abs(loss_a - loss_fp32), 2**-8 * abs(loss_fp32))
    assert rel_err(grads_fp32, grads_b) < 1.1 * rel_err(grads_fp32, grads_a)  # no further from fp32's than the plain path


class FixedDropout(torch.nn.Module):
    """PEFT's dropout with a given set of dropped positions (what ``nn.Dropout`` computes for that mask)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(x.numel(), dtype=x.dtype)
        keep[fixed_positions(x.numel(), self.p)] = 0
        return x * keep.view(x.shape) / (1 - self.p)


def fixed_positions(numel: int, p: float) -> torch.Tensor:
    """The same dropped positions for every layer with this many inputs."""
    return fastpath.drop_positions(numel, p, numel)


def test_same_dropout_mask_gives_same_loss_and_gradients(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = nf4_lora(tiny_llama_dir, dropout=0.3, compute=torch.float32)
    for module in plain.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = FixedDropout(0.3)
    fused = nf4_lora(tiny_llama_dir, dropout=0.3, compute=torch.float32)
    fastpath.fuse_lora_layers(fused)
    monkeypatch.setattr(fastpath, "_positions", lambda numel, p, seed: None if seed is None else fixed_positions(numel, p))
    loss_a, grads_a = loss_and_grads(plain, autocast=False)
    loss_b, grads_b = loss_and_grads(fused, autocast=False)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert rel_err(grads_a, grads_b) < 1e-5


def test_dropout_positions_follow_the_bernoulli_law() -> None:
    n, p = 2_000_000, 0.05
    positions = fastpath.drop_positions(n, p, 1)
    assert torch.all(positions[1:] > positions[:-1]) and int(positions[0]) >= 0 and int(positions[-1]) < n
    # P(dropped) = p: within 5 standard deviations of n draws.
    assert abs(positions.numel() / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Independence: neighbours are both dropped with probability p^2, and gaps are Geometric(p).
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    both = float((dropped[1:] & dropped[:-1]).double().mean())
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n)
    gaps = torch.diff(positions) - 1
    for k in range(4):
        expected = (1 - p) ** k * p
        assert abs(float((gaps == k).double().mean()) - expected) < 5 * math.sqrt(expected / gaps.numel())
    # A seed gives the same positions (backward redraws them); another seed gives others.
    again = fastpath.drop_positions(n, p, 1)
    assert torch.equal(positions, again)
    assert not torch.equal(positions[:100], fastpath.drop_positions(n, p, 2)[:100])
    assert fastpath.drop_positions(n, 0.0, 0).numel() == 0
    with pytest.raises(ValueError):
        fastpath.drop_positions(n, 1.0, 0)


def test_fused_dropout_drops_at_the_rate_of_peft(tiny_llama_dir: Path) -> None:
    """End to end: each fused layer's input loses a fraction p of its elements, independently per layer."""
    fused = nf4_lora(tiny_llama_dir, dropout=0.5)
    fastpath.fuse_lora_layers(fused)
    calls: list[int] = []
    original = fastpath.drop_positions

    def spy(numel: int, p: float, seed: int) -> torch.Tensor:
        out = original(numel, p, seed)
        calls.append(out.numel() / numel)
        return out

    fastpath.drop_positions = spy
    try:
        loss_and_grads(fused, autocast=True)
    finally:
        fastpath.drop_positions = original
    assert len(calls) == 14  # once per fused layer: backward reuses the positions
    assert abs(sum(calls) / len(calls) - 0.5) < 0.05


def test_eval_pass_keeps_gradients_right(tiny_llama_dir: Path) -> None:
    """bitsandbytes repacks 4-bit weights on an eval pass; its kernel has no backward. Training must not notice."""
    model = nf4_lora(tiny_llama_dir)
    _, before = loss_and_grads(model, autocast=True)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    fastpath.keep_bnb_trainable(model)
    model.train()
    _, after = loss_and_grads(model, autocast=True)
    assert rel_err(before, after) < 1e-6


def test_checkpointing_by_budget(tiny_llama_dir: Path) -> None:
    model = fastpath.prepare_for_training(nf4_lora(tiny_llama_dir, dropout=0.2), recipe(), torch.device("cpu"))
    big = recipe(batch=64, seq=2048)
    assert checkpoint_plan(model, big, budget_mb=1e9) == 0
    assert checkpoint_plan(model, big, budget_mb=1.0) == 2
    full = estimate_model(model, big, fastpath=True).peak_mb
    none_kept = estimate_model(model, big, fastpath=True, checkpointed_layers=2).peak_mb
    assert none_kept < full
    assert checkpoint_plan(model, big, budget_mb=(full + none_kept) / 2) == 1


def test_gated_mlp_rebuilds_the_down_input_exactly_in_fp32(tiny_llama_dir: Path) -> None:
    """The MLP keeps ``gate`` and ``up``, not their product: in fp32 the rebuilt product gives the same bits."""
    def run(gated: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = nf4_lora(tiny_llama_dir, dropout=0.3, compute=torch.float32)
        fastpath.fuse_lora_layers(model)
        if gated:
            assert fastpath.fuse_gated_mlps(model) == 2
        torch.manual_seed(5)
        return loss_and_grads(model, autocast=False)

    kept: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss_a, grads_a = run(False)
    product_inputs = kept.count(2 * 24 * 128)  # (batch, seq, intermediate) of the tiny Llama
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss_b, grads_b = run(True)
    assert loss_a == loss_b
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert kept.count(2 * 24 * 128) < product_inputs


@pytest.mark.parametrize("autocast", [False, True])
def test_the_estimate_counts_what_a_fast_path_layer_keeps(tiny_llama_dir: Path, autocast: bool) -> None:
    """Per token and decoder layer, the bytes autograd keeps in the fast path's layers (blocked attention, fused
    LoRA, gated MLP, fused norms) are what the memory estimator counts, in fp32 and under bf16 autocast."""
    model = nf4_lora(tiny_llama_dir, dropout=0.25, compute=torch.bfloat16 if autocast else torch.float32)
    assert use_blocked_attention(model)
    assert fastpath.fuse_lora_layers(model) == 14 and fastpath.fuse_gated_mlps(model) == 2
    assert fastpath.fuse_rms_norms(model) == 5  # two a layer and the final one
    inside, storages = [False], {}
    for layer in fastpath.decoder_layers(model):
        layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        CausalLMLoss(model)(input_ids=ids, position_ids=torch.arange(64).expand(4, 64), labels=ids)
    shape = ModelShape.from_config(model.config)
    counted = activation_bytes_per_token(shape, adapter_shape(model), quantized=True, fastpath=True,
                                         compute_bytes=2 if autocast else 4, stream_bytes=4, blocked=True)
    assert sum(storages.values()) / (ids.numel() * shape.layers) == pytest.approx(counted, rel=0.02)


def test_checkpointed_layers_replay_the_same_dropout(tiny_llama_dir: Path) -> None:
    def run(checkpointed: int) -> tuple[float, dict[str, torch.Tensor]]:
        model = nf4_lora(tiny_llama_dir, dropout=0.3)
        fastpath.fuse_lora_layers(model)
        fastpath.fuse_gated_mlps(model)
        assert fastpath.checkpoint_layers(model, checkpointed) == checkpointed
        torch.manual_seed(5)
        return loss_and_grads(model, autocast=True)

    loss_a, grads_a = run(0)
    loss_b, grads_b = run(2)
    assert loss_a == loss_b
    assert rel_err(grads_a, grads_b) < 1e-6


def test_switched_off_by_env(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENV_FLAG, "0")
    model = fastpath.prepare_for_training(nf4_lora(tiny_llama_dir), recipe(), torch.device("cpu"))
    assert not any(hasattr(m, "_tuneguard_fused") for m in model.modules())
    assert fastpath.fastpath_enabled(True) and not fastpath.fastpath_enabled()


def test_file_backed_weights_are_released(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(fastpath._file_backed(p) for p in model.parameters())
    assert fastpath.release_file_backed_weights(model) > 0
    assert not any(fastpath._file_backed(p) for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_cross_entropy_matches_full_logits(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 500 * 64)  # 64 rows per chunk: several chunks
    monkeypatch.setattr(losses, "_WORKSPACE", losses._Workspace())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=gen, requires_grad=True)
    weight = torch.randn(500, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 500, (300,), generator=gen)
    rows: list[int] = []  # the head's products: the last chunk (44 rows) padded, so a few shapes serve every batch
    monkeypatch.setattr(losses, "linear", lambda x, w, real=losses.linear: rows.append(x.shape[0]) or real(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        got = chunked_lm_loss(hidden, weight, targets)
    assert set(rows) == {64, 48}  # 44 rows padded to 48
    gh_a, gw_a = torch.autograd.grad(expected * 0.5, (hidden, weight))
    gh_b, gw_b = torch.autograd.grad(got * 0.5, (hidden, weight))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float((gh_a - gh_b).norm() / gh_a.norm()) < (1e-5 if not autocast else 1e-3)
    assert float((gw_a - gw_b).norm() / gw_a.norm()) < (1e-5 if not autocast else 1e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert float(chunked_lm_loss(hidden, weight, targets)) == float(got.detach())  # no gradient work, same loss
    kept = losses._WORKSPACE.buffers  # bf16: the chunk's casts kept for the next call; fp32 needs none
    assert (kept is None) if not autocast else ([b.shape for b in kept] == [(64, 500)] * 2 and kept[1].dtype == torch.bfloat16)


def test_the_kept_casts_serve_every_later_call_and_grow_to_a_padded_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workspace is made once (the same storage for every later batch), as wide as a chunk padded to a multiple
    of 16 rows (50-row chunks are products of 64 rows), and no wider than the batch's own rows need."""
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 500 * 50)  # 50 rows per chunk, padded to 64
    monkeypatch.setattr(losses, "_WORKSPACE", losses._Workspace())
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 32, generator=gen)

    def loss(rows: int) -> torch.Tensor:
        hidden = torch.randn(rows, 32, generator=gen, requires_grad=True)
        targets = torch.randint(0, 500, (rows,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = chunked_lm_loss(hidden, weight, targets)
            expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(expected, hidden)[0],
                                   atol=2e-2, rtol=2e-2)
        return got

    loss(5)
    assert losses._WORKSPACE.buffers[0].shape == (16, 500)  # 5 target rows need one 16-row product
    loss(120)
    first = [b.data_ptr() for b in losses._WORKSPACE.buffers]
    assert losses._WORKSPACE.buffers[0].shape == (64, 500)
    for rows in (7, 120, 64):
        loss(rows)
        assert [b.data_ptr() for b in losses._WORKSPACE.buffers] == first
    losses.release_kept()  # when training ends: evaluation uses neither the workspace nor the head's cast
    assert losses._WORKSPACE.buffers is None and losses._HEAD_CAST._entry is None


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_weights_decoded_once_give_the_same_scores(tiny_llama_dir: Path, compute: torch.dtype, fused: bool) -> None:
    """Evaluation with every 4-bit weight decoded once scores exactly as bitsandbytes' per-forward decoding."""
    from bitsandbytes.nn import Linear4bit

    from tuneguard.backbones import dequantized
    from tuneguard.eval.scoring import loglikelihood

    model = nf4_lora(tiny_llama_dir, compute=compute).eval()
    if fused:
        fastpath.fuse_lora_layers(model)
    requests = [(IDS[0, :10].tolist(), IDS[0, 10:].tolist()), (IDS[1, :5].tolist(), IDS[1, 5:9].tolist())]

    def scores() -> list[float]:
        with model.disable_adapter():
            base = [s.logprob for s in loglikelihood(model, requests, 2)]
        return base + [s.logprob for s in loglikelihood(model, requests, 2)]

    before = scores()
    with dequantized(model) as held:
        decoded = scores()
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert held == sum(m.weight.quant_state.shape.numel() for m in four_bit) * torch.finfo(compute).bits // 8
    assert decoded == before
    assert scores() == before and not any(hasattr(m, "decoded_weight") for m in model.modules())


def test_batches_padded_to_a_multiple_score_the_same(tiny_llama_dir: Path) -> None:
    """Decoder batches are widened to a multiple of 64 tokens (steady heap); the padding changes no loss."""
    from tuneguard.data.packing import Packed, collate

    rows = [Packed(list(range(5, 15)), list(range(5, 15)), list(range(10))),
            Packed(list(range(7, 31)), list(range(7, 31)), list(range(24)))]
    tight, wide = collate(rows, 0), collate(rows, 0, multiple=64)
    assert tight["input_ids"].shape[1] == 24 and wide["input_ids"].shape[1] == 64
    model = nf4_lora(tiny_llama_dir, compute=torch.float32).eval()
    with torch.no_grad():
        loss_a, n_a = CausalLMLoss(model)(**tight)
        loss_b, n_b = CausalLMLoss(model)(**wide)
    assert int(n_a) == int(n_b) and float(loss_b) == pytest.approx(float(loss_a), rel=1e-5)


def test_freed_blocks_are_reused_without_page_faults() -> None:
    """After keep_freed_memory, an 8 MB block freed and allocated again comes back from glibc's heap, not as
    2,048 freshly zero-filled pages each time (glibc's default maps and unmaps it, or trims the heap top)."""
    import ctypes
    import resource

    from tuneguard.allocator import keep_freed_memory

    assert keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    size = 8 * 2**20

    def cycle() -> None:
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        cycle()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2048  # one block's pages, for all 20


def test_trim_heap_returns_free_pages_between_live_blocks() -> None:
    """With the heap never trimmed on its own, freed blocks stay resident; trim_heap (after loading, before training)
    hands back the free pages even where live blocks sit on both sides of them, not only at the heap's top."""
    import ctypes

    from tuneguard.allocator import keep_freed_memory, trim_heap

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    assert keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    size = 8 * 2**20
    blocks = [libc.malloc(size) for _ in range(9)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks[1::2]:  # four freed blocks, each between two live ones: never at the heap's top
        libc.free(block)
    resident = rss_mb()
    trim_heap()
    assert resident - rss_mb() > 24  # most of the four 8 MB blocks' pages
    for block in blocks[::2]:
        libc.free(block)


def test_last_result_is_reused_only_for_the_same_unchanged_tensor() -> None:
    import gc
    import weakref

    from tuneguard.train.reuse import LastResult

    calls: list[int] = []
    last: LastResult[int] = LastResult()

    def compute() -> int:
        calls.append(1)
        return len(calls)

    x = torch.zeros(3)
    assert last(x, "a", compute) == 1 and last(x, "a", compute) == 1  # same tensor, same key: once
    assert last(x, "b", compute) == 2  # another key
    x.add_(1)
    assert last(x, "b", compute) == 3  # changed in place
    assert last(x.clone(), "b", compute) == 4  # equal values, another tensor
    assert last(x, "b", compute) == 5 and last(x, "b", compute) == 5  # x is the cached tensor again
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None  # the cache does not keep the tensor alive
