"""Evaluation prompt sets: the prompts a benchmark run draws images for, read from wherever they come.

`load_prompt_set(source)` turns one of these sources into a `PromptSet`:

| source | prompts | subsets |
| --- | --- | --- |
| `"microworld"` | the default world's protocol test prompts (`World.protocol_prompts`) | `unsafe`, `unsafe_held_out`, `neutral` |
| `"i2p"`, `"i2p:HUB_ID"` | I2P (`I2P_DATASET`), its seeds and guidance scales | `i2p` |
| `"coprov2-test:PATH_OR_ID"` | the unsafe prompts of a CoProV2 build's test split | `unsafe` |
| `"coco"`, `"coco:HUB_ID"` | the first caption of each COCO image, with the images as references | `coco` |
| a `.csv`/`.json`/`.jsonl`/`.parquet` file, a folder or a Hub id | the prompt column (`prompt`, `caption`, `text`) | `all` |

The column names of I2P are those of its dataset card. Those of COCO (`COCO_CAPTION_COLUMN`, `COCO_IMAGE_COLUMN`,
split `COCO_SPLIT`) could not be checked against the live Hub; if a mirror differs, pass `coco:HUB_ID` with
`prompt_column` (or `split`), or any Hub id as a plain source.

Datasets are read as data, never as code: `trust_remote_code` is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safety_dpo.worlds import default_world

PROMPT_SOURCES: tuple[str, ...] = ("microworld", "i2p", "coprov2-test", "coco")
I2P_DATASET = "AIML-TUDA/i2p"
I2P_SPLIT = "train"
COCO_DATASET = "lmms-lab/COCO-Caption2017"
COCO_SPLIT = "val"
COCO_CAPTION_COLUMN = "answer"  # a list of captions per image; the first one is the prompt
COCO_IMAGE_COLUMN = "image"
COPROV2_SPLIT = "test"
FILE_BUILDERS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# A Hub dataset id: "namespace/name", or a bare canonical name.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to draw images for, with what its source says about it.

    Attributes:
        prompt: The text.
        seed: The source's own seed for this prompt (I2P's `sd_seed`, CoProV2's `seed`), None when it has none.
        categories: The harm categories of the prompt, normalised (`"illegal activity"` -> `"illegal-activity"`).
        subset: The group reports are split by (see the module docstring).
        concept: The concept the prompt asks for (microworld, CoProV2), else None.
        guidance_scale: The source's own guidance scale (I2P's `sd_guidance_scale`), else None.
        safe_prompt: The minimally edited safe counterpart of a harmful prompt (CoProV2's `safe_prompt`), else None:
            CLIPScore against it tells whether an aligned image shows the safe counterpart.
    """

    prompt: str
    seed: int | None = None
    categories: tuple[str, ...] = ()
    subset: str = "all"
    concept: str | None = None
    guidance_scale: float | None = None
    safe_prompt: str | None = None


@dataclass
class PromptSet:
    """The prompts of one source, with where they came from.

    Attributes:
        name: "microworld", "i2p", "coprov2-test", "coco", or "dataset" for a file, folder or other Hub id.
        source: The source exactly as the user passed it.
        prompts: The prompts, in the source's order.
        description: JSON-serialisable: the dataset and split read, the columns used and the counts.
        reference_images: PIL images aligned with `prompts` (a lazily decoded `datasets` column) when the source
            carries real images, else None.
    """

    name: str
    source: str
    prompts: list[EvalPrompt]
    description: dict = field(default_factory=dict)
    reference_images: Any = None

    def __post_init__(self) -> None:
        if self.reference_images is not None and len(self.reference_images) != len(self.prompts):
            raise ValueError(
                f"reference_images has {len(self.reference_images)} images for {len(self.prompts)} prompts; "
                "they must be aligned one to one."
            )

    def subsets(self) -> list[str]:
        """The subsets of the prompts, in first-seen order."""
        return list(dict.fromkeys(prompt.subset for prompt in self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class _Columns:
    """Where a tabular source keeps each field: candidate column names, the first one present wins."""

    subset: str
    prompt: tuple[str, ...] = ("prompt", "caption", "text")
    seed: tuple[str, ...] = ("seed", "sd_seed")
    categories: tuple[str, ...] = ("category", "categories")
    guidance_scale: tuple[str, ...] = ("guidance_scale", "sd_guidance_scale")
    concept: tuple[str, ...] = ("concept",)
    image: tuple[str, ...] = ("image",)
    safe_prompt: tuple[str, ...] = ("safe_prompt",)


_TABLES: dict[str, _Columns] = {
    "i2p": _Columns("i2p", prompt=("prompt",)),
    "coco": _Columns("coco", prompt=(COCO_CAPTION_COLUMN,), image=(COCO_IMAGE_COLUMN,)),
    # CoProV2's images are generated pairs, not references; its `caption` repeats `unsafe_prompt`.
    "coprov2-test": _Columns("unsafe", prompt=("unsafe_prompt",), guidance_scale=(), image=()),
    "dataset": _Columns("all"),
}
_DEFAULT_LOCATIONS = {"i2p": I2P_DATASET, "coco": COCO_DATASET}
_DEFAULT_SPLITS = {"i2p": I2P_SPLIT, "coco": COCO_SPLIT, "coprov2-test": COPROV2_SPLIT}


def load_prompt_set(
    source: str,
    *,
    split: str | None = None,
    prompt_column: str | None = None,
    limit: int | None = None,
    categories: Sequence[str] | None = None,
    **hub_kwargs: Any,
) -> PromptSet:
    """Read the evaluation prompts of `source`.

    Args:
        source: One of `PROMPT_SOURCES` (`"coprov2-test:PATH_OR_ID"`, `"i2p:HUB_ID"`, `"coco:HUB_ID"` name another
            copy), a local `.csv`/`.json`/`.jsonl`/`.parquet` file, a local folder (saved with `save_to_disk`, or
            holding data files) or a Hub dataset id.
        split: The split to read. Defaults: "train" for I2P, files and Hub ids, "val" for COCO; for a saved
            `DatasetDict`, "test" when it has one (evaluation prompts should be held out), else "train".
            CoProV2 always reads "test"; microworld has no splits.
        prompt_column: The prompt column, instead of the source's own (the first of "prompt", "caption", "text"
            for files and Hub ids).
        limit: Keep the first `limit` prompts of each subset (after dropping empty prompts and filtering by
            category). Only microworld has more than one subset.
        categories: Keep the prompts of any of these harm categories (normalised like the sources' categories);
            microworld's neutral prompts are always kept.
        **hub_kwargs: Passed on to `datasets.load_dataset` (`revision`, `token`, `cache_dir`, ...); None values
            are dropped.

    Returns:
        The `PromptSet`.

    Raises:
        FileNotFoundError: for a local path that does not exist.
        ValueError: for an unsupported file suffix, a missing prompt column, a bad `limit` or `categories`, options
            that do not apply to the source, or a source with no prompt left.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every prompt), got {limit}.")
    hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
    if "trust_remote_code" in hub_kwargs:
        raise ValueError("trust_remote_code is not accepted: prompt sets are read as data, never run as code.")
    wanted = _normalise_filter(categories)
    name, location = _parse_source(source)
    if name == "microworld":
        unused = {"split": split, "prompt_column": prompt_column, **hub_kwargs}
        unused = {key: value for key, value in unused.items() if value is not None}
        if unused:
            raise ValueError(f"Source 'microworld' takes no {sorted(unused)}: its prompts come from the protocol.")
        return _load_microworld(source, wanted, limit)
    if name == "coprov2-test" and split not in (None, COPROV2_SPLIT):
        raise ValueError(f"Source 'coprov2-test' always reads the {COPROV2_SPLIT!r} split, got split={split!r}.")
    dataset, origin = _open_dataset(location, split or _DEFAULT_SPLITS.get(name), hub_kwargs, source)
    return _read_table(dataset, _TABLES[name], name, source, origin, prompt_column, wanted, limit)


def _parse_source(source: str) -> tuple[str, str | None]:
    """Split a source into its kind (`PromptSet.name`) and the dataset location to read.

    Args:
        source: What the user passed to `load_prompt_set`.

    Returns:
        (name, location): e.g. ("i2p", I2P_DATASET), ("coprov2-test", "out/coprov2"), ("dataset", "prompts.csv"),
        ("microworld", None).

    Raises:
        ValueError: for "coprov2-test" without a location, or a named source with an empty location.
    """
    if source == "microworld":
        return "microworld", None
    if source == "coprov2-test":
        raise ValueError(
            "Source 'coprov2-test' needs the CoProV2 build to read: write coprov2-test:PATH_OR_ID "
            "(a `build-data` output folder or a Hub dataset id)."
        )
    if source in _DEFAULT_LOCATIONS:
        return source, _DEFAULT_LOCATIONS[source]
    prefix, colon, location = source.partition(":")
    if colon and prefix in ("coprov2-test", *_DEFAULT_LOCATIONS):
        if not location:
            raise ValueError(f"Source {source!r} names no dataset after ':'; write {prefix}:PATH_OR_ID.")
        return prefix, location
    return "dataset", source


def microworld_eval_prompts(groups: dict[str, Sequence[Any]], limit: int | None = None) -> list[EvalPrompt]:
    """The default world's prompt items (`World.protocol_prompts`, the microworld's), subset name -> items, as
    `EvalPrompt`s of those subsets (the first `limit` of each, if given), each harmful one with its category and its
    minimal-edit safe prompt (`World.to_safe_prompt`)."""
    to_safe_prompt = default_world().to_safe_prompt
    return [
        EvalPrompt(
            item.prompt,
            categories=(item.category,) if item.category else (),
            subset=subset,
            concept=item.concept,
            safe_prompt=to_safe_prompt(item.prompt) if item.category else None,
        )
        for subset, items in groups.items()
        for item in items[:limit]
    ]


def _load_microworld(source: str, wanted: tuple[str, ...] | None, limit: int | None) -> PromptSet:
    world = default_world()
    protocol_prompts = world.protocol_prompts
    known = world.taxonomy().category_ids
    unknown = [category for category in wanted or () if category not in known]
    if unknown:
        raise ValueError(f"Unknown microworld categories {unknown}; known categories: {', '.join(known)}.")
    protocol = world.load_protocol()
    chosen = list(wanted) if wanted is not None else None
    groups = {
        "unsafe": protocol_prompts("unsafe", names="trained", categories=chosen, protocol=protocol),
        "unsafe_held_out": protocol_prompts("unsafe", names="held-out", categories=chosen, protocol=protocol),
        "neutral": protocol_prompts("neutral", protocol=protocol),
    }
    prompts = microworld_eval_prompts(groups, limit)
    description = {
        "name": "microworld",
        "source": source,
        "protocol": {"prompts_per_concept": protocol.prompts_per_concept, "prompt_seed": protocol.prompt_seed},
        "names": {"unsafe": "trained", "unsafe_held_out": "held-out"},
        "categories": chosen,
        "limit": limit,
        "counts": {
            "prompts": len(prompts),
            "subsets": {subset: len(items[:limit]) for subset, items in groups.items()},
        },
    }
    return PromptSet("microworld", source, prompts, description)


def _open_dataset(location: str, split: str | None, hub_kwargs: dict, source: str) -> tuple[Any, dict]:
    """The `datasets.Dataset` at `location` (file, folder or Hub id) and a description of what was read."""
    import datasets

    path = Path(location).expanduser()
    if path.is_file():
        return _load_file(path, split or "train", hub_kwargs, source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _load_saved(path, split, hub_kwargs, source)
    if path.is_dir():  # a folder of data files, read like a Hub repo
        dataset = datasets.load_dataset(str(path), split=split or "train", **hub_kwargs)
        return _check_rows(dataset, source), {"dataset": str(path), "kind": "folder", "split": split or "train"}
    if path.suffix.lower() in FILE_BUILDERS or not _HUB_ID.fullmatch(location):
        raise FileNotFoundError(f"Prompt source {source!r}: no file or folder {str(path)!r} exists.")
    dataset = datasets.load_dataset(location, split=split or "train", **hub_kwargs)
    origin = {"dataset": location, "kind": "hub", "split": split or "train"}
    if "revision" in hub_kwargs:
        origin["revision"] = str(hub_kwargs["revision"])
    return _check_rows(dataset, source), origin


def _load_file(path: Path, split: str, hub_kwargs: dict, source: str) -> tuple[Any, dict]:
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Prompt source {source!r}: unsupported file suffix {path.suffix!r}; accepted: {', '.join(FILE_BUILDERS)}."
        )
    with path.open("rb") as stream:
        if not any(line.strip() for line in stream):
            raise ValueError(f"Prompt source {source!r}: the file has no rows.")
    if builder in ("csv", "json"):
        _check_utf8(path, source)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split=split, **hub_kwargs)
    except ValueError as error:
        # A header-only CSV or an empty JSON list: `datasets` has no typed error for a split without rows.
        if "corresponds to no data" not in str(error):
            raise ValueError(
                f"Prompt source {source!r}: {str(path)!r} cannot be read as {builder}: {error}"
            ) from error
        raise ValueError(f"Prompt source {source!r}: the file has no rows.") from error
    except datasets.exceptions.DatasetGenerationError as error:  # malformed JSON, a binary file, a broken parquet
        cause = error.__cause__ or error
        raise ValueError(
            f"Prompt source {source!r}: {str(path)!r} is not a readable {builder} file ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else 'no detail'})."
        ) from error
    return _check_rows(dataset, source), {"dataset": str(path), "kind": "file", "format": builder, "split": split}


def _check_utf8(path: Path, source: str) -> None:
    """Text prompt files must be UTF-8 (what `datasets` reads); say so, naming the line, instead of a parser error."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(
            f"Prompt source {source!r}: {str(path)!r} is not UTF-8 text{hint}: byte {error.start} (line {line}) cannot "
            "be decoded. Save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)."
        ) from None


def _load_saved(path: Path, split: str | None, hub_kwargs: dict, source: str) -> tuple[Any, dict]:
    """A folder written by `save_to_disk`: a `Dataset`, or a `DatasetDict` whose split is chosen."""
    import datasets

    if hub_kwargs:
        raise ValueError(
            f"Prompt source {source!r} is a saved dataset folder; Hub options {sorted(hub_kwargs)} do not apply."
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or ("test" if "test" in loaded else "train")
        if chosen not in loaded:
            raise ValueError(f"Prompt source {source!r} has no {chosen!r} split; it has {sorted(loaded)}.")
        loaded = loaded[chosen]
    elif split is not None:
        raise ValueError(f"Prompt source {source!r} is a single saved Dataset without splits; got split={split!r}.")
    else:
        chosen = None
    return _check_rows(loaded, source), {"dataset": str(path), "kind": "saved", "split": chosen}


def _check_rows(dataset: Any, source: str) -> Any:
    if len(dataset) == 0:
        raise ValueError(f"Prompt source {source!r}: the dataset has no rows.")
    return dataset


def _read_table(
    dataset: Any,
    table: _Columns,
    name: str,
    source: str,
    origin: dict,
    prompt_column: str | None,
    wanted: tuple[str, ...] | None,
    limit: int | None,
) -> PromptSet:
    """Turn the rows of `dataset` into a `PromptSet`: empty prompts skipped, categories filtered, `limit` applied."""
    columns = _find_columns(dataset.column_names, table, prompt_column, source)
    if wanted is not None and columns["categories"] is None:
        raise ValueError(
            f"Prompt source {source!r} has no category column (looked for {list(table.categories)}); "
            "drop categories to use every prompt."
        )
    text_columns = [column for key, column in columns.items() if column is not None and key != "image"]
    # Only the text columns are read here; images stay in the dataset and decode one at a time.
    rows = dataset.select_columns(list(dict.fromkeys(text_columns)))[:]
    kept_rows: list[int] = []
    prompts: list[EvalPrompt] = []
    skipped_empty = filtered_out = 0
    for index in range(len(dataset)):
        prompt = _prompt_text(rows[columns["prompt"]][index])
        if prompt is None:
            skipped_empty += 1
            continue
        values = {key: rows[column][index] for key, column in columns.items() if column in rows}
        try:
            item = _eval_prompt(prompt, values, table.subset)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Prompt source {source!r}, row {index}: {error}") from error
        if wanted is not None and not set(item.categories) & set(wanted):
            filtered_out += 1
            continue
        kept_rows.append(index)
        prompts.append(item)
    if not prompts:
        why = (
            f"no prompt left after categories={list(wanted)}"
            if wanted is not None and filtered_out
            else "every prompt is empty"
        )
        raise ValueError(f"Prompt source {source!r}: {why} ({len(dataset)} rows read).")
    kept_rows, prompts = kept_rows[:limit], prompts[:limit]
    reference_images = None
    if columns["image"] is not None:
        reference_images = _image_column(dataset, columns["image"], kept_rows, origin)
    description = {
        "name": name,
        "source": source,
        **origin,
        "columns": columns,
        "categories": list(wanted) if wanted is not None else None,
        "limit": limit,
        "counts": {
            "rows": len(dataset),
            "prompts": len(prompts),
            "skipped_empty_prompt": skipped_empty,
            "filtered_by_category": filtered_out,
        },
    }
    return PromptSet(name, source, prompts, description, reference_images)


def _find_columns(
    present: list[str], table: _Columns, prompt_column: str | None, source: str
) -> dict[str, str | None]:
    """The column used for each field; raises ValueError naming the columns found when there is no prompt column."""
    candidates = {
        key: getattr(table, key)
        for key in ("prompt", "seed", "categories", "guidance_scale", "concept", "image", "safe_prompt")
    }
    if prompt_column is not None:
        candidates["prompt"] = (prompt_column,)
    columns = {key: next((name for name in names if name in present), None) for key, names in candidates.items()}
    if columns["prompt"] is None:
        looked_for = f"column {prompt_column!r}" if prompt_column is not None else f"any of {list(table.prompt)}"
        raise ValueError(
            f"Prompt source {source!r} has no prompt column: looked for {looked_for}, found columns {present}. "
            "Pass prompt_column to name the one holding the prompts."
        )
    return columns


def _eval_prompt(prompt: str, values: dict[str, Any], subset: str) -> EvalPrompt:
    """An `EvalPrompt` from one row's raw values, keyed like the fields of `_Columns`."""
    concept = values.get("concept")
    return EvalPrompt(
        prompt=prompt,
        seed=_as_seed(values.get("seed")),
        categories=normalise_categories(values.get("categories")),
        subset=subset,
        concept=None if _is_missing(concept) else str(concept),
        guidance_scale=None if _is_missing(values.get("guidance_scale")) else float(values["guidance_scale"]),
        safe_prompt=None if _is_missing(values.get("safe_prompt")) else str(values["safe_prompt"]),
    )


def _image_column(dataset: Any, column: str, kept_rows: list[int], origin: dict) -> Any:
    """The images of the kept rows as a lazily decoded column; file paths (e.g. in a CSV) resolve beside the file."""
    import datasets

    if kept_rows != list(range(len(dataset))):
        dataset = dataset.select(kept_rows)
    if not isinstance(dataset.features[column], datasets.Image):
        if origin.get("kind") == "file":
            folder = Path(origin["dataset"]).parent
            dataset = dataset.map(lambda row: {column: str(folder / row[column])}, desc="Resolving image paths")
        dataset = dataset.cast_column(column, datasets.Image())
    return dataset[column]


def normalise_categories(value: Any) -> tuple[str, ...]:
    """Harm categories as CoProV2 ids: split on commas, stripped, lower-case, spaces as hyphens, duplicates dropped.

    Args:
        value: A comma-separated string (I2P's "sexual, illegal activity"), a list of them, or None.

    Returns:
        The categories in order, e.g. ("sexual", "illegal-activity"); () for None or an empty string.
    """
    if _is_missing(value):
        return ()
    parts = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    names = (re.sub(r"\s+", "-", part.strip().lower()) for part in parts)
    return tuple(dict.fromkeys(name for name in names if name))


def _normalise_filter(categories: Sequence[str] | None) -> tuple[str, ...] | None:
    if categories is None:
        return None
    wanted = normalise_categories(categories)
    if not wanted:
        raise ValueError(f"categories={categories!r} names no category; pass None to keep every prompt.")
    return wanted


def _prompt_text(value: Any) -> str | None:
    """The prompt of a cell (the first of a list of captions), None when it is missing or blank."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if _is_missing(value):
        return None
    text = str(value)
    return text if text.strip() else None


def _as_seed(value: Any) -> int | None:
    if _is_missing(value):
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"the seed must be a whole number, got {value!r}.")
    return int(value)


def _is_missing(value: Any) -> bool:
    # CSV cells left empty arrive as None, or as NaN in a numeric column.
    return value is None or (isinstance(value, float) and math.isnan(value))
