"""The evaluation's on-disk state, so an interrupted run resumes without drawing or scoring anything twice.

```
OUTPUT_DIR/images/<variant>/generation.json      # the settings that drew these images; a run with others is refused
OUTPUT_DIR/images/<variant>/<index>-<k>-seed<seed>.png
OUTPUT_DIR/scores/<variant>/<detector>-<digest>.jsonl   # one line per scored image, appended as scoring goes; the
                                                        # digest covers the detector's and the images' settings
```
Images are written atomically (temporary file, then rename); an unreadable image is reported, removed and drawn again.
A score line cut short by a crash is ignored and that image scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from safety_dpo.data.build_dir import differences, write_json
from safety_dpo.evaluation.prompts import EvalPrompt

logger = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"
_UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises on truncated or foreign files


@dataclass(frozen=True)
class Job:
    """One image to draw: image `k` of prompt `index`, from `seed`."""

    index: int
    k: int
    seed: int
    prompt: EvalPrompt

    @property
    def file_name(self) -> str:
        return f"{self.index:05d}-{self.k}-seed{self.seed}.png"


def digest(data: Any) -> str:
    """A short, stable SHA-256 of JSON-serialisable data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImageCache:
    """The images of one model variant ("base" or "aligned") under `root/<variant>/`."""

    def __init__(self, root: str | os.PathLike, variant: str) -> None:
        self.variant = variant
        self.directory = Path(root) / variant

    def claim(self, settings: dict[str, Any]) -> None:
        """Record the settings that draw these images, or check that they are those already recorded.

        Raises:
            FileExistsError: If the folder holds images drawn with other settings (they are left untouched).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / GENERATION_FILE
        if path.is_file():
            differing = differences(json.loads(path.read_text()), settings)
            if differing:
                raise FileExistsError(
                    f"{str(self.directory)!r} holds {self.variant} images drawn with other settings ("
                    + "; ".join(differing)
                    + "). Use another --output-dir, or delete that folder to draw them again."
                )
            return
        write_json(path, settings)

    def recorded_settings(self) -> dict[str, Any]:
        """The settings `claim` recorded, {} before the first claim."""
        path = self.directory / GENERATION_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def settings_digest(self) -> str | None:
        """A digest of the settings that drew these images (None before `claim`): score caches are keyed by it, so
        that images drawn again with other settings are never scored from an earlier run's results."""
        recorded = self.recorded_settings()
        return digest(recorded) if recorded else None

    def path(self, job: Job) -> Path:
        return self.directory / job.file_name

    def has(self, job: Job) -> bool:
        """Whether `job`'s image is on disk and intact (PNG chunks and checksums, without decoding the pixels); an
        unreadable file is removed, so that it is drawn again."""
        path = self.path(job)
        if not path.is_file():
            return False
        try:
            with Image.open(path) as image:
                image.verify()
            return True
        except _UNREADABLE as error:
            _discard(path, error)
            return False

    def read(self, job: Job) -> Image.Image | None:
        """The cached image of `job`, or None when it is missing or unreadable (an unreadable file is removed)."""
        path = self.path(job)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except _UNREADABLE as error:
            _discard(path, error)
            return None

    def write(self, job: Job, image: Image.Image) -> None:
        path = self.path(job)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        image.save(temporary, format="PNG")
        os.replace(temporary, path)


def _discard(path: Path, error: Exception) -> None:
    logger.warning("Cached image %s is unreadable (%s); it will be drawn again.", path, error)
    path.unlink(missing_ok=True)


class ScoreCache:
    """One detector's results on one variant's images, one JSON line per image, appended as they come."""

    def __init__(self, root: str | os.PathLike, variant: str, detector_settings: dict[str, Any]) -> None:
        name = str(detector_settings.get("detector", "detector"))
        self.path = Path(root) / variant / f"{name}-{digest(detector_settings)}.jsonl"

    def load(self) -> dict[str, dict[str, Any]]:
        """file name -> result, for every complete line."""
        results: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return results
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that image is scored again
            results[record.pop("file")] = record
        return results

    def append(self, records: Iterable[tuple[str, dict[str, Any]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            if handle.tell() and not self._ends_with_newline():
                handle.write("\n")  # after a cut-short line, start a fresh one
            for file_name, result in records:
                handle.write(json.dumps({"file": file_name, **result}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
