"""The labeled (CTR) protocol: context and sequential models get the same rows, split and evaluation sample; the
Accuracy metric is RecBole's like AUC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from recbole.data import data_preparation

from recbole_llm.data.labeled import LabeledDataset, LabeledProtocolError, LabeledSequentialDataset
from recbole_llm.quick_start import make_config, run_recbole_llm
from recbole_llm.registry import create_dataset

CTR = {
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "labeled"},
    "threshold": {"rating": 4},
    "metrics": ["AUC", "LogLoss", "Accuracy"],
    "valid_metric": "AUC",
    "train_neg_sample_args": None,
    "MAX_ITEM_LIST_LENGTH": 20,
    "min_history_length": 5,
}


def split_rows(model: str, config_dict: dict):
    config = make_config(model, "ml-tiny", config_dict=config_dict)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    rows = []
    for loader in loaders:
        inter = loader.dataset.inter_feat
        users = dataset.field2id_token[dataset.uid_field][inter[dataset.uid_field].numpy()]
        items = dataset.field2id_token[dataset.iid_field][inter[dataset.iid_field].numpy()]
        rows.append(list(zip(users.tolist(), items.tolist(), inter["timestamp"].numpy().tolist(),
                             inter[dataset.label_field].numpy().tolist())))
    return dataset, loaders, rows


def test_context_and_sequential_models_share_rows_split_and_sample(base_config, data_path):
    settings = {**base_config, **CTR, "eval_max_interactions": 150}
    flat, _, context_rows = split_rows("DeepFM", settings)
    seq, loaders, sequential_rows = split_rows("DIN", settings)
    assert isinstance(flat, LabeledDataset) and isinstance(seq, LabeledSequentialDataset)
    assert [len(part) for part in sequential_rows[1:]] == [150, 150]
    for context_part, sequential_part in zip(context_rows, sequential_rows):
        assert context_part == sequential_part  # same rows, same order, same labels
    train, valid, test = sequential_rows
    raw = pd.read_csv(data_path / "ml-tiny" / "ml-tiny.inter", sep="\t", dtype=str)
    exact = {(u, i): int(t) for u, i, t in zip(raw["user_id:token"], raw["item_id:token"], raw["timestamp:float"])}
    key = lambda row: (exact[row[0], row[1]], row[0], row[1])  # noqa: E731  (RecBole's float32 rounds to minutes)
    for part in (train, valid, test):  # an exact total order: file time, then user token, then item token
        assert part == sorted(part, key=key)
    assert max(map(key, train)) < min(map(key, valid)) and max(map(key, valid)) < min(map(key, test))
    assert max(t for _, _, t, _ in train) <= min(t for _, _, t, _ in valid + test)  # global temporal split
    # every kept row has >= 5 earlier interactions of its user, and the history holds ratings, never the row's own
    inter = loaders[2].dataset.inter_feat
    assert (inter["item_length"] >= 5).all()
    assert "rating" not in inter.interaction and "rating_list" in inter.interaction
    ratings = inter["rating_list"][inter["item_id_list"] > 0]
    assert set(np.unique(ratings.numpy()).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_eval_sample_is_seeded(base_config):
    settings = {**base_config, **CTR, "eval_max_interactions": 100}
    _, _, first = split_rows("DeepFM", settings)
    _, _, again = split_rows("DeepFM", settings)
    _, _, other = split_rows("DeepFM", {**settings, "seed": 7})
    assert first[2] == again[2] and first[2] != other[2] and first[0] == other[0]


def test_labeled_keys_refused_in_a_ranking_run(base_config):
    config = make_config("SASRec", "ml-tiny", config_dict={**base_config, "eval_max_interactions": 10})
    with pytest.raises(LabeledProtocolError, match="labeled"):
        create_dataset(config)


def test_accuracy_is_a_recbole_value_metric(base_config):
    record = run_recbole_llm("LR", "ml-tiny", config_dict={**base_config, **CTR, "eval_step": 1}, saved=False)
    result = record["test_result"]
    assert set(result) == {"auc", "logloss", "accuracy"} and 0 < result["accuracy"] < 1
    assert record["protocol"]["min_history_length"] == 5 and record["protocol"]["threshold"] == {"rating": 4}


def test_cli_table_header_states_the_labeled_protocol(base_config, data_path):
    from pathlib import Path

    from recbole_llm.cli import main

    flags = [f"--{k}={v}" for k, v in {"data_path": data_path, "gpu_id": "''", "state": "ERROR", "epochs": 1,
                                        "show_progress": False, "eval_max_interactions": 80}.items()]
    ctr = ['--eval_args={split: {RS: [0.8, 0.1, 0.1]}, order: TO, group_by: ~, mode: labeled}',
           "--threshold={rating: 4}", "--metrics=[AUC,LogLoss,Accuracy]", "--valid_metric=AUC",
           "--min_history_length=5", "--load_col={inter: [user_id, item_id, rating, timestamp]}"]
    assert main(["--model=LR,FM", "--dataset=ml-tiny", "--table=ctr.md", *flags, *ctr]) == 0
    header = Path("ctr.md").read_text().splitlines()[0]
    assert "label {'rating': 4}, rows with >= 5 earlier interactions, 80 test rows" in header
    assert "in the ranking" not in header
    # each AUC with its standard error, from the 80 rows' label counts
    row = next(line for line in Path("ctr.md").read_text().splitlines() if line.startswith("| test AUC s.e."))
    assert all(0.02 < float(cell) < 0.2 for cell in row.strip("|").split("|")[1:])


def test_auc_standard_error_by_hand_and_by_simulation():
    import numpy as np

    from recbole_llm.metrics import auc_standard_error

    # A = 0.8, 10 positives, 20 negatives: Q1 = 2/3, Q2 = 32/45, SE^2 = (0.16 + 9 (2/3 - 0.64) + 19 (32/45 - 0.64)) / 200
    assert auc_standard_error(0.8, 10, 20) == pytest.approx(0.0935711, abs=1e-6)
    # the spread of AUCs of an uninformative scorer over many draws of 300 + 500 rows
    rng = np.random.default_rng(0)
    aucs = []
    for _ in range(400):
        scores = rng.random(800)
        ranks = scores.argsort().argsort() + 1
        aucs.append((ranks[:300].sum() - 300 * 301 / 2) / (300 * 500))
    assert auc_standard_error(0.5, 300, 500) == pytest.approx(np.std(aucs), rel=0.15)
