"""A run measured after another starts from memory given back, not from the earlier run's high-water mark."""

import ctypes.util
import gc
import sys

import psutil
import pytest
import torch

from recbole_llm.quick_start import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's heap (malloc_trim) is Linux's")
def test_a_measured_run_starts_with_freed_tensors_given_back():
    process = psutil.Process()
    resident = lambda: process.memory_info().rss / 2**20  # noqa: E731
    spare = torch.empty(30 * 2**20 // 4)
    del spare  # glibc raises its mmap threshold after freeing a large block: 1 MiB tensors then live on its heap
    before = resident()
    # 1.6 GiB of 1 MiB tensors (like a model's activations), each followed by a small block that stays: the heap
    # cannot shrink from its top by itself
    blocks = [(torch.ones(2**18), torch.ones(16)) for _ in range(1600)]
    pins = [pin for _, pin in blocks]
    del blocks
    gc.collect()
    held = resident()
    with PeakMemory() as memory:
        pass
    assert held - before > 1000  # freed, yet still resident: what the next run of a comparison would start from
    assert memory.peak_rss_mib < before + 300  # given back when the measurement started
    del pins
