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
    before = resident()
    # 1.6 GiB of 64 KiB tensors (below glibc's smallest mmap threshold, 128 KiB, whatever the process did before:
    # they always live on its heap), each followed by a small block that stays: the heap cannot shrink by itself
    blocks = [(torch.ones(2**14), torch.ones(16)) for _ in range(25600)]
    pins = [pin for _, pin in blocks]
    del blocks
    gc.collect()
    held = resident()
    with PeakMemory() as memory:
        pass
    assert held - before > 1000  # freed, yet still resident: what the next run of a comparison would start from
    assert memory.peak_rss_mib < before + 300  # given back when the measurement started
    del pins
