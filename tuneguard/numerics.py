"""Which dtype each ``auto`` becomes on this device: measured, not read off CPU flags.

Flags say which instructions exist, not how fast torch's kernels run with them. On an AVX2-only
CPU a bf16 matmul is emulated (about 60x slower than fp32); with AVX512-BF16 or AMX it is faster
than fp32. So a short matmul probe times fp32, bf16 and fp16 on the device once, the result is
cached per machine (CPU model, torch build, kernel-selection variables, threads), and every
``auto`` (model weights, 4-bit compute, mixed precision, evaluation) resolves from it. A dtype
forced by a recipe or flag that the probe found emulated gets one warning naming the slowdown.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from tuneguard.io import atomic_write_json, cache_dir
from tuneguard.progress import console

CANDIDATES = ("float32", "bfloat16", "float16")
PROBE_SHAPE = (256, 576, 1536)
"""(m, k, n): SmolLM2's hidden width against its MLP width, a few hundred tokens at a time."""
FASTER = 1.1
"""A low-precision dtype is chosen only when it beats fp32 by this factor: precision is not spent for less."""
EMULATED = 0.5
"""Slower than this fraction of fp32: the hardware does not run the dtype natively."""
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Probe:
    """Measured matmul throughput (GFLOP/s) per dtype on one device, and where it was measured."""

    device: str
    device_name: str
    capability: str
    gflops: dict[str, float]

    def speed(self, dtype: str) -> float:
        """Throughput relative to fp32 (below 1: slower)."""
        return self.gflops.get(dtype, 0.0) / max(self.gflops["float32"], 1e-9)

    @property
    def choice(self) -> str:
        """bf16 where it is clearly faster than fp32 (fp16 is never automatic: it needs loss scaling)."""
        return "bfloat16" if self.speed("bfloat16") >= FASTER else "float32"

    def emulated(self, dtype: str) -> bool:
        return dtype != "float32" and self.speed(dtype) < EMULATED

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "chosen": self.choice}


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


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.05, windows: int = 1) -> float:
    """Sustained GFLOP/s of an ``(m, k) @ (k, n)`` matmul into a kept output: one warm-up call, then calls for
    ``seconds`` (at least one), best of ``windows`` such timings (what the hardware does when nothing interferes)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    out = torch.mm(a, b)
    best = 0.0
    for _ in range(windows):
        calls, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, 2 * m * k * n * calls / elapsed / 1e9)
    return best


def _cache_key(device: torch.device) -> str:
    parts = [device.type, device_name(device), cpu_capability(), torch.__version__, str(torch.get_num_threads()),
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
    return Probe(str(device.type), device_name(device), cpu_capability() if device.type == "cpu" else "", gflops)


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


def numerics_record(device: torch.device | str | None = None) -> dict[str, object]:
    """What run.json and bench results keep: the device, torch's CPU capability, the probe and its choice."""
    return {"cpu_model": cpu_model(), **probe(_device_type(device)).to_dict()}
