"""Hub cards and pushes: the one place where safety_dpo renders cards and talks to the Hugging Face Hub.

- `render_model_card` / `render_dataset_card` fill the Jinja templates of `safety_dpo.hub_cards` (the adapter card and
  the CoProV2 dataset card) into `huggingface_hub` `ModelCard` / `DatasetCard` objects. Card values come from users
  and datasets (concept names, paths, model ids, licenses) and the cards are published, so every `{{ value }}` is
  escaped for markdown and HTML unless a filter renders it for its context (see `_card_environment`).
- `push_folder` creates a repo if needed and uploads a folder to it in one commit.
- `ensure_local_or_download` turns "a local folder or a Hub id" into a local folder, the way every loader takes it.

Endpoint, token and offline mode come from `huggingface_hub`'s usual settings (`HF_ENDPOINT`, `HF_TOKEN`,
`HF_HUB_OFFLINE`); nothing here downloads unless asked to.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import jinja2
import yaml
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)

from safety_dpo.worlds import MICROWORLD_NAME

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
    dicts), `evaluation_notes` and `limitations`; every one of them is optional. Values are escaped for their place
    in the card; `description`, `evaluation_notes` and `limitations` are the caller's markdown (`markdown_prose`),
    so values embedded in them should be wrapped with `markdown_code` or `markdown_text` first.

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
    variables.update(
        _loading_code(
            variables.pop("base_model_source", metadata.get("base_model")),
            variables.pop("adapter_source", None) or variables.get("repo_id"),
        )
    )
    metadata = {"library_name": "diffusers", "pipeline_tag": "text-to-image", **metadata}
    metadata["tags"] = _merge_tags(_ADAPTER_TAGS, metadata.get("tags"))
    card_data = ModelCardData(**metadata, **(extra_metadata or {}))
    return ModelCard(_render_card_text(card_data, _read_template(template), variables))


# Base models recorded by a name rather than a Hub id or a path, and how a card's code loads them.
_NAMED_BASE_MODELS = {MICROWORLD_NAME: ("from safety_dpo.microworld import checkpoint_path", "checkpoint_path()")}


def _loading_code(base_model: Any, adapter: Any) -> dict[str, Any]:
    """The Python of a card's "How to use": `base_import` (a line, or None), `base_code` and `adapter_code` (the
    expressions that name the base model and the adapter: a Hub id, a local path, or how a named model is found),
    None where the card's caller did not know them."""
    base_import, base_code = None, None
    if base_model in _NAMED_BASE_MODELS:
        base_import, expression = _NAMED_BASE_MODELS[base_model]
        base_code = _Rendered(expression)
    elif base_model:
        base_code = python_string(base_model)
    return {
        "base_import": _Rendered(base_import) if base_import else None,
        "base_code": base_code,
        "adapter_code": python_string(adapter) if adapter else None,
    }


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
    `build_config` (a dict); every one of them is optional. Values are escaped for their place in the card, as in
    `render_model_card`.

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
    return DatasetCard(_render_card_text(card_data, _read_template(template), variables))


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


# ------------------------------------------------------------------------------------------------ card rendering
class _Rendered(str):
    """Text a card filter already made safe for its place in the card; the environment's finalizer leaves it as is."""


# Characters that start markdown syntax inline: backslash first (it escapes the others), code, emphasis,
# strikethrough, links and images, headings, table cells, math. "_" only where it can emphasise (not inside a word).
_MARKDOWN_SPECIALS = re.compile(r"[\\`*~\[\]#|$]|(?<![^\W_])_|_(?![^\W_])")
_HTML_SPECIALS = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_NEWLINES = re.compile(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")
# What makes a line a block (heading, list, thematic break, setext underline, fence) when it starts one; ">" is an
# entity by then. An ordered list's marker is its "." or ")", not its digits.
_BLOCK_START = re.compile(r"^(\s*)([#+=*_~`-]|\d+(?=[.)]))")


def _escape_html(text: str) -> str:
    return re.sub(r"[&<>]", lambda match: _HTML_SPECIALS[match.group()], text)


def markdown_text(value: Any) -> str:
    """`value` as inert inline markdown: HTML special characters as entities, markdown syntax characters
    backslash-escaped, line breaks as spaces. Numbers and booleans are written as they are.

    Args:
        value: Any value; it is formatted with `str`.

    Returns:
        Text that renders as `value` and can sit in a paragraph, a heading, a list item or a table cell without
        starting a link, an HTML tag, a heading, a list, emphasis, code or a new table cell.
    """
    if isinstance(value, (bool, int, float)):
        return _Rendered(value)
    text = _NEWLINES.sub(" ", str(value))
    text = _MARKDOWN_SPECIALS.sub(lambda match: "\\" + match.group(), text)
    text = _BLOCK_START.sub(_escape_block_start, text, count=1)  # "-", "+", "=", "1." (the others are escaped)
    return _Rendered(_escape_html(text))


def markdown_prose(value: Any) -> str:
    """Markdown written by the caller (a description, a note) that may embed user values in code spans: HTML and
    link brackets are escaped and line breaks become spaces, but code spans and emphasis are kept, and a line-start
    block marker (heading, quote, list, rule) is escaped. Embed user values with `markdown_code` or
    `markdown_text` before passing them here."""
    text = _escape_html(_NEWLINES.sub(" ", str(value)))
    text = re.sub(r"[\[\]]", lambda match: "\\" + match.group(), text)
    return _Rendered(_BLOCK_START.sub(_escape_block_start, text, count=1))


def _escape_block_start(match: re.Match) -> str:
    indent, marker = match.groups()
    return f"{indent}{marker}\\" if marker[0].isdigit() else f"{indent}\\{marker}"


def markdown_code(value: Any) -> str:
    """`value` as a markdown code span that nothing in it can end: the fence is one backtick longer than the
    longest run of backticks in `value`, line breaks become spaces, and "|" is escaped so the span can sit in a
    table cell.

    Args:
        value: Any value; it is formatted with `str`.

    Returns:
        The code span, fences included (e.g. "`beta`", "`` a`b ``").
    """
    text = _NEWLINES.sub(" ", str(value)).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    if not text or text.startswith(("`", " ")) or text.endswith(("`", " ")):
        text = f" {text} "  # CommonMark strips one space at each end of a span, so the value keeps its own
    return _Rendered(f"{fence}{text}{fence}")


def python_string(value: Any) -> str:
    """`value` as a double-quoted Python string literal (for code blocks): no quote, backslash or line break in it
    can end the string or the code block."""
    return _Rendered(json.dumps(str(value)))


def readable_setting(value: Any) -> str:
    """A setting as a reader writes it, not as Python prints it: a mapping as `key: value, ...`, a list as
    `a, b`, nested ones in parentheses."""

    def nested(item: Any) -> str:
        text = readable_setting(item)
        return f"({text})" if isinstance(item, (Mapping, list, tuple)) and len(item) > 1 else text

    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {nested(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(nested(item) for item in value)
    return str(value)


def markdown_setting(value: Any) -> str:
    """`readable_setting` of `value` in a code span: a card's settings tables."""
    return markdown_code(readable_setting(value))


def hub_url(repo_id: Any, repo_type: RepoType = "model") -> str:
    """The Hub page of `repo_id`, percent-encoded so that the URL cannot end a markdown link early."""
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return _Rendered(f"https://huggingface.co/{prefix}{quote(str(repo_id), safe='/')}")


def markdown_join(values: Any, separator: str = ", ") -> str:
    """`markdown_text` of each value (or of a single string), joined by `separator`."""
    items = [values] if isinstance(values, str) or not isinstance(values, Iterable) else list(values)
    return _Rendered(separator.join(markdown_text(item) for item in items))


def _finalize(value: Any) -> Any:
    """Every `{{ value }}` of a card template that no card filter rendered is escaped as inline markdown text."""
    return value if isinstance(value, _Rendered) else markdown_text(value)


def _card_environment() -> jinja2.Environment:
    """The Jinja environment of the card templates: `markdown_text` for every plain `{{ value }}`, and filters
    for the places where a value needs another treatment: `code` (inside a code span), `setting` (a setting's value in
    a code span, lists and mappings written out), `prose` (caller-written markdown), `pystr` (a Python string in a code block), `hub_url` (a link target) and `md_join` (a list)."""
    environment = jinja2.Environment(finalize=_finalize)
    environment.filters.update(
        md=markdown_text,
        md_join=markdown_join,
        prose=markdown_prose,
        code=markdown_code,
        setting=markdown_setting,
        pystr=python_string,
        hub_url=hub_url,
    )
    return environment


def _front_matter(card_data: Any) -> str:
    """The card's YAML metadata, dumped with `yaml.safe_dump`: every string quoted as YAML needs, so that no value
    can end the front matter or add keys to it."""
    plain = json.loads(json.dumps(card_data.to_dict(), default=str))  # tuples as lists, paths as strings
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True).strip()


def _render_card_text(card_data: Any, template: str, variables: Mapping[str, Any]) -> str:
    """The card's text, as `RepoCard.from_template` renders it (metadata fields are template variables too, the
    caller's variables win), with the values escaped."""
    values = {**card_data.to_dict(), **variables}
    return _card_environment().from_string(template).render(card_data=_Rendered(_front_matter(card_data)), **values)


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
