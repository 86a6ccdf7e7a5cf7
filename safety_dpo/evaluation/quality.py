"""Image quality (FID) and prompt fidelity (CLIPScore) through torchmetrics, with the feature extractor named.

- FID: `torchmetrics.image.fid.FrechetInceptionDistance` on one of three feature extractors:
  `inception` (the standard 2048-d pool features; needs `pip install safety_dpo[fid-inception]`), `clip` (CLIP image
  embeddings of a model given by path or Hub id) and `judge` (the microworld judge's features, the microworld's FID).
- CLIPScore: `torchmetrics.multimodal.CLIPScore` (100 x the mean cosine of CLIP image and text embeddings; torchmetrics
  floors the *mean* at 0, where Hessel et al. 2021 floor each image's) with a CLIP model loaded here by path or Hub id,
  from safetensors.

Every function returns the number together with a description of how it was computed, for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

FIDFeatures = Literal["inception", "clip", "judge"]
FID_FEATURES: tuple[str, ...] = ("inception", "clip", "judge")
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def images_to_uint8(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> uint8 tensor (N, 3, H, W); `size` resizes (bilinear) to size x size, else all must match."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1:
        raise ValueError(f"Images of different sizes {sorted(shapes)}; pass size= to resize them to one.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


class JudgeFeatures(nn.Module):
    """The microworld judge's feature vector as a torchmetrics FID feature extractor: uint8 (N, 3, H, W) -> (N, D)."""

    def __init__(self, judge: Any = None) -> None:
        super().__init__()
        from safety_dpo.microworld import load_judge

        self.judge = judge or load_judge()
        self.num_features = self.judge.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from safety_dpo.microworld.renderer import RESOLUTION

        pixels = images.float() / 127.5 - 1.0  # the judge reads [-1, 1]
        if pixels.shape[-1] != RESOLUTION or pixels.shape[-2] != RESOLUTION:
            pixels = nn.functional.interpolate(pixels, size=(RESOLUTION, RESOLUTION), mode="bilinear")
        device = next(self.judge.parameters()).device
        return self.judge.eval()(pixels.to(device))["features"].float().cpu()


class CLIPImageFeatures(nn.Module):
    """CLIP image embeddings as a torchmetrics FID feature extractor: uint8 (N, 3, H, W) -> (N, projection_dim)."""

    def __init__(self, model: Any, processor: Any) -> None:
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.num_features = model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        device = next(self.model.parameters()).device
        return _embedding(self.model.get_image_features(pixel_values=pixels.to(device))).float().cpu()


def load_clip(clip_model: str, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """A CLIP model and its processor from a path or Hub id, safetensors weights only, no remote code."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(clip_model, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(clip_model)
    except OSError as error:
        raise ValueError(
            f"clip_model={clip_model!r} could not be loaded as a transformers CLIPModel with safetensors weights "
            f"({error}); pass a path or Hub id of one (e.g. {DEFAULT_CLIP_MODEL!r})."
        ) from error
    return model.to(device or "cpu").eval(), processor


def fid_feature_extractor(
    features: FIDFeatures, clip: tuple[Any, Any] | None = None, judge: Any = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A feature extractor for FID, taking uint8 (N, 3, S, S) with S its `input_size`, and a description of it.

    Args:
        features: "inception", "clip" or "judge".
        clip: (CLIPModel, CLIPProcessor) for "clip" features.
        judge: The microworld judge for "judge" features (the shipped one by default).

    Raises:
        ValueError: For an unknown name, or "clip" features without a CLIP model.
        ImportError: For "inception" features without torch-fidelity.
    """
    if features == "judge":
        from safety_dpo.microworld.renderer import RESOLUTION

        module = JudgeFeatures(judge)
        module.input_size = RESOLUTION
        return module, {"features": "judge", "dimensions": module.num_features}
    if features == "clip":
        if clip is None:
            raise ValueError("fid_features='clip' needs a CLIP model (clip_model=PATH_OR_ID).")
        module = CLIPImageFeatures(*clip)
        crop = getattr(clip[1].image_processor, "crop_size", None) or {"height": 224}
        module.input_size = int(crop["height"])
        model_id = getattr(clip[0], "name_or_path", None)
        return module, {"features": "clip", "model": model_id, "dimensions": module.num_features}
    if features == "inception":
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError(
                "fid_features='inception' needs torch-fidelity: pip install 'safety_dpo[fid-inception]' (it brings "
                "torchvision, which may pull a CUDA build of torch); or use fid_features='clip'."
            )
        module = FrechetInceptionDistance(feature=2048).inception  # torch-fidelity's FID Inception v3, 2048-d pool
        module.num_features, module.input_size = 2048, 299
        return module, {
            "features": "inception",
            "model": "pt_inception-2015-12-05 (torch-fidelity)",
            "dimensions": 2048,
        }
    raise ValueError(f"fid_features={features!r} is not known; choose one of {', '.join(FID_FEATURES)}.")


@torch.no_grad()
def extract_features(images: Sequence[Image.Image], extractor: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """(N, D) float64 features of images, resized to the extractor's `input_size` when they differ from it."""
    size = getattr(extractor, "input_size", None)
    chunks = [
        extractor(images_to_uint8(images[start : start + batch_size], size)).double().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, extractor.num_features, dtype=torch.float64)


class _GivenFeatures(nn.Module):
    """torchmetrics' FID runs its extractor on what `update` gets; this one hands precomputed features through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real_features: torch.Tensor, generated_features: torch.Tensor) -> float:
    """FID (Heusel et al. 2017) between two feature sets, computed by torchmetrics' `FrechetInceptionDistance`.

    Args:
        real_features: (N, D) features of the reference set, N >= 2.
        generated_features: (M, D) features of the measured set, M >= 2.

    Returns:
        The squared Fréchet distance between Gaussians fitted to the two sets, >= 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real_features.ndim != 2 or generated_features.shape[1:] != real_features.shape[1:]:
        raise ValueError(
            f"Expected (N, D) and (M, D) features, got {tuple(real_features.shape)} and "
            f"{tuple(generated_features.shape)}."
        )
    if min(len(real_features), len(generated_features)) < 2:
        raise ValueError(
            f"FID needs at least two images in each set; got {len(real_features)} reference and "
            f"{len(generated_features)} generated."
        )
    # No set_dtype: the metric's sums are float64 already, and set_dtype would cast the extractor too. No sync: the
    # runner scores on the main process alone, so gathering across processes would wait for the others forever.
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real_features.shape[1]), sync_on_compute=False)
    metric.update(real_features.double(), real=True)
    metric.update(generated_features.double(), real=False)
    return max(float(metric.compute()), 0.0)


def frechet_distance(
    real_images: Sequence[Image.Image],
    generated_images: Sequence[Image.Image],
    extractor: nn.Module,
    batch_size: int = 64,
) -> float:
    """FID between two image sets: features from `extractor` (`fid_feature_extractor`), distance from torchmetrics."""
    return fid_from_features(
        extract_features(real_images, extractor, batch_size), extract_features(generated_images, extractor, batch_size)
    )


def clip_score(
    images: Sequence[Image.Image], prompts: Sequence[str], clip: tuple[Any, Any], batch_size: int = 32
) -> float:
    """Mean CLIPScore of images against their prompts, with torchmetrics' `CLIPScore` on the given CLIP model.

    Args:
        images: The images.
        prompts: One prompt per image.
        clip: (CLIPModel, CLIPProcessor), from `load_clip`.
        batch_size: Images per pass.

    Returns:
        100 x the mean cosine similarity of image and text embeddings, floored at 0 (torchmetrics' convention).
    """
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    if not images:
        raise ValueError("clip_score needs at least one image.")
    metric = clip_score_metric(clip)
    for start in range(0, len(images), batch_size):
        update_clip_score(metric, images[start : start + batch_size], prompts[start : start + batch_size])
    return float(metric.compute())


def clip_score_metric(clip: tuple[Any, Any]) -> Any:
    """A torchmetrics `CLIPScore` on a loaded (CLIPModel, CLIPProcessor), to `update_clip_score` batch by batch."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    # No sync across processes: the runner scores on the main process alone.
    return CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor), sync_on_compute=False)


@torch.no_grad()
def update_clip_score(metric: Any, images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    """Add images and their prompts to a `clip_score_metric`."""
    device = next(metric.model.parameters()).device
    metric.update(list(images_to_uint8(images).to(device)), list(prompts))


class _TensorFeatures(nn.Module):
    """A CLIP model whose `get_*_features` return tensors: torchmetrics 1.9 takes `.norm()` of them directly, which
    fails on the model output that transformers 5 returns."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(output: Any) -> torch.Tensor:
    """transformers returns a tensor from `get_image_features` in some versions and a model output in others."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output if getattr(output, "pooler_output", None) is not None else output[0]
