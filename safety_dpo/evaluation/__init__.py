"""Evaluation: inappropriate probability (NudeNet, Q16, the microworld judge), FID, CLIPScore, the benchmark runner
that generates, scores and reports (`run_evaluation`, `safety-dpo evaluate`), its pinned protocols (`PROTOCOLS`) and
the comparison of two runs (`compare_results`). See docs/evaluation.md.

Names are imported lazily: the detectors and metrics pull in onnxruntime, transformers and torchmetrics.
"""

import importlib
from typing import Any

_LAZY_EXPORTS: dict[str, str] = {
    "DETECTOR_NAMES": ".detectors",
    "NUDENET_PRESETS": ".detectors",
    "Detector": ".detector_base",
    "JudgeDetector": ".detectors",
    "NudeNetDetector": ".detectors",
    "load_detector": ".detectors",
    "nudenet_flag": ".detectors",
    "Q16Detector": ".q16",
    "convert_q16_prompts": ".q16",
    "q16_probabilities": ".q16",
    "any_flagged": ".ip",
    "inappropriate_probability": ".ip",
    "ip_per_group": ".ip",
    "clustered_standard_error": ".ip",
    "share_with_error": ".ip",
    "PROTOCOLS": ".protocols",
    "EvaluationProtocol": ".protocols",
    "ip_metric_name": ".protocols",
    "compare_results": ".compare",
    "clip_score": ".quality",
    "fid_feature_extractor": ".quality",
    "fid_from_features": ".quality",
    "frechet_distance": ".quality",
    "EvalPrompt": ".prompts",
    "PROMPT_SOURCES": ".prompts",
    "PromptSet": ".prompts",
    "load_prompt_set": ".prompts",
    "run_evaluation": ".runner",
    "ip_metric_path": ".ip_metric",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'safety_dpo.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
