"""Choosing the kernel backend: once, by the wiring code, from what the CPU runs and SOUVERAIN_KERNELS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from souverain import kernels
from souverain.kernels.backend import TORCH, BackendUnavailable, available, choose

fast = kernels.load()


def fake_cpu(amx: bool, isas: tuple[int, ...]) -> SimpleNamespace:
    return SimpleNamespace(amx_available=lambda: amx, q4_supported=lambda isa: isa in isas)


def test_what_each_cpu_gets() -> None:
    assert available(fake_cpu(True, (512, 256))) == ["amx", "avx512", "avx2", "torch"]
    # A CPU that lists AMX in a sandbox that refuses it (amx_available asks the kernel): AVX-512, no crash.
    assert available(fake_cpu(False, (512, 256))) == ["avx512", "avx2", "torch"]
    assert available(fake_cpu(False, (256,))) == ["avx2", "torch"]
    assert available(fake_cpu(False, ())) == ["torch"]
    assert available(None) == ["torch"]  # no compiler


def test_souverain_kernels_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    here = available(fast)
    for name in here:
        monkeypatch.setenv("SOUVERAIN_KERNELS", name)
        assert choose().name == name
    for off in ("0", "off", "torch"):
        monkeypatch.setenv("SOUVERAIN_KERNELS", off)
        assert choose() is TORCH
    monkeypatch.setenv("SOUVERAIN_KERNELS", "auto")
    assert choose().name == here[0]
    monkeypatch.setenv("SOUVERAIN_KERNELS", "sse9")
    with pytest.raises(BackendUnavailable, match="use auto, amx, avx512, avx2, torch, cuda"):
        choose()
    monkeypatch.delenv("SOUVERAIN_KERNELS")
    assert choose(name="torch") is TORCH
    with pytest.raises(BackendUnavailable, match="needs the model on a CUDA device"):
        choose(name="cuda")


def test_a_backend_this_machine_lacks_is_refused_with_what_it_has() -> None:
    missing = [n for n in ("amx", "avx512", "avx2") if n not in available(fast)]
    if not missing:
        pytest.skip("this machine runs every CPU backend")
    with pytest.raises(BackendUnavailable, match="this machine runs: "):
        choose(name=missing[0])
