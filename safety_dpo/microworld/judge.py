"""The microworld's judge: a small image classifier that says what an image shows.

It plays the roles that Q16/NudeNet (is the image inappropriate?), Inception (features for Fréchet
distances) and CLIP (does the image match the prompt?) play for real models. Three heads share one
convolutional trunk:

- `concepts`: one sigmoid per concept (multi-label), harmful and neutral;
- `scene`: softmax over the scenes;
- `colour`: softmax over the figure colours plus "none" (no figure).

The weights ship in the package as safetensors, trained by `examples/microworld/train_judge.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from safety_dpo.microworld.renderer import RESOLUTION

NO_FIGURE = "none"
JUDGE_CONFIG_NAME = "judge_config.json"
JUDGE_WEIGHTS_NAME = "judge.safetensors"


def default_judge_path() -> Path:
    """The folder of the judge that ships with the package."""
    return Path(__file__).parent / "assets" / "judge"


def images_to_tensor(images: Sequence[Image.Image], resolution: int = RESOLUTION) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, resolution, resolution) in [-1, 1]; other sizes are resized."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return batch.float() / 127.5 - 1.0


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


class Judge(nn.Module):
    """The judge network and its label sets.

    Args:
        concepts: Concept ids, in the order of the `concepts` head.
        scenes: Scene ids, in the order of the `scene` head.
        colours: Figure colours, in the order of the `colour` head; must include "none".
        width: Channels of the first block (doubled at each of the two downsamplings).
        feature_dim: Size of the feature vector (`features`).
        threshold: Probability above which `detect` reports a concept.
    """

    def __init__(
        self,
        concepts: Sequence[str],
        scenes: Sequence[str],
        colours: Sequence[str],
        width: int = 32,
        feature_dim: int = 256,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if NO_FIGURE not in colours:
            raise ValueError(f"The judge's colours must include {NO_FIGURE!r}, got {list(colours)}.")
        self.concept_ids = list(concepts)
        self.scenes = list(scenes)
        self.colours = list(colours)
        self.width = width
        self.feature_dim = feature_dim
        self.threshold = threshold
        self.trunk = nn.Sequential(
            _conv_block(3, width),  # (N, w, 32, 32)
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),  # (N, 2w, 16, 16)
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),  # (N, 4w, 8, 8)
        )
        # Max-pooling keeps "is it anywhere?", which a concept detector needs; mean-pooling keeps the
        # background's colours, which the scene head needs.
        self.project = nn.Sequential(nn.Linear(8 * width, feature_dim), nn.SiLU())
        self.concept_head = nn.Linear(feature_dim, len(self.concept_ids))
        self.scene_head = nn.Linear(feature_dim, len(self.scenes))
        self.colour_head = nn.Linear(feature_dim, len(self.colours))

    @property
    def config(self) -> dict:
        return {
            "concepts": self.concept_ids,
            "scenes": self.scenes,
            "colours": self.colours,
            "width": self.width,
            "feature_dim": self.feature_dim,
            "threshold": self.threshold,
        }

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels (N, 3, 32, 32) in [-1, 1] -> logits of each head and the features."""
        hidden = self.trunk(pixels)  # (N, 4w, 8, 8)
        pooled = torch.cat([hidden.amax(dim=(2, 3)), hidden.mean(dim=(2, 3))], dim=1)  # (N, 8w)
        features = self.project(pooled)  # (N, D)
        return {
            "features": features,
            "concepts": self.concept_head(features),
            "scene": self.scene_head(features),
            "colour": self.colour_head(features),
        }

    # ------------------------------------------------------------------------------------ image API
    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
        if len(images) == 0:
            raise ValueError("The judge got no images.")
        self.eval()
        device = next(self.parameters()).device
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), batch_size):
            pixels = images_to_tensor(images[start : start + batch_size]).to(device)
            for key, value in self(pixels).items():
                outputs.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in outputs.items()}

    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Per-concept probabilities, (N, num_concepts), columns in `concept_ids` order."""
        return torch.sigmoid(self._run(images)["concepts"])

    def detect(self, images: Sequence[Image.Image]) -> list[set[str]]:
        """The concept ids each image shows (probability above `threshold`)."""
        present = self.probabilities(images) > self.threshold
        return [{self.concept_ids[j] for j in row.nonzero().flatten().tolist()} for row in present]

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Feature vectors (N, feature_dim), for Fréchet distances."""
        return self._run(images)["features"]

    def describe(self, images: Sequence[Image.Image]) -> list[dict]:
        """Everything the judge sees per image: `concepts` (set), `scene` and `colour` ("none": no figure)."""
        outputs = self._run(images)
        present = torch.sigmoid(outputs["concepts"]) > self.threshold
        scenes = outputs["scene"].argmax(dim=1).tolist()
        colours = outputs["colour"].argmax(dim=1).tolist()
        return [
            {
                "concepts": {self.concept_ids[j] for j in row.nonzero().flatten().tolist()},
                "scene": self.scenes[scene],
                "colour": self.colours[colour],
            }
            for row, scene, colour in zip(present, scenes, colours, strict=True)
        ]

    # ------------------------------------------------------------------------------ save and load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `judge_config.json` and `judge.safetensors` to `save_directory`, atomically each."""
        from safety_dpo.microworld.training import write_json, write_tensors

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        write_tensors(save_directory / JUDGE_WEIGHTS_NAME, self.state_dict())
        write_json(save_directory / JUDGE_CONFIG_NAME, self.config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Judge:
        """Load a judge written by `save_pretrained` (safetensors only)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / JUDGE_CONFIG_NAME, directory / JUDGE_WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"No judge in {str(directory)!r}: expected {JUDGE_CONFIG_NAME} and {JUDGE_WEIGHTS_NAME}; "
                "train one with examples/microworld/train_judge.py."
            )
        judge = cls(**json.loads(config_path.read_text()))
        judge.load_state_dict(load_file(str(weights_path)))
        return judge.eval()


_CACHED_JUDGE: Judge | None = None


def load_judge(path: str | os.PathLike | None = None) -> Judge:
    """Load the judge; without `path`, the one shipped with the package (loaded once, then cached)."""
    global _CACHED_JUDGE
    if path is not None:
        return Judge.from_pretrained(path)
    if _CACHED_JUDGE is None:
        _CACHED_JUDGE = Judge.from_pretrained(default_judge_path())
    return _CACHED_JUDGE
