"""How :class:`recbole_llm.trainer.LLMTrainer` runs a loss on several processes (``llm_parallel``).

* ``ddp`` (default): every process holds the whole model; the loss runs inside a ``DistributedDataParallel``
  wrapper, which all-reduces the gradients.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the parameters, gradients and optimizer state
  over the processes, for a fully fine-tuned backbone whose training state does not fit one device (CALRec with
  ``lora_r: 0`` on a 1-3B model). Each decoder layer of the backbone is one FSDP unit (gathered for its forward and
  backward only), the rest of the model (embeddings, LM head, the method's own modules) the root unit.

Either way the wrapped module is :class:`LossOf`, whose forward *is* the loss (``calculate_loss``,
``batch_loss``, ...), so the wrapper's hooks see every parameter the loss uses however the model calls its
backbone. Evaluation is not sharded by parameters: each process ranks its own users with the whole model
(:meth:`Sharded.unsharded`), since processes with different numbers of users cannot run FSDP's collectives in
step; a model that trains sharded still has to fit one device for inference (its weights, without gradients or
optimizer state).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from recbole_llm import distributed
from recbole_llm.llm.pooling import decoder_and_head

KINDS = ("ddp", "fsdp")


class LossOf(nn.Module):
    """The module a wrapper wraps: its forward is a loss of the model (``calculate_loss``, ``batch_loss``, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, loss_func, batch):
        return loss_func(batch)


class Replicated:
    """``llm_parallel: ddp``: the whole model on every process, gradients all-reduced by DDP."""

    def __init__(self, model: nn.Module):
        self.module = torch.nn.parallel.DistributedDataParallel(
            LossOf(model), find_unused_parameters=True, broadcast_buffers=False)

    def loss(self, loss_func, batch):
        return self.module(loss_func, batch)

    def sync(self, last_in_window: bool):
        """No all-reduce on the passes before a process's last one of an accumulation window."""
        return nullcontext() if last_in_window else self.module.no_sync()

    def unsharded(self):
        return nullcontext()


class Sharded:
    """``llm_parallel: fsdp``: FSDP2 over the backbone's decoder layers and the model's root."""

    def __init__(self, model: nn.Module, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        self.root = fully_shard(LossOf(model), mesh=mesh)
        self.units = [module for module in self.root.modules() if isinstance(module, FSDPModule)]

    def loss(self, loss_func, batch):
        return self.root(loss_func, batch)

    def sync(self, last_in_window: bool):
        """Reduce-scatter the gradients on a process's last pass of an accumulation window only."""
        self.root.set_requires_gradient_sync(last_in_window)
        return nullcontext()

    @contextmanager
    def unsharded(self):
        """Every parameter whole on every process inside the block (each process evaluates its own users, any
        number of forwards, no collectives); sharded again after it."""
        for unit in self.units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(True)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of each backbone the model declares (``backbone_modules``), in order; none for a model
    without them (FSDP then shards the whole model as one unit)."""
    layers = []
    for name in getattr(model, "backbone_modules", ()):
        decoder, _ = decoder_and_head(getattr(model, name))
        layers.extend(getattr(decoder, "layers", ()))
    return layers


def wrap(model: nn.Module, kind: str, device: torch.device) -> Replicated | Sharded:
    """The data-parallel wrapper of ``model`` for a run of several processes. Make it before the optimizer: FSDP
    replaces the parameters by sharded ones."""
    if kind not in KINDS:
        raise ValueError(f"llm_parallel={kind!r}: use one of {', '.join(KINDS)}")
    return Sharded(model, device) if kind == "fsdp" else Replicated(model)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP holds ``model``'s parameters as shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())
