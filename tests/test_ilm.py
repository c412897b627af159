"""ILM on the tiny backbone and a one-layer MiniLM Q-Former: the Q-Former's masks and BERT key remap, each phase-1
loss against a hand computation, slot injection, the frozen LLM kept exactly, constrained title decoding, the
oracle through RecBole's evaluator, a learning test, the phase-1 cache and resume, a full run, the checkpoint round
trip and the switches (MLP adaptor, ILM-rand)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertModel

from recbole_llm.cache import minilm_dir
from recbole_llm.llm.backbone import load_backbone
from recbole_llm.llm.generation import Beams
from recbole_llm.llm.qformer import bert_qformer_state, load_item_qformer, qformer_mask
from recbole_llm.model import ilm as ilm_module
from recbole_llm.model.ilm import (
    ITEM_SLOT,
    USER_SLOT,
    SlotBatch,
    contrastive_loss,
    disambiguated_titles,
    hard_negatives,
    itg_loss,
    itg_positions,
    itm_loss,
    max_query_similarity,
    pair_similarity,
)
from recbole_llm.quick_start import build_model_and_data, load_model, make_config, run_recbole_llm
from recbole_llm.registry import get_trainer
from recbole_llm.settings import SettingError

from conftest import first_ratings_subset
from oracle import evaluate_with_recbole, history_key, targets_by_history


@pytest.fixture
def ilm_config(base_config) -> dict:
    return {
        **base_config,
        "llm_path": "tiny-random",
        "llm_dtype": "fp32",
        "ilm_qformer_layers": 1,
        "ilm_cf_epochs": 2,
        "ilm_phase1_epochs": 1,
        "ilm_phase1_batch_size": 32,
        "ilm_phase1_text_tokens": 12,
        "ilm_beams": 5,
        "topk": [5],
        "eval_step": 0,
        "ilm_task_weights": {"sequential": 0.05, "item": 0.01, "user": 0.01},
        "item_text_fields": {"Title": "movie_title", "Genres": "class", "Year": "release_year"},
    }


def build_ilm(config_dict: dict, dataset: str = "ml-tiny"):
    config = make_config("ILM", dataset, config_dict=config_dict)
    _, loaders, model = build_model_and_data(config)
    return config, model, loaders


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    model, tokenizer = load_item_qformer(minilm_dir(), cf_dim=8, n_queries=3, encoder_tokens=2, layers=2)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------------- Q-Former
def test_bert_weights_land_in_the_text_branch_and_the_query_ffns_copy_their_text_twins(qformer):
    model, tokenizer = qformer
    bert = BertModel.from_pretrained(minilm_dir())
    bert_state = bert.state_dict()
    state = model.state_dict()
    layer = "qformer.encoder.layer.1."
    assert torch.equal(state[layer + "attention.attention.query.weight"],
                       bert_state["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(state[layer + "output.LayerNorm.weight"], bert_state["encoder.layer.1.output.LayerNorm.weight"])
    for twin in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.bias"):
        assert torch.equal(state[layer + twin.replace(".", "_query.", 1)], state[layer + twin])
    assert torch.equal(state["qformer.layernorm.weight"], bert_state["embeddings.LayerNorm.weight"])
    assert torch.equal(state["embeddings.word_embeddings.weight"][: bert.config.vocab_size],
                       bert_state["embeddings.word_embeddings.weight"])
    dec = tokenizer.convert_tokens_to_ids("[DEC]")
    assert dec == bert.config.vocab_size and torch.equal(state["embeddings.word_embeddings.weight"][dec],
                                                          bert_state["embeddings.word_embeddings.weight"][101])
    remapped = bert_qformer_state(bert_state, layers=2)
    assert not any("crossattention" in key for key in remapped)  # cross-attention starts new
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in state
    assert all(not key.startswith("qformer.encoder.layer.2.") for key in remapped)  # two layers kept


def test_the_text_branch_alone_is_the_bert_it_was_built_from():
    model, tokenizer = load_item_qformer(minilm_dir(), cf_dim=8, n_queries=2, encoder_tokens=2, layers=99)
    bert = BertModel.from_pretrained(minilm_dir()).eval()
    model.eval()
    encoded = tokenizer(["Toy Story, Animation Children's Comedy, 1995", "Heat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.encode_text(encoded.input_ids, encoded.attention_mask)
        reference = bert(**encoded).last_hidden_state
    real = encoded.attention_mask.bool()
    assert model.config.num_hidden_layers == 6  # capped by the checkpoint's layers
    torch.testing.assert_close(ours[real], reference[real], atol=1e-4, rtol=1e-4)


def _joint(model, cf, ids, kind):
    with torch.no_grad():
        return model.joint(cf, ids, torch.ones_like(ids), kind)


def test_unimodal_mask_keeps_queries_and_text_blind_to_each_other(qformer):
    model, _ = qformer
    n = model.n_queries
    cf, other_cf = torch.randn(2, 8), torch.randn(2, 8)
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 3000, 3001, 102]])
    other_ids = torch.tensor([[101, 4000, 4001, 102], [101, 5000, 5001, 102]])
    base = _joint(model, cf, ids, "unimodal")
    torch.testing.assert_close(_joint(model, cf, other_ids, "unimodal")[:, :n], base[:, :n])  # queries ignore text
    torch.testing.assert_close(_joint(model, other_cf, ids, "unimodal")[:, n:], base[:, n:])  # text ignores queries
    with torch.no_grad():
        torch.testing.assert_close(base[:, :n], model.encode_queries(cf))
    # the bidirectional mask lets them meet
    both = _joint(model, cf, ids, "bidirectional")
    assert not torch.allclose(_joint(model, cf, other_ids, "bidirectional")[:, :n], both[:, :n])


def test_itg_mask_lets_text_see_every_query_and_only_earlier_text(qformer):
    model, _ = qformer
    n = model.n_queries
    cf = torch.randn(1, 8)
    ids = torch.tensor([[30522, 2000, 2001, 2002, 102]])
    base = _joint(model, cf, ids, "causal")
    later = ids.clone()
    later[0, 3] = 4000  # change token 3
    changed = _joint(model, cf, later, "causal")
    torch.testing.assert_close(changed[:, : n + 3], base[:, : n + 3])  # queries and text tokens 0..2 unchanged
    assert not torch.allclose(changed[:, n + 3], base[:, n + 3])
    other_item = _joint(model, torch.randn(1, 8), ids, "causal")
    assert not torch.allclose(other_item[:, n:], base[:, n:])  # every text token sees the queries


def test_qformer_masks_by_hand():
    mask = qformer_mask(2, torch.tensor([[1, 1, 0]]), "causal")[0, 0] == 0  # True = may attend
    expected = torch.tensor([
        [1, 1, 0, 0, 0],  # queries: queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text 0: queries and itself
        [1, 1, 1, 1, 0],  # text 1: queries, text 0 and itself
        [1, 1, 1, 1, 1],  # padding row: only sees itself and what others see (never read)
    ], dtype=torch.bool)
    assert torch.equal(mask[:4], expected[:4]) and not mask[:, 4][:4].any()


# ------------------------------------------------------------------------------------------- phase-1 losses
def test_itc_similarity_and_loss_equal_a_hand_computation():
    queries = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 1.0], [0.0, -1.0]]), dim=-1)
    s = max_query_similarity(queries, texts)
    r = 1 / math.sqrt(2)
    hand = [[max(r, r), max(0.0, -1.0)], [max(0.6 * r + 0.8 * r, -r), max(-0.8, 0.0)]]
    torch.testing.assert_close(s, torch.tensor(hand))
    tau = 0.5
    rows = sum(-math.log(math.exp(hand[i][i] / tau) / sum(math.exp(hand[i][j] / tau) for j in range(2)))
               for i in range(2)) / 2
    cols = sum(-math.log(math.exp(hand[j][j] / tau) / sum(math.exp(hand[i][j] / tau) for i in range(2)))
               for j in range(2)) / 2
    assert float(contrastive_loss(s, tau)) == pytest.approx((rows + cols) / 2, rel=1e-6)


def test_pair_similarity_takes_the_closest_pair_of_queries():
    left = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [-1.0, 0.0]]])
    right = torch.tensor([[[0.0, 0.5], [0.2, 0.0]], [[-0.3, 0.0], [0.0, -0.9]]])
    hand = [[max(a[0] * b[0] + a[1] * b[1] for a in left[i].tolist() for b in right[j].tolist()) for j in range(2)]
            for i in range(2)]
    torch.testing.assert_close(pair_similarity(left, right), torch.tensor(hand))
    assert [v for row in hand for v in row] == pytest.approx([0.5, 0.0, 0.0, 0.9])


def test_itm_loss_and_hard_negatives():
    positive, negative = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    hand = (-math.log(math.exp(2) / (1 + math.exp(2))) - math.log(math.exp(1) / (math.exp(1) + math.exp(-1)))
            - math.log(0.5)) / 3
    assert float(itm_loss(positive, negative)) == pytest.approx(hand, rel=1e-6)
    # a similarity with one far-best off-diagonal entry per row and column: it is always the one drawn
    similarity = torch.tensor([[9.0, 30.0, 0.0], [0.0, 9.0, 30.0], [30.0, 0.0, 9.0]])
    texts, items = hard_negatives(similarity, torch.Generator().manual_seed(0))
    assert texts.tolist() == [1, 2, 0] and items.tolist() == [2, 0, 1]
    texts, items = hard_negatives(torch.zeros(4, 4), torch.Generator().manual_seed(1))
    assert (texts != torch.arange(4)).all() and (items != torch.arange(4)).all()  # never the positive


def test_itg_loss_predicts_each_real_token_from_the_one_before():
    logits_all = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 3, 4], [0, 2, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    hidden = logits_all  # an identity "head": positions chosen by itg_positions, in row-major order
    chosen = itg_positions(hidden, mask)
    hand = [-torch.log_softmax(logits_all[b, t - 1], -1)[ids[b, t]] for b, t in ((0, 1), (0, 2), (1, 1))]
    assert chosen.shape == (3, 5)
    assert float(itg_loss(chosen, ids, mask)) == pytest.approx(float(sum(hand) / 3), rel=1e-6)


def test_duplicate_titles_get_their_item_token():
    assert disambiguated_titles(["[PAD]", "Heat", "Up", "Heat"], ["[PAD]", "6", "7", "8"]) == \
        ["[PAD]", "Heat [item 6]", "Up", "Heat [item 8]"]


# ------------------------------------------------------------------------------------------- the model
def test_slots_are_written_at_their_placeholders_in_order_and_nowhere_else(ilm_config):
    _, model, _ = build_ilm(ilm_config)
    n = model.n_queries
    prompt = model.sequential_prompt(user=7, history=[11, 12])
    pieces, names = model.templates["sequential"]
    assert names == ["user", "history"]
    # by hand: piece 0, the user's N slots, piece 1, item 11's slots, ",", item 12's slots, piece 2
    expected_tokens = (pieces[0] + [model.pad] * n + pieces[1] + [model.pad] * n + model.separator
                       + [model.pad] * n + pieces[2])
    expected_flags = ([0] * len(pieces[0]) + [1] * n + [0] * len(pieces[1]) + [1] * n + [0] * len(model.separator)
                      + [1] * n + [0] * len(pieces[2]))
    assert prompt.tokens == expected_tokens and prompt.slot_flags == expected_flags
    assert prompt.slots == [(USER_SLOT, 7), (ITEM_SLOT, 11), (ITEM_SLOT, 12)]

    other = model.render(model.templates["item"], items=[5])
    batch = SlotBatch.build([prompt, other], model.pad)
    model.eval()
    with torch.no_grad():
        embeds = model.input_embeddings(batch)
        plain = model.llm.get_input_embeddings()(batch.ids)
        one_by_one = [model.slot_embeddings(torch.tensor([k]), torch.tensor([e]))[0] for k, e in prompt.slots + other.slots]
    flags = batch.slot_flags
    torch.testing.assert_close(embeds[~flags], plain[~flags])  # text and padding untouched
    starts = [[i for i in range(len(row)) if row[i] and (i == 0 or not row[i - 1])] for row in flags.tolist()]
    written = [embeds[r, s: s + n] for r, row in enumerate(starts) for s in row]
    assert len(written) == 4
    for got, want in zip(written, one_by_one):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(one_by_one[0], one_by_one[1])  # a user and an item differ


def test_the_llm_stays_exactly_the_base_model_and_is_never_saved(ilm_config, small_data):
    config, model, (train, valid, _) = build_ilm({**ilm_config, "data_path": str(small_data)}, "ml-small")
    base, _ = load_backbone("tiny-random", dtype="fp32")
    base.eval()
    prompt = model.render(model.templates["item"], items=[5])
    text_only = SlotBatch.build([model.with_response(prompt, [])._replace(
        slot_flags=[0] * len(prompt.tokens), slots=[])], model.pad)
    trainer = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    trainer.fit(train, valid, saved=True)
    model.eval()
    with torch.no_grad():
        ours = model.llm(inputs_embeds=model.input_embeddings(text_only), attention_mask=text_only.mask).logits
        reference = base(input_ids=text_only.ids, attention_mask=text_only.mask).logits
    assert torch.equal(ours, reference)  # no slot: the base LLM's logits, exactly
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.llm.state_dict()[name], tensor), name  # training never touched the LLM
    saved = load_file(Path(trainer.saved_model_file) / "model.safetensors")
    assert not any(key.startswith("llm.") for key in saved)
    assert any(key.startswith("qformer.") for key in saved) and "projection.weight" in saved
    assert not any(key.startswith("cf_") for key in saved)  # rebuilt from the cache, not stored


def test_constrained_title_decoding_writes_only_catalogue_titles_and_avoids_banned_items(ilm_config):
    _, model, (_, _, test) = build_ilm(ilm_config)
    model.eval()
    prompts = [model.sequential_prompt(u, h) for u, h in ((1, [1, 2, 3]), (2, [50]), (3, []))]
    banned = torch.zeros(3, model.n_items, dtype=torch.bool)
    with torch.no_grad():
        items, scores = model.generate_titles(prompts)
        assert ((items > 0) & (items < model.n_items)).all() and torch.isfinite(scores).all()
        assert all(len(set(row)) == len(row) for row in items.tolist())  # K different items
        assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
        banned[0, items[0]] = True  # forbid row 0's whole first ranking
        again, again_scores = model.generate_titles(prompts, banned)
    assert not set(again[0].tolist()) & set(items[0].tolist())
    assert torch.equal(again[1:], items[1:]) and torch.equal(again_scores[1:], scores[1:])


def test_beam_scores_are_the_llms_log_probabilities_of_the_titles(ilm_config):
    _, model, _ = build_ilm(ilm_config)
    model.eval()
    prompt = model.sequential_prompt(1, [1, 2])
    with torch.no_grad():
        items, scores = model.generate_titles([prompt], beams=3)
        for item, score in zip(items[0].tolist(), scores[0].tolist()):
            full = model.with_response(prompt, model.title_tokens[item] + [model.eos])
            batch = SlotBatch.build([full], model.pad)
            logits = model.llm(inputs_embeds=model.input_embeddings(batch), attention_mask=batch.mask).logits[0]
            start = len(prompt.tokens)
            log_p = torch.log_softmax(logits[start - 1: -1].float(), -1).gather(1, batch.ids[0, start:, None]).sum()
            assert score == pytest.approx(float(log_p), abs=1e-4)


def _oracle(model, truth, target_rank, monkeypatch):
    """Beam search replaced: beam ``target_rank`` of each prompt writes the true target's title, the others other
    items' titles, scores 0, -1, -2 ...; the title -> item mapping, the full ranking and RecBole's evaluator are
    the real code. The prompt's history is read from its slots."""
    seen = {}
    real_generate = model.generate_titles

    def spy(prompts, banned=None, beams=None):
        seen["histories"] = [tuple(e for k, e in p.slots if k == ITEM_SLOT) for p in prompts]
        return real_generate(prompts, banned, beams)

    def fake_beam_search(llm, ids, mask, *, num_beams, max_new_tokens, logits_processor, eos_token_id,
                         inputs_embeds):
        rows = []
        for history in seen["histories"]:
            target = truth[history_key(history)]
            others = [i for i in range(1, model.n_items) if i != target][: num_beams - 1]
            ranked = others[:target_rank] + [target] + others[target_rank:]
            rows.append([(model.title_tokens[i] + [eos_token_id] * max_new_tokens)[:max_new_tokens] for i in ranked])
        return Beams(torch.tensor(rows), -torch.arange(num_beams, dtype=torch.float).repeat(len(rows), 1))

    monkeypatch.setattr(model, "generate_titles", spy)
    monkeypatch.setattr(ilm_module, "beam_search", fake_beam_search)


@pytest.mark.parametrize("target_rank, recall_at_1", [(0, 1.0), (2, 0.0)])
def test_oracle_true_titles_rank_by_beam_score_through_full_sort_predict_and_recboles_evaluator(
        ilm_config, target_rank, recall_at_1, monkeypatch):
    settings = {**ilm_config, "topk": [1, 3], "metrics": ["Recall", "NDCG"], "max_history_items": 50,
                "MAX_ITEM_LIST_LENGTH": 50}
    config, model, (_, _, test) = build_ilm(settings)
    _oracle(model, targets_by_history(test), target_rank, monkeypatch)
    result = evaluate_with_recbole(config, model, test)
    assert result["recall@1"] == recall_at_1 and result["recall@3"] == 1.0
    assert result["ndcg@3"] == pytest.approx(1.0 if target_rank == 0 else 0.5)  # 1 / log2(2 + 2)


def test_ranking_deeper_than_the_beams_and_cf_models_without_users_are_refused(ilm_config):
    with pytest.raises(SettingError, match="ilm_beams=5"):
        build_ilm({**ilm_config, "topk": [10]})
    with pytest.raises(SettingError, match="user embedding table"):
        build_ilm({**ilm_config, "ilm_cf_user_table": "no_such_table"})


# --------------------------------------------------------------------------------------- small-data runs
@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_path) -> Path:
    """30 users with their first 8 ratings each: 6 training items (5 targets) per user."""
    return first_ratings_subset(tmp_path_factory.mktemp("small"), data_path, "ml-small", users=30, per_user=8)


@pytest.fixture(scope="module")
def few_data(tmp_path_factory, data_path) -> Path:
    """8 users with their first 4 ratings each: 2 training items (1 target) per user."""
    return first_ratings_subset(tmp_path_factory.mktemp("few"), data_path, "ml-few", users=8, per_user=4)


def _training_recall_at_1(model) -> float:
    prompts, targets = [], []
    for user, sequence in model.sequences:
        for p in range(1, len(sequence)):
            prompts.append(model.sequential_prompt(user, sequence[:p]))
            targets.append(sequence[p])
    model.eval()
    with torch.no_grad():
        top = model.generate_titles(prompts)[0][:, 0]
    return float((top == torch.tensor(targets)).float().mean())


def test_the_soft_tokens_learn_to_make_the_frozen_llm_name_each_users_next_item(ilm_config, few_data):
    # The bundled SmolLM2-135M, frozen: a random tiny LLM attends to nothing (its 0.02-scale weights ignore the
    # context), so only a pretrained LLM can show that the Q-Former and projection learn to steer it.
    settings = {**ilm_config, "data_path": str(few_data), "llm_path": "smollm2-135m", "ilm_phase1": False,
                "learning_rate": 0.005, "epochs": 30, "train_batch_size": 8, "ilm_task_weights": {"sequential": 1.0},
                "ilm_beams": 3, "topk": [3], "lr_scheduler": "constant", "lr_warmup": 0}
    config, model, (train, _, _) = build_ilm(settings, "ml-few")
    assert len(model.positions) == 8
    assert _training_recall_at_1(model) < 0.2
    get_trainer(config["MODEL_TYPE"], "ILM")(config, model).fit(train, None, saved=False)
    assert _training_recall_at_1(model) >= 0.75  # chance: 1 / 1681 titles


def test_phase_one_is_cached_by_its_own_inputs_and_resumes_after_an_interruption(ilm_config, small_data, monkeypatch):
    settings = {**ilm_config, "data_path": str(small_data), "ilm_phase1_epochs": 2}
    config, model, (train, _, _) = build_ilm(settings, "ml-small")
    trainer = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    folder = trainer.phase_one_dir()
    same = lambda change: get_trainer(config["MODEL_TYPE"], "ILM")(  # noqa: E731
        make_config("ILM", "ml-small", config_dict={**settings, **change}), model).phase_one_dir() == folder
    assert same({"ilm_beams": 4, "learning_rate": 0.01, "epochs": 3, "ilm_task_weights": {"user": 1.0}})
    for change in ({"ilm_phase1_losses": {"itc": 1.0}}, {"ilm_queries": 2}, {"ilm_cf_epochs": 3},
                   {"ilm_qformer_init": "random"}, {"ilm_phase1_epochs": 3}, {"ilm_phase1_lr": 0.001}):
        assert not same(change), change

    epochs_run = []
    real_epoch = trainer._train_epoch

    def interrupted(batches, epoch_idx, loss_func=None, show_progress=False):
        epochs_run.append(epoch_idx)
        if epoch_idx == 1:
            raise KeyboardInterrupt
        return real_epoch(batches, epoch_idx, loss_func, show_progress)

    monkeypatch.setattr(trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer._phase_one(show_progress=False)
    meta = __import__("json").loads((folder / "recbole_llm.json").read_text())
    assert meta["epoch"] == 0 and not meta["finished"]
    after_epoch_0 = load_file(folder / "model.safetensors")

    config, model, _ = build_ilm(settings, "ml-small")
    resumed = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    seen = []
    real = resumed._train_epoch

    def record(batches, epoch_idx, loss_func=None, show_progress=False):
        seen.append(epoch_idx)
        if epoch_idx == 1:  # epoch 0's weights and optimizer state were restored before epoch 1 runs
            assert all(torch.equal(model.state_dict()[k], v) for k, v in after_epoch_0.items())
            assert resumed.optimizer.state  # Adam moments restored, not fresh
        return real(batches, epoch_idx, loss_func, show_progress)

    monkeypatch.setattr(resumed, "_train_epoch", record)
    resumed._phase_one(show_progress=False)
    assert seen == [1] and __import__("json").loads((folder / "recbole_llm.json").read_text())["finished"]
    trained = load_file(folder / "model.safetensors")
    assert not torch.equal(trained["qformer.query_tokens"], after_epoch_0["qformer.query_tokens"])

    config, model, _ = build_ilm(settings, "ml-small")  # a finished phase 1 is loaded, never retrained
    again = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    monkeypatch.setattr(again, "_train_epoch", lambda *a, **k: pytest.fail("phase 1 retrained"))
    again._phase_one(show_progress=False)
    assert torch.equal(model.qformer.query_tokens.detach(), trained["qformer.query_tokens"])


def test_full_run_and_checkpoint_round_trip(ilm_config, small_data):
    settings = {**ilm_config, "data_path": str(small_data), "learning_rate": 0.01}
    config, model, (train, valid, test) = build_ilm(settings, "ml-small")
    fresh = model.projection.weight.detach().clone()
    trainer = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    trainer.fit(train, valid, saved=True)
    assert not torch.equal(model.projection.weight, fresh)  # phase 2 trained the projection
    interaction = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        expected = model.full_sort_predict(interaction)
    assert (torch.isfinite(expected).sum(1) == 5).all()  # ilm_beams items per user, -inf elsewhere
    _, reloaded, _, _, _, reloaded_test = load_model(trainer.saved_model_file)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        actual = reloaded.full_sort_predict(next(iter(reloaded_test))[0])
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("switch", [{"ilm_adaptor": "mlp"}, {"ilm_phase1": False}], ids=["mlp", "ilm-rand"])
def test_the_papers_comparisons_run_as_switches(ilm_config, small_data, switch):
    result = run_recbole_llm("ILM", "ml-small", config_dict={**ilm_config, "data_path": str(small_data), **switch})
    assert set(result["test_result"]) >= {"recall@5", "ndcg@5"}
    report = result["model_report"]
    assert report["phase1"] is False and report["adaptor"] == switch.get("ilm_adaptor", "qformer")
    # each example of the one epoch's tasks counts as a target
    assert result["train_targets"] == sum(report["tasks"].values()) > 0 and result["train_targets_per_second"] > 0
    assert not list(Path("saved").glob("ILM-ml-small-phase1-*")) and not list(
        Path(ilm_config["checkpoint_dir"]).glob("ILM-ml-small-phase1-*"))
    config, model, _ = build_ilm({**ilm_config, "data_path": str(small_data), **switch}, "ml-small")
    assert hasattr(model, "mlp") != hasattr(model, "qformer")


# ------------------------------------------------------------------------------------------- conversation
def test_chat_answers_like_the_base_llm_and_recommends_catalogue_items(ilm_config, small_data, monkeypatch, capsys):
    import io

    import recbole_llm
    from recbole_llm.chat import main as chat_main
    from recbole_llm.errors import UsageError
    from recbole_llm.llm.chat_format import chat_frame
    from recbole_llm.llm.generation import sample_continuations

    settings = {**ilm_config, "data_path": str(small_data), "ilm_phase1": False}
    config, model, (train, valid, _) = build_ilm(settings, "ml-small")
    trainer = get_trainer(config["MODEL_TYPE"], "ILM")(config, model)
    trainer.fit(train, valid, saved=True)
    base, tokenizer = load_backbone("tiny-random", dtype="fp32")

    def base_reply(turns, message):  # the frozen LLM alone, greedy, on the same conversation
        before, after = chat_frame(tokenizer, turns)
        ids = torch.tensor([tokenizer(before + message + after, add_special_tokens=False).input_ids])
        out = sample_continuations(base.eval(), ids, torch.ones_like(ids), num_samples=1, temperature=0.0,
                                   max_new_tokens=20, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out.tokens[0, 0, : int(out.lengths[0, 0])], skip_special_tokens=True).strip()

    reply = recbole_llm.chat(model, "Can you recommend a movie for me?", user="1", k=3, max_new_tokens=20)
    assert reply.text == base_reply([], "Can you recommend a movie for me?")  # no slot: the LLM's own words
    assert len(reply.items) == 3 and len({token for token, _ in reply.items}) == 3
    for token, title in reply.items:
        assert model.titles[model.item_tokens.index(token)] == title
    with torch.no_grad():  # the same items evaluation ranks first for this user's known history
        expected, _ = model.generate_titles([model.sequential_prompt(model.user_tokens.index("1"),
                                                                     model.user_history(model.user_tokens.index("1")))],
                                            beams=3)
    assert [t for t, _ in reply.items] == [model.item_tokens[i] for i in expected[0].tolist()]

    second = recbole_llm.chat(model, "Thanks. Any other idea?", user="1", history=reply.history, max_new_tokens=20,
                              recommend=False)
    assert len(second.history) == 4 and second.items == []
    assert second.text == base_reply(reply.history, "Thanks. Any other idea?")
    slotted = recbole_llm.chat(model, "What is {item} about?", items=[reply.items[0][0]], max_new_tokens=20)
    assert slotted.history[0]["content"] == f"What is {reply.items[0][1]} about?"

    with pytest.raises(UsageError, match="user '99999' is not in the model's dataset"):
        recbole_llm.chat(model, "hello", user="99999")
    with pytest.raises(UsageError, match="1 {item} slots and 0 items"):
        recbole_llm.chat(model, "What is {item}?")

    monkeypatch.setattr("sys.stdin", io.StringIO("Please recommend something\nquit\n"))
    assert chat_main([trainer.saved_model_file, "--user", "1", "--k", "2", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr()
    assert "  1. " in printed.out and "  2. " in printed.out
    assert chat_main([str(Path(trainer.saved_model_file).parent / "nothing"), "--user", "1"]) == 2
    assert chat_main([trainer.saved_model_file, "--user", "99999"]) == 2
    assert "error: user '99999'" in capsys.readouterr().err


def test_liked_items_are_the_training_items_rated_at_least_the_threshold_in_the_raw_file(ilm_config, small_data):
    import pandas as pd

    # normalize_all (ml-100k's RecBole default) rescales ratings to 0..1 inside RecBole: the threshold must not see that
    _, model, _ = build_ilm({**ilm_config, "data_path": str(small_data), "normalize_all": True}, "ml-small")
    raw = pd.read_csv(small_data / "ml-small" / "ml-small.inter", sep="\t", dtype=str)
    rating = {(u, i): float(r) for u, i, r in zip(raw["user_id:token"], raw["item_id:token"], raw["rating:float"])}
    expected = {(model.user_tokens[u], model.item_tokens[i]) for u, seq in model.sequences for i in seq
                if rating[(model.user_tokens[u], model.item_tokens[i])] >= 4}
    found = {(model.user_tokens[u], model.item_tokens[i]) for u, i in model.pairs["user_item"].tolist()}
    assert found == expected and 0 < len(found) < sum(len(seq) for _, seq in model.sequences)
