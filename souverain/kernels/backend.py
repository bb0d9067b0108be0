"""The kernel backend a model and an engine run on, chosen once by the wiring code and passed down.

    amx     Intel AMX: prompt tokens through bf16 products on AMX tiles (int4 codes dequantised,
            gemm.cpp's q4_linear_bf16), generated tokens through int4 x int8 products on the tiles for wide
            decode steps (q4.cpp, the same bits as AVX-512 VNNI's, which takes the narrow ones); prompt
            tokens attend on the tiles (prefill.cpp), generated ones through cpu.cpp's vector kernel
    avx512  AVX-512 with VNNI (AMD Zen 4, Intel Ice Lake and later): every int4 product through
            q4.cpp's 512-bit kernel; where the CPU has AVX-512 BF16 (Zen 4, Cooper Lake, Sapphire Rapids),
            prompt tokens take gemm.cpp's and prefill.cpp's bf16 products with vdpbf16ps in place of the
            tiles (q4_linear_bf16, prefill attention), generated ones q4.cpp's and cpu.cpp's vector kernels
    avx2    AVX2 with FMA (older and smaller CPUs): q4.cpp's 256-bit kernel
    torch   PyTorch ops only (no compiler, SOUVERAIN_KERNELS=torch, or autograd)
    cuda    a CUDA device: PyTorch ops on the GPU

Every CPU backend but `torch` also runs the element-wise and decode-attention kernels of cpu.cpp and
the C++ decoder (decoder.cpp). `choose()` takes what the CPU reports and the OS grants (AMX needs the
kernel's permission: a sandbox that lists AMX but refuses it gets `avx512`); SOUVERAIN_KERNELS forces
one (`auto` by default; `0`/`off` mean `torch`), and a backend this machine cannot run is an error
naming what it has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from souverain import kernels

NAMES = ("amx", "avx512", "avx2", "torch", "cuda")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run on this machine."""


@dataclass(frozen=True)
class Backend:
    name: str
    ops: ModuleType | None = None  # the compiled kernels; None: PyTorch ops

    @property
    def amx(self) -> bool:
        return self.name == "amx"

    @property
    def q4_isa(self) -> int:
        """q4_linear's `isa` on this backend: 1024 AMX tiles (and AVX-512 VNNI up to 4 rows), 512 AVX-512
        VNNI, 256 AVX2; 0: not used."""
        return {"amx": 1024, "avx512": 512, "avx2": 256}.get(self.name, 0)

    @property
    def prefill_isa(self) -> int:
        """The `isa` of prompt tokens' bf16 products on this backend (q4_linear_bf16, prefill_attention): 1024
        AMX tiles, 512 the same products on AVX-512 BF16 (where the build has it: `bf16_supported` and
        `prefill_supported` say); 0: not used."""
        return {"amx": 1024, "avx512": 512}.get(self.name, 0)

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    def __str__(self) -> str:
        return self.name


TORCH = Backend("torch")


def requested() -> str:
    """The backend SOUVERAIN_KERNELS asks for: one of NAMES or `auto`."""
    value = os.environ.get("SOUVERAIN_KERNELS", "auto").strip().lower() or "auto"
    if value in ("0", "false", "no", "off"):
        return "torch"
    if value in ("1", "true", "yes", "on"):
        return "auto"
    if value != "auto" and value not in NAMES:
        raise BackendUnavailable(f"SOUVERAIN_KERNELS={value!r}: use auto, {', '.join(NAMES)}")
    return value


def available(ops: ModuleType | None) -> list[str]:
    """The CPU backends this machine runs, fastest first."""
    names = []
    if ops is not None:
        if ops.amx_available() and ops.q4_supported(512):
            names.append("amx")
        if ops.q4_supported(512):
            names.append("avx512")
        if ops.q4_supported(256):
            names.append("avx2")
    return [*names, "torch"]


def choose(device: str | torch.device = "cpu", name: str | None = None) -> Backend:
    """The backend for models on `device`: `name`, else SOUVERAIN_KERNELS, else the fastest this
    machine runs. Builds the C++ kernels the first time (see souverain/kernels/__init__.py)."""
    want = name or requested()
    if torch.device(device).type == "cuda":
        if want not in ("auto", "cuda"):
            raise BackendUnavailable(f"backend {want!r} is for the CPU; the model is on {device}")
        return Backend("cuda")
    if want == "cuda":
        raise BackendUnavailable("backend 'cuda' needs the model on a CUDA device")
    if want == "torch":
        return TORCH
    ops = kernels.load()
    names = available(ops)
    pick = names[0] if want == "auto" else want
    if pick not in names:
        raise BackendUnavailable(f"backend {want!r} does not run here; this machine runs: {', '.join(names)}")
    return TORCH if pick == "torch" else Backend(pick, ops)
