"""SemConv on the tiny backbone: semantic-ID cache, code tokens, the four task builders, packed = per-prefix loss,
constrained beam search, the oracle through RecBole's evaluator, a learning test, a full run and the checkpoint
round trip."""

from __future__ import annotations

import contextlib
import io
import json

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from recbole_llm.errors import UsageError
from recbole_llm.data.packing import pack_window, prefix_example, sequence_windows
from recbole_llm.llm.examples import TokenBatch
from recbole_llm.data.sequences import user_sequences
from recbole_llm.model.semconv import semantic_ids_dir, training_sequences
from recbole_llm.trainer.llm_trainer import LLMTrainer
from recbole_llm.quick_start import build_model_and_data, load_model, make_config, run_recbole_llm
from recbole_llm.settings import SettingError

from conftest import first_ratings_subset
from oracle import evaluate_with_recbole, history_key, targets_by_history


@pytest.fixture
def semconv_config(base_config) -> dict:
    return {
        **base_config,
        "llm_path": "tiny-random",
        "llm_dtype": "fp32",
        "lora_target_modules": ["q_proj", "v_proj"],
        "semconv_codebook_size": 16,
        "semconv_cf_epochs": 2,
        "semconv_rq_epochs": 20,
        "semconv_beams": 5,
        "topk": [5],
        "semconv_task_weights": {"sequential": 1.0, "text": 0.05, "query": 0.02, "negative": 0.02},
        "train_batch_size": 16,
        "eval_batch_size": 64,
        "eval_step": 0,
        "item_text_fields": {"Title": "movie_title", "Genres": "class", "Year": "release_year"},
    }


def build_semconv(config_dict: dict, dataset: str = "ml-tiny"):
    config = make_config("SemConv", dataset, config_dict=config_dict)
    _, loaders, model = build_model_and_data(config)
    return config, model, loaders


# --------------------------------------------------------------------------------------- stage 1 and cache
def test_items_get_unique_codes_cached_by_every_input_that_shapes_them(semconv_config, data_path):
    config, model, _ = build_semconv(semconv_config)
    codes = model.item_codes
    assert codes.shape == (model.n_items, 4) and (codes[0] == -1).all()
    assert len(torch.unique(codes[1:], dim=0)) == model.n_items - 1 and codes[1:].max() < 16
    folder = semantic_ids_dir(config)
    stamp = (folder / "codes.safetensors").stat().st_mtime_ns
    stats = model.codebook_stats
    assert stats.items == model.n_items - 1 and len(stats.usage) == 4 and stats.reconstruction_error > 0
    # the model's codes are the cached ones, and its codebook module gives them (up to the re-assigned items)
    assert torch.equal(load_file(folder / "codes.safetensors")["codes"], codes)
    assert model.codebook is not None

    # stage-2 keys share the cache; every stage-1 input makes a new one
    same = make_config("SemConv", "ml-tiny", config_dict={**semconv_config, "lora_r": 4, "semconv_beams": 3})
    assert semantic_ids_dir(same) == folder
    for change in ({"semconv_codebook_size": 32}, {"semconv_lambda_align": 0.0}, {"semconv_cf_epochs": 3},
                   {"semconv_rq_epochs": 21}, {"semconv_rq_lr": 0.002}, {"semconv_cf_table": "user_embedding"},
                   {"item_text_fields": {"Title": "movie_title"}}, {"semconv_codes": "random"}):
        assert semantic_ids_dir(make_config("SemConv", "ml-tiny", config_dict={**semconv_config, **change})) != folder
    build_semconv(semconv_config)
    assert (folder / "codes.safetensors").stat().st_mtime_ns == stamp  # reused, not recomputed


def test_cold_items_are_counted_in_the_codebook_statistics(semconv_config):
    split = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}
    _, model, (train, _, _) = build_semconv({**semconv_config, "eval_args": split})
    trained = {item for items in user_sequences(train.dataset).values() for item in items}
    cold = set(range(1, model.n_items)) - trained  # items first seen after the training period
    assert len(cold) > 20 and model.codebook_stats.cold_items == len(cold)
    assert model.run_report()["codebook"]["cold_items"] == len(cold)

def test_edited_item_data_never_reuses_cached_codes(semconv_config, tmp_path, data_path):
    copy = tmp_path / "copy"
    (copy / "ml-tiny").mkdir(parents=True)
    for f in (data_path / "ml-tiny").iterdir():
        (copy / "ml-tiny" / f.name).write_bytes(f.read_bytes())
    settings = {**semconv_config, "data_path": str(copy)}
    before = semantic_ids_dir(make_config("SemConv", "ml-tiny", config_dict=settings))
    item = copy / "ml-tiny" / "ml-tiny.item"
    item.write_text(item.read_text().replace("Toy Story", "Toy Story II"))
    assert semantic_ids_dir(make_config("SemConv", "ml-tiny", config_dict=settings)) != before


def test_random_codes_ablation_needs_no_collaborative_model(semconv_config):
    _, model, _ = build_semconv({**semconv_config, "semconv_codes": "random"})
    assert model.codebook is None and len(torch.unique(model.item_codes[1:], dim=0)) == model.n_items - 1


def test_window_context_must_be_below_the_window(semconv_config):
    with pytest.raises(SettingError, match="semconv_window_context=5 must be below semconv_window_items=5"):
        build_semconv({**semconv_config, "semconv_window_items": 5, "semconv_window_context": 5})


# ------------------------------------------------------------------------------------------- code tokens
def test_code_tokens_join_the_vocabulary_and_only_their_rows_train_beside_lora(semconv_config):
    _, model, _ = build_semconv(semconv_config)
    tokens = model.tokenizer.convert_ids_to_tokens(model.code_tokens[1])
    code = model.item_codes[1].tolist()
    assert tokens == [f"<{'abcd'[level]}_{code[level]}>" for level in range(4)]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.endswith("embed_tokens.new_rows") for name in trainable)
    new_rows = dict(model.named_parameters())["llm.base_model.model.model.embed_tokens.new_rows"]
    assert new_rows.shape == (4 * 16, model.llm.config.hidden_size)
    prompt = model.tokenizer.decode(model.sequential_prompt([1, 2]))
    assert prompt.endswith("".join(model.tokenizer.convert_ids_to_tokens(model.code_tokens[2])))


# ------------------------------------------------------------------------------------------------- tasks
def test_four_task_builders_write_the_prompts_with_loss_on_the_response_only(semconv_config):
    _, model, (train, _, _) = build_semconv(semconv_config)
    decode = model.tokenizer.decode
    toy = model.titles.index("Toy Story")
    tokens, targets = model.text_example(toy, title_to_code=True)
    answer = len(model.code_tokens[toy])
    assert decode(tokens[:-answer]) == 'Which item has the title: " Toy Story"? Item:'
    assert tokens[-answer:] == model.code_tokens[toy] and targets == [0] * (len(tokens) - answer) + [1] * answer
    tokens, targets = model.text_example(toy, title_to_code=False)
    assert decode([t for t, m in zip(tokens, targets) if m]) == " Toy Story" + model.tokenizer.eos_token
    tokens, targets = model.query_example([5, 6], toy)
    assert "preferences are: Genres: Animation Children's Comedy, Year: 1995." in decode(tokens)
    assert [t for t, m in zip(tokens, targets) if m] == model.code_tokens[toy]
    tokens, targets = model.negative_example([5], toy, positive=False)
    assert decode([t for t, m in zip(tokens, targets) if m]).strip().startswith("No")


def test_an_epoch_mixes_the_tasks_by_weight_and_trains_every_sequential_target_once(semconv_config):
    _, model, (train, _, _) = build_semconv(semconv_config)
    sequences = training_sequences(train.dataset)
    assert len(sequences) == 60 and sum(len(s) - 1 for s in sequences) == train.dataset.inter_num
    batches = model.epoch_batches(train.dataset, epoch=0)
    n_targets = train.dataset.inter_num
    assert batches.counts["text"] == round(0.05 * n_targets) and batches.counts["query"] == round(0.02 * n_targets)
    windows = model._tasks.windows
    assert batches.counts["sequential"] == len(windows)
    code_tokens_trained = sum(w.end - w.first_target for _, w in windows) * 4
    sequential = [ex for ex in batches.examples if ex[0][: len(model.sequential_head)] == model.sequential_head]
    assert sum(sum(t) for _, t in sequential) == code_tokens_trained == 4 * n_targets
    assert sum(b.targets.sum().item() for b in batches) == sum(sum(t) for _, t in batches.examples)


def _raw_timelines(data_path) -> dict[str, list[tuple[float, str]]]:
    """{user token: [(time, item token)] in time order}, read from the raw file, at the float32 resolution RecBole's
    SequentialDataset orders by (items rated within about a minute tie, in either order)."""
    inter = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t", dtype=str)
    return {user: sorted(zip(rows["timestamp:float"].astype(float).astype("float32").tolist(), rows["item_id:token"]))
            for user, rows in inter.groupby("user_id:token")}


def test_training_sequences_of_a_global_temporal_split_hold_only_real_transitions(semconv_config, data_path):
    split = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}
    _, model, (train, _, _) = build_semconv({**semconv_config, "eval_args": split, "semconv_codes": "random"})
    users = train.dataset.inter_feat[train.dataset.uid_field].numpy()
    assert (users[1:] != users[:-1]).sum() > 2 * len(set(users))  # the rows of a user are not contiguous
    model.epoch_batches(train.dataset, epoch=0)  # the task builders' sequences
    sequences = model._tasks.sequences
    timelines = _raw_timelines(data_path)
    token = lambda item: str(train.dataset.id2token(train.dataset.iid_field, item))  # noqa: E731
    assert len(sequences) == len(set(users)) and sum(len(s) - 1 for s in sequences) == len(users)
    for user, sequence in zip(sorted(set(users)), sequences):
        timeline = timelines[str(train.dataset.id2token(train.dataset.uid_field, user))]
        time_of = {item: t for t, item in timeline}
        items = [token(i) for i in sequence]
        assert time_of[items[0]] == timeline[0][0]  # starts at the user's first item
        for a, b in zip(items, items[1:]):  # every transition happened: b came next after a (ties: either order)
            assert time_of[a] <= time_of[b]
            assert not any(time_of[a] < t < time_of[b] for t, _ in timeline)


def _occurrences(tokens: list[int], part: list[int]) -> int:
    return sum(tokens[i: i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_the_scoring_prompt_shows_the_most_recent_items_of_a_long_history(semconv_config):
    _, model, _ = build_semconv({**semconv_config, "semconv_codes": "random", "max_history_items": 3})
    history = [11, 12, 13, 14, 15, 16]
    expected = model.sequential_head + [t for item in (14, 15, 16) for t in model.code_tokens[item]]
    assert model.sequential_prompt(history) == expected


def test_query_and_negative_prompts_never_show_the_target_they_ask_for(semconv_config):
    _, model, (train, _, _) = build_semconv({**semconv_config, "semconv_codes": "random",
                                             "semconv_task_weights": {"query": 0.3, "negative": 0.3}})
    model.epoch_batches(train.dataset, epoch=0)
    made = {"query_example": [], "negative_example": []}
    for name, calls in made.items():
        original = getattr(model, name)
        setattr(model, name, lambda *args, _original=original, _calls=calls: _calls.append((args, _original(*args)))
                or _calls[-1][1])
    model._tasks.examples(epoch=1)
    assert len(made["query_example"]) > 100 and len(made["negative_example"]) > 100
    for name, calls in made.items():
        for args, (tokens, targets) in calls:
            history, item = args[0], args[1]
            prompt = [t for t, m in zip(tokens, targets) if not m]
            if name == "query_example" or args[2]:  # the true next item: ml-100k has no repeats, so never earlier
                assert item not in history
            # a query prompt names no item it asks for; a negative prompt names the asked item once, in its slot
            assert _occurrences(prompt, model.code_tokens[item]) == (0 if name == "query_example" else 1)


def test_query_history_zero_puts_no_history_in_query_and_negative_prompts(semconv_config):
    _, model, _ = build_semconv({**semconv_config, "semconv_codes": "random", "semconv_query_history": 0})
    decode = model.tokenizer.decode
    empty_query, _ = model.query_example([], 7)
    for tokens, _ in (model.query_example([5, 6, 8], 7), ):
        assert tokens == empty_query
    assert model.negative_example([5, 6], 7, True)[0] == model.negative_example([], 7, True)[0]
    assert "interacted with items . The user" in decode(empty_query)


def test_negative_task_samples_unseen_items_for_no_and_the_target_for_yes(semconv_config, monkeypatch):
    _, model, (train, _, _) = build_semconv({**semconv_config, "semconv_task_weights": {"negative": 0.2}})
    made = []
    negative_example = model.negative_example
    monkeypatch.setattr(model, "negative_example",
                        lambda history, item, positive: made.append((history, item, positive))
                        or negative_example(history, item, positive))
    model.epoch_batches(train.dataset, epoch=0)
    users = {}  # history -> the sequences of the users with that history (two users may share a short one)
    for s in training_sequences(train.dataset):
        for p in range(1, len(s)):
            users.setdefault(tuple(s[:p]), []).append(s)
    assert {positive for _, _, positive in made} == {True, False}
    for history, item, positive in made:
        assert any((item == s[len(history)]) if positive else (item not in s) for s in users[tuple(history)])


def test_packed_window_loss_equals_the_per_prefix_loss(semconv_config):
    _, model, _ = build_semconv(semconv_config)
    model.double().eval()  # fp64: equality up to rounding
    items = [model.code_tokens[i] for i in (3, 9, 27, 81, 243, 5)]
    packed = pack_window(model.sequential_head, items, sequence_windows(6, window=20, context=5)[0])
    prefixes = [prefix_example(model.sequential_head, items, t) for t in range(1, 6)]
    with torch.no_grad():
        packed_losses = model.token_losses(TokenBatch.build([packed], model.pad))
        prefix_losses = model.token_losses(TokenBatch.build(prefixes, model.pad))
    assert packed_losses.shape == (20,)
    assert torch.allclose(packed_losses, prefix_losses, atol=1e-10, rtol=0)
    assert packed_losses.std() > 0  # not a constant


def test_a_batch_counts_the_items_it_writes_as_its_targets(semconv_config):
    _, model, _ = build_semconv(semconv_config)
    items = [model.code_tokens[i] for i in (3, 9, 27, 81, 243, 5)]
    packed = pack_window(model.sequential_head, items, sequence_windows(6, window=20, context=5)[0])  # items 2-6
    title_to_code, code_to_title = model.text_example(7, True), model.text_example(7, False)
    with torch.no_grad():
        model.batch_loss(TokenBatch.build([packed, title_to_code, code_to_title], model.pad))
    assert model.last_batch_targets == 5 + 1 + 0


def test_code_softmax_scores_code_targets_over_the_code_rows_and_text_over_the_vocabulary(semconv_config):
    _, model, _ = build_semconv({**semconv_config, "semconv_code_softmax": "codes"})
    model.double().eval()
    items = [model.code_tokens[i] for i in (3, 9, 27)]
    window = pack_window(model.sequential_head, items, sequence_windows(3, window=20, context=5)[0])
    batch = TokenBatch.build([window, model.text_example(9, title_to_code=False)], model.pad)  # codes; a title
    block = model.code_rows
    with torch.no_grad():
        losses = model.token_losses(batch)
        # the reference: the whole model's logits (Hugging Face's forward, every row of the head), by hand
        logits = model.llm(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1]
    predicts = batch.targets[:, 1:].bool()
    logits, targets = logits[predicts], batch.ids[:, 1:][predicts]
    is_code = (targets >= block.start) & (targets < block.stop)
    assert is_code.sum() >= 8 and (~is_code).sum() >= 2  # both kinds of target in the batch
    full = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    codes_only = -logits[:, block.start:block.stop].log_softmax(-1)[is_code].gather(
        1, (targets[is_code] - block.start)[:, None]).squeeze(1)
    torch.testing.assert_close(losses[~is_code], full[~is_code], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(losses[is_code], codes_only, rtol=1e-9, atol=1e-10)
    assert (losses[is_code] < full[is_code]).all()  # fewer rows in the softmax: a smaller loss at every code target
    model.train()
    model.token_losses(batch).mean().backward()
    _, head = model.llm.get_base_model().get_decoder(), model.llm.get_base_model().get_output_embeddings()
    assert head.new_rows.grad is not None and head.new_rows.grad.abs().sum() > 0  # the code rows learn


# ------------------------------------------------------------------------------------------------ decoding
def test_constrained_beam_search_only_writes_catalogue_codes(semconv_config):
    _, model, (_, _, test) = build_semconv(semconv_config)
    model.eval()
    histories = model._histories(next(iter(test))[0])[:6]
    items, scores = model.beam_search(histories)
    assert items.shape == (6, 5) and (items >= 1).all() and (items < model.n_items).all()
    assert all(len(set(row)) == 5 for row in items.tolist())  # five different items per user
    assert torch.isfinite(scores).all() and (scores[:, :-1] >= scores[:, 1:]).all()
    free, _ = model.beam_search(histories, constraint="none")
    assert (free == -1).any()  # the untrained model writes non-codes when nothing constrains it
    reference_items, reference_scores = model.beam_search(histories, constraint="reference")
    assert torch.equal(reference_items, items) and torch.allclose(reference_scores, scores)


def test_shared_prefill_beam_search_returns_what_generate_returns(semconv_config):
    _, model, (_, _, test) = build_semconv(semconv_config)
    model.eval()
    histories = model._histories(next(iter(test))[0])[:6]  # different lengths: left padding is exercised
    assert len({len(h) for h in histories}) > 1
    for constraint in ("trie", "none"):
        ours, our_scores = model.generate_code_tokens(histories, constraint, decoder="prefill")
        theirs, their_scores = model.generate_code_tokens(histories, constraint, decoder="generate")
        assert torch.equal(ours, theirs), constraint
        assert torch.allclose(our_scores, their_scores, atol=1e-4), constraint


def test_full_sort_scores_the_beams_and_minus_inf_elsewhere(semconv_config):
    _, model, (_, _, test) = build_semconv(semconv_config)
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (interaction.length, model.n_items)
    assert (torch.isfinite(scores).sum(1) == 5).all() and torch.isinf(scores[:, 0]).all()


def test_ranking_deeper_than_the_beams_or_the_catalogue_is_refused_before_training(semconv_config):
    with pytest.raises(SettingError, match=r"topk=\[5, 10\] asks for 10 items per user.*--semconv_beams=10"):
        build_semconv({**semconv_config, "topk": [5, 10]})
    with pytest.raises(SettingError, match="semconv_beams=5000 exceeds the 1126 items"):
        build_semconv({**semconv_config, "semconv_beams": 5000, "topk": [5]})


def test_codebooks_too_small_for_the_catalogue_are_refused_before_the_cf_model_trains(semconv_config, monkeypatch):
    import recbole_llm.model.semconv as semconv

    monkeypatch.setattr(semconv, "collaborative_vectors", lambda *a, **k: pytest.fail("LightGCN trained"))
    with pytest.raises(SettingError, match=r"semconv_levels=2 x semconv_codebook_size=16 cannot give the 1126 items"):
        build_semconv({**semconv_config, "semconv_levels": 2})


def test_excluding_history_keeps_every_beam_on_an_item_the_ranking_keeps(semconv_config):
    """Under exclude_history the evaluator removes each user's earlier items; the beams must avoid them, so each
    user still gets ``semconv_beams`` ranked items (dropping history beams after the search would leave fewer)."""
    config, model, (_, _, test) = build_semconv({**semconv_config, "exclude_history": True, "semconv_beams": 20,
                                                  "topk": [20]})
    model.eval()
    interaction, history, _, _ = next(iter(test))
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[history[0], history[1]] = True  # RecBole's loader: the protocol's whole earlier history
    assert excluded.sum(1).median() >= 50  # most users have more earlier items than beams
    assert (torch.isfinite(scores).sum(1) == 20).all()
    assert not (torch.isfinite(scores) & excluded).any()


def _oracle_generate(model, truth, target_rank: int):
    """Code generation replaced: beam ``target_rank`` of each user is the true target's code tokens, the others
    random other items', scores 0, -1, -2 ... Everything after generation (token -> code -> item mapping,
    scattering into the full ranking, RecBole's evaluator) is the real code."""
    generator = torch.Generator().manual_seed(0)

    def generate(histories, constraint="trie", decoder="prefill", banned=None):
        rows = []
        for history in histories:
            target = truth[history_key(history)]
            others = [i for i in torch.randperm(model.n_items - 1, generator=generator).add(1).tolist()
                      if i != target][: model.beams - 1]
            rows.append([model.code_tokens[i] for i in others[:target_rank] + [target] + others[target_rank:]])
        scores = -torch.arange(model.beams, dtype=torch.float).repeat(len(histories), 1)
        return torch.tensor(rows), scores

    model.generate_code_tokens = generate


@pytest.mark.parametrize("target_rank, recall_at_1", [(0, 1.0), (2, 0.0)])
def test_oracle_true_codes_rank_by_beam_score_through_full_sort_predict_and_recboles_evaluator(
        semconv_config, target_rank, recall_at_1):
    config, model, (_, _, test) = build_semconv({**semconv_config, "topk": [1, 3], "metrics": ["Recall", "NDCG"]})
    _oracle_generate(model, targets_by_history(test), target_rank)
    result = evaluate_with_recbole(config, model, test)
    assert result["recall@1"] == recall_at_1 and result["recall@3"] == 1.0
    assert result["ndcg@3"] == pytest.approx(1.0 if target_rank == 0 else 0.5)  # 1 / log2(2 + 2)


# ---------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def learn_data(tmp_path_factory, data_path) -> Path:
    """30 users with their first 8 ratings each: 6 training items (5 targets) per user."""
    return first_ratings_subset(tmp_path_factory.mktemp("learn"), data_path, "ml-learn", users=30, per_user=8)


def _training_recall_at_1(model, train_dataset) -> float:
    sequences = training_sequences(train_dataset)
    histories = [s[:p] for s in sequences for p in range(1, len(s))]
    targets = torch.tensor([s[p] for s in sequences for p in range(1, len(s))])
    model.eval()
    with torch.no_grad():
        top = torch.cat([model.beam_search(histories[i: i + 32])[0][:, 0] for i in range(0, len(histories), 32)])
    return float((top == targets).float().mean())


def test_the_model_learns_to_recall_its_training_targets(semconv_config, learn_data):
    settings = {**semconv_config, "data_path": str(learn_data), "lora_r": 0, "learning_rate": 0.005,
                "epochs": 120, "train_batch_size": 8, "semconv_codebook_size": 8, "semconv_levels": 3,
                "semconv_task_weights": {"sequential": 1.0}, "semconv_beams": 3, "topk": [3]}
    config, model, (train, valid, _) = build_semconv(settings, "ml-learn")
    assert _training_recall_at_1(model, train.dataset) < 0.2
    LLMTrainer(config, model).fit(train, None, saved=False)
    assert _training_recall_at_1(model, train.dataset) >= 0.8


# ------------------------------------------------------------------------------------- run and round trip
def test_full_run_and_checkpoint_round_trip_with_codebook_and_code_tokens(semconv_config):
    config, model, (train, valid, test) = build_semconv({**semconv_config, "learning_rate": 0.01})
    fresh_rows = model.llm.get_input_embeddings().new_rows.detach().clone()
    trainer = LLMTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(model.llm.get_input_embeddings().new_rows, fresh_rows)  # code rows trained
    interaction = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        expected = model.full_sort_predict(interaction)

    saved = load_file(Path(trainer.saved_model_file) / "model.safetensors")
    assert any(k.startswith("codebook.quantizer.") for k in saved) and "item_codes" in saved
    assert any("lora_" in k for k in saved) and any(k.endswith("embed_tokens.new_rows") for k in saved)
    assert not any(k.endswith("embed_tokens.base.weight") for k in saved)  # not the 49k-row matrix

    _, reloaded, _, _, _, reloaded_test = load_model(trainer.saved_model_file)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in trained.items())
    with torch.no_grad():
        actual = reloaded.full_sort_predict(next(iter(reloaded_test))[0])
    assert torch.equal(actual, expected)


def test_run_recbole_llm_reports_recboles_metrics(semconv_config):
    result = run_recbole_llm("SemConv", "ml-tiny", config_dict=semconv_config)
    assert set(result["test_result"]) >= {"recall@5", "ndcg@5"} and result["protocol"]["exclude_history"] is False


# ------------------------------------------------------------------------------------------ top-K cache
def test_top_k_export_serves_the_evaluated_ranking_and_refuses_a_stale_fingerprint(semconv_config, tmp_path):
    from recbole_llm.serving import StaleCacheError, TopKCache, checkpoint_fingerprint, export_checkpoint_top_k

    # 59 + 1 users per batch: a one-row batch once exported user "23" as "2" and "3"
    config, model, (train, valid, test) = build_semconv({**semconv_config, "eval_batch_size": 59})
    trainer = LLMTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    path = export_checkpoint_top_k(trainer.saved_model_file, tmp_path / "top.jsonl", k=5, show_progress=False)
    cache = TopKCache.load(path, checkpoint_fingerprint(trainer.saved_model_file))
    assert cache.header["users"] == 60 and cache.header["fingerprint"] == trainer.fingerprint
    assert set(cache.lists) == {str(u) for u in test._dataset.id2token("user_id", test._dataset.inter_feat["user_id"].numpy())}

    model.eval()
    interaction = next(iter(test))[0]  # the whole split in one batch, as the export scores it
    with torch.no_grad():
        best = torch.topk(model.full_sort_predict(interaction)[0], 5).indices
    user = test._dataset.id2token("user_id", interaction["user_id"][:1].numpy())[0]
    assert cache.recommend(user, 5) == list(test._dataset.id2token("item_id", best.numpy()))
    assert cache.recommend(user, 2) == cache.recommend(user, 5)[:2]
    with pytest.raises(UsageError, match="holds the top 5 items per user; ask for 1 to 5"):
        cache.recommend(user, 6)

    with pytest.raises(StaleCacheError, match="Export again"):
        TopKCache.load(path, "0" * 12)
    _serving_commands_refuse_bad_input_with_one_line(path, trainer.saved_model_file, user, tmp_path)


def _serving_commands_refuse_bad_input_with_one_line(export, checkpoint, user, tmp_path):
    from recbole_llm.serving import main

    lines = Path(export).read_text().splitlines()
    header = json.loads(lines[0])
    stale = tmp_path / "stale.jsonl"
    stale.write_text("\n".join([json.dumps({**header, "fingerprint": "0" * 12}), *lines[1:]]) + "\n")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:-1]) + "\n")
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("\n".join([lines[0], lines[1], "[1, 2]", *lines[3:]]) + "\n")
    not_a_checkpoint = tmp_path / "empty_dir"
    not_a_checkpoint.mkdir()
    cases = [
        (["recommend", str(stale), user, "--checkpoint", str(checkpoint)], "changed since the export"),
        (["recommend", str(export), "no-such-user"], "user 'no-such-user' is not in the top-K export"),
        (["recommend", str(export), user, "--k", "9"], "holds the top 5 items per user"),
        (["recommend", str(truncated), user], f"{truncated}:{len(lines)} is not JSON"),
        (["recommend", str(short), user], "the file is truncated"),
        (["recommend", str(garbled), user], f"{garbled}:3 is not a user's list"),
        (["recommend", str(tmp_path / "missing.jsonl"), user], "no such top-K export"),
        (["export", str(not_a_checkpoint), str(tmp_path / "x.jsonl")], "is not a recbole_llm checkpoint"),
        (["export", str(tmp_path / "missing_dir"), str(tmp_path / "x.jsonl")], "is not a recbole_llm checkpoint"),
    ]
    for argv, message in cases:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(argv) == 2, argv
        assert err.getvalue().startswith("error: ") and message in err.getvalue() and err.getvalue().count("\n") == 1
