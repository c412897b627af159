"""LLMTrainer: safetensors checkpoints of trainable weights, resume, accumulation, load_model round trip."""

import json
import shutil
from pathlib import Path

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

    second = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "epochs": 2})
    meta = json.loads((_run_dir(toy_config) / "last" / "recbole_llm.json").read_text())
    assert meta["epoch"] == 1  # trained one more epoch, not two

    third = run_recbole_llm("ToyLLMRec", "ml-tiny", config_dict={**toy_config, "epochs": 2})
    assert third["test_result"] == second["test_result"]
    assert third["train_seconds"] < second["train_seconds"]
    # the resumed run kept the first run's best (RecBole's max over epochs), so it can only have improved
    assert second["best_valid_score"] >= first["best_valid_score"]


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
