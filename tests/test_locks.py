"""Two identical runs started together: one process computes, the other waits and reuses (never both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("concurrent_worker.py")


def _together(kind: str, settings: dict, tmp_path: Path) -> list[dict]:
    """Start two workers, let both finish their set-up, then release them at the same instant."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    workers = [subprocess.Popen([sys.executable, str(WORKER), kind, str(go), name, json.dumps(settings)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    deadline = time.time() + 300
    while not all(Path(f"{go}.ready.{name}").exists() for name in ("a", "b")):
        assert time.time() < deadline and all(w.poll() is None for w in workers), [w.communicate() for w in workers]
        time.sleep(0.05)
    go.touch()
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_identical_training_runs_train_once(base_config, tmp_path):
    settings = {**base_config, "llm_path": "tiny-random", "lora_r": 4, "learning_rate": 0.01,
                "train_batch_size": 128, "MAX_ITEM_LIST_LENGTH": 10, "epochs": 2}
    results = _together("train", settings, tmp_path)
    assert sorted(r["steps"] > 0 for r in results) == [False, True]  # the second resumed the finished run
    (run_dir,) = Path(settings["checkpoint_dir"]).glob("ToyLLMRec-ml-tiny-*")
    assert json.loads((run_dir / "last" / "recbole_llm.json").read_text())["epoch"] == 1


def test_two_processes_writing_the_same_texts_generate_them_once(tmp_path):
    results = _together("texts", {"file": str(tmp_path / "texts.jsonl")}, tmp_path)
    assert sorted(r["prefills"] for r in results) == [0, 3]  # 12 prompts in batches of 4, by one process
    assert results[0]["texts"] == results[1]["texts"]
    assert not list(tmp_path.glob("texts.jsonl.*tmp*")) and not (tmp_path / "texts.jsonl.partial").exists()
