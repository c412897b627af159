"""LLM backbone loading: aliases, GGUF, offline errors, dtype/quantization checks, LoRA and 4-bit QLoRA on CPU."""

import time

import pytest
import torch

from recbole_llm.llm.backbone import (
    BackboneNotFoundError,
    LoraSpec,
    autocast_dtype,
    convert_gguf,
    load_backbone,
    materialize_tiny_random,
    resolve_llm_path,
)


def _logits(model, tokenizer, text="The next item bought is as follows."):
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_tiny_random_is_deterministic_and_has_no_bos_assumption():
    model_a, tok = load_backbone("tiny-random")
    model_b, _ = load_backbone("tiny-random")
    assert torch.equal(_logits(model_a, tok), _logits(model_b, tok))
    assert tok.bos_token is None and tok.pad_token == tok.eos_token
    assert tok.decode(tok("Title: Heat, Year: 1995").input_ids) == "Title: Heat, Year: 1995"


def test_lora_leaves_only_adapters_trainable():
    model, _ = load_backbone("tiny-random", lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and not any("k_proj" in name for name in trainable)


def test_qlora_4bit_training_step_on_cpu(tmp_path):
    import bitsandbytes as bnb

    # Layers sized to bitsandbytes' blocks, so every CPU kernel path (AVX512-BF16 repacking included) takes them.
    wide = materialize_tiny_random(tmp_path / "tiny-64", hidden_size=64, intermediate_size=128)
    model, tok = load_backbone(str(wide), quantization="4bit", lora=LoraSpec(r=4))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    batch = tok(["The user watched the following movies"], return_tensors="pt")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()  # inference in eval mode takes the other kernel path (weight repacking on AVX512-BF16 CPUs)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_four_bit_on_layers_the_kernels_cannot_take_is_refused():
    with pytest.raises(ValueError, match="multiple of 64.*llm_quantization=none or 8bit"):
        load_backbone("tiny-random", quantization="4bit")


def test_a_directory_without_a_model_is_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(BackboneNotFoundError, match="holds no model"):
        load_backbone(str(tmp_path))


def test_smollm2_alias_converts_the_bundled_gguf_once():
    path, local_only = resolve_llm_path("smollm2-135m")
    assert local_only and (path.endswith(".Q4_1-" + path.rsplit("-", 1)[-1]))
    model, tok = load_backbone("smollm2-135m")
    assert tok.eos_token == "<|im_end|>" and model.config.vocab_size == 49152
    start = time.perf_counter()
    load_backbone("smollm2-135m")
    assert time.perf_counter() - start < 10  # the second load reads the converted cache


def test_unreachable_hub_id_fails_fast_with_a_useful_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(BackboneNotFoundError, match="smollm2-135m.*local model directory"):
        load_backbone("someone/some-model")
    assert time.perf_counter() - start < 10


def test_missing_local_directory_is_reported(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="no such directory"):
        load_backbone(str(tmp_path / "nothing" / "here"))


@pytest.mark.parametrize("kwargs, pattern", [({"dtype": "fp8"}, "llm_dtype"), ({"quantization": "3bit"}, "llm_quantization")])
def test_bad_options_name_the_key_and_allowed_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_backbone("tiny-random", **kwargs)


def test_auto_dtype_autocasts_to_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", "1")
    assert autocast_dtype("auto", "cpu") is torch.bfloat16
    assert autocast_dtype("fp32", "cpu") is None  # an explicit dtype is taken as asked
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", "0")
    assert autocast_dtype("auto", "cpu") is None


def test_bf16_autocast_keeps_fp32_master_weights_and_the_loss():
    model, tok = load_backbone("tiny-random")
    batch = tok(["The user watched the following movies"], return_tensors="pt")
    fp32 = model(**batch, labels=batch.input_ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(**batch, labels=batch.input_ids).loss
    bf16.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_a_gguf_file_changed_anywhere_is_converted_afresh(tmp_path):
    """The converted directory is keyed by the whole file: same size, same first and last MiB, another byte in the
    middle (a fine-tune that kept the embeddings and the head) is not served the old conversion."""
    from recbole_llm.fingerprint import file_digest

    content = bytearray(torch.randint(0, 256, (3 << 20,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    old, new = tmp_path / "old" / "model.gguf", tmp_path / "new" / "model.gguf"
    old.parent.mkdir(), new.parent.mkdir()
    old.write_bytes(content)
    content[len(content) // 2] ^= 1
    new.write_bytes(content)
    converted = tmp_path / "cache" / "backbones" / f"model-{file_digest(old)[:16]}"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # old's conversion, already in the cache

    assert convert_gguf(old, tmp_path / "cache") == converted
    with pytest.raises(ValueError, match="GGUF"):  # not the cached directory: it converts (and these bytes are no GGUF)
        convert_gguf(new, tmp_path / "cache")


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, dropout=0.0)])
def test_gradient_checkpointing_recomputes_activations_and_gives_the_same_gradients(lora):
    torch.manual_seed(0)
    plain, tokenizer = load_backbone("tiny-random", dtype="fp32", lora=lora)
    torch.manual_seed(0)
    checkpointed, _ = load_backbone("tiny-random", dtype="fp32", lora=lora, gradient_checkpointing=True)
    base = checkpointed.get_base_model() if lora else checkpointed
    assert base.is_activation_checkpointing and not (plain.get_base_model() if lora else plain).is_activation_checkpointing
    ids = tokenizer(["a user watched a film"], return_tensors="pt").input_ids
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6)
                                                      for n in grads[0])
