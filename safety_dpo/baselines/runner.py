"""`make_baseline`: one call from a method name and the concepts to erase to a finished adapter folder.

Used by `safety-dpo baseline` and the experiments. The taxonomy is the default world's (the microworld's) when no
model is named, else the one given or CoProV2's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safety_dpo.baselines.concepts import ErasureTargets, erasure_targets

logger = logging.getLogger(__name__)

ADAPTER_METHODS = ("esd-u", "uce")  # the baselines that write an adapter; SLD is a sampling method (sld.py)
TIMING_NAME = "baseline_timing.json"  # wall time of the run that made the adapter (kept when it is reused)


def make_baseline(
    method: str,
    output_dir: str | os.PathLike,
    model: Any = None,
    categories: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
    taxonomy: Any = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Erase `categories` (None: all) / `concepts` (None: all of them) with an adapter baseline into `output_dir`.

    Args:
        method: "esd-u" or "uce".
        output_dir: The adapter folder; a finished adapter with the same settings is reused, an interrupted ESD-u run
            resumes.
        model: A Stable Diffusion pipeline, its path or Hub id; None: the default world (the microworld).
        categories, concepts: What to erase (trained names only; `concepts.erasure_targets`).
        taxonomy: A `Taxonomy` or the path of one; None: the default world's without a model, else CoProV2's.
        options: The method's config fields (`ESDConfig`, `UCEConfig`); for UCE also `guide`: "counterpart" (the
            safe counterpart's name) or "empty" (the empty prompt).
        progress: Show progress bars.

    Returns:
        `output_dir`.

    Raises:
        ValueError: For an unknown method or option, naming the accepted ones.
    """
    if method not in ADAPTER_METHODS:
        raise ValueError(
            f"method={method!r} is not a baseline that writes an adapter; choose one of {', '.join(ADAPTER_METHODS)} "
            "(SLD is a sampling method: `safety-dpo evaluate --method sld-strong`)."
        )
    targets = erasure_targets(resolve_taxonomy(taxonomy, model), categories, concepts)
    output_dir = Path(output_dir)
    start = time.perf_counter()
    if method == "esd-u":
        ran = _esd(targets, output_dir, model, dict(options or {}), progress)
    else:
        ran = _uce(targets, output_dir, model, dict(options or {}), progress)
    if ran or not (output_dir / TIMING_NAME).is_file():
        seconds = round(time.perf_counter() - start, 1)
        (output_dir / TIMING_NAME).write_text(json.dumps({"method": method, "seconds": seconds}) + "\n")
    return output_dir


def baseline_seconds(output_dir: str | os.PathLike) -> float | None:
    """The wall time recorded by the run that made the adapter in `output_dir` (None: not recorded)."""
    path = Path(output_dir) / TIMING_NAME
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def resolve_taxonomy(taxonomy: Any, model: Any) -> Any:
    from safety_dpo.data.taxonomy import Taxonomy, coprov2_taxonomy

    if isinstance(taxonomy, (str, os.PathLike)):
        return Taxonomy.from_file(taxonomy)
    if taxonomy is not None:
        return taxonomy
    if model is None:
        from safety_dpo.worlds import default_world

        return default_world().taxonomy()
    return coprov2_taxonomy()


def _config(config_class: type, options: dict[str, Any], method: str) -> Any:
    import dataclasses

    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{method} has no option(s) {unknown}; its options are {', '.join(sorted(known))}.")
    return config_class(**options)


def _esd(targets: ErasureTargets, output_dir: Path, model: Any, options: dict[str, Any], progress: bool) -> bool:
    from safety_dpo.baselines.esd import ESDConfig, train_esd_u

    finished = (output_dir / "safety_dpo.json").is_file()
    config = _config(ESDConfig, options, "esd-u")
    train_esd_u(
        targets.erase_prompts,
        output_dir,
        model=model,
        config=config,
        categories=targets.categories,
        concepts=targets.concepts,
        progress=progress,
    )
    return not finished


def _uce(targets: ErasureTargets, output_dir: Path, model: Any, options: dict[str, Any], progress: bool) -> bool:
    from safety_dpo.baselines.uce import UCEConfig, edit_uce

    guide = options.pop("guide", "counterpart")
    if guide not in ("counterpart", "empty"):
        raise ValueError(f"guide={guide!r} is not known; choose 'counterpart' or 'empty'.")
    finished = (output_dir / "safety_dpo.json").is_file()
    edit_uce(
        targets.erase_prompts,
        output_dir,
        model=model,
        guide_prompts=targets.guide_prompts if guide == "counterpart" else [""] * len(targets.erase_prompts),
        preserve_prompts=targets.preserve_prompts,
        config=_config(UCEConfig, options, "uce"),
        categories=targets.categories,
        concepts=targets.concepts,
        progress=progress,
    )
    return not finished
