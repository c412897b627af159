"""Collaborative vectors: the representation the CF model scores with, trained on exactly the run's training period
(sequential leave-one-out and labeled CTR runs), and a principled vector for items no training interaction reached."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from recbole.data import data_preparation

from recbole_llm.collaborative import cf_config, collaborative_vectors, regress_cold_items
from recbole_llm.data.sequences import user_sequences
from recbole_llm.quick_start import make_config
from recbole_llm.registry import create_dataset

LIGHTGCN = {"embedding_size": 8, "n_layers": 2}


def _run(config_dict, model="SASRec"):
    config = make_config(model, "ml-tiny", config_dict=config_dict)
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, train._dataset, test._dataset


def _propagated_mean(users, items, pairs, layers):
    """LightGCN's output by hand: mean of E, A E, ..., A^L E with A = D^-1/2 [[0, R], [R^T, 0]] D^-1/2."""
    n_users = len(users)
    embeddings = torch.cat([users, items]).double()
    adjacency = torch.zeros(len(embeddings), len(embeddings), dtype=torch.float64)
    for user, item in pairs:
        adjacency[user, n_users + item] = adjacency[n_users + item, user] = 1.0
    scale = (adjacency.sum(1) + 1e-7).pow(-0.5)
    normalised = scale[:, None] * adjacency * scale[None, :]
    layer, total = embeddings, embeddings.clone()
    for _ in range(layers):
        layer = normalised @ layer
        total += layer
    mean = total / (layers + 1)
    return mean[:n_users].float(), mean[n_users:].float()


def test_scoring_vectors_are_lightgcns_propagated_output_over_the_runs_training_interactions(base_config):
    config, train, _ = _run({**base_config, "MAX_ITEM_LIST_LENGTH": 10})
    table = collaborative_vectors(config, train, vectors="table", epochs=2, settings=LIGHTGCN)
    scoring = collaborative_vectors(config, train, vectors="scoring", epochs=2, settings=LIGHTGCN)
    # the run's training interactions, rebuilt from its own training split (not from the CF model)
    pairs = {(user, item) for user, items in user_sequences(train).items() for item in items}
    users, items = _propagated_mean(table.users, table.items, pairs, LIGHTGCN["n_layers"])
    assert torch.allclose(scoring.users[1:], users[1:], atol=1e-5)
    assert torch.allclose(scoring.items[1:], items[1:], atol=1e-5)
    assert not torch.allclose(scoring.items, table.items, atol=1e-3)  # propagation changed the vectors
    assert (scoring.items[0] == 0).all() and (scoring.users[0] == 0).all()
    # items of no training pair: cold (under leave-one-out only items seen in valid/test alone)
    warm = {item for _, item in pairs}
    assert set(scoring.cold_items.nonzero().flatten().tolist()) == set(range(1, train.item_num)) - warm


def test_a_labeled_runs_cf_model_sees_every_interaction_of_the_training_period_and_none_later(base_config,
                                                                                              data_path):
    labeled = {**base_config, "threshold": {"rating": 4}, "min_history_length": 5, "eval_max_interactions": 100,
               "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "labeled"}}
    config, train, test = _run(labeled, model="DIN")
    other = cf_config(config, "LightGCN", epochs=1, settings=LIGHTGCN)
    cf_train = data_preparation(other, create_dataset(other))[0]._dataset

    def pairs(dataset):
        inter = dataset.inter_feat
        users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())
        return set(zip(users.tolist(), items.tolist()))

    raw = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t", dtype=str)
    time = {(u, i): float(t) for u, i, t in zip(raw["user_id:token"], raw["item_id:token"], raw["timestamp:float"])}
    cutoff = max(time[pair] for pair in pairs(train))  # the last scored training row, at the file's precision
    seen = pairs(cf_train)
    assert seen >= {pair for pair, t in time.items() if t < cutoff}  # users' first 5 interactions included
    assert all(time[pair] <= cutoff for pair in seen)  # nothing of the valid or test period
    assert len(seen - pairs(train)) >= 200  # the rows min_history_length keeps from being scored


def test_cold_items_are_regressed_from_their_text_or_take_the_warm_mean():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(40, 6, generator=generator)
    vectors = text @ torch.randn(6, 3, generator=generator) + 2.0  # a linear function of the text
    cold = torch.zeros(40, dtype=torch.bool)
    cold[[3, 17, 30]] = True
    noisy = vectors.clone()
    noisy[cold] = torch.randn(3, 3, generator=generator) * 100  # what an untrained embedding row would hold
    filled = regress_cold_items(noisy, cold, text, ridge=1e-6)
    assert torch.allclose(filled[cold], vectors[cold], atol=1e-3)
    assert torch.equal(filled[~cold], noisy[~cold])
    mean = regress_cold_items(noisy, cold)
    assert torch.allclose(mean[cold], vectors[~cold].mean(0).expand(3, 3), atol=1e-5)
    assert regress_cold_items(noisy, torch.zeros(40, dtype=torch.bool), text) is noisy


@pytest.mark.parametrize("vectors", ["scoring", "table"])
def test_every_cf_setting_is_its_own_cache_entry(base_config, vectors, tmp_path):
    config, train, _ = _run({**base_config, "MAX_ITEM_LIST_LENGTH": 10})
    one = collaborative_vectors(config, train, vectors=vectors, epochs=1, settings=LIGHTGCN)
    two = collaborative_vectors(config, train, vectors=vectors, epochs=2, settings=LIGHTGCN)
    assert not torch.equal(one.items, two.items)
    assert torch.equal(collaborative_vectors(config, train, vectors=vectors, epochs=1, settings=LIGHTGCN).items,
                       one.items)
