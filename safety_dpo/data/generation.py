"""Drawing image pairs with a diffusers text-to-image pipeline: loading and checking it, the sampling settings,
and the pair batches in which both prompts of a pair start from the same noise.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from typing import Any

from safety_dpo.data.pairs import PromptPair
from safety_dpo.worlds import default_world


def load_text_to_image_pipeline(pipeline_or_path: Any, pipeline_kwargs: dict[str, Any]) -> tuple[Any, str]:
    """The pipeline to draw with and the model name to record: `pipeline_or_path` (a pipeline, or a path or Hub id
    to load one from), or for None the default world's pipeline and name (`safety_dpo.worlds`)."""
    if pipeline_or_path is None:
        world = default_world()
        pipeline, model_id = world.load_pipeline(**pipeline_kwargs), world.name
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, model_id
    if isinstance(pipeline_or_path, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(str(pipeline_or_path), **pipeline_kwargs)
        model_id = str(pipeline_or_path)
    else:
        pipeline = pipeline_or_path
        model_id = str(getattr(pipeline, "name_or_path", None) or type(pipeline).__name__)
    check_text_to_image(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, model_id


def check_text_to_image(pipeline: Any) -> None:
    """A text-to-image pipeline takes `prompt` and `generator` and no input image."""
    accepted = "a diffusers text-to-image pipeline (e.g. StableDiffusionPipeline, StableDiffusionXLPipeline)"
    if not hasattr(pipeline, "set_progress_bar_config") or not callable(pipeline):
        raise ValueError(f"pipeline_or_path must be {accepted}, a path or Hub id of one, or None; got {pipeline!r}.")
    parameters = inspect.signature(pipeline.__call__).parameters
    takes_image = {"image", "mask_image", "control_image"} & set(parameters)
    if "prompt" not in parameters or "generator" not in parameters or takes_image:
        raise ValueError(
            f"{type(pipeline).__name__} is not a text-to-image pipeline (it takes {sorted(takes_image) or 'no prompt'}"
            f"); the builder needs {accepted}."
        )


def check_sampler(
    num_inference_steps: int | None,
    guidance_scale: float | None,
    resolution: int | None,
    safety_scale: float = 1.0,
    batch_size: int = 1,
) -> None:
    """Refuse sampler values that cannot draw a meaningful image, before anything is written.

    Raises:
        ValueError: Naming the value and what is accepted.
    """
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps!r}.")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(
            f"guidance_scale must be a finite number (e.g. 7.5; 1 turns guidance off), got {guidance_scale}."
        )
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise ValueError(
            f"resolution must be a positive multiple of 8 (the VAE's scale factor; e.g. 32 for the microworld, 512 "
            f"for SD 1.x, 1024 for SDXL), got {resolution}."
        )
    if not math.isfinite(safety_scale):
        raise ValueError(f"safety_scale must be a finite number (1.0: the adapter as trained), got {safety_scale}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")


def process_state():
    """accelerate's view of the processes: several under `accelerate launch`/`torchrun`, else one."""
    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate treats a multi-process launch as distributed only when told it is on CPU.
    distributed_on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=True) if distributed_on_cpu else PartialState()


def default_world_generation() -> dict[str, Any]:
    """The default world's sampling settings (its protocol's scheduler, steps, guidance and resolution): what a
    build draws with when no model is given."""
    protocol = default_world().load_protocol()
    return {
        "scheduler": protocol.scheduler,
        "num_inference_steps": protocol.num_inference_steps,
        "guidance_scale": protocol.guidance_scale,
        "resolution": protocol.resolution,
    }


class use_scheduler:
    """Sample with the named scheduler class for the duration of the block, then restore the pipeline's."""

    def __init__(self, pipeline: Any, name: str | None) -> None:
        self.pipeline, self.name, self.original = pipeline, name, None

    def __enter__(self) -> None:
        if self.name is None or type(self.pipeline.scheduler).__name__ == self.name:
            return
        import diffusers

        scheduler_class = getattr(diffusers, self.name, None)
        if scheduler_class is None:
            raise ValueError(f"scheduler={self.name!r} is not a diffusers scheduler class.")
        self.original = self.pipeline.scheduler
        self.pipeline.scheduler = scheduler_class.from_config(self.original.config)

    def __exit__(self, *exc_info: Any) -> None:
        if self.original is not None:
            self.pipeline.scheduler = self.original


def draw_pairs(
    pipeline: Any,
    pairs: list[PromptPair],
    seeds: list[int],
    generation: dict[str, Any],
    batch_size: int,
    bar: Any = None,
) -> tuple[list, list]:
    """Draw the safe and the unsafe image of each pair, both from the pair's seed, `batch_size` images per call.

    Args:
        pipeline: A text-to-image pipeline.
        pairs: The prompt pairs.
        seeds: One seed per pair; both images of the pair start from `torch.Generator("cpu").manual_seed(seed)`.
        generation: `num_inference_steps`, `guidance_scale` and `resolution`, each optional (the pipeline's
            default when missing). The scheduler is the caller's business (`use_scheduler`).
        batch_size: Images per pipeline call: half of them safe, half unsafe.
        bar: A tqdm bar to advance by the number of images drawn.

    Returns:
        The safe images and the unsafe images, as PIL images in the order of `pairs`.
    """
    import torch

    safe_images, unsafe_images = [], []
    pairs_per_call = max(1, batch_size // 2)
    call_kwargs: dict[str, Any] = {"output_type": "pil"}
    for key in ("num_inference_steps", "guidance_scale"):
        if key in generation:
            call_kwargs[key] = generation[key]
    if "resolution" in generation:
        call_kwargs["height"] = call_kwargs["width"] = generation["resolution"]
    for start in range(0, len(pairs), pairs_per_call):
        batch = pairs[start : start + pairs_per_call]
        batch_seeds = seeds[start : start + pairs_per_call]
        # Both images of a pair get a generator seeded alike, hence the same initial noise.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in batch_seeds * 2]
        prompts = [pair.safe_prompt for pair in batch] + [pair.unsafe_prompt for pair in batch]
        images = pipeline(prompt=prompts, generator=generators, **call_kwargs).images
        safe_images.extend(images[: len(batch)])
        unsafe_images.extend(images[len(batch) :])
        if bar is not None:
            bar.update(len(images))
    return safe_images, unsafe_images


def encode_png(image) -> dict[str, Any]:
    """A PIL image as the `{"bytes", "path"}` dict a `datasets.Image` column stores; the same bytes `datasets`
    writes itself (PNG, default settings), so the thread that calls this takes the encoding off the main one."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def config_digest(model: Any) -> str | None:
    """A SHA-256 of a model's config (private `_` keys left out), or None when it has none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()
