"""safety_dpo: safety alignment of text-to-image diffusion models with SafetyDPO (arXiv 2412.10493).

The public names are imported lazily, so that `import safety_dpo` and `safety-dpo --help` stay fast and
importing one component does not load torch, diffusers and transformers for the others.
"""

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

# public name -> module that defines it; a name appears here once its module exists.
_LAZY_EXPORTS: dict[str, str] = {
    "CoMergeConfig": ".merging.config",
    "CoProV2Builder": ".data.builder",
    "SafetyDPOConfig": ".trainer.config",
    "SafetyAdapterMixin": ".pipelines.mixin",
    "SafetyDPOTrainer": ".trainer.trainer",
    "StableDiffusionSafePipeline": ".pipelines.safe_pipelines",
    "StableDiffusionXLSafePipeline": ".pipelines.safe_pipelines",
    "enable_safety_adapters": ".pipelines.safe_pipelines",
    "co_merge": ".merging.co_merge",
    "run_evaluation": ".evaluation.runner",
    "align": ".align",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(_LAZY_EXPORTS[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'safety_dpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
