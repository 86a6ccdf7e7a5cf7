"""The on-disk state of a CoProV2 build, written so that a killed build resumes without holes or duplicates.

```
OUTPUT_DIR/
  coprov2_build.json        the build's settings; another build's settings are refused, not mixed
  prompts/<concept>.json    accepted pairs and rejection counts of one concept, written when it is finished
  shards/shard-00000/       rows [0, shard_size) as a saved `datasets.Dataset`, renamed into place when complete
  dataset_dict.json train/ test/   the finished DatasetDict (`datasets.load_from_disk(OUTPUT_DIR)`)
  build_report.json README.md       rows, counts, rejections and timings; the dataset card
```

Every file and shard appears by an atomic rename, so whatever exists is complete. `dataset_dict.json` is the last
thing a build writes: its presence means the build is finished (the shards are then deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safety_dpo.folder_lock import folder_contents

BUILD_FILE = "coprov2_build.json"
REPORT_FILE = "build_report.json"
DATASET_DICT_FILE = "dataset_dict.json"
FORMAT_VERSION = 1


class BuildDirectory:
    """Paths and atomic writes of one build's output directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.prompts = self.path / "prompts"
        self.shards = self.path / "shards"

    # ------------------------------------------------------------------------------------------- claiming
    def claim(self, settings: dict[str, Any]) -> None:
        """Make the directory this build's, or raise if it holds anything else.

        Raises:
            FileExistsError: If the directory holds another build (the message lists the settings that differ) or
                files that are not a CoProV2 build.
        """
        settings = json.loads(json.dumps(settings))  # the form it takes once read back from JSON
        build_file = self.path / BUILD_FILE
        if build_file.is_file():
            stored = json.loads(build_file.read_text())
            if stored.get("format") != FORMAT_VERSION or stored.get("settings") != settings:
                differing = differences(stored.get("settings", {}), settings)
                raise FileExistsError(
                    f"output_dir={str(self.path)!r} holds another CoProV2 build; settings that differ: "
                    f"{'; '.join(differing) or 'format version'}. Use a new output directory, or the same "
                    "settings to resume that build."
                )
            return
        if self.path.exists() and (not self.path.is_dir() or folder_contents(self.path)):
            raise FileExistsError(
                f"output_dir={str(self.path)!r} exists and is not an empty directory or a CoProV2 build "
                f"(no {BUILD_FILE}); choose a new or empty directory."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(build_file, {"format": FORMAT_VERSION, "settings": settings})

    @property
    def is_finished(self) -> bool:
        return (self.path / DATASET_DICT_FILE).is_file()

    # --------------------------------------------------------------------------------------------- prompts
    def prompt_file(self, concept_id: str) -> Path:
        return self.prompts / f"{concept_id}.json"

    def read_prompts(self, concept_id: str) -> dict[str, Any] | None:
        path = self.prompt_file(concept_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_prompts(self, concept_id: str, data: dict[str, Any]) -> None:
        self.prompts.mkdir(parents=True, exist_ok=True)
        write_json(self.prompt_file(concept_id), data)

    # ---------------------------------------------------------------------------------------------- shards
    def shard(self, index: int) -> Path:
        return self.shards / f"shard-{index:05d}"

    def write_shard(self, index: int, dataset) -> None:
        """Save a `datasets.Dataset` as shard `index`, renamed into place only once it is complete."""
        self.shards.mkdir(parents=True, exist_ok=True)
        final = self.shard(index)
        temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        with _quiet_datasets():
            dataset.save_to_disk(str(temporary))
        os.replace(temporary, final)

    def remove_partial_shards(self, indices: set[int]) -> None:
        """Delete leftovers of shards that a killed run was writing (only those of `indices`)."""
        if not self.shards.is_dir():
            return
        for entry in self.shards.iterdir():
            name, _, suffix = entry.name.partition(".tmp-")
            if suffix and name.startswith("shard-") and int(name[6:]) in indices:
                shutil.rmtree(entry, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- result
    def write_dataset(self, dataset_dict) -> None:
        """Save the finished `DatasetDict` into the directory itself, `dataset_dict.json` last."""
        staging = self.path / ".assembling"
        shutil.rmtree(staging, ignore_errors=True)
        with _quiet_datasets():
            dataset_dict.save_to_disk(str(staging))
        for split in dataset_dict:
            shutil.rmtree(self.path / split, ignore_errors=True)
            os.replace(staging / split, self.path / split)
        os.replace(staging / DATASET_DICT_FILE, self.path / DATASET_DICT_FILE)
        shutil.rmtree(staging, ignore_errors=True)

    def remove_shards(self) -> None:
        shutil.rmtree(self.shards, ignore_errors=True)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' own progress bars (one per shard saved) under the builder's."""
    import datasets

    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (a temporary file, then a rename)."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Write tensors as safetensors atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ between a folder's recorded ones and the current ones, one line each."""
    keys = sorted(set(stored) | set(current))
    return [
        f"{key}: {stored.get(key)!r} there, {current.get(key)!r} now"
        for key in keys
        if stored.get(key) != current.get(key)
    ]
