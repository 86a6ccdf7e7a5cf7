"""Hub cards and pushes: the one place where safety_dpo renders cards and talks to the Hugging Face Hub.

- `render_model_card` / `render_dataset_card` fill the Jinja templates of `safety_dpo.hub_cards` (the adapter card and
  the CoProV2 dataset card) with `huggingface_hub`'s `ModelCard.from_template` / `DatasetCard.from_template`.
- `push_folder` creates a repo if needed and uploads a folder to it in one commit.
- `ensure_local_or_download` turns "a local folder or a Hub id" into a local folder, the way every loader takes it.

Endpoint, token and offline mode come from `huggingface_hub`'s usual settings (`HF_ENDPOINT`, `HF_TOKEN`,
`HF_HUB_OFFLINE`); nothing here downloads unless asked to.
"""

from __future__ import annotations

import importlib.resources
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)

RepoType = Literal["model", "dataset"]

ADAPTER_CARD_TEMPLATE = "adapter_card.md"
DATASET_CARD_TEMPLATE = "coprov2_card.md"
_TEMPLATE_PACKAGE = "safety_dpo.hub_cards"
_REPO_TYPES: tuple[str, ...] = ("model", "dataset")

# Metadata every safety_dpo card carries, merged with (and ahead of) the caller's tags.
_ADAPTER_TAGS = ["safety_dpo", "safety", "lora", "text-to-image", "stable-diffusion", "diffusers"]
_DATASET_TAGS = ["safety_dpo", "safety", "preference", "text-to-image", "not-for-all-audiences"]


def hub_id_or_none(name: Any) -> str | None:
    """`name` when it reads as a Hub repo id ("org/name", not an existing local path), else None: cards link Hub
    ids in their metadata (`base_model`, `datasets`), never local folders."""
    if isinstance(name, str) and name.count("/") == 1 and not Path(name).exists():
        return name
    return None


def render_model_card(
    template: str = ADAPTER_CARD_TEMPLATE,
    *,
    extra_metadata: Mapping[str, Any] | None = None,
    **card_data_and_vars: Any,
) -> ModelCard:
    """Render a model card (by default the SafetyDPO adapter card) from a `safety_dpo.hub_cards` template.

    Keyword arguments named like a `ModelCardData` field (`license`, `base_model`, `datasets`, `tags`,
    `library_name`, `pipeline_tag`, `model_name`, ...) go into the card's YAML metadata; all others are template
    variables. The adapter card reads `repo_id`, `description`, `categories`, `concepts` (category -> names, or a
    list), `weight_name`, `training_config`, `merge_config` (dicts), `evaluation` (metric -> value, or a list of row
    dicts), `evaluation_notes` and `limitations`; every one of them is optional.

    Args:
        template: A template name in `safety_dpo.hub_cards` (e.g. "adapter_card.md") or a path to a Jinja markdown file.
        extra_metadata: YAML metadata beyond `ModelCardData`'s named fields (e.g. `instance_prompt`).
        **card_data_and_vars: Card metadata fields and template variables.

    Returns:
        The rendered card; `card.save(path)` writes it, `card.push_to_hub(repo_id)` uploads it.

    Raises:
        ValueError: If `template` is neither a template name of the package nor an existing file.
    """
    metadata, variables = _split_card_fields(ModelCardData, card_data_and_vars)
    metadata = {"library_name": "diffusers", "pipeline_tag": "text-to-image", **metadata}
    metadata["tags"] = _merge_tags(_ADAPTER_TAGS, metadata.get("tags"))
    card_data = ModelCardData(**metadata, **(extra_metadata or {}))
    return ModelCard.from_template(card_data, template_str=_read_template(template), **variables)


def render_dataset_card(
    template: str = DATASET_CARD_TEMPLATE,
    *,
    extra_metadata: Mapping[str, Any] | None = None,
    **card_data_and_vars: Any,
) -> DatasetCard:
    """Render a dataset card (by default the CoProV2 card) from a `safety_dpo.hub_cards` template.

    Keyword arguments named like a `DatasetCardData` field (`license`, `pretty_name`, `task_categories`,
    `size_categories`, `language`, ...) or `tags` go into the card's YAML metadata; all others are template
    variables. The CoProV2 card reads `repo_id`, `description`, `generator_model`, `prompt_writer`, `num_pairs`,
    `category_counts` (category -> pairs), `concepts` (category -> names), `rejections` (reason -> pairs) and
    `build_config` (a dict); every one of them is optional.

    Args:
        template: A template name in `safety_dpo.hub_cards` (e.g. "coprov2_card.md") or a path to a Jinja markdown
            file.
        extra_metadata: YAML metadata beyond `DatasetCardData`'s named fields, e.g. the `configs` and
            `dataset_info` blocks that `datasets.Dataset.push_to_hub` writes, to keep them when replacing its card.
        **card_data_and_vars: Card metadata fields and template variables.

    Returns:
        The rendered card.

    Raises:
        ValueError: If `template` is neither a template name of the package nor an existing file.
    """
    metadata, variables = _split_card_fields(DatasetCardData, card_data_and_vars, also=("tags",))
    metadata = {"task_categories": ["text-to-image"], **metadata}
    metadata["tags"] = _merge_tags(_DATASET_TAGS, metadata.get("tags"))
    card_data = DatasetCardData(**metadata, **(extra_metadata or {}))
    return DatasetCard.from_template(card_data, template_str=_read_template(template), **variables)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: RepoType = "model",
    commit_message: str = "Upload with safety_dpo",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Create `repo_id` if it does not exist and upload the contents of `folder` to it in one commit.

    Args:
        folder: A local directory; its files land at the root of the repo, sub-folders included.
        repo_id: The Hub repo, "namespace/name".
        repo_type: "model" (adapters) or "dataset".
        commit_message: The commit's title.
        private: Visibility when the repo is created; None keeps the Hub's default. An existing repo is left as is.
        token: A Hub token; None uses the logged-in one (`HF_TOKEN` or `hf auth login`).
        revision: The branch to commit to (it must exist); None commits to main.

    Returns:
        The URL of the commit.

    Raises:
        NotADirectoryError: If `folder` is not a directory.
        ValueError: If `repo_type` is not "model" or "dataset".
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"push_folder: folder={str(folder)!r} is not a directory; pass the folder to upload.")
    _check_repo_type(repo_type)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, repo_type=repo_type, commit_message=commit_message, revision=revision
    )
    return str(commit.commit_url)


def ensure_local_or_download(
    path_or_repo_id: str | Path,
    repo_type: RepoType = "model",
    allow_patterns: list[str] | str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Return a local folder for `path_or_repo_id`: the folder itself, or a snapshot of the Hub repo it names.

    Args:
        path_or_repo_id: A local directory, or a Hub repo id ("namespace/name").
        repo_type: "model" or "dataset", for a repo id.
        allow_patterns: Glob patterns of the repo files to download (e.g. "*.safetensors"); None downloads all.
        **hub_kwargs: More `huggingface_hub.snapshot_download` arguments (`revision`, `token`, `cache_dir`,
            `local_files_only`, ...).

    Returns:
        The local directory: `path_or_repo_id` unchanged if it is one, otherwise the downloaded snapshot.

    Raises:
        ValueError: If `repo_type` is not "model" or "dataset".
        FileNotFoundError: If `path_or_repo_id` is neither a local directory nor a repo id that can be reached (or
            found in the cache when offline). The message names the input and the Hub's reason.
    """
    _check_repo_type(repo_type)
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    try:
        snapshot = snapshot_download(
            repo_id=str(path_or_repo_id), repo_type=repo_type, allow_patterns=allow_patterns, **hub_kwargs
        )
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"{str(path_or_repo_id)!r} is neither a local directory nor a reachable {repo_type} repo id on the Hub "
            f"({type(error).__name__}: {reason}). Pass an existing directory or a 'namespace/name' repo id."
        ) from error
    return Path(snapshot)


def _read_template(template: str) -> str:
    """Return the text of a packaged card template, or of a template file given by path."""
    if template.endswith(".md") and "/" not in template and "\\" not in template:
        packaged = importlib.resources.files(_TEMPLATE_PACKAGE) / template
        if packaged.is_file():
            return packaged.read_text(encoding="utf-8")
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = sorted(entry.name for entry in importlib.resources.files(_TEMPLATE_PACKAGE).iterdir())
    available = [name for name in names if name.endswith(".md")]
    raise ValueError(
        f"Card template {template!r} is neither a template of {_TEMPLATE_PACKAGE} ({', '.join(available)}) "
        "nor an existing file."
    )


def _split_card_fields(
    card_data_class: type, values: Mapping[str, Any], also: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into the card data class's named fields (plus `also`) and template variables."""
    parameters = inspect.signature(card_data_class.__init__).parameters
    fields = {name for name, parameter in parameters.items() if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = (fields - {"ignore_metadata_errors"}) | set(also)
    metadata = {key: value for key, value in values.items() if key in fields}
    variables = {key: value for key, value in values.items() if key not in fields}
    return metadata, variables


def _merge_tags(defaults: list[str], tags: str | list[str] | None) -> list[str]:
    extra = [tags] if isinstance(tags, str) else list(tags or [])
    return list(dict.fromkeys([*defaults, *extra]))


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type={repo_type!r} is not supported; expected one of {', '.join(_REPO_TYPES)}.")
