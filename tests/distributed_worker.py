"""Run by test_distributed.py under torchrun (gloo, CPU): ``torchrun ... distributed_worker.py OUT JOB JSON``.

Each process writes ``OUT/rank<r>.json``:

* ``runs``: JSON is a list of ``[model, settings]``; every run goes through ``run_recbole_llm`` (the process group
  comes from torchrun's environment); per run, its test and valid results, test rows and process count.
* ``shares``: JSON is ToyLLMRec's settings with ``llm_parallel: fsdp``; whether its trainer holds the model sharded,
  and how many trainable weights there are in all and on this process.
* ``artifact``: JSON is a run's settings; the process asks for the run's collaborative vectors (a cached artifact)
  on a cold cache; how many times this process trained them, and a digest of what it read.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

import recbole_llm  # noqa: F401  (compat shims first)


def runs(payload: list) -> list:
    from recbole_llm.quick_start import run_recbole_llm

    records = []
    for model, settings in payload:
        record = run_recbole_llm(model, settings.pop("dataset", "ml-tiny"), config_dict=settings)
        keys = ("test_result", "best_valid_result", "test_rows", "processes", "train_losses", "test_units")
        records.append({key: record[key] for key in keys})
    return records


def artifact(settings: dict) -> dict:
    from recbole_llm import collaborative
    from recbole_llm.quick_start import make_config
    from recbole_llm.registry import create_dataset

    trained = []
    train = collaborative._train
    collaborative._train = lambda *args: trained.append(1) or train(*args)
    config = make_config("SASRec", "ml-tiny", config_dict=settings)
    vectors = collaborative.collaborative_vectors(config, create_dataset(config), model="BPR", epochs=1)
    from recbole_llm import distributed

    return {"trained": len(trained), "digest": hashlib.sha256(vectors.items.numpy().tobytes()).hexdigest(),
            "processes": distributed.world_size()}


def shares(settings: dict) -> dict:
    from recbole_llm.quick_start import build_model_and_data, make_config
    from recbole_llm.registry import get_trainer
    from recbole_llm.trainer.data_parallel import is_sharded
    from recbole_llm.trainer.parallel import parallel_trainer

    config = make_config("ToyLLMRec", settings.pop("dataset"), config_dict=settings)
    _, _, model = build_model_and_data(config)
    trainer = parallel_trainer(get_trainer(config["MODEL_TYPE"], "ToyLLMRec"))(config, model)
    trainable = trainer.trainable_parameters
    return {"sharded": is_sharded(model), "total": sum(p.numel() for p in trainable),
            "local": sum(p.to_local().numel() for p in trainable)}


def main(out: str, job: str, payload: str) -> None:
    import toy_llm  # noqa: F401  (registers ToyLLMRec)
    from recbole_llm import distributed

    torch.set_num_threads(1)
    result = {"runs": runs, "artifact": artifact, "shares": shares}[job](json.loads(payload))
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
