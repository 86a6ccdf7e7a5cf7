"""A finished CoProV2 build's card, and its upload to the Hub.

Both read what the build wrote (`build_report.json`, with the settings it was built with), so a build is described
and published the same way whichever `CoProV2Builder` object asks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safety_dpo.data.build_dir import REPORT_FILE, BuildDirectory


def read_report(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The `build_report.json` of a finished build.

    Raises:
        FileNotFoundError: If `output_dir` holds no finished build.
    """
    directory = BuildDirectory(output_dir)
    if not directory.is_finished or not (directory.path / REPORT_FILE).is_file():
        raise FileNotFoundError(
            f"No finished CoProV2 build in {str(directory.path)!r}; run CoProV2Builder.build(output_dir) first, or "
            "pass the output_dir of a finished build."
        )
    return json.loads((directory.path / REPORT_FILE).read_text())


def render_build_card(
    report: dict[str, Any],
    license: str | None = None,
    repo_id: str | None = None,
    local_path: str | os.PathLike | None = None,
):
    """The dataset card (`safety_dpo.hub_cards/coprov2_card.md`) of a build, from its report: the categories that
    were built (not the whole taxonomy's), and how to load it from `repo_id`, else from `local_path`."""
    from safety_dpo.hub import render_dataset_card

    settings = report["settings"]
    built = {category: count for category, count in report["category_counts"].items() if count}
    return render_dataset_card(
        repo_id=repo_id,
        local_path=str(local_path) if local_path is not None and repo_id is None else None,
        license=license,
        generator_model=report["generator_model"],
        prompt_writer=report["prompt_writer"],
        num_pairs=report["num_pairs"],
        category_counts=built,
        concepts={category: report["concepts"].get(category, []) for category in built},
        rejections=report["rejections"],
        build_config={
            "rows": report["num_rows"],
            "rows per split": report["split_rows"],
            **{key: settings[key] for key in ("pairs_per_concept", "images_per_prompt", "seed")},
            **{f"generation: {key}": value for key, value in (settings.get("generation") or {}).items()},
            "min_similarity": settings["min_similarity"],
        },
        size_categories=_size_category(report["num_rows"]),
    )


def push_build(
    output_dir: str | os.PathLike,
    repo_id: str,
    license: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Upload a finished build and its card to the dataset repo `repo_id`; returns the repo's URL."""
    from datasets import load_from_disk
    from huggingface_hub import HfApi

    report = read_report(output_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    # The card goes first: `DatasetDict.push_to_hub` then merges the dataset's metadata into it instead of
    # writing a card of its own.
    api.upload_file(
        path_or_fileobj=str(render_build_card(report, license, repo_id)).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Add the CoProV2 dataset card",
    )
    load_from_disk(str(Path(output_dir))).push_to_hub(repo_id, token=token, commit_message="Upload the CoProV2 build")
    return str(url)


def _size_category(num_rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if num_rows < limit:
            return label
    return "n>1M"
