"""Which process am I: rank, world size, rank 0, barriers and gathers, in one place.

A run goes distributed when it is started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, the process
group from ``env://``) or through RecBole's own keys (``local_rank``, ``world_size``, ``ip``, ``port``, ``offset``
in the configuration, as RecBole's ``run_recboles`` passes them: ``tcp://ip:port``). :func:`init` is called once by
the configuration (:class:`recbole_llm.config.Config`); the trainer, the evaluation protocol and the caches use
the helpers below, models never do. Without a process group every helper is the single-process identity (rank 0
of 1, barriers return at once, a gather is a list of one), so no caller needs a branch of its own.

``dist_backend: auto`` is NCCL on CUDA and gloo on CPU, so every distributed path runs on a CPU with gloo. While
rank 0 builds a shared artifact the others wait on a barrier, so the group's timeout is long: 12 hours, or
``RECBOLE_LLM_DIST_TIMEOUT_MIN`` minutes (item descriptions of a large catalogue on a CPU take hours).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


def backend_for(name: str | None, cuda: bool) -> str:
    """The process-group backend for ``dist_backend``: ``auto`` is nccl on CUDA, gloo otherwise."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown dist_backend {name!r}; use one of {', '.join(BACKENDS)}")
    return ("nccl" if cuda else "gloo") if name == "auto" else name


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(backend: str | None = "auto", use_cuda: bool = False, rank: int | None = None,
         world_size: int | None = None, init_method: str | None = None) -> bool:
    """Join the process group (once per process); True when this process is one of several.

    With no arguments the group comes from torchrun's environment; RecBole's way in passes ``rank``,
    ``world_size`` and ``init_method`` (``tcp://ip:port``)."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if rank is None and not launched_by_torchrun():
        return False
    dist.init_process_group(
        backend=backend_for(backend, use_cuda), init_method=init_method or "env://",
        rank=rank if rank is not None else int(os.environ["RANK"]),
        world_size=world_size if world_size is not None else int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(minutes=int(os.environ.get("RECBOLE_LLM_DIST_TIMEOUT_MIN", str(12 * 60)))),
    )
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (its GPU), from torchrun's ``LOCAL_RANK``; else the global rank."""
    return int(os.environ.get("LOCAL_RANK", rank())) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the one process that logs, shows progress, writes tables, records and checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather(obj) -> list:
    """Every rank's ``obj`` (any picklable object; tensors travel on the CPU), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(value: int | float) -> int | float:
    """The sum of ``value`` over all ranks."""
    return sum(all_gather(value))


@contextmanager
def main_first():
    """Rank 0 runs the block first; the other ranks wait on a barrier, then run it (and find rank 0's result in
    the cache). Use around work that writes a shared artifact, so no two ranks ever write one file."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(n: int, part: int | None = None, parts: int | None = None) -> range:
    """The contiguous, unpadded share of ``range(n)`` of rank ``part`` of ``parts`` (default: this process):
    the first ``n % parts`` shares hold one item more, and the shares in rank order are exactly ``range(n)``."""
    part, parts = rank() if part is None else part, world_size() if parts is None else parts
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return range(start, start + size + (part < extra))

