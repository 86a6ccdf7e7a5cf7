"""Safe pipelines: `SafetyAdapterMixin` (`pipe.load_safety_adapter(...)`), `StableDiffusionSafePipeline`,
`StableDiffusionXLSafePipeline`, and `enable_safety_adapters` for a pipeline that already exists. Their
`save_pretrained` writes a folder that stock diffusers loads, with the safety adapters saved beside it or recorded in
the UNet's config. See docs/inference.md.
"""

from safety_dpo.pipelines.mixin import SafetyAdapterMixin
from safety_dpo.pipelines.safe_pipelines import (
    StableDiffusionSafePipeline,
    StableDiffusionXLSafePipeline,
    enable_safety_adapters,
)

__all__ = [
    "SafetyAdapterMixin",
    "StableDiffusionSafePipeline",
    "StableDiffusionXLSafePipeline",
    "enable_safety_adapters",
]
