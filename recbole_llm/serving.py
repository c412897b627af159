"""Pre-computed top-K lists: rank every user once offline, then serve recommendations by lookup.

This is the Semantic Convergence paper's serving path (beam search offline per user, a cache lookup online), and
it works for any recbole_llm or RecBole model with ``full_sort_predict``. The export is a JSON-lines file::

    {"format": 1, "model": "SemConv", "dataset": "ml-100k", "fingerprint": "3f2a...", "k": 20, "users": 943, ...}
    {"user": "196", "items": ["242", "302", ...], "scores": [-0.51, -1.20, ...]}
    ...

The first line records the model's run fingerprint (resolved configuration, data files, package version; see
:mod:`recbole_llm.fingerprint`). :meth:`TopKCache.load` refuses a file whose fingerprint is not the one
the caller expects, so lists computed from an older model or older data are never served by mistake.

Users and histories are those of the evaluation split exported (``test`` by default): each list is the ranking
RecBole's evaluator scores for that user, with the run's history exclusion applied.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from recbole_llm.errors import InputFileError, UsageError

FORMAT = 1


class StaleCacheError(UsageError, ValueError):
    """A top-K file made from other inputs (model, configuration, data or version) than the expected ones."""


@torch.no_grad()
def export_top_k(model, eval_data, path, k: int, *, fingerprint: str, model_name: str, dataset_name: str,
                 show_progress: bool = False) -> Path:
    """Write each user's top ``k`` items (tokens, as in the dataset files) with scores, atomically."""
    from tqdm.auto import tqdm

    dataset = eval_data._dataset
    uid, iid = dataset.uid_field, dataset.iid_field
    model.eval()
    lines = []
    for batch in tqdm(eval_data, desc="Top-K export", ncols=100, disable=not show_progress):
        interaction, history_index = batch[0], batch[1]
        interaction = interaction.to(model.device)
        scores = model.full_sort_predict(interaction).view(len(interaction), -1).float()
        scores[:, 0] = float("-inf")  # the padding item
        if history_index is not None:
            scores[history_index[0].to(scores.device), history_index[1].to(scores.device)] = float("-inf")
        values, items = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
        # numpy indices: a one-element torch tensor would index RecBole's token array as a scalar
        users = dataset.id2token(uid, interaction[uid].cpu().numpy())
        for user, row_items, row_values in zip(users, items.cpu().numpy(), values.cpu()):
            keep = torch.isfinite(row_values).numpy()  # a generative model ranks fewer than k items for some users
            lines.append({"user": str(user), "items": [str(t) for t in dataset.id2token(iid, row_items[keep])],
                          "scores": [round(float(v), 6) for v in row_values[keep]]})
    header = {"format": FORMAT, "model": model_name, "dataset": dataset_name, "fingerprint": fingerprint, "k": k,
              "users": len(lines)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as f:
        for line in [header, *lines]:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)
    return path


class TopKCache:
    """Recommendations served from an exported top-K file."""

    def __init__(self, header: dict, lists: dict[str, list[str]]):
        self.header, self.lists = header, lists

    @classmethod
    def load(cls, path, fingerprint: str | None) -> "TopKCache":
        """Read ``path``; with a ``fingerprint``, refuse a file exported from other inputs (``None`` skips the
        check, for inspection only)."""
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such top-K export; write one with `python -m recbole_llm.serving "
                                 "export CHECKPOINT OUT`.")
        with open(path) as f:
            header = _json_line(path, 1, f.readline())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise InputFileError(f"{path}:1 is not the header of a recbole_llm top-K export (format {FORMAT}); "
                                     "export again.")
            if fingerprint is not None and header.get("fingerprint") != fingerprint:
                raise StaleCacheError(
                    f"{path} holds top-K lists of {header.get('model')} on {header.get('dataset')} with fingerprint "
                    f"{header.get('fingerprint')}, but the current model and data give {fingerprint}: the "
                    "configuration, the data files or the package version changed since the export. Export again "
                    "from the current checkpoint."
                )
            lists = {}
            for number, line in enumerate(f, start=2):
                row = _json_line(path, number, line)
                if not isinstance(row, dict) or not isinstance(row.get("user"), str) \
                        or not isinstance(row.get("items"), list):
                    raise InputFileError(f"{path}:{number} is not a user's list ({{\"user\": ..., \"items\": [...]}}); "
                                         "the export is damaged: export again.")
                lists[row["user"]] = row["items"]
        if len(lists) != header.get("users"):
            raise InputFileError(f"{path} holds {len(lists)} users' lists but its header announces "
                                 f"{header.get('users')}: the file is truncated. Export again.")
        return cls(header, lists)

    def recommend(self, user_id, k: int = 10) -> list[str]:
        """The top ``k`` item tokens for ``user_id`` (a token as in the dataset files)."""
        key = str(user_id)
        if key not in self.lists:
            raise UsageError(f"user {user_id!r} is not in the top-K export ({len(self.lists)} users of the "
                             f"{self.header.get('dataset')} split it was made from, e.g. "
                             f"{', '.join(list(self.lists)[:3])}); users are written as in the dataset's files.")
        if not 1 <= k <= self.header["k"]:
            raise UsageError(f"--k {k}: the export holds the top {self.header['k']} items per user; ask for 1 to "
                             f"{self.header['k']}, or export again with a larger --k.")
        return self.lists[key][:k]


# ---------------------------------------------------------------------------------------- from checkpoints
def checkpoint_fingerprint(checkpoint) -> str:
    """The fingerprint the checkpoint's configuration gives *now* (current YAML layers, data files, version)."""
    from recbole_llm.quick_start import make_config
    from recbole_llm.trainer.checkpoint import read_meta
    from recbole_llm.fingerprint import run_fingerprint

    meta = read_meta(checkpoint)
    return run_fingerprint(make_config(meta["model"], meta["dataset"], config_dict=meta.get("config") or {}))


def export_checkpoint_top_k(checkpoint, path, k: int = 20, split: str = "test", show_progress: bool = True) -> Path:
    """Load a trained checkpoint (its inputs must be unchanged) and export the top ``k`` of every user of ``split``."""
    from recbole_llm.quick_start import load_model
    from recbole_llm.trainer.checkpoint import read_meta

    meta = read_meta(checkpoint)
    config, model, _, _, valid, test = load_model(checkpoint)
    data = {"test": test, "valid": valid}[split]
    return export_top_k(model, data, path, k, fingerprint=meta["fingerprint"], model_name=meta["model"],
                        dataset_name=meta["dataset"], show_progress=show_progress)


def main(argv=None) -> int:
    """``python -m recbole_llm.serving export CHECKPOINT OUT [--k 20]`` and
    ``python -m recbole_llm.serving recommend OUT USER [--k 10] [--checkpoint CHECKPOINT]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recbole_llm.serving", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export every user's top-K from a checkpoint directory")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--k", type=int, default=20)
    export.add_argument("--split", choices=("test", "valid"), default="test")
    serve = commands.add_parser("recommend", help="read one user's top-K from an export")
    serve.add_argument("export")
    serve.add_argument("user")
    serve.add_argument("--k", type=int, default=10)
    serve.add_argument("--checkpoint", help="refuse the export unless it matches this checkpoint's current inputs")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if args.k < 1:
                raise UsageError(f"--k {args.k}: export at least one item per user (e.g. --k 20).")
            print(export_checkpoint_top_k(args.checkpoint, args.out, args.k, args.split))
            return 0
        fingerprint = checkpoint_fingerprint(args.checkpoint) if args.checkpoint else None
        print(" ".join(TopKCache.load(args.export, fingerprint).recommend(args.user, args.k)))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _json_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}:{number} is not JSON ({err.msg}); the export is damaged or truncated: "
                             "export again.") from None


if __name__ == "__main__":
    raise SystemExit(main())
