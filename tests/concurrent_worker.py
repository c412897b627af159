"""Run by test_locks.py as two processes at once: set up, wait for the go file, then do the same work.

``python concurrent_worker.py train|texts GO_FILE NAME CONFIG_JSON`` prints one JSON line: how much this process
computed itself (LLM optimizer steps taken, prompts prefilled) and what it ended with.
"""

import json
import sys
import time
from pathlib import Path

import recbole_llm  # noqa: F401  (compat shims first)


def wait_for(go: Path, name: str) -> None:
    Path(f"{go}.ready.{name}").touch()
    while not go.exists():
        time.sleep(0.02)


def train(go: Path, name: str, settings: dict) -> dict:
    import toy_llm  # noqa: F401  (registers ToyLLMRec)
    from recbole_llm.quick_start import build_model_and_data, make_config
    from recbole_llm.registry import get_trainer

    config = make_config("ToyLLMRec", "ml-tiny", config_dict=settings)
    _, (train_data, valid_data, _), model = build_model_and_data(config)
    trainer = get_trainer(config["MODEL_TYPE"], "ToyLLMRec")(config, model)
    wait_for(go, name)
    trainer.fit(train_data, valid_data, saved=True)
    # this process's own steps (the run's token totals carry over a resume, so they cannot tell)
    return {"steps": len(trainer.learning_rates)}


def texts(go: Path, name: str, settings: dict) -> dict:
    import torch

    from recbole_llm.llm.backbone import load_backbone
    from recbole_llm.llm.descriptions import Decoding, write_texts

    model, tokenizer = load_backbone("tiny-random", dtype="fp32")
    prefills = []
    model.register_forward_pre_hook(lambda module, args, kwargs: prefills.append(1)
                                    if kwargs.get("cache") is None else None, with_kwargs=True)
    prompts = [f"Describe item {'x ' * i}" for i in range(12)]
    wait_for(go, name)
    with torch.no_grad():
        written = write_texts(model, tokenizer, prompts, [str(i) for i in range(12)], Path(settings["file"]),
                              Decoding(max_new_tokens=6, temperature=0.8, batch_size=4), progress=False)
    return {"prefills": len(prefills), "texts": written}


if __name__ == "__main__":
    kind, go, name, settings = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    print(json.dumps({"train": train, "texts": texts}[kind](go, name, settings)))
