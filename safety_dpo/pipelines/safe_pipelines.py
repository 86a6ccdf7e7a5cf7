"""`StableDiffusionSafePipeline` and `StableDiffusionXLSafePipeline`: the stock pipelines with `SafetyAdapterMixin`,
and the folder that `save_pretrained` writes for them and `from_pretrained` reads back.

Not to be confused with diffusers' deprecated `StableDiffusionPipelineSafe` (Safe Latent Diffusion, which adds safety
guidance work at every denoising step): these are the stock pipelines, unchanged, with a SafetyDPO adapter loaded
into the UNet.

The folder that `save_pretrained` writes is described in `safety_dpo.pipelines.saved_folder`.
"""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from safety_dpo.pipelines.mixin import SafetyAdapterMixin, _finite_scale
from safety_dpo.pipelines.saved_folder import SAVED_ADAPTERS_KEY


class _SafeFromPretrained:
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        safety_adapter: Any = None,
        safety_scale: float = 1.0,
        fuse_safety_adapter: bool = False,
        load_saved_safety_adapters: bool = True,
        **kwargs: Any,
    ):
        """Load the base pipeline, the safety adapters a `save_pretrained` saved beside it, and `safety_adapter`
        when it is given, in one call.

        Args:
            pretrained_model_name_or_path: The base model, as for diffusers' `from_pretrained`.
            safety_adapter: A Hub id, folder, `.safetensors` file or state dict of a safety adapter.
            safety_scale: Its weight.
            fuse_safety_adapter: Fuse it into the base weights (zero inference overhead).
            load_saved_safety_adapters: Load the unfused safety adapters listed under `_safety_adapters` in
                `model_index.json` (what `save_pretrained` of a pipeline with safety adapters writes), each from its
                sub-folder and at its scale. Fused ones are in the UNet's weights already.
            **kwargs: diffusers `from_pretrained` arguments (`torch_dtype`, `variant`, `revision`, ...).

        Raises:
            ValueError: If `safety_scale` is not a finite number (checked before the base model is loaded), if the
                `_safety_adapters` entry of `model_index.json` is malformed, or as `load_safety_adapter` raises.
        """
        if safety_adapter is not None:
            _finite_scale(safety_scale)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in ("token", "cache_dir", "local_files_only") if key in kwargs}
        if load_saved_safety_adapters:
            download = {key: kwargs[key] for key in ("revision", "force_download") if key in kwargs}
            for name, entry in _saved_adapters(cls, pretrained_model_name_or_path, {**hub_kwargs, **download}).items():
                pipeline.load_safety_adapter(
                    pretrained_model_name_or_path,
                    adapter_name=name,
                    subfolder=entry["subfolder"],
                    weight_name=entry.get("weight_name"),
                    scale=entry.get("scale", 1.0),
                    **hub_kwargs,
                    **download,
                )
        if safety_adapter is not None:
            pipeline.load_safety_adapter(safety_adapter, scale=safety_scale, fuse=fuse_safety_adapter, **hub_kwargs)
        return pipeline


def _saved_adapters(cls: type, pretrained_model_name_or_path: Any, hub_kwargs: dict[str, Any]) -> dict[str, dict]:
    """The `_safety_adapters` entry of the pipeline's `model_index.json` (cached by `from_pretrained` already):
    adapter name -> subfolder, weight_name, scale; {} when there is none.

    Raises:
        ValueError: If the entry is not such a mapping.
    """
    config = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
    saved = config.get(SAVED_ADAPTERS_KEY) or {}
    valid = isinstance(saved, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("subfolder"), str) for entry in saved.values()
    )
    if not valid:
        raise ValueError(
            f"The {SAVED_ADAPTERS_KEY!r} entry of {str(pretrained_model_name_or_path)!r}'s model_index.json is "
            'malformed: expected adapter name -> {"subfolder": ..., "scale": ...}. Load the pipeline with '
            "load_saved_safety_adapters=False and the adapters with load_safety_adapter(..., subfolder=...)."
        )
    return saved


class StableDiffusionSafePipeline(_SafeFromPretrained, SafetyAdapterMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` (SD 1.x/2.x) with `load_safety_adapter`.

    ```python
    pipe = StableDiffusionSafePipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                       safety_adapter="org/sd15-safety-adapter")
    ```
    """


class StableDiffusionXLSafePipeline(_SafeFromPretrained, SafetyAdapterMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with `load_safety_adapter`."""


def enable_safety_adapters(pipeline: Any) -> Any:
    """Give an existing pipeline instance `load_safety_adapter` (in place; the same object is returned).

    A `StableDiffusionPipeline` becomes a `StableDiffusionSafePipeline`, a `StableDiffusionXLPipeline` a
    `StableDiffusionXLSafePipeline`; any other pipeline with a UNet and diffusers' LoRA loading gets the mixin added
    to its own class. Its components, weights and loaded LoRAs are untouched.

    Raises:
        ValueError: If the pipeline has no UNet or no diffusers LoRA loading.
    """
    if isinstance(pipeline, SafetyAdapterMixin):
        return pipeline
    missing = [name for name in ("unet", "load_lora_weights", "set_adapters") if not hasattr(pipeline, name)]
    if missing or getattr(pipeline, "unet", None) is None:
        raise ValueError(
            f"{type(pipeline).__name__} cannot take a safety adapter: it lacks {missing or ['a UNet']}; expected a "
            "Stable Diffusion 1.x/2.x or SDXL pipeline."
        )
    known = {
        StableDiffusionPipeline: StableDiffusionSafePipeline,
        StableDiffusionXLPipeline: StableDiffusionXLSafePipeline,
    }
    cls = type(pipeline)
    pipeline.__class__ = known.get(cls) or type(f"{cls.__name__}WithSafetyAdapter", (SafetyAdapterMixin, cls), {})
    return pipeline
