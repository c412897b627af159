"""One writer at a time for every run directory and cached artifact, across processes.

Two identical runs started together (two terminals, a tuning sweep, a cluster array job) would otherwise both
train in full and overwrite each other's checkpoints and caches. :func:`exclusive` holds an operating-system file
lock (the ``filelock`` library) on ``.locks/<target name>.lock`` beside the target: the second process waits, says
so in the log, and then finds the finished artifact or run and reuses or resumes it. Callers check again after acquiring (the double-checked
pattern), since the artifact may have appeared while they waited.

The processes of one distributed run (:mod:`recbole_llm.distributed`) act as one: in :func:`exclusive` (work the
ranks do together, such as training a run) rank 0 holds the file lock for the whole group; in :func:`build_once`
(an artifact one process computes) rank 0 builds it while the other ranks wait on a barrier, then they read it.
So no two ranks ever write one file, and another job still waits for the group.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

from filelock import FileLock, Timeout

from recbole_llm import distributed

logger = logging.getLogger(__name__)


@contextmanager
def _file_lock(target, what: str):
    """Hold the operating-system lock of ``target`` (a file or directory path) in this process."""
    target = Path(target)
    folder = target.parent / ".locks"  # beside the target, out of the way of globs over run directories
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("Another process is writing %s (%s); waiting for it to finish, then using its result.",
                       target, what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def exclusive(target, what: str = "it"):
    """Hold the inter-process lock of ``target`` (a file or directory path); in a distributed run every rank enters
    together once rank 0 holds it (call it on every rank)."""
    with _file_lock(target, what) if distributed.is_main() else nullcontext():
        distributed.barrier()
        yield


def build_once(target, ready, build, what: str = "it") -> None:
    """Run ``build()`` unless ``ready()``, so concurrent processes build ``target`` once and the others wait for it
    and reuse it; in a distributed run rank 0 builds while the other ranks wait (call it on every rank)."""
    with distributed.main_first():
        if ready():
            return
        with _file_lock(target, what):
            if not ready():
                build()
