"""The dtype probe: each measured outcome gives the right choice, forced emulated dtypes warn once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tuneguard import numerics
from tuneguard.numerics import Probe

AVX2 = Probe("cpu", "AMD EPYC 7B13", "AVX2", {"float32": 72.0, "bfloat16": 1.2, "float16": 1.5},
             {"layer": {"default": 72.0, "onednn": 84.0}, "head": {"default": 70.0, "onednn": 125.0}})
AMX = Probe("cpu", "Intel Xeon", "AVX512", {"float32": 110.0, "bfloat16": 475.0, "float16": 134.0},
            {"layer": {"default": 110.0, "onednn": 108.0}, "head": {"default": 110.0, "onednn": 104.0}})
ZEN4 = Probe("cpu", "AMD EPYC 9B14", "AVX512", {"float32": 150.0, "bfloat16": 160.0, "float16": 20.0},
             {"layer": {"default": 150.0, "onednn": 0.0}, "head": {"default": 150.0, "onednn": 0.0}})
ZEN3 = Probe("cpu", "AMD EPYC", "AVX2", {"float32": 112.0, "bfloat16": 1.2, "float16": 1.3},
             {"layer": {"default": 118.5, "onednn": 120.4}, "head": {"default": 71.0, "onednn": 126.0}})


@pytest.fixture()
def fake_probe(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Make the probe 'measure' a given outcome; caches (memory and disk) are fresh for each test."""
    measured: list[str] = []
    monkeypatch.setenv("TUNEGUARD_CACHE", str(tmp_path))

    def use(result: Probe) -> list[str]:
        def fake_measure(device: torch.device) -> Probe:
            measured.append(device.type)
            return result

        monkeypatch.setattr(numerics, "measure", fake_measure)
        monkeypatch.setattr(numerics, "_cache_key", lambda device: f"fake-{result.device_name}")
        clear()
        return measured

    def clear() -> None:
        for cached in (numerics.probe, numerics._warn):
            cached.cache_clear()

    yield use
    clear()


@pytest.mark.parametrize(("result", "dtype", "mixed"), [(AVX2, torch.float32, "no"), (AMX, torch.bfloat16, "bf16"),
                                                         (ZEN4, torch.float32, "no")])
def test_auto_follows_the_measurement(fake_probe, result: Probe, dtype: torch.dtype, mixed: str) -> None:
    fake_probe(result)
    assert numerics.resolve_dtype("auto", "cpu") == dtype
    assert numerics.resolve_mixed_precision("auto", "cpu") == mixed


def test_forced_emulated_dtype_warns_once_and_is_kept(fake_probe, capsys: pytest.CaptureFixture[str]) -> None:
    fake_probe(AVX2)
    for _ in range(3):
        assert numerics.resolve_dtype("bfloat16", "cpu", "quantization.compute_dtype") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    line = next(ln for ln in err.splitlines() if "warning:" in ln)
    assert "quantization.compute_dtype=bfloat16" in line and "60x slower" in line and "float32" in line
    assert numerics.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert "train.mixed_precision=bf16" in capsys.readouterr().err


def test_native_forced_dtype_does_not_warn(fake_probe, capsys: pytest.CaptureFixture[str]) -> None:
    fake_probe(AMX)
    assert numerics.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert numerics.resolve_dtype("float32", "cpu") == torch.float32
    assert "warning" not in capsys.readouterr().err


def test_probe_is_measured_once_per_machine(fake_probe) -> None:
    measured = fake_probe(AVX2)
    numerics.probe("cpu")
    numerics.probe.cache_clear()  # a new process: read back from the cache file
    again = numerics.probe("cpu")
    assert measured == ["cpu"] and again == AVX2
    record = numerics.numerics_record("cpu")
    assert record["chosen"] == "float32" and record["capability"] == "AVX2" and record["gflops"]["bfloat16"] == 1.2
    assert json.dumps(record)


def test_real_probe_measures_every_candidate() -> None:
    result = numerics.measure(torch.device("cpu"))
    assert set(result.gflops) == set(numerics.CANDIDATES)
    assert result.gflops["float32"] > 0
    assert result.choice in {"float32", "bfloat16"}
    assert result.capability == torch.backends.cpu.get_cpu_capability()
    assert set(result.linear_gflops) == {"layer", "head"}
    assert all(rates["default"] > 0 for rates in result.linear_gflops.values())
    assert set(result.linear_kernel.values()) <= {"default", "onednn"}


@pytest.mark.parametrize(("result", "layer", "head"), [(AVX2, "onednn", "onednn"), (AMX, "onednn", "default"),
                                                       (ZEN4, "default", "default"), (ZEN3, "onednn", "onednn")])
def test_linear_kernel_follows_the_measurement(fake_probe, monkeypatch: pytest.MonkeyPatch, result: Probe, layer: str,
                                               head: str) -> None:
    """oneDNN (where it exists) unless MKL measured clearly faster for a layer of that width (a tie: oneDNN, which
    peaks lower), and only where autograd records nothing."""
    fake_probe(result)
    assert result.linear_kernel == {"layer": layer, "head": head} == numerics.numerics_record("cpu")["linear_kernel"]
    calls: list[int] = []
    real = numerics._onednn_linear
    monkeypatch.setattr(numerics, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    x, w, vocab = torch.randn(3, 5, 8), torch.randn(4, 8), torch.randn(numerics.HEAD_WIDTH, 8)
    with torch.no_grad():
        numerics.linear(x, w)
        assert len(calls) == (layer == "onednn")
        numerics.linear(x, vocab)
    assert len(calls) == (layer == "onednn") + (head == "onednn")
    calls.clear()
    numerics.linear(x.requires_grad_(), w).sum().backward()  # autograd must see it: F.linear
    numerics.linear(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        numerics.linear(x, w)
    assert calls == [] and x.grad is not None


def test_onednn_linear_computes_f_linear() -> None:
    """The kernel the probe may pick gives F.linear's values (fp32 rounding in another order), for the layouts used."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 37, 96, generator=gen), torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
    g = torch.randn(2, 37, 64, generator=gen)
    pairs = [(numerics._onednn_linear(x, w, b), F.linear(x, w, b)), (numerics._onednn_linear(g, w.t()), g @ w),
             (numerics._onednn_linear(x[:, ::2], w), F.linear(x[:, ::2], w))]
    for got, want in pairs:
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
