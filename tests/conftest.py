"""Shared fixtures: every test runs in its own working directory (RecBole writes ./log, ./saved), with a clean
``sys.argv`` (RecBole parses every ``--key=value``), on the CPU, with a small ml-100k subset."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import pytest

import recbole_llm  # noqa: F401  (applies the compat shims before any RecBole import below)

TINY = "ml-tiny"
N_USERS = 60


class _DeprecationLog(logging.Handler):
    """transformers announces some deprecations through its logger (once per process), not as warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if "deprecated" in record.getMessage().lower():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_deprecated_transformers_calls():
    handler = _DeprecationLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    assert not handler.messages, f"a deprecated transformers API was called: {handler.messages}"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    cache = tmp_path_factory.getbasetemp() / "recbole_llm_cache"
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def _ml100k_dir() -> Path:
    import recbole

    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


@pytest.fixture(scope="session")
def data_path(tmp_path_factory) -> Path:
    """``<data_path>/ml-tiny``: the interactions of ml-100k's first 60 users, and the full item and user files;
    ``<data_path>/ml-tiny-kg``: the same with ml-100k's ``.kg`` and ``.link`` files."""
    root = tmp_path_factory.mktemp("data")
    folder = root / TINY
    folder.mkdir()
    source = _ml100k_dir()
    inter = pd.read_csv(source / "ml-100k.inter", sep="\t", dtype=str)
    inter = inter[inter["user_id:token"].astype(int) <= N_USERS]
    inter.to_csv(folder / f"{TINY}.inter", sep="\t", index=False)
    for suffix in ("item", "user"):
        (folder / f"{TINY}.{suffix}").write_bytes((source / f"ml-100k.{suffix}").read_bytes())
    # the same interactions with ml-100k's knowledge graph, for knowledge-aware models
    kg = root / f"{TINY}-kg"
    kg.mkdir()
    for suffix in ("inter", "item", "user"):
        (kg / f"{TINY}-kg.{suffix}").write_bytes((folder / f"{TINY}.{suffix}").read_bytes())
    for suffix in ("kg", "link"):
        (kg / f"{TINY}-kg.{suffix}").write_bytes((source / f"ml-100k.{suffix}").read_bytes())
    return root


def first_ratings_subset(root: Path, data_path: Path, name: str, users: int, per_user: int) -> Path:
    """``<root>/<name>``: the first ``per_user`` ratings (in time order) of ml-tiny's first ``users`` users, with the
    full item file; returns ``root`` (a ``data_path``)."""
    (root / name).mkdir()
    inter = pd.read_csv(data_path / TINY / f"{TINY}.inter", sep="\t")
    inter = inter[inter["user_id:token"] <= users].sort_values(["user_id:token", "timestamp:float"])
    inter.groupby("user_id:token").head(per_user).to_csv(root / name / f"{name}.inter", sep="\t", index=False)
    (root / name / f"{name}.item").write_bytes((data_path / TINY / f"{TINY}.item").read_bytes())
    return root


@pytest.fixture
def base_config(data_path, tmp_path) -> dict:
    return {
        "data_path": str(data_path),
        "gpu_id": "",
        "state": "ERROR",
        "epochs": 1,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
        "seed": 2020,
        "reproducibility": True,
        "eval_batch_size": 4096,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
    }


@pytest.fixture
def small_sasrec() -> dict:
    return {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
            "train_batch_size": 256}
