"""The kernels build here, and the code only other CPUs compile still compiles.

gemm.cpp, prefill.cpp and q4.cpp hold sections compiled only where the CPU has AMX or AVX-512 BF16. A
machine builds its own sections only, and a failed build falls back to PyTorch ops with a warning: a
mistake in AMX code once passed a whole suite on an AMD machine that way, then broke every AMX machine's
build. So each test run also compiles (syntax only) the sections of the other CPU kinds.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

from souverain import kernels

# The three kinds of x86 CPU the kernels have sections for, as GCC 12 names them (it has no znver4: Cooper
# Lake has Zen 4's AVX-512 BF16 and VNNI without AMX), with ATen's vector width for each, and the CPU flag
# that makes a machine build that kind's sections itself.
TARGETS = {
    "sapphirerapids": ("AVX512", "amx_tile"),  # AMX tiles, AVX-512 BF16 and VNNI
    "cooperlake": ("AVX512", "avx512_bf16"),  # AVX-512 BF16 and VNNI, no AMX: AMD Zen 4's path
    "haswell": ("AVX2", "avx2"),  # AVX2 and FMA only
}
# The sources with sections per CPU kind, and the kinds whose sections differ: gemm.cpp's and prefill.cpp's
# AMX, AVX-512 BF16 and plain paths; q4.cpp's AMX section (its AVX-512 and AVX2 kernels compile everywhere).
SECTIONED = {p.name: p for p in kernels.SOURCES if p.name in ("gemm.cpp", "prefill.cpp", "q4.cpp")}
KINDS = {"gemm.cpp": tuple(TARGETS), "prefill.cpp": tuple(TARGETS), "q4.cpp": ("sapphirerapids",)}
compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler here: the kernels cannot be built")


@compiler
def test_the_kernels_build_on_a_machine_with_a_compiler() -> None:
    if not kernels.enabled():
        pytest.skip("SOUVERAIN_KERNELS turns the kernels off")
    assert kernels.load() is not None, "the C++ kernels failed to build: see the warning above"


@compiler
def test_every_cpu_kinds_sections_compile() -> None:
    from torch.utils import cpp_extension

    includes = [f for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]] for f in ("-isystem", p)]

    def check(march: str, source: str) -> str:
        cmd = ["c++", "-fsyntax-only", "-std=c++20", "-w", *kernels.cflags(march, TARGETS[march][0]), *includes,
               "-DTORCH_EXTENSION_NAME=souverain_cpu_kernels", "-DTORCH_API_INCLUDE_EXTENSION_H", source]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return "" if done.returncode == 0 else f"-march={march} {source}:\n{done.stderr[-3000:]}"

    # The first kind this CPU has is the one its own build compiled (the test above): only the others here.
    flags = set(kernels._cpu_flags().split())
    native = next((march for march, (_, flag) in TARGETS.items() if flag in flags), None)
    jobs = [(march, str(SECTIONED[name])) for name, kinds in KINDS.items() for march in kinds if march != native]
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(lambda job: check(*job), jobs) if f]
    assert not failures, "\n".join(failures)
