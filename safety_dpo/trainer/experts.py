"""Training several experts in a row (`safety-dpo train --all-categories`), resumably, and loading the dataset.

An expert directory is finished when its `safety_dpo.json` exists: the final `save_model` writes it last, after the
weights, `training_settings.json` and the card (checkpoints write theirs inside `checkpoint-N/`). Before any work, a
run compares its training settings with those each directory recorded:

- a finished expert with the same settings is reused: nothing is trained, and `ExpertDirectories.reused` says so;
- an unfinished one resumes from its last complete checkpoint (the trainer sets incomplete ones aside), if that
  checkpoint recorded the same settings;
- other settings are refused with a `ValueError` that lists them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safety_dpo.trainer import adapter_io

if TYPE_CHECKING:
    from safety_dpo.trainer.config import SafetyDPOConfig

logger = logging.getLogger(__name__)


def load_pairs(dataset: Any, split: str | None = "train"):
    """A CoProV2 split from a `build-data` folder (`load_from_disk`), a saved `Dataset`, or a Hub id; with
    `split=None`, every split as a `DatasetDict` (a saved `Dataset` as its "train" split)."""
    import datasets

    if not isinstance(dataset, (str, os.PathLike)):
        return dataset
    path = Path(dataset).expanduser()
    if (path / "dataset_dict.json").is_file():
        splits = _load_from_disk(path)
        if split is None:
            return splits
        if split not in splits:
            raise ValueError(f"Dataset {str(path)!r} has no {split!r} split; it has {sorted(splits)}.")
        return splits[split]
    if (path / "dataset_info.json").is_file():
        single = _load_from_disk(path)
        return datasets.DatasetDict({"train": single}) if split is None else single
    if path.exists():
        raise ValueError(f"{str(path)!r} is neither a `build-data` output folder nor a saved datasets.Dataset.")
    return datasets.load_dataset(str(dataset), split=split)


def _load_from_disk(path: Path):
    """`datasets.load_from_disk`, with a damaged file (a truncated or corrupt arrow file, broken JSON) named."""
    import datasets
    import pyarrow

    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        arrow_files = sorted(str(file.relative_to(path)) for file in path.rglob("*.arrow"))
        raise ValueError(
            f"Dataset {str(path)!r} cannot be read ({type(error).__name__}: {error}); one of its files is damaged "
            f"(arrow files: {', '.join(arrow_files) or 'none'}). Build it again (`safety-dpo build-data` into a new "
            "folder) or copy it again."
        ) from error


class ExpertDirectories(list[Path]):
    """What `train_experts` returns: the experts' directories (a list of `Path`s, in training order), and in
    `reused` those that already held a finished expert trained with the same settings, into which nothing was
    trained."""

    def __init__(self, directories: Iterable[Path] = (), reused: Iterable[Path] = ()) -> None:
        super().__init__(directories)
        self.reused = list(reused)

    @property
    def trained(self) -> list[Path]:
        """The directories an expert was trained (or finished) into by this call."""
        return [directory for directory in self if directory not in self.reused]


def train_experts(
    dataset: Any,
    output_dir: str | os.PathLike,
    model: Any = None,
    category: str | None = None,
    categories: list[str] | None = None,
    all_categories: bool = False,
    max_steps: int | None = None,
    config_flags: list[str] | None = None,
    **config_kwargs: Any,
) -> ExpertDirectories:
    """Train one expert (`category`), one LoRA on several categories (`categories`), one expert per category
    (`all_categories`, into `output_dir/<category>/`), or, with none of them, one expert on every pair of the dataset.
    Finished experts trained with the same settings are reused; unfinished ones resume.

    A dataset in the published CoProV2 / Pick-a-Pic layout (`jpg_0`, `jpg_1`, `label_0`, `caption`) trains as it is:
    without a `category` column, `all_categories` trains one expert on all pairs (with a logged notice); without a
    `safe_prompt` column, `prompt_condition` falls back to "unsafe" (`data.effective_prompt_condition`), and the
    condition used is the one the experts record.

    Args:
        dataset: A CoProV2 `Dataset`, a `build-data` folder or a Hub id (its `train` split is used).
        output_dir: Where the expert(s) go.
        model: Pipeline, path or Hub id; None for the microworld.
        category, categories, all_categories: Which expert(s) to train (at most one of them; none: one expert on
            every pair, into `output_dir`).
        max_steps: Optimizer steps per expert.
        config_flags: Command-line flags of `SafetyDPOConfig` (e.g. ["--learning_rate", "1e-4"]).
        **config_kwargs: `SafetyDPOConfig` fields, in Python.

    Returns:
        The experts' directories; `.reused` lists those that were finished already, with these settings.

    Raises:
        ValueError: Before anything is written, for an invalid setting, a `category` or `categories` on a dataset
            without a `category` column, or a directory whose finished expert or last checkpoint recorded other
            training settings (listing them).
    """
    from safety_dpo.trainer.config import SafetyDPOConfig, given_training_flags
    from safety_dpo.trainer.data import effective_prompt_condition
    from safety_dpo.trainer.trainer import SafetyDPOTrainer, expert_training_settings

    chosen = [category is not None, categories is not None, all_categories]
    if sum(chosen) > 1:
        raise ValueError(
            "Choose at most one of category, categories or all_categories; none trains one expert on every pair."
        )
    flag_settings = given_training_flags(config_flags or [])  # bad flags fail first
    pairs = load_pairs(dataset)
    plan = _expert_plan(pairs, category, categories, all_categories, output_dir)
    requested = {**flag_settings, **config_kwargs}.get("prompt_condition", SafetyDPOConfig.prompt_condition)
    prompt_condition = effective_prompt_condition(pairs, requested)  # once: one notice, whatever the experts
    # 1. Every expert's settings, checked before anything is written
    experts = []
    for subdirectory, names in plan:
        expert_dir = Path(output_dir) / subdirectory if subdirectory else Path(output_dir)
        settings = dict(flag_settings)
        settings.update(output_dir=str(expert_dir), categories=names, **config_kwargs)
        settings["prompt_condition"] = prompt_condition  # what the dataset allows is what the expert records
        if max_steps is not None:
            settings["max_steps"] = max_steps
        if isinstance(dataset, (str, os.PathLike)) and settings.get("dataset_name") is None:
            settings["dataset_name"] = str(dataset)
        if subdirectory and settings.get("push_to_hub") and settings.get("hub_model_id"):
            # one repo per category expert ("org/experts-violence"), as each has a folder of its own here: one
            # repo for all would hold only the last expert pushed
            settings["hub_model_id"] = f"{settings['hub_model_id']}-{subdirectory}"
        experts.append((expert_dir, SafetyDPOConfig(**settings)))
    # 2. What each directory holds, against the training settings, before any work
    base_model, fingerprint = _base_model_name(model), getattr(pairs, "_fingerprint", None)
    reused = [
        expert_dir
        for expert_dir, args in experts
        if _is_finished(expert_dir, args, expert_training_settings(args, base_model, fingerprint))
    ]
    # 3. Training the others, one job per output folder (a second process is refused, naming this one)
    from safety_dpo.data.generation import process_state
    from safety_dpo.folder_lock import FolderLock

    main_process = process_state().is_main_process
    with FolderLock(output_dir, "safety-dpo train") if main_process else contextlib.nullcontext():
        for expert_dir, args in experts:
            if expert_dir in reused:
                _reuse(expert_dir, args)
                continue
            trainer = SafetyDPOTrainer(model=model, args=args, train_dataset=pairs)
            resume = bool(adapter_io.checkpoints(expert_dir))
            logger.info(
                "Training the expert for %s into %s%s.",
                args.categories or "every pair",
                expert_dir,
                " (resuming)" if resume else "",
            )
            trainer.train(resume_from_checkpoint=True if resume else None)
            trainer.save_state()  # trainer_state.json: the logged metrics, beside the adapter
            trainer.save_model()
    return ExpertDirectories([expert_dir for expert_dir, _ in experts], reused)


def _expert_plan(
    pairs, category: str | None, categories: list[str] | None, all_categories: bool, output_dir: str | os.PathLike
) -> list[tuple[str | None, list[str] | None]]:
    """The experts to train: (subdirectory of `output_dir` or None, categories or None for every pair).

    Raises:
        ValueError: If `category` or `categories` is given for a dataset without a `category` column.
    """
    columns = pairs.column_names
    if category is not None or categories is not None:
        argument = f"category={category!r}" if category is not None else f"categories={categories!r}"
        if "category" not in columns:
            raise ValueError(
                f"{argument}: the dataset has no 'category' column (it has {columns}), so its rows cannot be chosen "
                "by category. Leave it out to train one expert on all its pairs."
            )
        return [(None, [category] if category is not None else list(categories))]
    if "category" not in columns:
        if all_categories:
            logger.warning(
                "all_categories: the dataset has no 'category' column (it has %s); training one expert on all its "
                "pairs into %s.",
                columns,
                output_dir,
            )
        return [(None, None)]
    present = sorted(set(pairs["category"]))
    if all_categories:
        return [(name, [name]) for name in present]
    logger.warning(
        "No category, categories or all_categories: training one expert on all pairs, which mixes the dataset's "
        "categories %s. all_categories trains one expert per category, as SafetyDPO does before merging them.",
        present,
    )
    return [(None, None)]


def _is_finished(expert_dir: Path, args: SafetyDPOConfig, settings: dict[str, Any]) -> bool:
    """Whether `expert_dir` holds a finished expert trained with `settings`.

    Raises:
        ValueError: If its finished expert, or else its last complete checkpoint, recorded other settings.
    """
    if adapter_io.read_metadata(expert_dir) is not None:
        adapter_io.check_training_settings(expert_dir, settings)
        return True
    with_optimizer = adapter_io.saves_optimizer(args)
    for checkpoint in reversed(adapter_io.checkpoints(expert_dir)):
        if not adapter_io.checkpoint_gaps(checkpoint, with_optimizer):
            adapter_io.check_training_settings(checkpoint, settings)
            break
    return False


def _reuse(expert_dir: Path, args: SafetyDPOConfig) -> None:
    logger.info(
        "Expert %s is finished and was trained with these settings; nothing was trained, it is reused as it is.",
        expert_dir,
    )
    if not (expert_dir / "README.md").is_file():  # written before safety_dpo.json since; not by older versions
        logger.info("Writing the missing card (README.md) of %s.", expert_dir)
        adapter_io.write_card(expert_dir, adapter_io.read_metadata(expert_dir), repo_id=args.hub_model_id)
    if args.push_to_hub and args.should_save:  # asked for a push: the finished expert goes up as a trained one would
        _push_reused(expert_dir, args)


def _push_reused(expert_dir: Path, args: SafetyDPOConfig) -> None:
    """Push a reused expert as `SafetyDPOTrainer.push_to_hub` pushes a trained one: to `hub_model_id` (else the
    folder's name, as `Trainer` chooses), its card naming that repo, the expert's files only."""
    from huggingface_hub import HfApi

    from safety_dpo.trainer.hub_push import upload_expert

    repo_id = (
        HfApi(token=args.hub_token)
        .create_repo(
            args.hub_model_id or Path(args.output_dir).absolute().name,
            private=args.hub_private_repo,
            exist_ok=True,
            token=args.hub_token,
        )
        .repo_id
    )
    adapter_io.write_card(expert_dir, adapter_io.read_metadata(expert_dir), repo_id=repo_id)
    logs_root = expert_dir if args.push_logs else None
    upload_expert(
        expert_dir, repo_id, "Upload the finished expert", args.hub_token, args.hub_revision, True, logs_root
    )
    logger.info("Pushed the finished expert %s to %s.", expert_dir, repo_id)


def _base_model_name(model: Any) -> str:
    """The base model's name as `trainer.components.load_components` gives it, without loading the model."""
    from safety_dpo.worlds import default_world_name

    if model is None:
        return default_world_name()
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(model, "name_or_path", None) or type(model).__name__)
