"""One evaluation protocol for every model of a comparison: split, metrics and history exclusion, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from recbole_llm.cli import main
from recbole_llm.quick_start import build_model_and_data, make_config


def _flags(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def _excluded(config_dict, model, targets: dict | None = None) -> dict[str, set[str]]:
    """{user token: item tokens excluded from that user's test ranking}, from the real test loader; ``targets``
    collects each row's test target (user token -> item token)."""
    config = make_config(model, "ml-tiny", config_dict=config_dict)
    dataset, (_, _, test), _ = build_model_and_data(config)
    token = lambda field, value: str(dataset.id2token(field, int(value)))  # noqa: E731
    excluded = {}
    for interaction, history, positive_u, positive_i in test:
        users = interaction[dataset.uid_field]
        if targets is not None:
            targets.update({token(dataset.uid_field, users[u]): token(dataset.iid_field, i)
                            for u, i in zip(positive_u, positive_i)})
        if history is None:
            return {}
        for row, item in zip(*history):
            excluded.setdefault(token(dataset.uid_field, users[row]), set()).add(token(dataset.iid_field, item))
    return excluded


def test_sequential_models_keep_history_by_default_as_in_recbole(base_config, small_sasrec):
    assert _excluded({**base_config, **small_sasrec}, "SASRec") == {}


def test_excluding_history_uses_the_whole_training_history_not_the_last_max_length_items(
        base_config, small_sasrec, data_path):
    targets = {}
    excluded = _excluded({**base_config, **small_sasrec, "exclude_history": True}, "SASRec", targets)
    inter = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t", dtype=str)
    longer = 0
    for user, rows in inter.groupby("user_id:token"):
        items = set(rows["item_id:token"])
        assert excluded[user] == items - {targets[user]}  # every other item of the user: all came before
        longer += len(items) - 1 > small_sasrec["MAX_ITEM_LIST_LENGTH"]
    assert longer > 30  # most users have older items than the model's window


def test_a_comparison_applies_one_history_setting_to_every_model_and_records_it(base_config, small_sasrec, capsys):
    flags = _flags({**base_config, **small_sasrec})
    assert main(["--model=Pop,SASRec", "--dataset=ml-tiny", "--results=kept.jsonl", "--table=kept.md", *flags]) == 0
    records = [json.loads(line) for line in Path("kept.jsonl").read_text().splitlines()]
    assert [r["protocol"]["exclude_history"] for r in records] == [False, False]  # Pop too, unlike RecBole's default
    assert "history kept in the ranking" in Path("kept.md").read_text()

    assert main(["--model=Pop,SASRec", "--dataset=ml-tiny", "--results=excluded.jsonl", "--table=excluded.md",
                 "--exclude_history=True", *flags]) == 0
    excluded = [json.loads(line) for line in Path("excluded.jsonl").read_text().splitlines()]
    assert [r["protocol"]["exclude_history"] for r in excluded] == [True, True]
    assert "history excluded in the ranking" in Path("excluded.md").read_text()
    # excluding seen items can only help Pop, which otherwise ranks the user's own popular items first
    assert excluded[0]["test_result"]["recall@10"] > records[0]["test_result"]["recall@10"]


def test_a_general_model_alone_keeps_recboles_default_exclusion(base_config):
    assert _excluded(base_config, "Pop")  # RecBole removes the training history of general models


def test_a_user_sample_ranks_the_same_users_for_every_model_with_all_their_rows(base_config, small_sasrec, data_path):
    every = {}
    _excluded({**base_config, **small_sasrec}, "SASRec", every)
    inter = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t", dtype=str)
    assert set(every) == set(inter["user_id:token"])  # leave-one-out: every user has a test row
    sampled = {}
    kg = {"embedding_size": 8, "kg_embedding_size": 8,
          "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                       "kg": ["head_id", "relation_id", "tail_id"], "link": ["item_id", "entity_id"]}}
    bpr_sequential = {"loss_type": "BPR", "embedding_size": 16, "hidden_size": 16, "MAX_ITEM_LIST_LENGTH": 10}
    for model, extra in (("SASRec", small_sasrec), ("Pop", {}), ("CKE", kg), ("GRU4Rec", bpr_sequential)):
        targets = {}
        dataset = "ml-tiny-kg" if model == "CKE" else "ml-tiny"
        leave_one_out = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}
        settings = {**base_config, **extra, "eval_args": leave_one_out}
        _, (unsampled, _, _), _ = build_model_and_data(make_config(model, dataset, config_dict=settings))
        data, (train, _, test), _ = build_model_and_data(make_config(model, dataset, config_dict={
            **settings, "eval_max_users": 17}))
        assert len(train._dataset) == len(unsampled._dataset)  # training is untouched
        assert type(test._dataset).__module__.startswith("recbole.")  # parts stay RecBole's own classes
        token = lambda field, value: str(data.id2token(field, int(value)))  # noqa: E731
        for interaction, _, positive_u, positive_i in test:
            users = interaction[data.uid_field]
            targets.update({token(data.uid_field, users[u]): token(data.iid_field, i)
                            for u, i in zip(positive_u, positive_i)})
        sampled[model] = targets
    assert len(sampled["SASRec"]) == 17
    # one sample, whatever the model type, loader and training sampler
    assert sampled["Pop"] == sampled["SASRec"] == sampled["CKE"] == sampled["GRU4Rec"]
    assert all(every[user] == item for user, item in sampled["SASRec"].items())  # a sampled user keeps its target
    other = {}
    _excluded({**base_config, **small_sasrec, "eval_max_users": 17, "seed": 7}, "SASRec", other)
    assert set(other) != set(sampled["SASRec"])  # the seed chooses


def test_a_user_sample_is_part_of_the_protocol_and_labeled_runs_are_pointed_to_row_samples(base_config, capsys):
    flags = _flags(base_config)
    assert main(["--model=Pop", "--dataset=ml-tiny", "--results=sampled.jsonl", "--table=sampled.md",
                 "--eval_max_users=9", *flags]) == 0
    assert "ranked for a seeded sample of 9 users" in Path("sampled.md").read_text()
    assert main(["--model=Pop", "--dataset=ml-tiny", "--results=every.jsonl", *flags]) == 0
    record, every = (json.loads(Path(name).read_text()) for name in ("sampled.jsonl", "every.jsonl"))
    assert record["protocol"]["eval_max_users"] == 9 and every["protocol"]["eval_max_users"] is None
    assert 9 <= record["test_rows"] < every["test_rows"] / 3  # all test rows of 9 of the 60 users
    labeled = {"eval_args": "{split: {RS: [0.8, 0.1, 0.1]}, order: TO, mode: labeled}",
               "threshold": "{rating: 4}", "metrics": "[AUC]", "valid_metric": "AUC"}
    assert main(["--model=LR", "--dataset=ml-tiny", "--eval_max_users=9", *flags, *_flags(labeled)]) == 2
    assert "--eval_max_interactions=9" in capsys.readouterr().err
