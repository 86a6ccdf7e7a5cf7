"""Image quality (FID) and prompt fidelity (CLIPScore) through torchmetrics, with the feature extractor named.

- Fréchet distances on one of three feature extractors: `inception` is FID proper, computed exactly as pytorch-fid
  computes it (its Inception v3 and weights, its image handling and its distance; needs `pip install
  safety_dpo[fid]`); `clip` (CLIP image embeddings of a model given by path or Hub id) and `judge` (the microworld
  judge's features) give Fréchet distances through torchmetrics' `FrechetInceptionDistance`, named `fd_clip` and
  `fd_judge` in reports because they are not FID.
- CLIPScore: `torchmetrics.multimodal.CLIPScore` (100 x the mean cosine of CLIP image and text embeddings; torchmetrics
  floors the *mean* at 0, where Hessel et al. 2021 floor each image's) with a CLIP model loaded here by path or Hub id,
  from safetensors.

Every function returns the number together with a description of how it was computed, for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from safety_dpo.worlds import default_world

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
    """The default world's judge's feature vector (the microworld's) as a torchmetrics FID feature extractor: uint8
    (N, 3, H, W) -> (N, D)."""

    def __init__(self, judge: Any = None) -> None:
        super().__init__()
        world = default_world()
        self.judge = judge or world.load_judge()
        self.num_features = self.judge.feature_dim
        self.resolution = world.resolution  # the side of the images the judge reads

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.resolution
        pixels = images.float() / 127.5 - 1.0  # the judge reads [-1, 1]
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear")
        device = next(self.judge.parameters()).device
        return self.judge.eval()(pixels.to(device))["features"].float().cpu()


class PytorchFIDInception(nn.Module):
    """pytorch-fid's Inception v3 (pool3, 2048-d) as a feature extractor: uint8 (N, 3, H, W) -> (N, 2048).

    Fed exactly as pytorch-fid's `get_activations` feeds it: each image at its own size, as the [0, 1] floats of
    `ToTensor` (uint8 / 255); the network itself resizes to 299 x 299 (bilinear, align_corners=False) and scales to
    [-1, 1]. No resizing happens before it (`input_size` is None), unlike torchmetrics' PIL-resized path.

    pytorch-fid downloads its weights (`pt_inception-2015-12-05-6726825d.pth`, a torch pickle) into torch's hub
    cache. They are read here with `torch.load(weights_only=True)` after checking the file's SHA-256 prefix, never
    fully unpickled (pytorch-fid's own loader would).
    """

    input_size = None
    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        inception = _import_pytorch_fid()
        self.weights_name = Path(inception.FID_WEIGHTS_URL).name
        original = inception.load_state_dict_from_url
        inception.load_state_dict_from_url = _load_weights_only
        try:
            block = inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
            self.network = inception.InceptionV3([block], resize_input=True, normalize_input=True).eval()
        finally:
            inception.load_state_dict_from_url = original

    def weights_sha256(self) -> str | None:
        import torch.hub

        from safety_dpo.evaluation.provenance import file_sha256

        path = Path(torch.hub.get_dir()) / "checkpoints" / self.weights_name
        return file_sha256(path) if path.is_file() else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.network.parameters()).device
        pixels = images.to(device).float() / 255.0  # torchvision's ToTensor on a uint8 image
        return self.network(pixels)[0].squeeze(3).squeeze(2).float().cpu()


def _import_pytorch_fid() -> Any:
    try:
        from pytorch_fid import inception
    except ImportError as error:
        raise ImportError(
            "fid_features='inception' (FID as pytorch-fid computes it) needs pytorch-fid: pip install "
            "'safety_dpo[fid]' (it brings torchvision; on a CPU-only machine install the torchvision build that matches "
            "your torch first). Or name another feature extractor: 'clip' (reported as fd_clip, not FID)."
        ) from error
    return inception


def _load_weights_only(url: str, progress: bool = True, **_: Any) -> dict[str, torch.Tensor]:
    """pytorch-fid's weights, downloaded by torch's hub (SHA-256 prefix in the file name checked) and read with
    `weights_only=True`, which rebuilds tensors and refuses any other object in the pickle."""
    import torch.hub

    return torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True)


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
        module = JudgeFeatures(judge)
        module.input_size = module.resolution
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
        module = PytorchFIDInception()
        return module, {
            "features": "inception",
            "implementation": "pytorch-fid",
            "model": module.weights_name,
            "dimensions": 2048,
            "image_handling": "each image at its own size as [0, 1] floats (ToTensor), resized to 299 x 299 by "
            "F.interpolate(bilinear, align_corners=False) inside the network, scaled to [-1, 1]: as pytorch-fid",
            "distance": "pytorch_fid.fid_score.calculate_frechet_distance on float64 mean and covariance",
        }
    raise ValueError(f"fid_features={features!r} is not known; choose one of {', '.join(FID_FEATURES)}.")


@torch.no_grad()
def extract_features(images: Sequence[Image.Image], extractor: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """(N, D) float64 features of images, resized to the extractor's `input_size` when they differ from it; an
    extractor without one (pytorch-fid's Inception) gets each image at its own size, batched with images of the
    same size, and the features come back in the images' order."""
    size = getattr(extractor, "input_size", None)
    if size is None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(image.size, []).append(index)
    else:
        groups = {(size, size): list(range(len(images)))}
    features = torch.zeros(len(images), extractor.num_features, dtype=torch.float64)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chosen = members[start : start + batch_size]
            batch = images_to_uint8([images[i] for i in chosen], size)
            features[chosen] = extractor(batch).double().cpu()
    return features


class _GivenFeatures(nn.Module):
    """torchmetrics' FID runs its extractor on what `update` gets; this one hands precomputed features through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(
    real_features: torch.Tensor, generated_features: torch.Tensor, implementation: str = "torchmetrics"
) -> float:
    """The Fréchet distance (Heusel et al. 2017) between two feature sets.

    Args:
        real_features: (N, D) features of the reference set, N >= 2.
        generated_features: (M, D) features of the measured set, M >= 2.
        implementation: "torchmetrics" (its `FrechetInceptionDistance`, float64) or "pytorch-fid" (numpy mean and
            covariance, scipy's sqrtm: `pytorch_fid.fid_score.calculate_frechet_distance`, for FID proper).

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
    if implementation == "pytorch-fid":
        import numpy as np
        from pytorch_fid.fid_score import calculate_frechet_distance

        real, generated = real_features.double().numpy(), generated_features.double().numpy()
        return float(
            calculate_frechet_distance(
                np.mean(real, axis=0),
                np.cov(real, rowvar=False),
                np.mean(generated, axis=0),
                np.cov(generated, rowvar=False),
            )
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
