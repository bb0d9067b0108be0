"""Our C++ CPU kernels (cpu.cpp), compiled once per machine with the system's C++ compiler.

`load()` builds them on first call (1.5-4 min on 2 cores, the sources compiled in parallel;
`scripts/setup.sh` does it ahead with `python -m souverain.kernels`) into the user cache, keyed by the
torch version and the CPU's instruction sets (ninja rebuilds what changed), then imports the result.
Without a compiler, or with SOUVERAIN_KERNELS=0, `load()` returns None and every op falls back to the
plain PyTorch code beside its call: same results, slower. Nothing is built at import time, and nothing
here decides which kernels a model uses: `backend.choose()` does, once, in the wiring code, and the
backend is passed to the model (`prepare`) and the engine.

cpu.cpp holds the element-wise and attention kernels, gemm.cpp the bf16 matrix products of prompt rows on
AMX tiles or AVX-512 BF16 (compiled where the CPU has either; `amx_available()` and `bf16_supported()` say
what runs here), prefill.cpp the causal
attention of prefill chunks on AMX tiles or, with the same bf16 products, on AVX-512 BF16 (compiled
where the CPU has either; `prefill_supported` says), q4.cpp the int4 x int8 product for AVX-512 VNNI and
AVX2, decoder.cpp a decode step's layers in one call (`Decoder`, built by souverain/engine/fused.py),
pool.cpp the thread pool their parallel loops share;
kernels.h declares what they share, amx.h what the AMX kernels share.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu.cpp", "gemm.cpp", "prefill.cpp", "decoder.cpp", "q4.cpp", "pool.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("kernels.h", "amx.h")]


def enabled() -> bool:
    return os.environ.get("SOUVERAIN_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where this machine's build lives: -march=native code must not travel to another CPU."""
    import platformdirs
    import torch

    # Not the sources' contents: ninja rebuilds only what changed since the last build in this folder. Their
    # folder, though: two checkouts (or installs) on one machine each keep their own build, instead of taking
    # turns rebuilding one under the other's running processes.
    key = hashlib.sha256(torch.__version__.encode() + _cpu_flags().encode()
                         + str(Path(__file__).resolve().parent).encode()).hexdigest()[:16]
    base = os.environ.get("SOUVERAIN_KERNELS_DIR") or platformdirs.user_cache_dir("souverain")
    return Path(base) / "kernels" / key


def load() -> ModuleType | None:
    """The compiled kernels, building them if needed; None when they cannot be had here."""
    with _lock:
        if "cpu" in _state:
            return _state["cpu"]
        module = None
        if enabled():
            try:
                module = _build()
            except Exception as e:  # no compiler, no headers, a failed build: PyTorch ops instead
                log.warning("C++ kernels unavailable, using PyTorch ops (slower): %s", str(e).strip()[-500:])
        _state["cpu"] = module
        return module


def _capability() -> str:
    """ATen's vector width for this CPU: its vector classes pick their instruction set from the CPU_CAPABILITY
    macros (as PyTorch's own generated kernels do); without them the portable scalar versions compile."""
    flags = set(_cpu_flags().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return ""


def cflags(march: str = "native", capability: str | None = None) -> list[str]:
    """The compiler flags the kernels build with: for this CPU, or for another kind of CPU (`march`, and ATen's
    vector width AVX512 or AVX2), as tests/kernels/test_build.py compiles them."""
    cap = _capability() if capability is None else capability
    macros = [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] if cap else []
    return ["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off", *macros]


def _ninja_on_path() -> None:
    """PyTorch runs `ninja` from PATH; the `ninja` package puts it beside this Python, which is not on PATH when
    `.venv/bin/souverain` runs without the venv activated (and no system ninja is installed)."""
    import shutil
    import sys

    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here) is not None:
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    _ninja_on_path()
    where = build_dir()
    where.mkdir(parents=True, exist_ok=True)
    built = where / "souverain_cpu_kernels.so"
    newest = max(p.stat().st_mtime for p in SOURCES + HEADERS)
    building = not built.exists() or built.stat().st_mtime < newest
    if building:
        # Once per machine (and after an upgrade): say so, it takes minutes.
        log.warning("building Souverain's C++ kernels for this CPU into %s (1.5-4 min on 2 cores, once; "
                    "ninja compiles the %d sources in parallel)", where, len(SOURCES))
    import fcntl

    # One build at a time per folder, under a lock the kernel releases if its holder dies: PyTorch's own `lock`
    # file, left behind by a build that was killed, would make every later start wait for ever.
    done = threading.Event()
    if building:  # minutes of silence look like a hang: say every 30 s that it goes on, and how far
        threading.Thread(target=_heartbeat, args=(where, done), name="souverain-kernel-build", daemon=True).start()
    try:
        with open(where / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (where / "lock").unlink(missing_ok=True)
            return cpp_extension.load(name="souverain_cpu_kernels", sources=[str(p) for p in SOURCES],
                                      build_directory=str(where), extra_cflags=cflags(), extra_ldflags=["-fopenmp"],
                                      verbose=False)
    finally:
        done.set()


def _heartbeat(where: Path, done: threading.Event) -> None:
    start, since = time.monotonic(), time.time()
    while not done.wait(30):
        objects = [where / f"{p.stem}.o" for p in SOURCES]
        compiled = sum(1 for o in objects if o.exists() and o.stat().st_mtime >= since)
        log.warning("still building the C++ kernels: %d of %d sources compiled, %.0f s so far", compiled,
                    len(SOURCES), time.monotonic() - start)


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] with each row contiguous, as the kernels read it: rows may lie apart (a slice
    of a fused projection is taken in place), anything else is copied."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def usable(module: ModuleType | None, *tensors: object, multiple: int = 0) -> ModuleType | None:
    """`module` (a backend's kernels, or None) if its kernels apply to these tensors: CPU, one dtype
    (bfloat16 or float32), no autograd (training takes the PyTorch ops, which have gradients), and
    `multiple` (the rows' length the kernel walks) a multiple of the SIMD width."""
    if module is None or multiple % module.vector_width():
        return None
    import torch

    if torch.is_grad_enabled():
        return None
    dtype = None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype not in (torch.bfloat16, torch.float32):
            return None
        if dtype is not None and t.dtype != dtype:
            return None
        dtype = t.dtype
    return module
