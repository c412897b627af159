"""LLMTrainer: safetensors checkpoints of trainable weights, resume, accumulation, load_model round trip."""

import functools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import data_preparation
from recbole.data.interaction import cat_interactions
from recbole.utils import init_seed
from safetensors.torch import load_file

from recbole_llm import load_model, run_recbole_llm
from recbole_llm.quick_start import make_config
from recbole_llm.settings import SettingError
from recbole_llm.trainer.checkpoint import CheckpointError
from recbole_llm.trainer.llm_trainer import deal, lr_factor, micro_batches
from recbole_llm.registry import create_dataset, get_model, get_trainer

import toy_llm  # noqa: F401  (registers ToyLLMRec)


@pytest.fixture
def toy_config(base_config):
    return {**base_config, "llm_path": "tiny-random", "lora_r": 4, "learning_rate": 0.01, "train_batch_size": 128,
            "MAX_ITEM_LIST_LENGTH": 10}


def _run_dir(base_config) -> Path:
    (run_dir,) = Path(base_config["checkpoint_dir"]).glob("ToyLLMRec-ml-tiny-*")
    return run_dir


def test_checkpoint_holds_only_trainable_weights_as_safetensors(toy_config):
    config = make_config("ToyLLMRec", "ml-tiny", config_dict=toy_config)
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = get_model("ToyLLMRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
    trainer.fit(train, valid, saved=True)  # one epoch: the best checkpoint is the final in-memory model
    run_dir = _run_dir(toy_config)
    assert not list(Path(toy_config["checkpoint_dir"]).rglob("*.pth"))
    tensors = load_file(run_dir / "best" / "model.safetensors")
    backbone = [name for name in tensors if name.startswith("llm.")]
    assert backbone and all("lora_" in name for name in backbone)
    assert "head.weight" in tensors and "item_embedding.weight" in tensors
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trained) <= set(tensors) and all(torch.equal(tensors[n], p.detach()) for n, p in trained.items())
    meta = json.loads((run_dir / "best" / "recbole_llm.json").read_text())
    assert meta["model"] == "ToyLLMRec" and meta["config"]["llm_path"] == "tiny-random"


def test_load_model_predicts_exactly_as_before_saving(toy_config):
    config = make_config("ToyLLMRec", "ml-tiny", config_dict=toy_config)
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model("ToyLLMRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
    trainer.fit(train, valid, saved=True)
    trainer.evaluate(test, load_best_model=True)
    batch = next(iter(test))[0]
    model.eval()
    with torch.no_grad():
        expected = model.full_sort_predict(batch)

    _, reloaded, _, _, _, reloaded_test = load_model(trainer.saved_model_file)
    with torch.no_grad():
        actual = reloaded.full_sort_predict(next(iter(reloaded_test))[0])
    assert torch.equal(actual, expected)


def test_rerun_resumes_instead_of_retraining(toy_config):
    first = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "epochs": 1})
    meta = json.loads((_run_dir(toy_config) / "last" / "recbole_llm.json").read_text())
    assert meta["epoch"] == 0
    config = make_config("ToyLLMRec", "ml-tiny", config_dict=toy_config)
    # the toy counts one target a row of RecBole's training batches (point-wise: each positive and its negative)
    train_rows = sum(len(batch) for batch in data_preparation(config, create_dataset(config))[0])
    assert first["train_targets"] == train_rows

    second = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "epochs": 2})
    meta = json.loads((_run_dir(toy_config) / "last" / "recbole_llm.json").read_text())
    assert meta["epoch"] == 1  # trained one more epoch, not two
    # the record covers the whole run: the first run's epoch and validation come back with the resume point
    assert [epoch for epoch, _ in second["train_losses"]] == [0, 1]
    assert [epoch for epoch, _ in second["valid_scores"]] == [0, 1]
    assert second["train_targets"] == 2 * train_rows and second["train_tokens"] > first["train_tokens"] > 0
    assert {row[1] for row in second["train_batch_losses"]} == {0, 1}

    third = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "epochs": 2})
    assert third["test_result"] == second["test_result"]
    assert third["train_seconds"] < second["train_seconds"]
    # the resumed run kept the first run's best (RecBole's max over epochs), so it can only have improved
    assert second["best_valid_score"] >= first["best_valid_score"]


@pytest.mark.parametrize("forgets", ["every batch", "after the first batch"])
def test_a_model_that_counts_tokens_but_not_targets_is_refused_as_a_bug(toy_config, monkeypatch, forgets):
    # a model counting its tokens and not its targets would record no targets/s without a word; one that counts them
    # once must not have its first count read again for every later batch
    original, calls = toy_llm.ToyLLMRec.calculate_loss, []

    def forgetful(self, interaction):
        before = getattr(self, "last_batch_targets", None)
        loss = original(self, interaction)  # counts tokens and targets
        if forgets == "every batch" or calls:
            self.last_batch_targets = before  # as if this batch never counted them
        calls.append(1)
        return loss

    monkeypatch.setattr(toy_llm.ToyLLMRec, "calculate_loss", forgetful)
    with pytest.raises(RuntimeError, match="ToyLLMRec set last_batch_tokens but not last_batch_targets"):
        run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "train_batch_size": 64})
    assert len(calls) == (1 if forgets == "every batch" else 2)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(toy_config, tmp_path):
    # the epoch order, dropout masks and Adam's state all continue where the first run stopped
    settings = {**toy_config, "learner": "adam", "lora_dropout": 0.3, "eval_step": 0, "llm_dtype": "fp32"}
    straight = {**settings, "epochs": 2, "checkpoint_dir": str(tmp_path / "straight")}
    resumed = {**settings, "checkpoint_dir": str(tmp_path / "resumed")}
    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=straight)
    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**resumed, "epochs": 1})
    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**resumed, "epochs": 2})
    (one,), (two,) = (list(Path(d["checkpoint_dir"]).glob("ToyLLMRec-*/last")) for d in (straight, resumed))
    assert json.loads((two / "recbole_llm.json").read_text())["epoch"] == 1
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch(toy_config):
    def one_step(batches, accumulation):
        config = make_config("ToyLLMRec", "ml-tiny", config_dict={
            **toy_config, "gradient_accumulation_steps": accumulation, "learner": "sgd", "lora_dropout": 0.0,
            "llm_dtype": "fp32"})  # exact arithmetic: no bf16 autocast, whatever the CPU
        init_seed(config["seed"], True)  # the same shuffled batches in both runs
        train, _, _ = data_preparation(config, create_dataset(config))
        torch.manual_seed(0)
        model = get_model("ToyLLMRec")(config, train._dataset)
        trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
        data = list(train)[:2]
        trainer._train_epoch(batches(data), 0)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    split = one_step(lambda data: data, accumulation=2)
    joined = one_step(lambda data: [cat_interactions(data)], accumulation=1)
    # Two half-batches of equal size average to the full batch's mean loss.
    assert all(torch.allclose(split[n], joined[n], atol=1e-6) for n in split)


def test_processes_share_each_step_s_batches_and_weigh_them_as_one_process_would():
    # 5 batches, 2 per step, 2 processes: steps {0, 1}, {2, 3}, {4}; DDP divides the summed gradient by 2
    def passes(rank, world, accumulation=2, n=5):
        return [(m.index, m.weight, m.last_in_window) for m in deal(range(n), accumulation, rank, world)]

    assert passes(0, 1) == [(0, .5, False), (1, .5, True), (2, .5, False), (3, .5, True), (4, 1, True)]
    assert passes(0, 2) == [(0, 1, True), (2, 1, True), (4, 2, True)]
    assert passes(1, 2) == [(1, 1, True), (3, 1, True), (4, 0, True)]  # a stand-in pass, weight 0, in the last step
    # 3 processes, 2 batches per step: rank 2 only stands in; each step's weights sum to 3 (DDP's divisor)
    assert [passes(r, 3, n=4) for r in range(3)] == [[(0, 1.5, True), (2, 1.5, True)], [(1, 1.5, True), (3, 1.5, True)],
                                                      [(0, 0, True), (2, 0, True)]]
    # 4 batches per step on 2 processes: two passes each, the optimizer steps after the second
    assert passes(1, 2, accumulation=4, n=6) == [(1, .5, False), (3, .5, True), (5, 1, True)]
    for n, accumulation, world in [(5, 2, 2), (4, 2, 3), (6, 4, 2), (7, 3, 2), (1, 1, 4)]:
        assert micro_batches(n, accumulation, world) == len(passes(0, world, accumulation, n))


# ------------------------------------------------------------------------------------------ unsafe checkpoints
@pytest.fixture
def checkpoint(toy_config, tmp_path) -> Path:
    """A trained ToyLLMRec checkpoint, copied so a test may damage it."""
    run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=toy_config)
    copy = tmp_path / "copy"
    shutil.copytree(_run_dir(toy_config) / "best", copy)
    return copy


def _edit_meta(checkpoint: Path, edit) -> None:
    meta_file = checkpoint / "recbole_llm.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_loading_never_runs_code_from_the_checkpoint(checkpoint, tmp_path):
    marker = tmp_path / "PWNED"
    _edit_meta(checkpoint, lambda meta: meta["config"].update(seed=f"__import__('os').system('touch {marker}') or 2"))
    with pytest.raises(SettingError, match="seed="):
        load_model(checkpoint, with_data=False)
    assert not marker.exists()


def test_a_checkpoint_without_the_trained_tensors_is_refused(checkpoint):
    from safetensors.torch import save_file

    save_file({}, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_model(checkpoint, with_data=False)


def test_a_truncated_weights_file_names_its_path(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{weights}.*damaged"):
        load_model(checkpoint, with_data=False)


def test_malformed_checkpoint_json_names_its_path(checkpoint):
    (checkpoint / "recbole_llm.json").write_text('{"model": "ToyLLMRec", ')
    with pytest.raises(CheckpointError, match="recbole_llm.json is not valid JSON"):
        load_model(checkpoint, with_data=False)


@pytest.mark.parametrize("native_bf16, expected", [("1", torch.bfloat16), ("0", None)])
def test_the_trainer_trains_and_evaluates_under_bf16_autocast_where_the_cpu_has_it(
        toy_config, monkeypatch, native_bf16, expected):
    monkeypatch.setenv("RECBOLE_LLM_CPU_BF16", native_bf16)
    config = make_config("ToyLLMRec", "ml-tiny", config_dict=toy_config)
    train, _, test = data_preparation(config, create_dataset(config))
    model = get_model("ToyLLMRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
    seen = []
    forward = model.head.forward
    model.head.forward = lambda x: seen.append(forward(x).dtype) or forward(x)
    trainer._train_epoch([next(iter(train))], 0)
    trainer.evaluate(test, load_best_model=False)
    assert trainer.autocast_dtype is expected
    assert set(seen) == {expected or torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


# ------------------------------------------------------------------------------------------ learning-rate schedule
def test_schedule_values_follow_the_formulas():
    # linear, 10 steps, 2 of warm-up: 0, 1/2, then (10 - s) / 8
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6, 9, 10)] == [0.0, 0.5, 1.0, 0.5, 0.125, 0.0]
    # cosine without warm-up: 1 at the start, 1/2 half way, (1 + cos(pi / 4)) / 2 a quarter of the way
    assert lr_factor(0, 8, 0, "cosine") == 1.0 and lr_factor(4, 8, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(2, 8, 0, "cosine") == pytest.approx((1 + 2 ** -0.5) / 2)
    assert [lr_factor(s, 8, 4, "constant") for s in (0, 2, 4, 7)] == [0.0, 0.5, 1.0, 1.0]


def _scheduled_run(toy_config, **extra):
    config = make_config("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "train_batch_size": 512, **extra})
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = get_model("ToyLLMRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
    return trainer, train, valid


def test_fit_applies_the_schedule_at_every_optimizer_step_and_a_resumed_run_continues_it(toy_config, monkeypatch):
    settings = {"lr_scheduler": "linear", "lr_warmup": 2, "epochs": 2, "gradient_accumulation_steps": 2,
                "eval_step": 0}
    trainer, train, valid = _scheduled_run(toy_config, **settings)
    trainer.fit(train, valid, saved=True)
    per_epoch = -(-len(train) // 2)  # optimizer steps per epoch: batches / accumulation, rounded up
    total = 2 * per_epoch
    expected = [0.01 * lr_factor(s, total, 2, "linear") for s in range(total)]
    assert trainer.learning_rates == pytest.approx(expected) and total >= 4
    assert trainer.learning_rates[1] == pytest.approx(0.005) and trainer.learning_rates[-1] > 0

    # the same run stopped during its second epoch, then started again: the schedule picks up at step per_epoch
    shutil.rmtree(_run_dir(toy_config))
    trainer, train, valid = _scheduled_run(toy_config, **settings)
    original = trainer._train_epoch

    def stop_in_second_epoch(data, epoch_idx, *args, **kwargs):
        if epoch_idx == 1:
            raise KeyboardInterrupt
        return original(data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(trainer, "_train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train, valid, saved=True)
    resumed, train, valid = _scheduled_run(toy_config, **settings)
    resumed.fit(train, valid, saved=True)
    assert resumed.learning_rates == pytest.approx(expected[per_epoch:])


def test_a_decaying_schedule_makes_epochs_part_of_the_run(toy_config):
    from recbole_llm.fingerprint import run_fingerprint

    def fingerprint(**extra):
        return run_fingerprint(make_config("ToyLLMRec", "ml-tiny", config_dict={**toy_config, **extra}))

    assert fingerprint(epochs=1) == fingerprint(epochs=2)  # constant: a longer run continues a shorter one
    assert fingerprint(epochs=1, lr_scheduler="cosine") != fingerprint(epochs=2, lr_scheduler="cosine")


class _Stopped(Exception):
    pass


def test_a_run_stopped_inside_an_epoch_resumes_there_and_its_learning_curve_changes_nothing(
        toy_config, tmp_path, monkeypatch):
    settings = {**toy_config, "learner": "adam", "lora_dropout": 0.3, "llm_dtype": "fp32", "epochs": 2,
                "eval_step": 1}
    straight = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "a")})
    per_epoch = sum(1 for row in straight["train_batch_losses"] if row[1] == 0)
    assert per_epoch >= 30
    every = per_epoch // 3
    curved = {**settings, "checkpoint_dir": str(tmp_path / "b"), "valid_curve_steps": every}

    # the process dies in epoch 1, a few batches after its first validation inside that epoch
    toy = get_model("ToyLLMRec")
    real_loss, calls = toy.calculate_loss, []

    @functools.wraps(real_loss)  # the loss function's name seeds its batches' dropout
    def dying_loss(self, interaction):
        calls.append(1)
        if len(calls) == per_epoch + every + 3:
            raise _Stopped
        return real_loss(self, interaction)

    monkeypatch.setattr(toy, "calculate_loss", dying_loss)
    with pytest.raises(_Stopped):
        run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=curved)
    monkeypatch.setattr(toy, "calculate_loss", real_loss)
    meta = json.loads((Path(curved["checkpoint_dir"]).glob("ToyLLMRec-*/last").__next__() / "recbole_llm.json")
                      .read_text())
    assert meta["epoch"] == 0 and meta["partial"]["epoch"] == 1 and meta["partial"]["steps"] == every

    calls.clear()
    @functools.wraps(real_loss)
    def counted_loss(self, interaction):
        calls.append(1)
        return real_loss(self, interaction)

    monkeypatch.setattr(toy, "calculate_loss", counted_loss)
    resumed = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict=curved)
    assert len(calls) == per_epoch - every  # the batches after the resume point, each once

    # validations inside epochs, put where the setting says, then each epoch's end, progress growing
    epochs = [point["epochs"] for point in resumed["valid_curve"]]
    steps = [point["optimizer_steps"] for point in resumed["valid_curve"]]
    inside = list(range(every, per_epoch, every))
    assert steps == [*inside, per_epoch, *[per_epoch + s for s in inside], 2 * per_epoch]
    assert epochs == pytest.approx([s / per_epoch for s in steps])
    seconds = [point["train_seconds"] for point in resumed["valid_curve"]]
    assert all(b > a for a, b in zip(seconds, seconds[1:]))
    # ... and the run trained exactly what the uninterrupted run without them trained
    assert [row[:3] for row in resumed["train_batch_losses"]] == [row[:3] for row in straight["train_batch_losses"]]
    assert [row[3] for row in resumed["train_batch_losses"]] == pytest.approx(
        [row[3] for row in straight["train_batch_losses"]], rel=1e-5)
    assert [loss for _, loss in resumed["train_losses"]] == pytest.approx(
        [loss for _, loss in straight["train_losses"]], rel=1e-5)
    assert [s for _, s in resumed["valid_scores"]] == pytest.approx([s for _, s in straight["valid_scores"]])
    assert resumed["test_result"] == pytest.approx(straight["test_result"])
    end_points = [p["valid_score"] for p in resumed["valid_curve"] if p["epochs"] in (1, 2)]
    assert end_points == pytest.approx([s for _, s in straight["valid_scores"]])
    # ... and the throughput counts every process's training, the stopped one's included
    assert resumed["train_tokens_per_second"] == pytest.approx(
        straight["train_tokens_per_second"], rel=0.6)


def test_validations_inside_an_epoch_leave_the_random_streams_training_draws_from_as_they_were(
        toy_config, tmp_path, monkeypatch):
    """A model may draw from Python's, numpy's and torch's global generators in training (samplers, noise) and in
    evaluation (sampled candidates): a curve point must not move training's draws."""
    toy = get_model("ToyLLMRec")
    real_loss, real_predict = toy.calculate_loss, toy.full_sort_predict

    @functools.wraps(real_loss)
    def noisy_loss(self, interaction):  # each stream's next draw shows in the logged loss
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
        return real_loss(self, interaction) + noise

    def drawing_predict(self, interaction):
        random.random(), np.random.rand(), torch.rand(())
        return real_predict(self, interaction)

    monkeypatch.setattr(toy, "calculate_loss", noisy_loss)
    monkeypatch.setattr(toy, "full_sort_predict", drawing_predict)
    settings = {**toy_config, "epochs": 1, "eval_step": 1}
    plain = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "a")})
    per_epoch = len(plain["train_batch_losses"])
    curved = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={
        **settings, "checkpoint_dir": str(tmp_path / "b"), "valid_curve_steps": per_epoch // 4})
    assert len(curved["valid_curve"]) >= 4  # three or more inside the epoch, and its end
    assert [row[3] for row in curved["train_batch_losses"]] == pytest.approx(
        [row[3] for row in plain["train_batch_losses"]], rel=1e-6)


@pytest.mark.parametrize("trim", [True, False])
def test_the_heap_is_trimmed_after_every_optimizer_step_unless_turned_off(toy_config, monkeypatch, trim):
    from recbole_llm.trainer import llm_trainer

    trims, steps = [], []
    monkeypatch.setattr(llm_trainer, "trim_heap", lambda: trims.append(len(steps)))
    trainer, train, _ = _scheduled_run(toy_config, gradient_accumulation_steps=2, llm_trim_memory=trim)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: steps.append(1))
    trainer._train_epoch(train, 0)
    n_steps = -(-len(train) // 2)  # batches / accumulation, rounded up
    assert len(steps) == n_steps >= 2
    # after each step, before the next one
    assert trims == (list(range(1, n_steps + 1)) if trim else [])
