"""A run measured after another starts from memory given back, not from the earlier run's high-water mark; large
tensors sit on huge pages (the allocator setting that keeps CALRec's cpu preset under 4 GiB)."""

import ctypes.util
import gc
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

import recbole_llm
from recbole_llm.memory import PeakMemory, thp_mode


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


HUGE_PAGES_PROBE = """
import recbole_llm, torch
print(recbole_llm.__file__)
def huge_mib():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) / 1024
before = huge_mib()
block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
print(huge_mib() - before)
"""


@pytest.mark.skipif(thp_mode() not in ("always", "madvise") or not Path("/proc/self/smaps_rollup").exists(),
                    reason="the kernel offers no transparent huge pages")
@pytest.mark.parametrize("user_setting, expect_huge", [(None, True), ("0", False)])
def test_importing_the_package_first_backs_large_tensors_with_huge_pages(user_setting, expect_huge):
    # the kernel's own count of huge pages under the process's anonymous memory, in a fresh interpreter where
    # recbole_llm is imported before torch (as run_recbole_llm.py does); the user's THP_MEM_ALLOC_ENABLE=0 wins
    if not expect_huge and thp_mode() != "madvise":
        pytest.skip("the kernel puts huge pages under every large block ([always]): nothing to tell apart")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    package_file, huge_mib = out.splitlines()[-2], float(out.splitlines()[-1])  # (a path may hold spaces)
    # a child started elsewhere imports the installed package: a stale editable install (one made from a worktree
    # since deleted) resolves to an empty namespace package that sets nothing
    assert package_file == recbole_llm.__file__, f"the child imported {package_file}: reinstall (make install)"
    if expect_huge:
        assert huge_mib >= 32  # most of the 64 MiB block (compaction may not find every 2 MiB page)
    else:
        assert huge_mib < 4
