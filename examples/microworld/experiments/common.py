"""What the microworld experiments share: data, experts, merges and measurements, each resumable and reused.

Every experiment measures with the benchmark runner (`run_evaluation`) on the protocol's test prompts and seeds,
the same measurement as docs/results.md. The base model is drawn once per prompt set and its images shared by
every adapter's evaluation (`evaluate`), so an experiment pays only for the aligned images.

Settings: `MICROWORLD_TRAINING` (the defaults of `safety-dpo align`) unless an experiment varies them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safety_dpo.align import MICROWORLD_TRAINING
from safety_dpo.data.build_dir import write_json
from safety_dpo.evaluation.prompts import PromptSet, load_prompt_set
from safety_dpo.evaluation.runner import run_evaluation


# ------------------------------------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, type=Path, help="Where everything goes; reruns resume.")
    parser.add_argument("--dataset", type=Path, help="A CoProV2 build to reuse (default: built in OUTPUT_DIR).")
    parser.add_argument("--categories", help="Comma-separated categories (default: the experiment's).")
    parser.add_argument("--pairs-per-concept", type=int, default=10, help="Pairs per concept of a new build.")
    parser.add_argument("--max-steps", type=int, default=MICROWORLD_TRAINING["max_steps"], help="Steps per expert.")
    parser.add_argument("--limit", type=int, help="Evaluate only the first N test prompts per subset (tests).")


def categories_of(args: argparse.Namespace, default: Sequence[str] | None = None) -> list[str]:
    from safety_dpo.microworld import taxonomy

    if args.categories:
        return args.categories.split(",")
    return list(default) if default is not None else [category.id for category in taxonomy().categories]


def training(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    return {**MICROWORLD_TRAINING, "max_steps": args.max_steps, **overrides}


# ------------------------------------------------------------------------------------------------- data, experts
def build_data(directory: Path, categories: Sequence[str], pairs_per_concept: int, seed: int = 0) -> Path:
    """A CoProV2 build of the microworld (resumable; a finished build is read back)."""
    from safety_dpo.data import CoProV2Builder

    CoProV2Builder(categories=list(categories), pairs_per_concept=pairs_per_concept, seed=seed).build(
        directory, progress=False
    )
    return directory


def train_expert(
    dataset: Any, output_dir: Path, categories: Sequence[str], settings: dict[str, Any], concepts=None
) -> Path:
    """One LoRA on `categories` (one category: an expert), optionally on some of their concepts only; a finished
    expert is reused, an interrupted one resumes."""
    from safety_dpo.trainer.experts import load_pairs, train_experts

    pairs = load_pairs(dataset)
    if concepts is not None:
        chosen = set(concepts)
        pairs = pairs.filter(lambda row: row["concept"] in chosen)
    selector = {"category": categories[0]} if len(categories) == 1 else {"categories": list(categories)}
    # The dataset's folder goes into the expert's safety_dpo.json, where Co-Merge finds its calibration prompts.
    name = {"dataset_name": str(dataset)} if isinstance(dataset, (str, os.PathLike)) else {}
    train_experts(pairs, output_dir, disable_tqdm=True, **selector, **name, **settings)
    return output_dir


def merge(experts: Sequence[Path], output_dir: Path, **config: Any) -> Path:
    """Merge experts (co_merge or a baseline) into `output_dir`, unless a merge is already there. Pass
    `calibration_dataset`: the dataset an expert names may be a path relative to where it was trained."""
    from safety_dpo.merging import CoMergeConfig, co_merge

    if not (output_dir / "safety_dpo.json").is_file():
        co_merge(list(experts), CoMergeConfig(**config)).save_pretrained(output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------------- measuring
def protocol_prompt_set(categories: Sequence[str] | None, limit: int | None) -> PromptSet:
    """The microworld's test prompts (unsafe, unsafe_held_out, neutral), harmful ones of `categories` only."""
    return load_prompt_set("microworld", categories=categories, limit=limit)


def evaluate(
    adapter: Path | None, output_dir: Path, prompts: PromptSet, base_dir: Path, **sampling: Any
) -> dict[str, Any]:
    """`run_evaluation` of base vs `adapter` into `output_dir`, reusing the base images and scores of `base_dir`.

    The base images are linked in from `base_dir` (an evaluation of the base alone on the same prompt set), so the
    runner finds them cached; their generation.json makes it refuse them if the settings ever differ. `sampling`:
    `run_evaluation`'s sampling options (`guidance_scale`, `scheduler`, ...), the same for base and adapter.
    """
    if not (base_dir / "results.json").is_file():
        run_evaluation(base_dir, prompts=prompts, progress=False, **sampling)
    if adapter is None:
        return json.loads((base_dir / "results.json").read_text())
    link_base(base_dir, output_dir)
    return run_evaluation(output_dir, safety_adapter=adapter, prompts=prompts, progress=False, **sampling)


def link_base(source_dir: Path, output_dir: Path) -> None:
    """Let an evaluation in `output_dir` find the base images and scores of `source_dir` (the same prompts and
    seeds, in the same order: the runner refuses them otherwise)."""
    for part in ("images", "scores"):
        (output_dir / part).mkdir(parents=True, exist_ok=True)
        link = output_dir / part / "base"
        if not link.exists():
            os.symlink((source_dir / part / "base").resolve(), link, target_is_directory=True)


def row(name: str, results: dict[str, Any], variant: str = "aligned", **extra: Any) -> dict[str, Any]:
    """The numbers every experiment table shows, for one model."""
    model = results["models"][variant]
    base = results["models"]["base"]
    per_subset = model["ip"]["per_subset"]
    neutral = model["microworld"]["neutral"]["concept_rate"]
    entry = {
        "name": name,
        **extra,
        "ip_trained": per_subset.get("unsafe", {}).get("value"),  # None when a subset has no prompt (a tiny --limit)
        "ip_held_out": per_subset.get("unsafe_held_out", {}).get("value"),
        "ip_per_category": {k: v["value"] for k, v in per_subset.get("unsafe", {}).get("per_category", {}).items()},
        "neutral_fidelity": neutral,
        "neutral_fidelity_ratio": neutral / base["microworld"]["neutral"]["concept_rate"],
        "fd_judge": model["fd_judge"]["reference"]["value"],
        "prompt_agreement_neutral": model["microworld"]["neutral"]["prompt_agreement"],
    }
    for subset, values in per_subset.items():  # experiments with their own subsets (e.g. removed / kept concepts)
        entry[f"ip_{subset}"] = values["value"]
    return entry


# ------------------------------------------------------------------------------------------------------- tables
def write_table(
    output_dir: Path, title: str, command: str, rows: list[dict[str, Any]], columns: dict[str, str], notes: str = ""
) -> str:
    """Write `table.md` and `table.json` (the rows, with the command that made them); returns the markdown."""
    lines = [f"# {title}", "", f"`{command}`", "", "| " + " | ".join(columns.values()) + " |"]
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for entry in rows:
        lines.append("| " + " | ".join(_cell(entry.get(key)) for key in columns) + " |")
    markdown = "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"
    (output_dir / "table.md").write_text(markdown, encoding="utf-8")
    write_json(output_dir / "table.json", {"title": title, "command": command, "rows": rows})
    return markdown


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


class Timer:
    """Seconds spent, for the tables."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_: Any) -> None:
        self.seconds = round(time.perf_counter() - self.start, 1)
