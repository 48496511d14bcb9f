"""Which dtype each ``auto`` becomes on this device: measured, not read off CPU flags.

Flags say which instructions exist, not how fast torch's kernels run with them. On an AVX2-only
CPU a bf16 matmul is emulated (about 60x slower than fp32); with AVX512-BF16 or AMX it is faster
than fp32. So a short matmul probe times fp32, bf16 and fp16 on the device once, the result is
cached per machine (CPU model, torch build, kernel-selection variables, threads), and every
``auto`` (model weights, 4-bit compute, mixed precision, evaluation) resolves from it. A dtype
forced by a recipe or flag that the probe found emulated gets one warning naming the slowdown.

The same probe picks the kernel of fp32 linear layers on CPU (:func:`linear`), separately for a
model's layers and for its vocabulary head: torch's ``F.linear`` calls MKL, and the same torch build
ships oneDNN, which ran SmolLM2's layer shapes 10-15% faster on a Zen 4 EPYC with AVX2 kernels and
2.6x with AVX-512 (MKL does not use AVX-512 on AMD), but no faster than MKL on a real Zen 3 (AVX2),
where it ran the LM head's forward (160 positions against 49,152 rows) 1.8x faster (126 vs 71
GFLOP/s). Unless MKL measures clearly faster here (a tie goes to oneDNN: training peaked ~130 MB lower
with it), the fast path's frozen-weight products, the chunked loss and evaluation's decoded layers and
head use it; elsewhere (MKL faster, oneDNN missing, bf16, autocast, anything autograd must see)
``F.linear`` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tuneguard.io import atomic_write_json, cache_dir
from tuneguard.progress import console

CANDIDATES = ("float32", "bfloat16", "float16")
PROBE_SHAPE = (256, 576, 1536)
"""(m, k, n): SmolLM2's hidden width against its MLP width, a few hundred tokens at a time."""
HEAD_SHAPE = (160, 576, 32768)
"""(m, k, n): an LM head's chunk, a few hundred positions against a vocabulary (the kernels rank differently there)."""
HEAD_WIDTH = 8192
"""A linear layer with at least this many outputs is a vocabulary head, for the kernel choice."""
KERNEL_SHAPES = {"layer": PROBE_SHAPE, "head": HEAD_SHAPE}
"""Where the fp32 linear kernels are timed, by the class of layer that gets the faster one."""
FASTER = 1.1
"""A low-precision dtype is chosen only when it beats fp32 by this factor: precision is not spent for less."""
EMULATED = 0.5
"""Slower than this fraction of fp32: the hardware does not run the dtype natively."""
KERNEL_FASTER = 1.05
"""``F.linear`` (MKL) is kept over oneDNN's fp32 linear only where it measured at least this much faster: at a tie
oneDNN, as training with it peaked lower (the bench configuration with AVX2 kernels, 3-step runs: 2,188-2,286 MB
against 2,308-2,488 with the layers on MKL, the same tensors allocated; bench/README.md, "The layers' kernel and the
peak")."""
KERNEL_ROUNDS = 6
"""Timings of each kernel, alternated (best of each kept): two shared cores drift within a second."""
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
PROBE_VERSION = "2"
"""Part of the cache key: raised when the probe measures something new, so older cached results are measured again."""


@dataclass(frozen=True)
class Probe:
    """Measured matmul throughput (GFLOP/s) per dtype on one device, and where it was measured."""

    device: str
    device_name: str
    capability: str
    gflops: dict[str, float]
    linear_gflops: dict[str, dict[str, float]]
    """fp32 ``x @ W.T`` on CPU, for each class of :data:`KERNEL_SHAPES` (``layer``, ``head``), by kernel:
    ``default`` (``F.linear``) and ``onednn`` (0: unavailable); empty on other devices, where ``F.linear`` is the
    only kernel."""

    def speed(self, dtype: str) -> float:
        """Throughput relative to fp32 (below 1: slower)."""
        return self.gflops.get(dtype, 0.0) / max(self.gflops["float32"], 1e-9)

    @property
    def choice(self) -> str:
        """bf16 where it is clearly faster than fp32 (fp16 is never automatic: it needs loss scaling)."""
        return "bfloat16" if self.speed("bfloat16") >= FASTER else "float32"

    def emulated(self, dtype: str) -> bool:
        return dtype != "float32" and self.speed(dtype) < EMULATED

    @cached_property
    def linear_kernel(self) -> dict[str, str]:
        """The fp32 linear kernel :func:`linear` uses for layers and for heads: ``onednn`` unless MKL measured clearly
        faster (or oneDNN is missing)."""
        def pick(rates: dict[str, float]) -> str:
            onednn = rates.get("onednn", 0.0)
            return "onednn" if onednn > 0 and KERNEL_FASTER * onednn > rates.get("default", 0.0) else "default"

        return {role: pick(self.linear_gflops.get(role, {})) for role in KERNEL_SHAPES}

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "chosen": self.choice, "linear_kernel": self.linear_kernel}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The kernel set torch dispatches to here (``AVX2``, ``AVX512``, ...); honours ``ATEN_CPU_CAPABILITY``."""
    return getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _rate(op: Any, flops: int, device: torch.device, seconds: float, windows: int) -> float:
    """Sustained GFLOP/s of ``op()``: one warm-up call, then calls for ``seconds`` (at least one), best of ``windows``
    such timings (what the hardware does when nothing interferes)."""
    op()
    best = 0.0
    for _ in range(windows):
        calls, start = 0, time.perf_counter()
        while True:
            op()
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, flops * calls / elapsed / 1e9)
    return best


def _operands(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(k, n, generator=gen).to(device, dtype)


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.05, windows: int = 1) -> float:
    """GFLOP/s of an ``(m, k) @ (k, n)`` matmul into a kept output."""
    a, b = _operands(m, k, n, dtype, device)
    out = torch.mm(a, b)
    return _rate(lambda: torch.mm(a, b, out=out), 2 * m * k * n, device, seconds, windows)


def linear_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.05, windows: int = 1,
                  kernel: Any = None) -> float:
    """GFLOP/s of a linear layer's ``(m, k) @ W.T`` with ``W`` of ``(n, k)``, through ``kernel`` (default :func:`linear`)."""
    x, w = _operands(m, k, n, dtype, device)
    w = w.t().contiguous()
    op = kernel or linear
    return _rate(lambda: op(x, w), 2 * m * k * n, device, seconds, windows)


def _cache_key(device: torch.device) -> str:
    parts = [PROBE_VERSION, device.type, device_name(device), cpu_capability(), torch.__version__, str(torch.get_num_threads()),
             *(os.environ.get(v, "") for v in KERNEL_VARIABLES)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def measure(device: torch.device) -> Probe:
    """Time the probe matmul in every candidate dtype the device can hold (well under a second even where emulated)."""
    m, k, n = PROBE_SHAPE
    gflops = {}
    for name in CANDIDATES:
        try:
            gflops[name] = round(matmul_gflops(m, k, n, getattr(torch, name), device), 2)
        except RuntimeError:  # a dtype the device has no kernel for counts as unusable
            gflops[name] = 0.0
    kernels = {"default": F.linear, "onednn": _onednn_linear} if device.type == "cpu" else {}  # a choice on CPU only
    linear_rates = {role: dict.fromkeys(kernels, 0.0) for role in KERNEL_SHAPES} if kernels else {}
    for _ in range(KERNEL_ROUNDS):
        for role, shape in KERNEL_SHAPES.items():
            for name, kernel in kernels.items():
                try:
                    rate = linear_gflops(*shape, torch.float32, device, kernel=kernel)
                except (RuntimeError, AttributeError, NotImplementedError):  # a torch build without oneDNN
                    rate = 0.0
                linear_rates[role][name] = max(linear_rates[role][name], round(rate, 2))
    return Probe(str(device.type), device_name(device), cpu_capability() if device.type == "cpu" else "", gflops, linear_rates)


@cache
def probe(device_type: str = "cpu") -> Probe:
    """This device's probe: from ``$TUNEGUARD_CACHE/numerics`` when this machine was measured before."""
    device = torch.device(device_type)
    path = cache_dir() / "numerics" / f"{_cache_key(device)}.json"
    try:
        return Probe(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    result = measure(device)
    atomic_write_json(path, asdict(result))
    return result


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


@cache
def _warn(setting: str, value: str, dtype: str, device_type: str) -> None:
    """One line per setting and value per process: forced, and measured to be emulated here."""
    p = probe(device_type)
    console.print(
        f"[yellow]warning:[/] {setting}={value}: this {p.device_name} ({p.capability or device_type}) runs {dtype} "
        f"matmuls {1 / max(p.speed(dtype), 1e-9):.0f}x slower than float32 (measured {p.gflops[dtype]:g} vs "
        f"{p.gflops['float32']:g} GFLOP/s); 'auto' would choose {p.choice}",
        soft_wrap=True,
    )


def resolve_dtype(name: str, device: torch.device | str | None = None, setting: str = "dtype") -> torch.dtype:
    """A recipe's dtype name as a torch dtype: ``auto`` by the probe; a forced one warned about if emulated."""
    device_type = _device_type(device)
    if name == "auto":
        return getattr(torch, probe(device_type).choice)
    if probe(device_type).emulated(name):
        _warn(setting, name, name, device_type)
    return getattr(torch, name)


def resolve_mixed_precision(name: str, device: torch.device | str | None = None) -> str:
    """``train.mixed_precision`` for Accelerate: ``auto`` is ``bf16`` only where the probe found it faster."""
    device_type = _device_type(device)
    if name == "auto":
        return "bf16" if probe(device_type).choice == "bfloat16" else "no"
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(name)
    if dtype and probe(device_type).emulated(dtype):
        _warn("train.mixed_precision", name, dtype, device_type)
    return name


def _use_onednn(role: str) -> bool:
    return probe("cpu").linear_kernel[role] == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN's kernel unless the probe measured MKL's clearly faster for fp32 on
    this CPU (for a layer this wide: a model's layers, or its vocabulary head).

    oneDNN's op has no derivative, so it runs only where autograd records nothing: inside custom autograd
    functions and without gradients. Under autocast, in other dtypes or on other devices: ``F.linear``.
    """
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
            and _use_onednn("head" if weight.shape[0] >= HEAD_WIDTH else "layer")):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def numerics_record(device: torch.device | str | None = None) -> dict[str, object]:
    """What run.json and bench results keep: the device, torch's CPU capability, the probe and its choice."""
    return {"cpu_model": cpu_model(), **probe(_device_type(device)).to_dict()}
