"""Compute accounting: a backbone's FLOPs per training token, the machine's matrix-multiply peak, and MFU.

FLOPs are counted from the architecture, the usual way (Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", §2.1; Chowdhery et al. 2022, "PaLM", appendix B): a linear layer with an ``in x out`` weight costs
``2 in out`` FLOPs per token forward; backward costs as much again for the gradient with respect to its input,
and as much again for the gradient of its weight when that weight trains. So a trained weight costs ``6 in out``
per training token and a frozen one that gradients pass through (the base weights under LoRA, a frozen LM head)
``4 in out``; LoRA's adapter matrices are trained weights of their own. Self-attention's score and value products
cost ``4 n_layers d_attn`` FLOPs per token and attended position forward, three times that in training. The LM
head is counted per *predicted* position (the methods here apply it only where a token is predicted), not per
input token. Model-FLOPs utilisation (MFU) is the FLOPs a run's tokens needed per second over the machine's peak
(:func:`mfu_peak`), measured by :func:`matmul_peak` in the same process: the rate of the dtype the run computed in,
or fp32's where that is faster (a dtype the hardware only emulates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn


@dataclass(frozen=True)
class MatmulWeights:
    """A backbone's matrix-multiply weights (``in x out`` summed) by role."""

    trained: int  # weights that receive gradients (a fully fine-tuned body, LoRA's A and B)
    frozen: int  # frozen weights that gradients pass through (LoRA's base layers)
    head: int  # the LM head
    head_trained: bool
    attention: int  # n_layers x (heads x head_dim): the width of the score and value products

    def training_flops(self, tokens: int, predicted: int = 0, attended: float = 0.0) -> float:
        """FLOPs of a forward and backward pass over ``tokens`` tokens, ``predicted`` of them through the LM head,
        each token attending to ``attended`` positions on average (about half the sequence under a causal mask;
        0 leaves attention out)."""
        body = (6 * self.trained + 4 * self.frozen) * tokens
        head = (6 if self.head_trained else 4) * self.head * predicted
        return float(body + head + 12 * self.attention * attended * tokens)

    def forward_flops(self, tokens: int, predicted: int = 0, attended: float = 0.0) -> float:
        """FLOPs of a forward pass (inference), counted as :meth:`training_flops` is."""
        return float(2 * (self.trained + self.frozen) * tokens + 2 * self.head * predicted
                     + 4 * self.attention * attended * tokens)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer: weight [in, out]
        return module.weight.shape[0], module.nf
    return None


def matmul_weights(llm: nn.Module) -> MatmulWeights:
    """Count a (possibly peft-wrapped, possibly quantized) causal LM's linear layers by role."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    head_module = base.get_output_embeddings()
    trained = frozen = head = 0
    head_trained = False
    for module in llm.modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        weights = shape[0] * shape[1]
        if module is head_module:
            head, head_trained = weights, bool(module.weight.requires_grad)
        elif module.weight.requires_grad:
            trained += weights
        else:
            frozen += weights
    config = base.config
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
    return MatmulWeights(trained, frozen, head, head_trained,
                         int(getattr(text, "num_hidden_layers", 0) or 0) * heads * head_dim)


@cache
def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                seconds: float = 0.5) -> float:
    """The machine's matrix-multiply rate in FLOP/s: ``size x size`` products in ``dtype`` repeated for about
    ``seconds`` after a warm-up, in this process (its thread settings, its load). Measured once per process."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    synchronize()
    start, repeats = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        repeats += 1
        if repeats % 4 == 0:
            synchronize()
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def mfu_peak(dtype: torch.dtype, device: str = "cpu") -> tuple[float, torch.dtype]:
    """The peak a run computing in ``dtype`` is measured against, and the dtype that reached it: the faster of
    ``dtype``'s matrix-multiply rate and fp32's. Where the hardware computes ``dtype`` natively (bf16 on a GPU or a
    CPU with AVX512-BF16 / AMX) that is ``dtype``'s own rate; where it emulates it (bf16 forced on a CPU without
    them), the emulation is slower than fp32, and its rate would flatter a run the machine could have computed in
    fp32 at fp32's rate."""
    rates = {candidate: matmul_peak(candidate, device) for candidate in dict.fromkeys((dtype, torch.float32))}
    fastest = max(rates, key=rates.get)
    return rates[fastest], fastest
