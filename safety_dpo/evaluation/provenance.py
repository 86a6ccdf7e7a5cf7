"""What exactly scored a run: package versions and the SHA-256 of every scorer's weights, for results.json.

Two reports are comparable only if the same detectors, feature extractors and CLIP models made their numbers; the
settings say which were asked for, these digests say which were used (a re-uploaded Hub model or another NudeNet
wheel changes them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def package_versions(*names: str) -> dict[str, str | None]:
    """name -> installed version, None when the package is not installed."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time) in a process."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_weights(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The weights files a transformers `from_pretrained(name_or_path, use_safetensors=True)` reads, with their
    SHA-256: a local folder's, or those of the Hub repo's snapshot in the local cache (it was just loaded from there).

    Returns:
        `{"id": name_or_path, "weights_sha256": {file name: digest}}`; `weights_sha256` is empty when no file could
        be found (the model then says so rather than guessing).
    """
    folder = _local_folder(str(name_or_path))
    files: dict[str, str] = {}
    if folder is not None:
        for name in _weight_files(folder):
            files[name] = file_sha256(folder / name)
    return {"id": str(name_or_path), "weights_sha256": files}


def _local_folder(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "model.safetensors.index.json"):
        cached = try_to_load_from_cache(name_or_path, name)
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    return sorted(path.name for path in folder.glob("*.safetensors"))
