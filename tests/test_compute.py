"""Compute accounting: the backbone's weights by role against a hand count, training FLOPs against torch's own
FLOP counter (a different computation: it counts the matrix multiplies autograd actually runs), the matmul probe."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from recbole_llm.compute import matmul_peak, matmul_weights
from recbole_llm.llm.backbone import load_backbone

# tiny-random (recbole_llm.llm.backbone): Llama, hidden 32, 2 layers, 4 heads of 8, 2 key/value heads, MLP 64,
# vocabulary 510, LM head tied to the input embeddings
Q, K, V, O = 32 * 32, 32 * 16, 32 * 16, 32 * 32
MLP = 3 * 32 * 64
BODY = 2 * (Q + K + V + O + MLP)
HEAD = 32 * 510
TOKENS = 12


def counted_flops(model, backward: bool) -> int:
    ids = torch.randint(1, 500, (1, TOKENS))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits  # the LM head at every position
        if backward:
            logits.sum().backward()
    return counter.get_total_flops()


def test_a_fully_fine_tuned_backbone_costs_six_flops_per_weight_and_token():
    torch.manual_seed(0)
    model, _ = load_backbone("tiny-random")
    weights = matmul_weights(model)
    assert (weights.trained, weights.frozen, weights.head, weights.head_trained) == (BODY, 0, HEAD, True)
    assert weights.attention == 2 * 4 * 8
    # CPU scaled-dot-product attention has no FLOP formula in torch's counter: compare without attention
    assert counted_flops(model, backward=False) == weights.forward_flops(TOKENS, predicted=TOKENS) \
        == 2 * (BODY + HEAD) * TOKENS
    assert counted_flops(model, backward=True) == weights.training_flops(TOKENS, predicted=TOKENS) \
        == 6 * (BODY + HEAD) * TOKENS


def test_lora_counts_adapters_as_trained_and_the_base_as_frozen():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, _ = load_backbone("tiny-random")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora = 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))  # A and B of q and v, two layers
    weights = matmul_weights(model)
    assert (weights.trained, weights.frozen, weights.head, weights.head_trained) == (lora, BODY, HEAD, False)
    expected = (6 * lora + 4 * BODY + 4 * HEAD) * TOKENS
    assert weights.training_flops(TOKENS, predicted=TOKENS) == expected
    # autograd skips one product the count includes: the input gradient of the first layer's q, k and v
    # projections and of its LoRA A matrices, whose input (the frozen embeddings, normalised) needs none
    assert counted_flops(model, backward=True) == expected - 2 * (Q + K + V + 2 * 32 * 4) * TOKENS


def test_the_lm_head_is_counted_per_predicted_position():
    weights = matmul_weights(load_backbone("tiny-random")[0])
    assert weights.training_flops(100, predicted=7) - weights.training_flops(100) == 6 * HEAD * 7
    assert weights.training_flops(10, attended=5) - weights.training_flops(10) == 12 * 64 * 5 * 10


def test_the_matmul_probe_measures_a_plausible_rate():
    rate = matmul_peak(torch.float32, "cpu", size=256, seconds=0.2)
    assert 1e8 < rate < 1e14  # between a slow phone and a large server, in FLOP/s
    assert matmul_peak(torch.float32, "cpu", size=256, seconds=0.2) == rate  # measured once per process


def test_mfu_is_taken_against_the_faster_of_the_dtypes_rate_and_fp32s(monkeypatch):
    from recbole_llm import compute

    rates = {torch.bfloat16: 4e11, torch.float32: 1e11}  # native bf16: four times fp32's rate
    monkeypatch.setattr(compute, "matmul_peak", lambda dtype, device: rates[dtype])
    assert compute.mfu_peak(torch.bfloat16) == (4e11, torch.bfloat16)
    assert compute.mfu_peak(torch.float32) == (1e11, torch.float32)
    rates[torch.bfloat16] = 2e10  # emulated bf16: slower than fp32, which the machine could have computed in
    assert compute.mfu_peak(torch.bfloat16) == (1e11, torch.float32)


@pytest.fixture
def calrec_run(base_config):
    return {**base_config, "llm_path": "tiny-random", "calrec_stages": [2], "train_targets_per_user": 2,
            "num_samples": 1, "max_item_tokens": 8, "max_history_items": 3, "calrec_window_items": 4,
            "calrec_window_context": 1, "eval_step": 0, "eval_max_users": 5}


@pytest.mark.parametrize("native_bf16, llm_dtype, computed_in",
                         [("0", "auto", "float32"), ("1", "auto", "bfloat16"), ("0", "bf16", "bfloat16")])
def test_an_llm_run_records_its_throughput_flops_and_mfu(calrec_run, monkeypatch, native_bf16, llm_dtype,
                                                         computed_in):
    from recbole_llm.quick_start import run_recbole_llm

    # llm_dtype auto: fp32 on a CPU without native bf16, bf16 autocast on one with it (forced here, so that both
    # paths run on every machine); llm_dtype bf16: bf16 weights, no autocast. The peak MFU is taken against is the
    # computing dtype's, or fp32's where that is faster (bf16 forced on a CPU that emulates it)
    from recbole_llm.llm.backbone import cpu_has_native_bf16

    monkeypatch.delenv("RECBOLE_LLM_CPU_BF16", raising=False)
    native = cpu_has_native_bf16()  # this CPU's own answer, before forcing it
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", native_bf16)
    record = run_recbole_llm("CALRec", "ml-tiny", config_dict={**calrec_run, "llm_dtype": llm_dtype})
    compute = record["train_compute"]
    # CALRec fully fine-tunes: 6 FLOPs per body weight and token, and the (tied, trained) head on the predicted
    # positions, fewer than the tokens (history and the target-only tower are not predicted)
    assert 6 * BODY < compute["flops_per_token"] < 6 * (BODY + HEAD)
    assert compute["compute_dtype"] == computed_in
    assert compute["peak_dtype"] == (computed_in if native else "float32")
    assert 0 < compute["mfu"] < 1  # a peak bounds what the run reached
    assert record["train_targets_per_second"] > 0 and record["train_tokens_per_second"] > 0
    assert record["train_batch_losses"] and {row[0] for row in record["train_batch_losses"]} == {"batch_loss"}
    from recbole_llm.quick_start import comparison_table

    assert f"| train MFU | {compute['mfu']:.3f} |" in comparison_table([record])
