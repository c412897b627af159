"""One writer at a time for every run directory and cached artifact, across processes.

Two identical runs started together (two terminals, a tuning sweep, a cluster array job) would otherwise both
train in full and overwrite each other's checkpoints and caches. :func:`exclusive` holds an operating-system file
lock (the ``filelock`` library) on ``.locks/<target name>.lock`` beside the target: the second process waits, says
so in the log, and then finds the finished artifact or run and reuses or resumes it. Callers check again after acquiring (the double-checked
pattern), since the artifact may have appeared while they waited.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)


@contextmanager
def exclusive(target, what: str = "it"):
    """Hold the inter-process lock of ``target`` (a file or directory path)."""
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


def build_once(target, ready, build, what: str = "it") -> None:
    """Run ``build()`` unless ``ready()``; under :func:`exclusive`, so concurrent processes build ``target`` once and
    the others wait for it and reuse it."""
    if ready():
        return
    with exclusive(target, what):
        if not ready():
            build()
