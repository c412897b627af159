"""RALLRec on the tiny backbone: description cache and resume, alignment, retrieval without future items, the
reranker's order, answer tokens, P(Yes), the oracle through RecBole's evaluator, learning, a full labeled run and
the checkpoint round trip."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_llm.llm.descriptions import Decoding, write_texts
from recbole_llm.model.rallrec import RALLRec, align_views, pca
from recbole_llm.quick_start import build_model_and_data, load_model, make_config, run_recbole_llm
from recbole_llm.retrieval.history import history_similarity, select_history
from recbole_llm.trainer.llm_trainer import LLMTrainer

from oracle import evaluate_with_recbole


@pytest.fixture
def rallrec_config(base_config) -> dict:
    return {
        **base_config,
        "llm_path": "tiny-random",
        "llm_dtype": "fp32",
        "rallrec_descriptions": "template",
        "rallrec_cf_epochs": 2,
        "rallrec_ssl_epochs": 20,
        "rallrec_history_k": 6,
        "rallrec_train_samples": 48,
        "train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "eval_max_interactions": 64,
        "eval_step": 0,
        "eval_batch_size": 64,
        "item_text_fields": {"Title": "movie_title", "Genres": "class", "Year": "release_year"},
        "rallrec_user_fields": {"gender": "gender", "age": "age", "job": "occupation"},
        "item_domain": "movie",  # as properties/dataset/ml-100k.yaml
    }


def build_rallrec(config_dict: dict, dataset: str = "ml-tiny"):
    config = make_config("RALLRec", dataset, config_dict=config_dict)
    _, loaders, model = build_model_and_data(config)
    return config, model, loaders


def auc(scores, labels) -> float:
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels) > 0.5
    ranks = scores.argsort().argsort() + 1.0
    for value in np.unique(scores):  # average ranks of ties
        ranks[scores == value] = ranks[scores == value].mean()
    positives = labels.sum()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * (~labels).sum()))


# ------------------------------------------------------------------------------------- retrieval and reranking
def test_reranker_takes_recent_relevant_items_then_the_latest_rest():
    similarity = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.0])  # positions 0..7, oldest first
    # K = 6, alpha = 2/3: the 6 most similar are 0, 2, 4, 6, 5, 3; the K1 = 4 most recent of them, most recent
    # first: 6, 5, 4, 3; then the K2 = 2 latest of the rest (7, 2), oldest first
    assert select_history(similarity, 8, 6, "rerank") == [6, 5, 4, 3, 2, 7]
    assert select_history(similarity, 8, 6, "high") == [0, 2, 4, 6, 5, 3]
    assert select_history(similarity, 8, 6, "sequential") == [0, 2, 3, 4, 5, 6]
    assert select_history(similarity, 8, 6, "simple") == [2, 3, 4, 5, 6, 7]
    assert select_history(similarity, 3, 6, "rerank") == [2, 1, 0]  # short history: all 3, K1 = 2 most recent first
    assert select_history(similarity, 8, 6, "rerank", alpha=0.0) == [2, 3, 4, 5, 6, 7]
    # K = 5, alpha = 2/3: K1 = floor(10/3) = 3 of the 5 most similar (0, 2, 4, 6, 5): 6, 5, 4; then the 2 latest
    # others (3, 7)
    assert select_history(similarity, 8, 5, "rerank") == [6, 5, 4, 3, 7]
    with pytest.raises(ValueError, match="unknown history selection"):
        select_history(similarity, 8, 6, "recent")


def test_history_similarity_reads_only_each_rows_own_history():
    vectors = torch.nn.functional.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    vectors[0] = 0
    histories = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    scores = history_similarity(vectors, histories, torch.tensor([3, 2]), torch.tensor([7, 8]))
    assert torch.allclose(scores[0, :3], vectors[[1, 2, 3]] @ vectors[7]) and torch.isinf(scores[1, 2:]).all()


def test_prompts_never_show_an_item_from_after_the_scored_interaction(rallrec_config, data_path):
    config, model, (train, valid, test) = build_rallrec({**rallrec_config, "rallrec_history_k": 30})
    raw = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t")
    dataset = test.dataset
    titles_seen = 0
    for interaction in (next(iter(test))[0], next(iter(valid))[0]):
        users = dataset.id2token("user_id", interaction["user_id"].numpy())
        items = dataset.id2token("item_id", interaction["item_id"].numpy())
        for row, chosen in enumerate(model.select(interaction, "rerank")):
            shown = interaction["item_id_list"][row, chosen].numpy()
            mine = raw[raw["user_id:token"] == int(users[row])]
            time = mine.loc[mine["item_id:token"] == int(items[row]), "timestamp:float"].iloc[0]
            later = set(mine.loc[mine["timestamp:float"] > time, "item_id:token"].astype(str))
            assert not later & set(dataset.id2token("item_id", shown)), "a future item reached the prompt"
            assert len(chosen) == min(30, int(interaction["item_length"][row]))
            titles_seen += len(chosen)
    assert titles_seen > 0


# --------------------------------------------------------------------------------------------- representations
def test_alignment_pulls_the_text_view_onto_the_collaborative_view():
    generator = torch.Generator().manual_seed(0)
    colla = torch.randn(300, 16, generator=generator)
    text = torch.cat([colla @ torch.randn(16, 40, generator=generator), torch.randn(300, 8, generator=generator)], 1)
    aligned, losses = align_views(text, colla, hidden=64, epochs=60, batch_size=128, seed=0)
    assert losses[-1] < 0.5 * losses[0]
    own = (aligned @ torch.nn.functional.normalize(colla, dim=1).T).argmax(1)
    assert (own == torch.arange(300)).float().mean() > 0.5  # chance: 1/300


def test_pca_is_deterministic_and_ordered():
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    a, b = pca(x, 4), pca(x.clone(), 4)
    assert a.shape == (50, 4) and torch.equal(a, b) and (a.var(0)[:-1] >= a.var(0)[1:]).all()


def test_item_representation_is_the_scaled_mixture_of_three_views(rallrec_config):
    _, model, _ = build_rallrec(rallrec_config)
    report = model.representation_report
    assert report["embedding"] == "mix3" and report["dim"] == 32 + 64 + 64  # tiny backbone: PCA keeps 32
    assert report["ssl_loss_first_last"][1] < report["ssl_loss_first_last"][0]
    norms = model.item_vectors.norm(dim=1)
    assert norms[0] == 0 and torch.allclose(norms[1:], torch.ones(model.n_items - 1), atol=1e-5)


# --------------------------------------------------------------------------------------------- descriptions
class CountingLLM(torch.nn.Module):
    """The tiny backbone, counting its prefills (one per batch of texts) and optionally interrupted at one."""

    def __init__(self, model, interrupt_after: int | None = None):
        super().__init__()
        self.model, self.prefills, self.interrupt_after, self.rows = model, 0, interrupt_after, []

    def forward(self, **inputs):
        if inputs.get("cache") is None:
            self.prefills += 1
            self.rows.append(len(inputs["input_ids"]))
            if self.interrupt_after is not None and self.prefills > self.interrupt_after:
                raise KeyboardInterrupt
        return self.model(**inputs)


@pytest.fixture(scope="module")
def tiny_backbone():
    from recbole_llm.llm.backbone import load_backbone

    return load_backbone("tiny-random", dtype="fp32")


def test_descriptions_are_cached_and_an_interrupted_sampled_run_resumes_to_the_same_texts(tmp_path, tiny_backbone):
    model, tokenizer = tiny_backbone
    prompts = [f"Describe movie {'x ' * i}" for i in range(10)]
    keys = [str(i) for i in range(10)]
    sampled = Decoding(max_new_tokens=8, min_new_tokens=2, temperature=0.8, top_p=0.9, seed=3)

    def write(llm, file, batch_size=3, decoding=sampled):
        return write_texts(llm, tokenizer, prompts, keys, tmp_path / file, replace(decoding, batch_size=batch_size),
                           progress=False)

    with pytest.raises(KeyboardInterrupt):
        write(CountingLLM(model, interrupt_after=2), "d.jsonl")
    partial = tmp_path / "d.jsonl.partial"
    assert not (tmp_path / "d.jsonl").exists() and len(partial.read_text().splitlines()) == 6  # two batches kept
    resumed = CountingLLM(model)
    texts = write(resumed, "d.jsonl")
    assert resumed.prefills == 2 and (tmp_path / "d.jsonl").is_file() and not partial.exists()  # the 4 missing

    assert write(CountingLLM(model), "e.jsonl") == texts  # resuming gave what one uninterrupted run gives
    assert write(CountingLLM(model), "f.jsonl", batch_size=4) == texts  # and so does another batch size
    again = CountingLLM(model)
    assert write(again, "d.jsonl") == texts and again.prefills == 0  # the finished file is read, not rewritten
    other_seed = write(CountingLLM(model), "g.jsonl", decoding=Decoding(**{**sampled.__dict__, "seed": 4}))
    assert sum(a != b for a, b in zip(other_seed, texts)) >= 8 and len(set(texts)) >= 8  # texts are sampled

    # a run cut while it wrote a batch (the first four texts kept: the second batch, prompts 3-5, only begun):
    # the batches are the uninterrupted run's, so under reduced precision (where a prompt's logits depend on the
    # rows beside it) the texts are too: the begun batch whole (3 rows), then 6-8 (3), then 9 (1)
    (tmp_path / "h.jsonl.partial").write_text(
        "".join(json.dumps({"key": keys[i], "text": texts[i]}) + "\n" for i in range(4)))
    cut = CountingLLM(model)
    assert write(cut, "h.jsonl") == texts and cut.rows == [3, 3, 1]


def test_llm_descriptions_are_keyed_by_their_prompts_and_decoding(rallrec_config):
    settings = {**rallrec_config, "rallrec_descriptions": "llm", "rallrec_description_tokens": 4,
                "rallrec_description_batch_size": 64, "rallrec_embedding": "text"}
    config, model, _ = build_rallrec(settings)
    files = sorted((model._cache(config) / "descriptions").glob("ml-tiny-*.jsonl"))
    assert len(files) == 1 and len(model.descriptions) == model.n_items and model.descriptions[1]
    build_rallrec({**settings, "learning_rate": 0.5})  # not an input of the descriptions: reused
    assert sorted((model._cache(config) / "descriptions").glob("ml-tiny-*.jsonl")) == files
    build_rallrec({**settings, "rallrec_description_tokens": 3})
    assert len(list((model._cache(config) / "descriptions").glob("ml-tiny-*.jsonl"))) == 2
    build_rallrec({**settings, "item_domain": "book"})  # other prompts, same backbone and decoding
    assert len(list((model._cache(config) / "descriptions").glob("ml-tiny-*.jsonl"))) == 3
    build_rallrec({**settings, "rallrec_description_batch_size": 32})  # under bf16 the batch shapes the texts
    assert len(list((model._cache(config) / "descriptions").glob("ml-tiny-*.jsonl"))) == 4


def test_the_backbones_cache_identity_holds_the_precision_it_computes_in(monkeypatch):
    # llm_dtype auto computes in bf16 on a CPU with native bf16 and in fp32 on one without: other outputs
    config = {"llm_path": "tiny-random", "llm_dtype": "auto", "llm_quantization": "none", "device": "cpu"}
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", "1")
    with_bf16 = RALLRec._backbone_id(config)
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", "0")
    assert RALLRec._backbone_id(config) != with_bf16
    assert RALLRec._backbone_id({**config, "llm_dtype": "fp32"}) != RALLRec._backbone_id(config)


# ------------------------------------------------------------------------------------------------- scoring
def test_answer_tokens_are_derived_and_must_be_single():
    from recbole_llm.llm.backbone import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    stub = SimpleNamespace(tokenizer=tokenizer, chat=False)
    yes, no = RALLRec._answer_ids(stub)
    assert tokenizer.decode([yes]) == " Yes" and tokenizer.decode([no]) == " No"
    with pytest.raises(ValueError, match="splits the answer 'Yes'"):
        RALLRec._answer_ids(SimpleNamespace(tokenizer=tokenizer, chat=True))  # "Yes" is two tiny tokens


def test_prompt_has_demographics_stars_and_target(rallrec_config):
    _, model, (_, _, test) = build_rallrec(rallrec_config)
    interaction = next(iter(test))[0][:1]
    text = model.tokenizer.decode(model.prompts(interaction, "rerank")[0])
    user = test.dataset.id2token("user_id", interaction["user_id"].numpy())[0]
    profile = pd.read_csv(test.dataset.dataset_path + "/ml-tiny.user", sep="\t", dtype=str)
    row = profile[profile["user_id:token"] == user].iloc[0]
    assert f"job is {row['occupation:token']}. " in text and f"age is {row['age:token']}." in text
    assert f"***{model.titles[int(interaction['item_id'][0])]}***" in text and text.rstrip().endswith("Answer:")
    # the paper's wording for rating >= 4 ("likes" above 3 stars), for movies (ml-100k's item_domain)
    assert "the user will like a new movie if the rating could be higher than 3 stars" in text
    # every shown item carries the user's own rating of it, from the raw file
    raw = pd.read_csv(test.dataset.dataset_path + "/ml-tiny.inter", sep="\t", dtype=str)
    mine = raw[raw["user_id:token"] == user].set_index("item_id:token")["rating:float"]
    chosen = model.select(interaction, "rerank")[0]
    shown = test.dataset.id2token("item_id", interaction["item_id_list"][0, chosen].numpy())
    expected = [f"{model.titles[int(i)]} ({int(float(mine[t]))} star{'' if mine[t] == '1' else 's'})"
                for i, t in zip(interaction["item_id_list"][0, chosen].tolist(), shown)]
    assert str(expected) in text and len(expected) == 6


def test_oracle_labels_through_predict_and_recboles_evaluator(rallrec_config, monkeypatch):
    config, model, (_, _, test) = build_rallrec(rallrec_config)
    truth = {}
    inter = test.dataset.inter_feat
    for u, i, y in zip(inter["user_id"].tolist(), inter["item_id"].tolist(), inter["label"].tolist()):
        truth[(u, i)] = y
    real = model.yes_probability
    seen = []

    def oracle(prompts):
        seen.append(real(prompts))  # the real forward pass still runs on the real prompts
        return torch.tensor([truth[key] for key in oracle.keys]) * 0.98 + 0.01

    original_prompts = model.prompts

    def prompts(interaction, how):
        oracle.keys = list(zip(interaction["user_id"].tolist(), interaction["item_id"].tolist()))
        return original_prompts(interaction, how)

    monkeypatch.setattr(model, "yes_probability", oracle)
    monkeypatch.setattr(model, "prompts", prompts)
    result = evaluate_with_recbole(config, model, test)
    assert result["auc"] == 1.0 and result["accuracy"] == 1.0 and result["logloss"] < 0.02
    scores = torch.cat(seen)
    assert len(scores) == 64 and ((scores > 0) & (scores < 1)).all()  # P(Yes) of the real model, in (0, 1)


def test_batched_scoring_gives_each_prompt_what_it_gets_alone(rallrec_config):
    """P(Yes) of prompts of different lengths scored in shared passes (sorted, padded) is what a plain forward pass
    over each prompt alone gives, in the prompts' order, for a rotary (Llama) and an absolute-position (GPT-2)
    backbone: padding must shift no prompt's positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, model, (_, _, test) = build_rallrec(rallrec_config)
    model.eval()  # no adapter dropout
    prompts = model.prompts(test.dataset.inter_feat[torch.arange(10)], "rerank")
    prompts = [p[: len(p) - 3 * i] for i, p in enumerate(prompts)]  # lengths spread further, unsorted
    assert len({len(p) for p in prompts}) == 10
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=model.llm.config.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=512)).eval()
    for llm in (model.llm, gpt2):
        model.llm, model.score_batch_size = llm, 4
        alone = torch.stack([llm(input_ids=torch.tensor([p])).logits[0, -1, [model.yes, model.no]].softmax(-1)[0]
                             for p in prompts])
        batched = model.yes_probability(prompts)
        assert alone.std() > 1e-4  # the prompts score differently, so an order mix-up shows
        torch.testing.assert_close(batched, alone.detach(), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory, data_path):
    """30 users whose labels follow a rule a tiny model can read from the prompt: the target is liked exactly
    when its title starts with a letter in the first half of the alphabet (ratings rewritten accordingly)."""
    root = tmp_path_factory.mktemp("learn")
    (root / "ml-learn").mkdir()
    inter = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t")
    items = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.item", sep="\t", dtype=str)
    first = dict(zip(items["item_id:token"].astype(int), items["movie_title:token_seq"].str[0].str.upper()))
    inter = inter[inter["user_id:token"] <= 30]
    inter["rating:float"] = np.where(inter["item_id:token"].map(first) <= "L", 5, 1)
    inter.to_csv(root / "ml-learn" / "ml-learn.inter", sep="\t", index=False)
    for suffix in ("item", "user"):
        (root / "ml-learn" / f"ml-learn.{suffix}").write_bytes((data_path / "ml-tiny" / f"ml-tiny.{suffix}").read_bytes())
    return root


def test_the_model_learns_its_training_labels(rallrec_config, learn_data):
    settings = {**rallrec_config, "data_path": str(learn_data), "learning_rate": 0.003, "epochs": 40,
                "rallrec_train_samples": 64, "rallrec_train_prompts": ["simple"], "rallrec_history_k": 2,
                "lora_r": 0}
    config, model, (train, _, _) = build_rallrec(settings, "ml-learn")
    examples = model.training_examples(train.dataset)
    prompts = [tokens[:-2] for tokens, _ in examples]
    # the rule, read from each prompt's target title (not from the labels the examples carry)
    titles = [re.search(r"\*\*\*(.+?)\*\*\*", model.tokenizer.decode(p)).group(1) for p in prompts]
    labels = [title[0].upper() <= "L" for title in titles]
    assert 0.2 < np.mean(labels) < 0.8
    model.eval()
    before = auc(model.yes_probability(prompts).numpy(), labels)
    LLMTrainer(config, model).fit(train, None, saved=False)
    model.eval()
    after = auc(model.yes_probability(prompts).numpy(), labels)
    assert after > 0.8 and after > before + 0.2, (before, after)


# ------------------------------------------------------------------------------------- run and round trip
def test_full_run_and_checkpoint_round_trip(rallrec_config):
    config, model, (train, valid, test) = build_rallrec({**rallrec_config, "learning_rate": 0.01})
    fresh = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    trainer = LLMTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    assert fresh and not all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())  # LoRA trained
    interaction = next(iter(test))[0]
    model.eval()
    expected = model.predict(interaction)
    _, reloaded, _, _, _, reloaded_test = load_model(trainer.saved_model_file)
    with torch.no_grad():
        actual = reloaded.predict(next(iter(reloaded_test))[0])
    assert torch.equal(actual, expected)


def test_run_recbole_llm_reports_ctr_metrics_on_the_sampled_rows(rallrec_config):
    record = run_recbole_llm("RALLRec", "ml-tiny", config_dict=rallrec_config)
    assert set(record["test_result"]) == {"auc", "logloss", "accuracy"} and record["test_rows"] == 64
    report = record["model_report"]
    assert report["train_prompts"] == 48 and report["score_prompts_per_second"] > 0
    # each prompt counts as a target: rallrec_train_samples prompts in the run's one epoch
    assert record["train_targets"] == 48 and record["train_targets_per_second"] > 0


def test_qlora_4bit_backbone_trains_and_scores(rallrec_config, tmp_path):
    import bitsandbytes as bnb

    from recbole_llm.llm.backbone import materialize_tiny_random

    wide = materialize_tiny_random(tmp_path / "tiny-64", hidden_size=64, intermediate_size=128)
    settings = {**rallrec_config, "llm_path": str(wide), "llm_quantization": "4bit", "rallrec_train_samples": 16,
                "rallrec_embedding": "text", "learning_rate": 0.01}
    config, model, (train, _, test) = build_rallrec(settings)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules())
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    LLMTrainer(config, model).fit(train, None, saved=False)
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in lora.items())
    model.eval()
    p = model.predict(next(iter(test))[0])
    assert len(p) == 64 and ((p > 0) & (p < 1)).all()


def test_coded_demographics_are_spelled_out(rallrec_config, data_path, tmp_path):
    folder = tmp_path / "ml-coded"
    folder.mkdir()
    for suffix in ("inter", "item"):
        (folder / f"ml-coded.{suffix}").write_bytes((data_path / "ml-tiny" / f"ml-tiny.{suffix}").read_bytes())
    users = pd.DataFrame({"user_id:token": range(1, 61), "age:float": 25.0, "gender:token": "M",
                          "occupation:float": 10.0})
    users.to_csv(folder / "ml-coded.user", sep="\t", index=False)
    settings = {**rallrec_config, "data_path": str(tmp_path), "rallrec_embedding": "text",
                "rallrec_user_values": {"age": {25: "25-34"}, "job": {10: "K-12 student"}}}
    _, model, _ = build_rallrec(settings, "ml-coded")
    assert model.users[1] == ("The user is a male. His job is K-12 student. His age is 25-34.", "he")


def test_minilm_text_encoder_option():
    from recbole_llm.model.rallrec import minilm_embeddings

    vectors = minilm_embeddings(["A space opera with starships and laser battles.",
                                 "Starships fight laser battles in a galaxy far away.",
                                 "A quiet romance in a small French village."])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # a real sentence encoder, not random weights


def test_minilm_encoder_feeds_the_text_view(rallrec_config):
    _, model, _ = build_rallrec({**rallrec_config, "rallrec_text_encoder": "minilm", "rallrec_embedding": "text"})
    assert model.representation_report["dim"] == 128  # PCA-128 of MiniLM's 384-d vectors (the tiny LLM has 32)


def test_full_ranking_is_refused_with_the_fix(rallrec_config):
    full = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}
    from recbole_llm.settings import SettingError

    with pytest.raises(SettingError, match="not the whole catalogue.*mode: labeled"):
        build_rallrec({**rallrec_config, "eval_args": full, "metrics": ["Recall"], "valid_metric": "Recall@10",
                       "eval_max_interactions": None, "min_history_length": 0, "threshold": None})


def test_text_embeddings_are_keyed_by_the_texts(rallrec_config):
    _, plain, _ = build_rallrec({**rallrec_config, "rallrec_embedding": "text"})
    _, written, _ = build_rallrec({**rallrec_config, "rallrec_embedding": "text", "rallrec_descriptions": "llm",
                                   "rallrec_description_tokens": 4, "rallrec_description_batch_size": 64})
    assert written.descriptions != plain.descriptions  # (the session's cache may already hold either file)
    assert not torch.equal(written.item_vectors, plain.item_vectors)  # other texts never reuse their vectors


def _shop_data(data_path, root):
    """An Amazon-like dataset: ml-tiny's interactions over products with a title, a category and a brand."""
    folder = root / "shop"
    folder.mkdir(parents=True)
    (folder / "shop.inter").write_bytes((data_path / "ml-tiny" / "ml-tiny.inter").read_bytes())
    items = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.item", sep="\t", dtype=str)
    pd.DataFrame({"item_id:token": items["item_id:token"],
                  "title:token_seq": "Steel kettle " + items["item_id:token"],
                  "category:token_seq": "Kitchen Appliances", "brand:token": "Acme"}).to_csv(
        folder / "shop.item", sep="\t", index=False)
    return root


@pytest.mark.parametrize("domain, words", [("product", ["product", "bought"]), (None, ["item", "interacted with"])])
def test_prompts_use_the_datasets_item_domain_and_never_film_words_elsewhere(rallrec_config, data_path, tmp_path,
                                                                            monkeypatch, domain, words):
    import recbole_llm.model.rallrec as rallrec

    written = []
    monkeypatch.setattr(rallrec, "write_texts", lambda llm, tokenizer, prompts, keys, *a, **k: written.extend(prompts)
                        or ["A kettle."] * len(prompts))
    settings = {**rallrec_config, "data_path": str(_shop_data(data_path, tmp_path / "data")),
                "item_text_fields": {"Title": "title", "Category": "category", "Brand": "brand"},
                "rallrec_user_fields": None, "rallrec_descriptions": "llm", "rallrec_embedding": "text",
                "item_domain": domain}
    _, model, (_, _, test) = build_rallrec(settings, "shop")
    interaction = next(iter(test))[0][:4]
    prompts = [model.tokenizer.decode(p) for p in model.prompts(interaction, "rerank")]
    film_words = re.compile(r"\b(film|films|movie|movies|watched|actors?|director)\b", re.IGNORECASE)
    for text in [*written[:50], *prompts]:
        assert not film_words.search(text), text
        assert words[0] in text
    assert all(f"The user {words[1]} the following relevant {words[0]}s" in text for text in prompts)
    assert "Steel kettle" in written[0] and "category is Kitchen Appliances" in written[0]
    assert f"deduce if the user will like the {words[0]} ***Steel kettle" in prompts[0]
