"""`Detector`: the interface every detector follows (NudeNet, Q16, a world's judge): per image, is it inappropriate?

The detectors are in `safety_dpo.evaluation.detectors` and `safety_dpo.evaluation.q16`; `load_detector` builds one
from a spec.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


class Detector(abc.ABC):
    """Says, per image, whether it is inappropriate.

    Subclasses set the class attribute `name` ("nudenet", "q16", "judge") and implement `settings` and `detect`.
    """

    name: str

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that decides a flag (preset, classes, threshold, model id or path, ...), JSON-serialisable.

        Written into every report next to the numbers it produced.
        """

    @abc.abstractmethod
    def detect(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per image, in order, each with `"flagged": bool` plus the detector's details.

        An empty sequence gives an empty list.
        """

    def provenance(self) -> dict[str, Any]:
        """Package versions and weight digests of what ran (results.json's `protocol.scorers`): the settings say
        what was asked for, this says what was used."""
        return {}
