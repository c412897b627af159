"""CALRec: prompts, losses against hand computation, sampling, the quasi-round-robin merge, training-example
selection, the two-stage run with its cache, full-sort scoring and the checkpoint round trip."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_llm.data.domains import DomainMixture, domain_probabilities
from recbole_llm.llm.backbone import load_backbone
from recbole_llm.llm.generation import left_pad, sample_continuations
from recbole_llm.data.packing import Window
from recbole_llm.model.calrec import (CALRecPrompt, CALRecTrainer, PackedBatch, TextBatch, first_item_text,
                                      select_training_samples)
from recbole_llm.losses import info_nce
from recbole_llm.quick_start import build_model_and_data, load_model, make_config, run_recbole_llm
from recbole_llm.retrieval.bm25 import tokenize
from recbole_llm.retrieval.merge import quasi_round_robin_merge
from safetensors.torch import load_file

from oracle import evaluate_with_recbole, history_key, targets_by_history


def build_calrec(config_dict: dict):
    """(config, model, (train, valid, test)) for CALRec on ml-tiny."""
    config = make_config("CALRec", "ml-tiny", config_dict=config_dict)
    _, loaders, model = build_model_and_data(config)
    return config, model, loaders


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("tiny-random")


@pytest.fixture
def calrec_config(base_config) -> dict:
    return {
        **base_config,
        "llm_path": "tiny-random",
        "stage1_steps": 2,
        "train_batch_size": 8,
        "train_targets_per_user": 1,
        "num_samples": 3,
        "max_item_tokens": 16,
        "max_history_items": 5,
        "stage1_domain_field": "class",
        "item_text_fields": {"Title": "movie_title", "Genres": "class", "Year": "release_year"},
        "eval_batch_size": 64,
    }


# ------------------------------------------------------------------------------------------------- prompts
def test_prompt_uses_the_papers_prefixes_and_ends_in_the_next_item_slot(tiny):
    _, tokenizer = tiny
    prompt = CALRecPrompt(tokenizer, max_history_items=10, max_prompt_tokens=10_000, max_item_tokens=100)
    items = prompt.encode_items(["", "Title: A", "Title: B", "Title: C"])
    text = tokenizer.decode(prompt.history([1, 2, 3], items))
    assert text == (
        "This is the summary of a user's purchase history. The first item bought is as follows. Title: A\n"
        "The next item bought is as follows. Title: B\n"
        "The next item bought is as follows. Title: C\n"
        "The next item bought is as follows."
    )


def test_history_is_cut_from_the_left_by_item_count_and_token_budget(tiny):
    _, tokenizer = tiny
    texts = ["", "Title: first", "Title: second", "Title: third", "Title: fourth"]
    by_count = CALRecPrompt(tokenizer, max_history_items=2, max_prompt_tokens=10_000, max_item_tokens=100)
    items = by_count.encode_items(texts)
    assert re.findall(r"Title: (\w+)", tokenizer.decode(by_count.history([1, 2, 3, 4], items))) == ["third", "fourth"]

    full = len(by_count.head) + sum(len(items[i]) + len(by_count.next) for i in (2, 3, 4))
    by_tokens = CALRecPrompt(tokenizer, max_history_items=10, max_prompt_tokens=full, max_item_tokens=100)
    kept = by_tokens.history([1, 2, 3, 4], items)
    assert len(kept) == full  # exactly three items fit; the oldest is dropped
    assert re.findall(r"Title: (\w+)", tokenizer.decode(kept)) == ["second", "third", "fourth"]
    assert tokenizer.decode(kept).count("The first item bought") == 1  # the oldest kept item becomes the first

    tight = CALRecPrompt(tokenizer, max_history_items=10, max_prompt_tokens=1, max_item_tokens=100)
    assert re.findall(r"Title: (\w+)", tokenizer.decode(tight.history([1, 2, 3, 4], items))) == ["fourth"]


def test_text_batch_marks_history_and_target_spans():
    batch = TextBatch.build([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], eos=0, pad=99, device="cpu")
    assert batch.joint_ids.tolist() == [[5, 6, 7, 1, 2, 0], [8, 3, 4, 9, 0, 99]]
    assert batch.history_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert batch.target_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]]
    assert batch.pool_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]]
    assert batch.target_ids.tolist() == [[1, 2, 0, 99], [3, 4, 9, 0]]
    assert batch.tokens == 6 + 5 + 3 + 4


def test_packed_batch_labels_each_target_and_its_end_of_text_from_the_position_before():
    # two targets in row 0 (tokens 3-4 and 7), one in row 1 (token 2); eos 0, pad 99
    examples = [([5, 6, 6, 1, 2, 6, 6, 3], [(3, 5, 11), (7, 8, 12)]), ([5, 6, 4], [(2, 3, 11)])]
    items = {11: [1, 2], 12: [3]}
    batch = PackedBatch.build(examples, pad=99, eos=0, items=items)
    assert batch.labels.tolist() == [[-100, -100, 1, 2, 0, -100, 3, 0], [-100, 4, 0, -100, -100, -100, -100, -100]]
    assert batch.rows.tolist() == [0, 0, 1] and batch.starts.tolist() == [3, 7, 2] and batch.ends.tolist() == [5, 8, 3]
    assert batch.item_ids.tolist() == [[1, 2, 0], [3, 0, 99]] and batch.item_index.tolist() == [0, 1, 0]
    assert batch.tokens == 8 + 3 + 3 + 2 and batch.targets == 3


def test_a_window_lays_out_items_as_the_history_prompt_does(tiny):
    _, tokenizer = tiny
    prompt = CALRecPrompt(tokenizer, max_history_items=10, max_prompt_tokens=10_000, max_item_tokens=100)
    items = prompt.encode_items(["", "Title: A", "Title: B", "Title: C", "Title: D"])
    tokens, spans = prompt.window([1, 2, 3, 4], items, Window(1, 4, 2))
    assert tokenizer.decode(tokens) == (
        "This is the summary of a user's purchase history. The first item bought is as follows. Title: B\n"
        "The next item bought is as follows. Title: C\n"
        "The next item bought is as follows. Title: D"
    )
    assert [item for _, _, item in spans] == [3, 4]
    for start, end, item in spans:
        assert tokens[start:end] == items[item]
        assert tokens[:start] == prompt.history([2, 3, 4][: [3, 4].index(item) + 1], items)


# -------------------------------------------------------------------------------------------------- losses
def test_info_nce_is_the_papers_formula_with_the_softmax_over_users():
    torch.manual_seed(1)
    q, k, tau = torch.randn(4, 6), torch.randn(4, 6), 0.3
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    expected = -sum(
        math.log(math.exp(cos(q[i], k[i]) / tau) / sum(math.exp(cos(q[j], k[i]) / tau) for j in range(4)))
        for i in range(4)
    ) / 4
    assert info_nce(q, k, tau) == pytest.approx(expected, rel=1e-5)
    transposed = -sum(
        math.log(math.exp(cos(q[i], k[i]) / tau) / sum(math.exp(cos(q[i], k[j]) / tau) for j in range(4)))
        for i in range(4)
    ) / 4
    assert info_nce(q, k, tau, symmetric=True) == pytest.approx((expected + transposed) / 2, rel=1e-5)


def test_calrec_losses_match_a_hand_computation(calrec_config):
    config, model, _ = build_calrec({**calrec_config, "contrastive_tau": 0.2})
    model.eval()  # no dropout: both computations see the same network
    prompts = [model.prompt.history(h, model.item_tokens) for h in ([1, 2, 3], [4], [5, 6])]
    targets = [model.item_tokens[i] for i in (7, 8, 9)]
    batch = TextBatch.build(prompts, targets, model.prompt.eos, model.prompt.pad, "cpu")
    terms = model.losses(batch)

    nig, v_t, v_u, v_tu = [], [], [], []
    for prompt, target in zip(prompts, targets):
        joint = torch.tensor([prompt + target + [model.prompt.eos]])
        out = model.llm(input_ids=joint, output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        for position in range(len(prompt), joint.shape[1]):  # every target token and the eos, from the position before
            nig.append(-torch.log_softmax(out.logits[0, position - 1], -1)[joint[0, position]])
        v_u.append(hidden[: len(prompt)].mean(0))
        v_tu.append(hidden[len(prompt): len(prompt) + len(target)].mean(0))  # the item's tokens, not the eos
        alone = torch.tensor([target + [model.prompt.eos]])
        v_t.append(model.llm(input_ids=alone, output_hidden_states=True).hidden_states[-1][0].mean(0))

    def paper_info_nce(users, items):
        cos = lambda a, b: F.cosine_similarity(a, b, dim=0) / 0.2  # noqa: E731
        return -sum(
            torch.log(torch.exp(cos(users[i], items[i])) / sum(torch.exp(cos(users[j], items[i])) for j in range(3)))
            for i in range(3)
        ) / 3

    assert terms["nig"].item() == pytest.approx(torch.stack(nig).mean().item(), rel=1e-4)
    assert terms["tt"].item() == pytest.approx(paper_info_nce(v_tu, v_t).item(), rel=1e-4)
    assert terms["ut"].item() == pytest.approx(paper_info_nce(v_u, v_t).item(), rel=1e-4)

    weighted = model.loss_from_tokens(prompts, targets)
    alpha, beta = 0.125, -0.025  # the paper's weights are the defaults
    assert [w.item() for w in weighted] == pytest.approx(
        [(1 - alpha - beta) * terms["nig"].item(), alpha * terms["tt"].item(), beta * terms["ut"].item()], rel=1e-5
    )
    assert weighted[2].item() < 0  # beta is negative: L_UT is pushed up


def test_packed_windows_give_the_per_prefix_losses_when_histories_fit(calrec_config):
    _, model, _ = build_calrec({**calrec_config, "contrastive_tau": 0.2})
    model.double().eval()  # fp64, no dropout: both computations see the same network
    users = [[3, 9, 4, 12, 7], [20, 5, 31]]  # item ids in time order; every history is within max_history_items
    windows = [model.prompt.window(items, model.item_tokens, Window(0, len(items), 1)) for items in users]
    packed = PackedBatch.build(windows, model.prompt.pad, model.prompt.eos, model.item_tokens)
    prompts = [model.prompt.history(items[:k], model.item_tokens) for items in users for k in range(1, len(items))]
    targets = [model.item_tokens[item] for items in users for item in items[1:]]
    per_prefix = TextBatch.build(prompts, targets, model.prompt.eos, model.prompt.pad, "cpu")
    assert packed.targets == per_prefix.targets == 6 and packed.item_ids.shape[0] == 6
    packed_terms, per_prefix_terms = model.packed_losses(packed), model.losses(per_prefix)
    for term in ("nig", "tt", "ut"):
        assert packed_terms[term].item() == pytest.approx(per_prefix_terms[term].item(), rel=1e-6), term
    # one pass per window: the packed tokens are the windows and the distinct targets, far fewer than the prefixes
    assert packed.tokens < 0.7 * per_prefix.tokens


def test_packed_windows_train_every_target_of_recboles_split_once(calrec_config):
    from recbole_llm.registry import create_dataset

    for targets_per_user, expected in ((0, None), (2, 2)):
        settings = {**calrec_config, "calrec_window_items": 4, "calrec_window_context": 1,
                    "train_targets_per_user": targets_per_user}
        config = make_config("CALRec", "ml-tiny", config_dict=settings)
        train = create_dataset(config).build()[0]  # every prefix: packing selects targets itself
        _, model, _ = build_calrec(settings)
        examples = model.packed_examples(train)
        trained = sorted(item for _, spans in examples for _, _, item in spans)
        users, items = train.inter_feat["user_id"].numpy(), train.inter_feat["item_id"].numpy()
        if expected is None:
            assert trained == sorted(items.tolist())  # RecBole's per-prefix targets, each once
        else:  # the latest `expected` targets of each user (by time; RecBole's row order breaks ties)
            times = train.inter_feat["timestamp"].numpy()
            latest = [items[users == u][np.argsort(times[users == u], kind="stable")][-expected:]
                      for u in np.unique(users)]
            assert trained == sorted(np.concatenate(latest).tolist())
        assert all(len(tokens) <= len(model.prompt.head) + 4 * (16 + len(model.prompt.next)) for tokens, _ in examples)
    capped = build_calrec({**settings, "train_targets_per_user": 0, "train_max_samples": 50})[1].packed_examples(train)
    assert 40 < sum(len(spans) for _, spans in capped) <= 50


def test_no_contrastive_switch_trains_on_next_item_generation_alone(calrec_config):
    _, model, _ = build_calrec({**calrec_config, "contrastive": False})
    prompts, targets = [model.prompt.history([1, 2], model.item_tokens)], [model.item_tokens[3]]
    loss = model.loss_from_tokens(prompts, targets)
    assert torch.is_tensor(loss) and loss.dim() == 0
    assert set(model.losses(TextBatch.build(prompts, targets, model.prompt.eos, model.prompt.pad, "cpu"))) == {"nig"}


# ------------------------------------------------------------------------------------- sampling and merging
def test_shared_prefill_sampling_matches_generate_greedily(tiny):
    from transformers import GenerationConfig

    model, tokenizer = tiny
    prompts = [tokenizer("The next item", add_special_tokens=False).input_ids,
               tokenizer("A much longer prompt about a film", add_special_tokens=False).input_ids]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    samples = sample_continuations(model, ids, mask, num_samples=2, temperature=0.0, max_new_tokens=6,
                                   eos_token_id=tokenizer.eos_token_id)
    assert samples.tokens.shape[:2] == (2, 2)
    for row, prompt in enumerate(prompts):
        reference = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id),
        )[0, len(prompt):]
        for sample in range(2):
            length = int(samples.lengths[row, sample])
            assert samples.tokens[row, sample, :length].tolist() == reference[:length].tolist()
            # its log-probability is the model's, token by token
            full = torch.tensor([prompt + reference[:length].tolist()])
            with torch.no_grad():
                logits = model(input_ids=full).logits[0]
            expected = sum(torch.log_softmax(logits[len(prompt) + t - 1], -1)[full[0, len(prompt) + t]]
                           for t in range(length))
            assert samples.log_probs[row, sample].item() == pytest.approx(float(expected), abs=1e-4)


def test_temperature_sampling_draws_different_texts(tiny):
    model, tokenizer = tiny
    ids, mask = left_pad([tokenizer("Title:", add_special_tokens=False).input_ids], tokenizer.pad_token_id)
    torch.manual_seed(0)
    samples = sample_continuations(model, ids, mask, num_samples=8, temperature=1.0, max_new_tokens=5,
                                   eos_token_id=tokenizer.eos_token_id)
    assert len({tuple(row) for row in samples.tokens[0].tolist()}) > 1


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny backbone with its final norm scaled up: logits peaked enough to tell temperatures apart."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model, tokenizer


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_the_softmax_at_the_given_temperature(peaked, temperature):
    model, tokenizer = peaked
    ids, mask = left_pad([tokenizer("Title:", add_special_tokens=False).input_ids], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=ids).logits[0, -1] / temperature, -1)
    top = torch.topk(expected, 3).indices
    samples = sample_continuations(model, ids, mask, num_samples=4000, temperature=temperature, max_new_tokens=1,
                                   eos_token_id=tokenizer.eos_token_id, seeds=[0])
    drawn = samples.tokens[0, :, 0]
    observed = torch.stack([(drawn == token).float().mean() for token in top])
    assert expected[top[0]] - expected[top[2]] > 0.1  # the temperatures give clearly different distributions
    assert torch.allclose(observed, expected[top], atol=0.03)


def test_top_p_keeps_the_smallest_nucleus_and_samples_it_renormalised(peaked):
    model, tokenizer = peaked
    ids, mask = left_pad([tokenizer("Title:", add_special_tokens=False).input_ids], tokenizer.pad_token_id)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
    ordered = probs.sort(descending=True)
    # a top_p just above the mass of the two most likely tokens: those two and the third (the one that crosses it)
    top_p = float(ordered.values[:2].sum()) + 1e-4
    nucleus = ordered.indices[:3]
    samples = sample_continuations(model, ids, mask, num_samples=4000, temperature=1.0, max_new_tokens=1,
                                   eos_token_id=tokenizer.eos_token_id, top_p=top_p, seeds=[1])
    drawn = samples.tokens[0, :, 0]
    assert set(drawn.tolist()) <= set(nucleus.tolist())
    expected = probs[nucleus] / probs[nucleus].sum()
    observed = torch.stack([(drawn == token).float().mean() for token in nucleus])
    assert torch.allclose(observed, expected, atol=0.03)


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in ("Title:", "A film about", "Next")]

    def draw(rows, seeds):
        ids, mask = left_pad([prompts[r] for r in rows], tokenizer.pad_token_id)
        return sample_continuations(model, ids, mask, num_samples=3, temperature=1.0, max_new_tokens=6,
                                    eos_token_id=tokenizer.eos_token_id, min_new_tokens=4, seeds=seeds).tokens

    together = draw([0, 1, 2], [10, 11, 12])
    alone = draw([1], [11])
    assert torch.equal(together[1, :, :alone.shape[-1]], alone[0, :, :together.shape[-1]])
    assert not torch.equal(draw([1], [99])[0], alone[0])
    assert (together[:, :, :4] != tokenizer.eos_token_id).all()  # min_new_tokens bars EOS


def test_prefill_positions_skip_left_padding_for_absolute_position_models(tiny):
    """GPT-2 adds a learned embedding per absolute position: a left-padded prompt must start at position 0."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       eos_token_id=tokenizer.eos_token_id)).eval()
    prompts = [tokenizer("A much longer prompt about a film", add_special_tokens=False).input_ids,
               tokenizer("Short", add_special_tokens=False).input_ids]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    samples = sample_continuations(model, ids, mask, num_samples=1, temperature=0.0, max_new_tokens=5,
                                   eos_token_id=tokenizer.eos_token_id)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               generation_config=GenerationConfig(do_sample=False, max_new_tokens=5,
                                                                  eos_token_id=tokenizer.eos_token_id,
                                                                  pad_token_id=tokenizer.pad_token_id))
        length = int(samples.lengths[row, 0])
        assert samples.tokens[row, 0, :length].tolist() == alone[0, len(prompt):len(prompt) + length].tolist()


def test_merge_min_max_subtracts_each_generations_minimum_and_weights_by_log_prob():
    bm25 = torch.tensor([[[3.0, 5.0, 7.0],
                          [2.0, 2.0, 6.0]]])
    log_probs = torch.tensor([[-10.0, -2.0]])
    score = quasi_round_robin_merge(bm25, log_probs, epsilon=0.1)[0]
    w0, w1 = math.exp(-1.0), math.exp(-0.2)
    expected = [max(w0 * 0.0, w1 * 0.0), max(w0 * 0.5, w1 * 0.0), max(w0 * 1.0, w1 * 1.0)]
    assert score.tolist() == pytest.approx(expected)
    by_self = quasi_round_robin_merge(bm25, log_probs, epsilon=0.1, self_scores=torch.tensor([[10.0, 4.0]]))[0]
    assert by_self.tolist() == pytest.approx([max(w0 * 0.3, w1 * 0.5), max(w0 * 0.5, w1 * 0.5), max(w0 * 0.7, w1 * 1.5)])


def test_quasi_round_robin_merge_orders_top1s_by_log_prob_then_interleaves():
    # two generations over 5 items; g1 is more likely than g0
    bm25 = torch.tensor([[[4.0, 2.0, 0.0, 1.0, 0.0],
                          [0.0, 1.0, 6.0, 0.0, 0.0]]])
    log_probs = torch.tensor([[-20.0, -5.0]])
    score = quasi_round_robin_merge(bm25, log_probs, epsilon=1 / 5000)[0]
    assert score[4] == float("-inf")  # reached by no generation
    order = torch.argsort(score, descending=True).tolist()
    assert order[:2] == [2, 0]  # round one: each generation's top-1, the more likely generation first
    assert order[2:4] == [1, 3]  # then by normalised BM25: item 1 (2/4 in g0) before item 3 (1/4)
    assert score[2].item() == pytest.approx(math.exp(-5 / 5000))


# ------------------------------------------------------------------------------------------------- data
def test_domain_probabilities_follow_n_to_the_power_0_3():
    p = domain_probabilities({"big": 1000, "small": 10, "empty": 0})
    assert set(p) == {"big", "small"}
    assert p["big"] / p["small"] == pytest.approx(100 ** 0.3)
    mixture = DomainMixture({"big": range(1000), "small": range(10)}, seed=0)
    draws = [domain for domain, _ in mixture.sample(20_000)]
    assert draws.count("small") / len(draws) == pytest.approx(p["small"], abs=0.01)


def test_training_examples_are_the_last_targets_of_each_users_training_split(calrec_config):
    from recbole.data import data_preparation

    from recbole_llm.registry import create_dataset

    settings = {**calrec_config, "calrec_packing": False}  # per-prefix examples: RecBole's rows, selected
    config = make_config("CALRec", "ml-tiny", config_dict={**settings, "train_targets_per_user": 2})
    dataset = create_dataset(config)
    train, valid, test = (loader.dataset for loader in data_preparation(config, dataset))
    users = train.inter_feat["user_id"].numpy()
    assert train.inter_num == 2 * len(np.unique(users))
    every_prefix = make_config("CALRec", "ml-tiny", config_dict={**settings, "train_targets_per_user": 0})
    everything = create_dataset(every_prefix).build()[0]
    for split in (valid, test):  # no evaluation target is a training target of its user
        held_out = set(zip(split.inter_feat["user_id"].tolist(), split.inter_feat["item_id"].tolist()))
        trained = set(zip(everything.inter_feat["user_id"].tolist(), everything.inter_feat["item_id"].tolist()))
        assert not held_out & trained
    # the kept rows are each user's two longest histories (the latest targets)
    lengths = everything.inter_feat["item_length"].numpy()
    everything_users = everything.inter_feat["user_id"].numpy()
    for user in np.unique(users)[:5]:
        kept = sorted(train.inter_feat["item_length"].numpy()[users == user])
        assert kept == sorted(lengths[everything_users == user])[-2:]
    sampled = select_training_samples(everything, 0, 50, seed=3)
    assert sampled.inter_num == 50


# ---------------------------------------------------------------------------------------------- end to end
def test_full_sort_scores_every_item_with_minus_inf_for_unreached(calrec_config):
    config, model, (train, valid, test) = build_calrec(calrec_config)
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (interaction.length, model.n_items)
    assert torch.isinf(scores[:, 0]).all()
    assert len(model.last_generations) == interaction.length * config["num_samples"]
    # a user gets a ranking exactly when one of its generated texts shares a word with the catalogue's texts
    # (the tiny random backbone writes gibberish, so now and then none does)
    vocabulary = {word for text in model.item_texts[1:] for word in tokenize(text)}
    n = config["num_samples"]
    reached = [any(set(tokenize(text)) & vocabulary for text in model.last_generations[row * n: (row + 1) * n])
               for row in range(interaction.length)]
    assert torch.isfinite(scores).any(dim=1).tolist() == reached and sum(reached) > 0.9 * len(reached)


def _oracle(model, truth, samples_per_user=None):
    """Generation replaced by each row's true target text (log-probability 0): the oracle of tests/oracle.py."""

    def generate(histories):
        texts = [model.item_texts[truth[history_key(h)]] for h in histories for _ in range(model.num_samples)]
        return texts, torch.zeros(len(histories), model.num_samples)

    return generate


@pytest.mark.parametrize("normalization", ["minmax", "self"])
def test_oracle_target_text_ranks_first_through_full_sort_predict_and_recboles_evaluator(
        calrec_config, monkeypatch, normalization):
    config, model, (_, _, test) = build_calrec({**calrec_config, "bm25_normalization": normalization,
                                                "topk": [1, 10], "metrics": ["Recall", "NDCG"]})
    truth = targets_by_history(test)
    monkeypatch.setattr(model, "generate_item_texts", _oracle(model, truth))
    result = evaluate_with_recbole(config, model, test)
    # ml-100k lists a few films twice under two ids with the same text: only a unique text can rank first alone
    unique = sum(model.item_texts.count(model.item_texts[target]) == 1 for target in truth.values()) / len(truth)
    assert 0.95 < unique < 1.0  # one of the 60 test targets (Desperate Measures, 1998) has a twin
    assert result["recall@1"] == pytest.approx(unique, abs=1e-4) and result["recall@10"] == 1.0


def _made_up_then_right(model, truth, made_up: list[str], right_log_prob: float):
    """Three confident made-up samples, then the right one (the target's text) with ``right_log_prob``."""

    def generate(histories):
        texts = []
        for h in histories:
            texts += made_up + [model.item_texts[truth[history_key(h)]]]
        return texts, torch.tensor([[-1.0, -1.0, -1.0, right_log_prob]] * len(histories))

    return generate


def _recall_at_10(calrec_config, monkeypatch, made_up, right_log_prob, **settings) -> float:
    config, model, (_, _, test) = build_calrec({**calrec_config, "num_samples": 4, "topk": [10], "metrics": ["Recall"],
                                                **settings})
    monkeypatch.setattr(model, "generate_item_texts",
                        _made_up_then_right(model, targets_by_history(test), made_up, right_log_prob))
    return evaluate_with_recbole(config, model, test)["recall@10"]


NONSENSE = ["Title: Qwzx, Year: 2031", "Title: Blorp Vrrn Zzt, Year: 2040", "Title: Mmm Kkk, Year: 2050"]
PLAUSIBLE = ["Title: Qwzx Blorp, Genres: Drama, Year: 1996", "Title: Vrrn Zzt, Genres: Comedy, Year: 1995",
             "Title: Mmm, Genres: Action, Year: 1997"]


def test_bm25_over_attribute_labels_turns_made_up_samples_into_noise_that_buries_the_target(
        calrec_config, monkeypatch):
    # Made-up samples share only the labels "Title"/"Year" with the catalogue. Indexed, these words give every
    # item a small length-dependent score that min-max stretches to [0, 1], above an unlikely right sample.
    labels = _recall_at_10(calrec_config, monkeypatch, NONSENSE, -3000.0, bm25_index_labels=True)
    values = _recall_at_10(calrec_config, monkeypatch, NONSENSE, -3000.0)  # the default: values only
    assert labels == 0.0 and values == 1.0


def test_self_normalisation_keeps_a_partial_match_below_a_perfect_one(calrec_config, monkeypatch):
    # Made-up titles with real genres and years: min-max gives each sample's best partial match (a Drama from
    # 1996) the same 1.0 as the target's perfect match; dividing by the sample's self-score does not.
    minmax = _recall_at_10(calrec_config, monkeypatch, PLAUSIBLE, -50.0)
    self_normalised = _recall_at_10(calrec_config, monkeypatch, PLAUSIBLE, -50.0, bm25_normalization="self")
    assert minmax == 0.0 and self_normalised == 1.0


def test_generated_text_is_cut_at_the_first_line_break_or_item_prefix():
    assert first_item_text(" Title: Heat, Year: 1995\nThe next item bought is as follows. Title: X") == (
        "Title: Heat, Year: 1995")
    assert first_item_text("Title: Heat The next item bought is as follows. Title: X") == "Title: Heat"


def test_predict_scores_one_users_candidates_against_the_same_generations(calrec_config):
    _, model, (_, _, test) = build_calrec({**calrec_config, "temperature": 1.0})
    model.eval()
    row = next(iter(test))[0][torch.tensor([0])]
    with torch.no_grad():
        torch.manual_seed(3)
        full = model.full_sort_predict(row)[0]
    candidates = torch.topk(full, 3).indices  # reached items: finite scores
    rows = row.repeat_interleave(3)
    rows.update(type(rows)({model.ITEM_ID: candidates}))
    calls = []
    generate = model.generate_item_texts
    model.generate_item_texts = lambda histories: calls.append(len(histories)) or generate(histories)
    with torch.no_grad():
        torch.manual_seed(3)
        scores = model.predict(rows)
    assert calls == [1]  # one generation for the three rows of one user
    assert torch.equal(scores, full[candidates]) and torch.isfinite(scores).all()


def test_two_stage_run_caches_stage_one_and_shares_it_with_the_ablation(calrec_config, caplog):
    first = run_recbole_llm("CALRec", "ml-tiny", config_dict=calrec_config)
    stage_dirs = list(Path(calrec_config["checkpoint_dir"]).glob("CALRec-ml-tiny-stage1-*"))
    assert len(stage_dirs) == 1
    stamp = (stage_dirs[0] / "model.safetensors").stat().st_mtime_ns
    assert set(first["test_result"]) >= {"recall@10", "ndcg@10", "mrr@10"}

    only_stage_one = run_recbole_llm("CALRec", "ml-tiny", config_dict={**calrec_config, "calrec_stages": [1]})
    assert (stage_dirs[0] / "model.safetensors").stat().st_mtime_ns == stamp  # loaded, not retrained
    assert list(Path(calrec_config["checkpoint_dir"]).glob("CALRec-ml-tiny-stage1-*")) == stage_dirs
    assert set(only_stage_one["test_result"]) == set(first["test_result"])


def test_checkpoint_round_trip_reproduces_the_in_memory_trained_model(calrec_config):
    config, model, (train, valid, test) = build_calrec({**calrec_config, "calrec_stages": [2], "eval_step": 0})
    trainer = CALRecTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    interaction = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model.full_sort_predict(interaction)

    _, reloaded, _, _, _, reloaded_test = load_model(trainer.saved_model_file)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in trained.items())
    with torch.no_grad():
        torch.manual_seed(5)
        actual = reloaded.full_sort_predict(next(iter(reloaded_test))[0])
    assert torch.equal(actual, expected)
    _, fresh, _ = build_calrec({**calrec_config, "calrec_stages": [2]})
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items() if k.startswith("llm."))


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_stage_one_changes_the_weights_and_stage_two_starts_from_them(calrec_config):
    config, model, (train, valid, _) = build_calrec({**calrec_config, "eval_step": 0, "learning_rate": 0.01})
    trainer = CALRecTrainer(config, model)
    starts = []
    train_epoch = trainer._train_epoch
    trainer._train_epoch = lambda *args, **kwargs: starts.append(_weights(model)) or train_epoch(*args, **kwargs)
    initial = _weights(model)
    trainer.fit(train, valid, saved=True)
    after_stage_one = load_file(trainer.stage_one_dir() / "model.safetensors")
    assert len(starts) == 2  # Stage I, then one Stage-II epoch
    assert all(torch.equal(starts[0][k], initial[k]) for k in initial)
    assert any(not torch.equal(after_stage_one[k], initial[k]) for k in initial)  # Stage I trained
    assert all(torch.equal(starts[1][k], after_stage_one[k]) for k in initial)  # Stage II starts from it
    assert any(not torch.equal(v, after_stage_one[k]) for k, v in _weights(model).items())  # and trains


def test_stage_one_adds_other_datasets_as_domains_of_their_own(calrec_config):
    config, model, (train, _, _) = build_calrec({**calrec_config, "stage1_datasets": "[ml-tiny]", "stage1_steps": 50})
    batches = model.stage_one_batches(train.dataset, config)
    probabilities = batches.mixture.probabilities
    assert "ml-tiny" in probabilities and any(name.startswith("ml-tiny:") for name in probabilities)
    # n_c is the number of users: the whole dataset (60 users) outweighs any single genre
    assert probabilities["ml-tiny"] == max(probabilities.values())
    drawn = {domain for domain, _ in batches.draws}
    assert "ml-tiny" in drawn and len(drawn) > 3
    batch = next(iter(batches))
    assert len(batch.prompts) == config["train_batch_size"]
    assert all(model.tokenizer.decode(p).startswith("This is the summary") for p in batch.prompts)


def test_calrec_tunes_with_recbole_hypertuning_over_its_hyper_file(calrec_config):
    from recbole_llm.config import properties_dir
    from recbole_llm.quick_start import tune

    result = tune("CALRec", "ml-tiny", str(properties_dir() / "hyper" / "CALRec.hyper"), algo="random", max_evals=2,
                  config_dict={**calrec_config, "calrec_stages": [2]})
    assert len(result.trials) == 2
    assert set(result.best_params) == {"learning_rate", "calrec_alpha", "contrastive_tau"}
    assert result.valid_metric.lower() == "ndcg@10"
