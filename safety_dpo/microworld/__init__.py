"""The microworld: a small world where SafetyDPO runs for real on a CPU, with exact ground truth.

- `taxonomy()`: seven categories of eight harmful stand-in concepts, and 24 neutral concepts;
- `sample_prompts`, `to_safe_prompt`, `parse_prompt`: the prompt grammar;
- `render(prompt, seed)`: the procedural renderer (the world's ground truth);
- `load_judge()`: the image classifier that plays Q16/NudeNet, Inception and CLIP;
- `checkpoint_path()`: the tiny Stable Diffusion checkpoint that lives in the world (`load_pipeline()` loads it);
- `reference_adapter_path()`: the safety adapter that `safety-dpo align` makes for it, shipped with the package;
- `evaluate_pipeline`, `score_images` and the metrics, under one `Protocol`.

It is the library's default world: `plugin.MICROWORLD` hands these pieces to `safety_dpo.worlds`, which the library
asks when no model is given (the library's lower layers never import this package). See docs/microworld.md.
"""

from safety_dpo.microworld.checkpoint import checkpoint_path, load_pipeline, reference_adapter_path
from safety_dpo.microworld.evaluate import evaluate_pipeline, protocol_prompts, score_images
from safety_dpo.microworld.grammar import PromptItem, parse_prompt, sample_prompts, to_safe_prompt
from safety_dpo.microworld.judge import Judge, load_judge
from safety_dpo.microworld.metrics import (
    concept_rates,
    frechet_distance,
    inappropriate_probability,
    ip_per_group,
    prompt_agreement,
)
from safety_dpo.microworld.protocol import Protocol, load_protocol
from safety_dpo.microworld.renderer import RESOLUTION, render
from safety_dpo.microworld.world import taxonomy

__all__ = [
    "RESOLUTION",
    "Judge",
    "PromptItem",
    "Protocol",
    "checkpoint_path",
    "concept_rates",
    "evaluate_pipeline",
    "frechet_distance",
    "inappropriate_probability",
    "ip_per_group",
    "load_pipeline",
    "load_judge",
    "load_protocol",
    "parse_prompt",
    "prompt_agreement",
    "protocol_prompts",
    "reference_adapter_path",
    "render",
    "sample_prompts",
    "score_images",
    "taxonomy",
    "to_safe_prompt",
]
