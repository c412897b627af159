"""The process's memory: huge pages for large tensors, freed memory given back, and the peak of a run measured.

Imports nothing heavy at module level: :func:`huge_pages_for_large_tensors` must run before torch is imported.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import threading
from pathlib import Path

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or None where there is none
    to read (not Linux, or a kernel built without them)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_for_large_tensors() -> None:
    """Ask torch's CPU allocator to back tensors of 2 MiB or more with transparent huge pages (its
    ``THP_MEM_ALLOC_ENABLE``: page-aligned blocks advised ``MADV_HUGEPAGE``), unless the user chose already
    (``THP_MEM_ALLOC_ENABLE=0`` keeps it off).

    Measured on CALRec's cpu-preset training step (BENCHMARKS.md, issue 18 item 5; full fine-tuning, activations
    checkpointed): peak resident memory 4.7-4.9 GiB with glibc's defaults, 3.5 GiB with huge pages, and no slower
    (a fixed 1 MiB mmap threshold gives 3.1 GiB but costs a third more time in page faults without huge pages).
    torch reads the variable at its first allocation, so this only takes effect before torch is imported (the
    package's ``__init__`` calls it first); nothing changes where the kernel offers no transparent huge pages."""
    if thp_mode() in ("always", "madvise") and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def trim_heap() -> None:
    """Give the free pages of glibc's heap back to the operating system (``malloc_trim``): tensors below glibc's
    mmap threshold (up to 32 MiB) stay resident after they are freed, and a training loop whose tensors change size
    from batch to batch scatters them over an ever larger heap (RALLRec's cpu preset: 2 GiB in use, a 3.3 GiB
    heap). A no-op where the C library is not glibc (macOS, musl)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Give freed memory back to the operating system: Python's cycles, then glibc's heap (:func:`trim_heap`).
    Without it a model run after another in one process (a comparison, ``make demo``) starts at the first one's
    high-water mark, and its measured peak is the sum of both; CUDA's cache is emptied too."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


class PeakMemory:
    """Peak resident memory of this process (sampled every 20 ms) and peak CUDA memory, within a ``with`` that
    starts by releasing the memory earlier work freed (:func:`release_memory`). Subclasses keep more per sample
    by overriding :meth:`record`."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss_mib = 0.0
        self.peak_gpu_mib = None

    def record(self, rss_mib: float) -> None:
        self.peak_rss_mib = max(self.peak_rss_mib, rss_mib)

    def _resident_mib(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _sample(self):
        while not self._stop.is_set():
            self.record(self._resident_mib())
            self._stop.wait(self._interval)

    def __enter__(self):
        import torch

        release_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.record(self._resident_mib())
        if torch.cuda.is_available():
            self.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20
