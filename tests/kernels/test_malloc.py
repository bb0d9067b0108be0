"""The engine's allocator setting: freed tensors' memory is reused, not faulted in again."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from souverain.kernels.malloc import retain_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_freed_step_tensor_is_reused_without_page_faults() -> None:
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
    counts = []
    for _ in range(3):
        before = faults()
        t = torch.ones(3 << 20)  # 12 MB, as a prefill chunk's projection output, written through
        counts.append(faults() - before)
        del t
    # Fresh pages would be ~3,000 faults of 4 KiB each time; reused heap needs none.
    assert counts[-1] < 100, counts
