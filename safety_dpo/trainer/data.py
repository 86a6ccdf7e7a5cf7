"""Preference pairs for training: checking a CoProV2-style dataset, choosing its rows, preparing its images, and the
optional one-off encoding of every image and prompt (`precompute`).

A training *example* is a pair and the prompt that conditions it: with `prompt_condition="both"` each pair gives
two examples, one per prompt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from safety_dpo.data.pickapic import IMAGE_COLUMNS, image_bytes, orient_pairs
from safety_dpo.trainer.components import DiffusionComponents, encode_images, encode_prompts
from safety_dpo.trainer.config import PROMPT_CONDITIONS

logger = logging.getLogger(__name__)

PRECOMPUTED_DIR = "_precomputed"  # starts with "_": Trainer.push_to_hub leaves it out


def effective_prompt_condition(dataset_or_columns: Any, requested: str) -> str:
    """The `prompt_condition` the dataset's columns allow: `requested` when they have its prompts, else the one
    they do have, with a logged warning. A dataset in Pick-a-Pic's layout (CoProV2 as published) has only `caption`,
    its unsafe prompt, so "both" and "safe" fall back to "unsafe".

    Args:
        dataset_or_columns: A `datasets.Dataset`, or its column names.
        requested: "unsafe", "safe" or "both" (`SafetyDPOConfig.prompt_condition`).

    Returns:
        "unsafe", "safe" or "both".

    Raises:
        ValueError: Naming the flag and the columns found, if the dataset has no prompt column at all, or if
            `requested` is not a prompt condition.
    """
    columns = sorted(getattr(dataset_or_columns, "column_names", dataset_or_columns))
    if requested not in PROMPT_CONDITIONS:
        raise ValueError(
            f"prompt_condition={requested!r} is not supported; use one of {', '.join(PROMPT_CONDITIONS)}."
        )
    has_unsafe = "unsafe_prompt" in columns or "caption" in columns
    has_safe = "safe_prompt" in columns
    if not has_unsafe and not has_safe:
        raise ValueError(
            f"prompt_condition={requested!r}: the training dataset has no prompt column; it has {columns}. Give it "
            "unsafe_prompt or caption (the unsafe prompt, as CoProV2 and Pick-a-Pic have it), or safe_prompt."
        )
    if not has_unsafe:
        if requested != "safe":
            logger.warning(
                "prompt_condition=%r needs the unsafe prompts, but the training dataset has no unsafe_prompt or "
                "caption column (it has %s); training with prompt_condition='safe' on its safe_prompt column.",
                requested,
                columns,
            )
        return "safe"
    if requested != "unsafe" and not has_safe:
        logger.warning(
            "prompt_condition=%r needs the safe prompts, but the training dataset has no safe_prompt column (it has "
            "%s, as CoProV2 and Pick-a-Pic are published); training with prompt_condition='unsafe' on its %s column.",
            requested,
            columns,
            "unsafe_prompt" if "unsafe_prompt" in columns else "caption",
        )
        return "unsafe"
    return requested


def prepare_pairs(dataset, categories: list[str] | None, prompt_condition: str):
    """Check the columns, keep the rows of `categories`, and orient every pair so that `jpg_0` is preferred.

    Pick-a-Pic's `label_0` says which image is preferred: 1 keeps the order, 0 swaps the images, 0.5 (a tie) drops
    the row (`safety_dpo.data.pickapic.orient_pairs`). Unsafe prompts come from `unsafe_prompt`, else `caption`;
    safe prompts from `safe_prompt`. `prompt_condition` is the effective one (`effective_prompt_condition`).

    Raises:
        ValueError: Naming the missing columns, or the categories absent from the dataset (listing those present).
    """
    columns = set(dataset.column_names)
    missing = sorted({*IMAGE_COLUMNS} - columns)
    if prompt_condition in ("safe", "both") and "safe_prompt" not in columns:
        missing.append("safe_prompt")
    if categories is not None and "category" not in columns:
        missing.append("category")
    if "unsafe_prompt" not in columns and "caption" not in columns and prompt_condition in ("unsafe", "both"):
        missing.append("unsafe_prompt (or caption)")
    if missing:
        raise ValueError(
            f"The training dataset lacks the columns {missing}; it has {sorted(columns)}. SafetyDPOTrainer reads "
            "CoProV2's columns: jpg_0 (preferred image), jpg_1, unsafe_prompt or caption, safe_prompt, category. "
            f"prompt_condition={prompt_condition!r} decides the prompt columns (a dataset without safe_prompt trains "
            "with 'unsafe'); categories needs the category column (None trains on every pair)."
        )
    if categories is not None:
        present = sorted(set(dataset["category"]))
        absent = [category for category in categories if category not in present]
        if absent:
            raise ValueError(f"Categories {absent} have no rows in the training dataset; it has {present}.")
        dataset = dataset.filter(lambda category: category in categories, input_columns="category")
    dataset = orient_pairs(dataset)
    if len(dataset) == 0:
        raise ValueError("No training pair is left after choosing the categories and dropping ties.")
    return dataset


def unsafe_prompts(dataset) -> list[str]:
    column = "unsafe_prompt" if "unsafe_prompt" in dataset.column_names else "caption"
    return list(dataset[column])


def retain_prompts(dataset, categories: list[str] | None) -> list[str]:
    """What an expert should leave as it is, as prompts: every safe prompt of the dataset, and the unsafe prompts of
    the categories it does not remove (all of them benign to this expert). Sorted and without duplicates.

    Raises:
        ValueError: If the dataset yields no such prompt (no `safe_prompt` column and no other category).
    """
    columns = dataset.column_names
    prompts = set(dataset["safe_prompt"]) if "safe_prompt" in columns else set()
    if categories is not None and "category" in columns and {"unsafe_prompt", "caption"} & set(columns):
        rows = zip(unsafe_prompts(dataset), dataset["category"], strict=True)
        prompts |= {prompt for prompt, category in rows if category not in categories}
    prompts.discard(None)
    if not prompts:
        raise ValueError(
            "preservation_weight > 0 needs benign prompts: pass preservation_prompts, or train on a dataset with a "
            f"safe_prompt column or with other categories than the expert's (this one has columns {columns})."
        )
    return sorted(prompts)


def image_to_pixels(image: Any, resolution: int, row: int, column: str = "image") -> torch.Tensor:
    """An image as a (3, R, R) tensor in [-1, 1]: shorter side resized, centre-cropped.

    Args:
        image: A PIL image (`datasets.Image`), the bytes of a PNG/JPEG file (`datasets.Value("binary")`, as
            Pick-a-Pic stores them) or a `{"bytes", "path"}` dict (`datasets.Image(decode=False)`).
        resolution: R.
        row: The row, for errors.
        column: The column, for errors.

    Raises:
        TypeError: Naming the row, the column and the accepted values, for a value that is no image at all.
        ValueError: Naming the row, when the image cannot be decoded.
    """
    try:
        if not isinstance(image, Image.Image):
            image = Image.open(io.BytesIO(image_bytes(image, column, row)))
        image = image.convert("RGB")
    except TypeError:
        raise  # not an image value: image_bytes named it and the accepted ones, which "cannot be decoded" would hide
    except Exception as error:  # PIL raises several types for broken data
        raise ValueError(
            f"Row {row}: the image cannot be decoded ({column}, {type(error).__name__}: {error})."
        ) from error
    if image.size != (resolution, resolution):
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


class PairExamples(torch.utils.data.Dataset):
    """Training examples: (pair index, conditioning prompt) for every pair and every prompt of `prompt_condition`.

    Items are dicts with the pair's pixels (`pixels_chosen`, `pixels_rejected`) and its `prompt`, or, when a
    precomputed cache is given, its latent posteriors and prompt embeddings.
    """

    def __init__(self, pairs, prompt_condition: str, resolution: int, cache: dict[str, torch.Tensor] | None = None):
        self.pairs = pairs
        self.conditions = ("unsafe", "safe") if prompt_condition == "both" else (prompt_condition,)
        self.resolution = resolution
        self.cache = cache
        self.unsafe = unsafe_prompts(pairs) if "unsafe" in self.conditions else None
        self.safe = list(pairs["safe_prompt"]) if "safe" in self.conditions else None

    def __len__(self) -> int:
        return len(self.pairs) * len(self.conditions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair, condition = divmod(index, len(self.conditions))
        condition_name = self.conditions[condition]
        if self.cache is not None:
            item = {
                key: self.cache[key][pair] for key in ("chosen_mean", "chosen_std", "rejected_mean", "rejected_std")
            }
            for key in ("prompt_embeds", "pooled_prompt_embeds"):
                cached = self.cache.get(f"{condition_name}_{key}")
                if cached is not None:
                    item[key] = cached[pair]
            return item
        row = self.pairs[pair]
        prompt = (self.unsafe if condition_name == "unsafe" else self.safe)[pair]
        return {
            "pixels_chosen": image_to_pixels(row["jpg_0"], self.resolution, pair, "jpg_0"),
            "pixels_rejected": image_to_pixels(row["jpg_1"], self.resolution, pair, "jpg_1"),
            "prompt": prompt,
        }


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep prompts as a list."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return batch


def precompute(
    pairs, components: DiffusionComponents, prompt_condition: str, resolution: int, batch_size: int, output_dir: str
) -> dict[str, torch.Tensor]:
    """Encode every image and conditioning prompt once; cached as safetensors in `output_dir/_precomputed/`.

    The cache file is named by a fingerprint of the rows, the model's VAE and text encoders and the resolution, so a
    resumed run reuses it and any change recomputes it.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    fingerprint = _cache_fingerprint(pairs, components, prompt_condition, resolution)
    path = Path(output_dir) / PRECOMPUTED_DIR / f"{fingerprint}.safetensors"
    if path.is_file():
        logger.info("Using the precomputed latents and embeddings in %s.", path)
        return load_file(str(path))
    conditions = ("unsafe", "safe") if prompt_condition == "both" else (prompt_condition,)
    prompts = {"unsafe": unsafe_prompts(pairs) if "unsafe" in conditions else None}
    prompts["safe"] = list(pairs["safe_prompt"]) if "safe" in conditions else None
    parts: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(pairs), batch_size), desc="precomputing latents and embeddings"):
        rows = pairs[start : start + batch_size]
        indices = range(start, start + len(rows["jpg_0"]))
        for side, column in (("chosen", "jpg_0"), ("rejected", "jpg_1")):
            images = zip(rows[column], indices, strict=True)
            pixels = torch.stack([image_to_pixels(image, resolution, index, column) for image, index in images])
            mean, std = encode_images(components.vae, pixels)
            parts.setdefault(f"{side}_mean", []).append(mean.float().cpu())
            parts.setdefault(f"{side}_std", []).append(std.float().cpu())
        for condition in conditions:
            encoded = encode_prompts(components, prompts[condition][start : start + len(indices)])
            for key, value in encoded.items():
                parts.setdefault(f"{condition}_{key}", []).append(value.float().cpu())
    cache = {key: torch.cat(values) for key, values in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in cache.items()}, str(temporary))
    temporary.replace(path)
    return cache


def _config_dict(model: Any) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


def _cache_fingerprint(pairs, components: DiffusionComponents, prompt_condition: str, resolution: int) -> str:
    models = [components.vae, *components.text_encoders]
    weights = [float(sum(p.double().sum() for p in model.parameters())) for model in models]
    key = {
        "rows": pairs._fingerprint,
        "configs": [_config_dict(model) for model in models],
        "weights": weights,
        "prompt_condition": prompt_condition,
        "resolution": resolution,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
