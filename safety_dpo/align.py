"""`safety-dpo align`: the whole SafetyDPO method in one call, resumable stage by stage.

```
OUTPUT_DIR/align.json             the settings of this alignment and, per finished stage, its wall time
OUTPUT_DIR/data/                  1. CoProV2: (safe, unsafe) image pairs drawn by the model (`CoProV2Builder`)
OUTPUT_DIR/experts/<category>/    2. one safety expert per category (`SafetyDPOTrainer`)
OUTPUT_DIR/safety-adapter/        3. the experts merged into one adapter (`co_merge`), with its card
OUTPUT_DIR/evaluation/            4. base vs aligned (`run_evaluation`): results.json, report.md, grids, charts
OUTPUT_DIR/summary.md             the table printed at the end
```

Every stage resumes where it stopped (each one through its own resumable writer), and a finished stage is skipped.
A rerun with other settings in the same folder is refused, listing the differences, so nothing is mixed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safety_dpo.data.build_dir import write_text
from safety_dpo.folder_lock import FolderLock, folder_contents
from safety_dpo.threads import adapt_threads

logger = logging.getLogger(__name__)

STAGES = ("data", "experts", "merge", "evaluate")
ALIGN_FILE = "align.json"
ADAPTER_DIR = "safety-adapter"

# The microworld's experts: the strongest erasure of the settings measured in docs/training.md (cross-attention K/V,
# beta 250, lr 3e-3, 300 steps of 8 pairs); the paper's settings barely move this small model in minutes.
MICROWORLD_TRAINING: dict[str, Any] = {
    "max_steps": 300,
    "learning_rate": 3e-3,
    "beta": 250.0,
    "target_modules": ["attn2.to_k", "attn2.to_v"],
    "rank": 16,
    "rpo_alpha": 100.0,
    "preservation_weight": 30.0,
}
# The microworld's merge: element-wise Co-Merge. With the specific experts above, row-wise Co-Merge (the library's
# default, exact for any experts) keeps only a seventh of each expert's rows and leaves IP at 0.25; element-wise keeps
# each expert's largest weights (IP 0.07 at the same fidelity), and the sum of the experts' ranks covers every K/V
# layer of the microworld, so its SVD storage is exact (docs/results.md, merging ablation).
MICROWORLD_MERGE: dict[str, Any] = {"granularity": "element"}
# Real models on one GPU: the SafetyDPO authors' launchers (examples/train_safety_expert.py, docs/gpu.md): batch
# 4 x 4 accumulated, 2000 steps, their lr 1e-5 scaled by the total batch, beta_dpo 5000 = our beta 2500 (the default).
PAPER_TRAINING: dict[str, Any] = {
    "max_steps": 2000,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "learning_rate": 1.6e-4,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 500,
    "gradient_checkpointing": True,
    "save_steps": 500,
}


def align(
    output_dir: str | os.PathLike = "safety-dpo-align",
    model: str | None = None,
    categories: Sequence[str] | None = None,
    prompt_writer: str = "template",
    merge_method: str = "co_merge",
    *,
    pairs_per_concept: int = 10,
    training: dict[str, Any] | None = None,
    training_flags: Sequence[str] | None = None,
    evaluation_prompts: str | None = None,
    evaluation: dict[str, Any] | None = None,
    llm_model: str | None = None,
    seed: int = 0,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build CoProV2, train one expert per category, merge them with Co-Merge, evaluate base vs aligned.

    Args:
        output_dir: Where everything goes; an interrupted alignment resumes there.
        model: A Stable Diffusion 1.x/2.x or SDXL pipeline (path or Hub id); None: the microworld.
        categories: Harm categories to remove; None: all of the taxonomy's.
        prompt_writer: "template" (the microworld's grammar), "transformers:MODEL_ID" or "openai:BASE_URL".
        merge_method: `CoMergeConfig.method`: "co_merge" (default) or a baseline ("cat", "ties", ...). Co-Merge
            uses `MICROWORLD_MERGE` (element-wise) in the microworld and `CoMergeConfig`'s defaults (row-wise) for a
            real model.
        pairs_per_concept: CoProV2 prompt pairs per concept.
        training: `SafetyDPOConfig` fields for every expert, over the defaults (`MICROWORLD_TRAINING` in the
            microworld, `PAPER_TRAINING` otherwise).
        training_flags: The same as command-line flags (["--learning_rate", "1e-4"]); they win over `training`.
        evaluation_prompts: The evaluation's prompt source; None: "microworld", or the test split of this
            alignment's own CoProV2 build for a real model.
        evaluation: More `run_evaluation` arguments (detectors, images_per_prompt, clip_model, ...).
        llm_model: Model name for an "openai:" prompt writer.
        seed: Seed of the data build (images, split) and of the merge; training uses `SafetyDPOConfig.seed`.
        push_to_hub: Upload the merged adapter (with its card and evaluation) to this Hub repo at the end.
        progress: Show progress bars.

    Returns:
        The summary: per stage its wall time, the adapter's folder, and the headline evaluation numbers.
    """
    from safety_dpo.trainer.config import given_training_flags

    output_dir = Path(output_dir)
    training_settings = {
        **(PAPER_TRAINING if model is not None else MICROWORLD_TRAINING),
        **(training or {}),
        **given_training_flags(training_flags or []),  # bad flags fail here, before any work
    }
    settings = {
        "model": model,
        "categories": sorted(categories) if categories else None,
        "prompt_writer": prompt_writer,
        "merge_method": merge_method,
        "pairs_per_concept": pairs_per_concept,
        "training": training_settings,
        "evaluation_prompts": evaluation_prompts,
        "evaluation": evaluation or {},
        "llm_model": llm_model,
        "seed": seed,
    }
    from safety_dpo.merging import CoMergeConfig

    merge_settings = MICROWORLD_MERGE if model is None and merge_method == "co_merge" else {}
    settings["merge"] = dict(merge_settings)
    merge_config = CoMergeConfig(method=merge_method, seed=seed, **merge_settings)  # bad input fails before any work
    from safety_dpo.data.builder import check_build_settings

    check_build_settings(model, categories=categories, pairs_per_concept=pairs_per_concept)  # before any write
    with FolderLock(output_dir, "safety-dpo align"):
        return _align(
            output_dir, model, categories, prompt_writer, pairs_per_concept, training_settings, merge_config,
            evaluation_prompts, evaluation, llm_model, seed, push_to_hub, progress, settings,
        )  # fmt: skip


def _align(
    output_dir, model, categories, prompt_writer, pairs_per_concept, training_settings, merge_config,
    evaluation_prompts, evaluation, llm_model, seed, push_to_hub, progress, settings,
) -> dict[str, Any]:  # fmt: skip
    state = _claim(output_dir, settings)
    data_dir, experts_dir = output_dir / "data", output_dir / "experts"
    adapter_dir, evaluation_dir = output_dir / ADAPTER_DIR, output_dir / "evaluation"

    with _stage(output_dir, state, "data", 1):
        from safety_dpo.data import CoProV2Builder

        builder = CoProV2Builder(
            model,
            prompt_writer=prompt_writer,
            categories=list(categories) if categories else None,
            pairs_per_concept=pairs_per_concept,
            seed=seed,
            llm_model=llm_model,
        )
        dataset = builder.build(data_dir, progress=progress)
    chosen = sorted(set(dataset["train"]["category"]))
    with _stage(output_dir, state, "experts", 2):
        from safety_dpo.trainer.experts import train_experts

        for index, category in enumerate(chosen, start=1):
            logger.info("Expert %d/%d: %s", index, len(chosen), category)
            adapt_threads()
            train_experts(
                data_dir,
                experts_dir / category,
                model=model,
                category=category,
                disable_tqdm=not progress,
                **training_settings,
            )
    with _stage(output_dir, state, "merge", 3):
        from safety_dpo.merging import co_merge

        if "merge" not in state["stages"] or not (adapter_dir / "safety_dpo.json").is_file():
            merged = co_merge([experts_dir / category for category in chosen], merge_config, pipeline=model)
            merged.save_pretrained(adapter_dir)
    with _stage(output_dir, state, "evaluate", 4):
        from safety_dpo.evaluation.runner import run_evaluation

        prompts = evaluation_prompts or (None if model is None else f"coprov2-test:{data_dir}")
        results = run_evaluation(
            evaluation_dir,
            model=model,
            safety_adapter=adapter_dir,
            prompts=prompts,
            progress=progress,
            **(evaluation or {}),
        )
        _add_evaluation_to_card(adapter_dir, results)
    summary = _summary(output_dir, state, chosen)
    write_text(output_dir / "summary.md", render_summary(summary))
    if push_to_hub:
        from safety_dpo.hub import push_folder

        summary["pushed"] = push_folder(adapter_dir, push_to_hub, commit_message="Upload SafetyDPO safety adapter")
    return summary


# -------------------------------------------------------------------------------------------------- stages, state
def _claim(output_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The alignment's state, created with `settings` or read back; other settings are refused."""
    from safety_dpo.data.build_dir import differences, write_json

    path = output_dir / ALIGN_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        differing = differences(state["settings"], settings)
        if differing:
            raise FileExistsError(
                f"{str(output_dir)!r} holds an alignment with other settings (" + "; ".join(differing) + "); use "
                "another --output-dir, or the same settings to resume it."
            )
        return state
    for leftover in output_dir.glob(f"{ALIGN_FILE}.tmp-*"):  # a kill between writing align.json and renaming it
        leftover.unlink()
    if folder_contents(output_dir):
        raise FileExistsError(
            f"{str(output_dir)!r} exists and is not an alignment folder (no {ALIGN_FILE}); choose another --output-dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "stages": {}}
    write_json(path, state)
    return state


class _stage:
    """Run one stage: announce it, time it, record it as finished in align.json. A finished stage runs again only
    to read back its result (each stage's own writer skips work that is done)."""

    def __init__(self, output_dir: Path, state: dict[str, Any], name: str, number: int) -> None:
        self.output_dir, self.state, self.name, self.number = output_dir, state, name, number

    def __enter__(self) -> None:
        done = self.name in self.state["stages"]
        logger.info(
            "Stage %d/%d: %s%s", self.number, len(STAGES), self.name, " (finished; reading it back)" if done else ""
        )
        adapt_threads()  # the cores other processes left free now (only where the CLI enabled it: threads.py)
        self.start = time.perf_counter()

    def __exit__(self, error_type, *_: Any) -> None:
        from safety_dpo.data.build_dir import write_json

        if error_type is not None or self.name in self.state["stages"]:
            return
        self.state["stages"][self.name] = {"seconds": round(time.perf_counter() - self.start, 1)}
        write_json(self.output_dir / ALIGN_FILE, self.state)


def _add_evaluation_to_card(adapter_dir: Path, results: dict[str, Any]) -> None:
    """Put the headline numbers into the adapter's card and safety_dpo.json."""
    from safety_dpo.hub import markdown_code, markdown_text
    from safety_dpo.trainer.adapter_io import read_metadata, write_metadata

    metadata = read_metadata(adapter_dir) or {}
    metadata["evaluation"] = headline(results)
    write_metadata(adapter_dir, metadata)
    card = adapter_dir / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8").split("\n## Evaluation (safety-dpo align)")[0].rstrip()
        rows = "\n".join(
            f"| {markdown_text(key)} | {_format(value)} |" for key, value in metadata["evaluation"].items()
        )
        text += (
            "\n\n## Evaluation (safety-dpo align)\n\n"
            f"Prompts: {markdown_code(results['prompts']['source'])}, detectors: "
            + ", ".join(markdown_code(spec) for spec in results["protocol"]["detectors"])
            + "; the full report is `evaluation/report.md` of the alignment folder.\n\n| metric | value |\n| --- | --- |\n"
            + rows
            + "\n"
        )
        write_text(card, text)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader asks for first: IP per subset (base, aligned, ratio), fidelity, what the adapter left
    unchanged and what it replaced (microworld), collateral IP, CLIPScore, FID, prompt agreement."""
    models, numbers = results["models"], {}
    ip_key, frechet = results["metrics"]["ip"], results["metrics"]["frechet"]
    ip = "IP" if ip_key == "ip" else ip_key  # a share named by its detectors is not called IP
    for subset, entry in models["base"][ip_key]["per_subset"].items():
        aligned = models["aligned"][ip_key]["per_subset"][subset]["value"]
        numbers[f"{ip} {subset}: base"] = entry["value"]
        numbers[f"{ip} {subset}: aligned"] = aligned
        numbers[f"{ip} {subset}: aligned / base"] = results["comparison"]["ip_ratio"].get(subset)
    if "microworld" in models["aligned"]:
        for variant in ("base", "aligned"):
            neutral = models[variant]["microworld"].get("neutral", {})
            numbers[f"neutral fidelity: {variant}"] = neutral.get("concept_rate")
            numbers[f"prompt agreement (neutral): {variant}"] = neutral.get("prompt_agreement")
        numbers["neutral fidelity: aligned / base"] = results["comparison"]["concept_rate_ratio"].get("neutral")
        aligned = models["aligned"]["microworld"]
        numbers["neutral images unchanged from the base (concepts, scene, colour)"] = aligned.get("neutral", {}).get(
            "base_agreement"
        )
        for subset in ("unsafe", "unsafe_held_out"):
            if subset in aligned:
                numbers[f"redirect rate {subset}: aligned"] = aligned[subset].get("redirect_rate")
    for subset, entry in (results["comparison"].get("collateral_ip") or {}).items():
        numbers[f"collateral IP {subset} (categories not targeted): aligned / base"] = entry["pooled"]["ratio"]
    if "clip_score" in models["aligned"]:
        for variant in ("base", "aligned"):
            numbers[f"CLIPScore: {variant}"] = models[variant]["clip_score"]["value"]
            for subset, value in models[variant]["clip_score"].get("per_subset_safe_prompt", {}).items():
                numbers[f"CLIPScore with the safe prompt, {subset}: {variant}"] = value
    for variant in ("base", "aligned"):
        distance = ((models[variant].get(frechet) if frechet else None) or {}).get("reference")
        if distance is not None:
            numbers[f"{frechet} to reference: {variant}"] = distance["value"]  # fid, fd_clip or fd_judge
    return numbers


def _summary(output_dir: Path, state: dict[str, Any], categories: list[str]) -> dict[str, Any]:
    results = json.loads((output_dir / "evaluation" / "results.json").read_text())
    return {
        "output_dir": str(output_dir),
        "adapter": str(output_dir / ADAPTER_DIR),
        "categories": categories,
        "stages": state["stages"],
        "total_seconds": round(sum(stage["seconds"] for stage in state["stages"].values()), 1),
        "evaluation": headline(results),
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The summary as markdown tables: stages and their wall time, then the headline numbers."""
    total = summary["total_seconds"] or 1.0
    lines = [
        "# safety-dpo align",
        "",
        f"Safety adapter: `{summary['adapter']}` ({len(summary['categories'])} categories: "
        + ", ".join(summary["categories"])
        + ")",
        "",
        "| stage | wall time (s) | share |",
        "| --- | --- | --- |",
    ]
    for name in STAGES:
        seconds = summary["stages"].get(name, {}).get("seconds")
        shown = "-" if seconds is None else f"{seconds:.1f}"
        lines.append(f"| {name} | {shown} | {_format(seconds / total if seconds else None, percent=True)} |")
    lines += [f"| total | {summary['total_seconds']:.1f} | |", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_format(value)} |" for key, value in summary["evaluation"].items()]
    return "\n".join(lines) + "\n"


def _format(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{100 * value:.0f} %"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
