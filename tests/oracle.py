"""Oracle tests for generative recommenders: feed the known answer through the real scoring path.

A generative method (CALRec's item texts, SemConv's item codes, ...) turns something it generates into a full
ranking. Replacing only the *generation* with each row's true target, and keeping everything after it (the
method's ``full_sort_predict``, RecBole's full-sort loader, history handling and evaluator), must rank the target
first. Zeroed scores, item ids shifted by one, a broken merge or a wrong column order all break that.

Usage, in a method's tests::

    truth = targets_by_history(test_data)                      # history -> target item id
    monkeypatch.setattr(model, "generate_item_texts", lambda histories: (texts for truth[h] ..., log_probs))
    result = evaluate_with_recbole(config, model, test_data)   # RecBole's Trainer.evaluate, no reload
    assert result["recall@1"] == 1.0
"""

from __future__ import annotations

import torch

from recbole_llm.registry import get_trainer


def history_key(history) -> tuple[int, ...]:
    return tuple(int(item) for item in history)


def targets_by_history(eval_data) -> dict[tuple[int, ...], int]:
    """``{history item ids: target item id}`` for every row of a sequential evaluation split."""
    dataset = eval_data.dataset
    inter = dataset.inter_feat
    sequences = inter[dataset.item_id_list_field].tolist()
    lengths = inter[dataset.item_list_length_field].tolist()
    truth = {}
    for sequence, length, target in zip(sequences, lengths, inter[dataset.iid_field].tolist()):
        key = history_key(sequence[:length])
        assert key not in truth or truth[key] == target, "two rows share a history: the oracle would be ambiguous"
        truth[key] = target
    return truth


def evaluate_with_recbole(config, model, eval_data) -> dict:
    """RecBole's evaluator over ``eval_data`` with the in-memory ``model`` (its real ``full_sort_predict``)."""
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    model.eval()
    with torch.no_grad():
        return dict(trainer.evaluate(eval_data, load_best_model=False))
