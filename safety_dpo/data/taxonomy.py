"""The taxonomy of harmful concepts that SafetyDPO removes.

A taxonomy groups harmful concepts into categories (CoProV2 uses seven, see `CATEGORY_IDS`). Every harmful
concept carries:

- `names`: the words used in the prompts that the CoProV2 builder writes for training;
- `held_out_names`: synonyms never used in those prompts, to test whether an aligned model generalises
  beyond the words it was trained on;
- `counterpart`: the safe concept that replaces it in the minimally edited safe prompt (CoProV2's
  "holding a knife" -> "holding a spoon"). When it is the id of one of the taxonomy's neutral concepts, that
  concept's name is used; otherwise it is a plain name, given to an LLM prompt writer as a hint.

Neutral concepts are the harmless things prompts are also about; they measure whether alignment leaves
ordinary generation alone.

The same type is used by the microworld (`safety_dpo.microworld.taxonomy()`), by YAML/JSON files and by
Python code; `Taxonomy.from_file` / `Taxonomy.save` read and write both file formats.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATEGORY_IDS: tuple[str, ...] = (
    "hate",
    "harassment",
    "violence",
    "self-harm",
    "sexual",
    "shocking",
    "illegal-activity",
)
"""The seven CoProV2 categories, in the paper's order."""

_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Concept:
    """One concept: harmful (with a category and a counterpart) or neutral (category None).

    Args:
        id: Unique identifier, lowercase letters, digits, `-` and `_`.
        names: Names used in training prompts (at least one).
        held_out_names: Synonyms never used in training prompts.
        counterpart: For a harmful concept, the id of a neutral concept or a plain name that replaces it in
            the minimally edited safe prompt. None for neutral concepts.
        category: The category id of a harmful concept; None for neutral concepts.
        description: Free text, e.g. how the concept looks.
    """

    id: str
    names: tuple[str, ...]
    held_out_names: tuple[str, ...] = ()
    counterpart: str | None = None
    category: str | None = None
    description: str = ""

    @property
    def is_harmful(self) -> bool:
        return self.category is not None

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + self.held_out_names

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "names": list(self.names)}
        if self.held_out_names:
            data["held_out_names"] = list(self.held_out_names)
        if self.counterpart is not None:
            data["counterpart"] = self.counterpart
        if self.description:
            data["description"] = self.description
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], category: str | None = None, where: str = "concept") -> Concept:
        if not isinstance(data, dict) or "id" not in data:
            raise ValueError(f"{where}: expected a mapping with at least 'id' and 'names', got {data!r}.")
        unknown = set(data) - {"id", "names", "held_out_names", "counterpart", "description"}
        if unknown:
            raise ValueError(
                f"{where} {data['id']!r}: unknown keys {sorted(unknown)}; accepted keys are "
                "id, names, held_out_names, counterpart, description."
            )
        names = data.get("names") or [data["id"]]
        return cls(
            id=str(data["id"]),
            names=tuple(str(name) for name in _as_list(names, f"{where} {data['id']!r}: names")),
            held_out_names=tuple(
                str(name) for name in _as_list(data.get("held_out_names", []), f"{where} {data['id']!r}: held_out")
            ),
            counterpart=data.get("counterpart"),
            category=category,
            description=str(data.get("description", "")),
        )


@dataclass(frozen=True)
class Category:
    """A harm category and its concepts."""

    id: str
    concepts: tuple[Concept, ...]
    description: str = ""


@dataclass(frozen=True)
class Taxonomy:
    """Harm categories with their concepts, plus neutral concepts. Validated on construction.

    Raises:
        ValueError: naming the offending category, concept or name, when ids or names are not unique, a name
            is both trained and held out, a harmful concept has no counterpart, or a counterpart names a
            harmful concept.
    """

    categories: tuple[Category, ...]
    neutral: tuple[Concept, ...] = ()
    name: str = "custom"
    _by_id: dict[str, Concept] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError("The taxonomy is empty: it needs at least one category with at least one concept.")
        by_id: dict[str, Concept] = {}
        owner_of_name: dict[str, str] = {}
        seen_categories: set[str] = set()
        for category in self.categories:
            _check_id(category.id, "category id")
            if category.id in seen_categories:
                raise ValueError(f"Category {category.id!r} appears twice.")
            seen_categories.add(category.id)
            if not category.concepts:
                raise ValueError(f"Category {category.id!r} has no concepts.")
        for concept in self.concepts:
            _check_id(concept.id, "concept id")
            if concept.id in by_id:
                raise ValueError(f"Concept id {concept.id!r} appears twice.")
            by_id[concept.id] = concept
            if not concept.names:
                raise ValueError(f"Concept {concept.id!r} has no names.")
            overlap = set(concept.names) & set(concept.held_out_names)
            if overlap:
                raise ValueError(f"Concept {concept.id!r}: names {sorted(overlap)} are both trained and held out.")
            for name in concept.all_names:
                if not name.strip():
                    raise ValueError(f"Concept {concept.id!r} has an empty name.")
                key = name.lower()
                if key in owner_of_name and owner_of_name[key] != concept.id:
                    raise ValueError(f"Name {name!r} belongs to both {owner_of_name[key]!r} and {concept.id!r}.")
                owner_of_name[key] = concept.id
        for concept in self.harmful_concepts:
            if not concept.counterpart:
                raise ValueError(f"Harmful concept {concept.id!r} needs a safe counterpart.")
            target = by_id.get(concept.counterpart)
            if target is not None and target.is_harmful:
                raise ValueError(
                    f"Concept {concept.id!r}: its counterpart {concept.counterpart!r} is itself harmful "
                    f"(category {target.category!r})."
                )
        object.__setattr__(self, "_by_id", by_id)

    # ----------------------------------------------------------------------------------------- lookups
    @property
    def category_ids(self) -> tuple[str, ...]:
        return tuple(category.id for category in self.categories)

    @property
    def harmful_concepts(self) -> tuple[Concept, ...]:
        return tuple(concept for category in self.categories for concept in category.concepts)

    @property
    def concepts(self) -> tuple[Concept, ...]:
        """Every concept: harmful ones in category order, then neutral ones."""
        return self.harmful_concepts + self.neutral

    def concept(self, concept_id: str) -> Concept:
        """Return the concept with this id.

        Raises:
            KeyError: naming the id and listing the known ones.
        """
        try:
            return self._by_id[concept_id]
        except KeyError:
            raise KeyError(f"Unknown concept {concept_id!r}; known concepts: {', '.join(self._by_id)}.") from None

    def category(self, category_id: str) -> Category:
        """Return the category with this id, or raise a KeyError listing the known ones."""
        for category in self.categories:
            if category.id == category_id:
                return category
        raise KeyError(f"Unknown category {category_id!r}; known categories: {', '.join(self.category_ids)}.")

    def counterpart_name(self, concept: Concept | str, held_out: bool = False) -> str:
        """The name that replaces `concept` in its minimally edited safe prompt."""
        concept = self.concept(concept) if isinstance(concept, str) else concept
        if concept.counterpart is None:
            raise ValueError(f"Concept {concept.id!r} is neutral and has no counterpart.")
        target = self._by_id.get(concept.counterpart)
        return target.names[0] if target is not None else concept.counterpart

    def select(self, categories: list[str] | tuple[str, ...] | None) -> Taxonomy:
        """A taxonomy restricted to `categories` (all when None), neutral concepts kept.

        Raises:
            KeyError: for an unknown category, listing the known ones.
        """
        if categories is None:
            return self
        if not categories:
            raise ValueError(f"No category chosen; choose among {', '.join(self.category_ids)}.")
        chosen = tuple(self.category(category_id) for category_id in categories)
        return Taxonomy(categories=chosen, neutral=self.neutral, name=self.name)

    def select_concepts(self, concept_ids: list[str] | tuple[str, ...] | None) -> Taxonomy:
        """A taxonomy restricted to these harmful concepts (all when None); categories left empty are dropped.

        Raises:
            KeyError: for an unknown concept, listing the known ones.
            ValueError: for an empty list or a neutral concept.
        """
        if concept_ids is None:
            return self
        if not concept_ids:
            raise ValueError("No concept chosen; pass None to keep every concept.")
        chosen = {self.concept(concept_id).id for concept_id in concept_ids}
        neutral = sorted(chosen & {concept.id for concept in self.neutral})
        if neutral:
            raise ValueError(f"Concepts {neutral} are neutral; only harmful concepts can be chosen.")
        categories = (
            Category(category.id, tuple(c for c in category.concepts if c.id in chosen), category.description)
            for category in self.categories
        )
        return Taxonomy(tuple(c for c in categories if c.concepts), self.neutral, self.name)

    # ------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "categories": [
                {
                    "id": category.id,
                    **({"description": category.description} if category.description else {}),
                    "concepts": [concept.to_dict() for concept in category.concepts],
                }
                for category in self.categories
            ],
            "neutral": [concept.to_dict() for concept in self.neutral],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Taxonomy:
        """Build a taxonomy from the structure `to_dict` writes (and YAML/JSON files hold)."""
        if not isinstance(data, dict) or "categories" not in data:
            raise ValueError("A taxonomy must be a mapping with a 'categories' list (and optionally 'neutral').")
        categories = []
        for index, entry in enumerate(_as_list(data["categories"], "categories")):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"categories[{index}]: expected a mapping with 'id' and 'concepts', got {entry!r}.")
            concepts = tuple(
                Concept.from_dict(concept, category=entry["id"], where=f"category {entry['id']!r}: concept")
                for concept in _as_list(entry.get("concepts", []), f"category {entry['id']!r}: concepts")
            )
            categories.append(Category(id=entry["id"], concepts=concepts, description=entry.get("description", "")))
        neutral = tuple(
            Concept.from_dict(concept, where="neutral concept")
            for concept in _as_list(data.get("neutral", []), "neutral")
        )
        return cls(categories=tuple(categories), neutral=neutral, name=str(data.get("name", "custom")))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Taxonomy:
        """Read a taxonomy from a `.yaml`/`.yml` or `.json` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Taxonomy file {str(path)!r} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"Taxonomy file {str(path)!r} is not UTF-8 text ({error}).") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:  # its message names the line and column
                raise ValueError(f"Taxonomy file {str(path)!r} is not valid YAML: {error}") from None
        elif path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"Taxonomy file {str(path)!r} is not valid JSON: {error}") from None
        else:
            raise ValueError(f"Taxonomy file {str(path)!r}: unsupported extension; use .yaml, .yml or .json.")
        try:
            return cls.from_dict(data)
        except (ValueError, KeyError) as error:
            raise ValueError(f"Taxonomy file {str(path)!r}: {error}") from error

    def save(self, path: str | os.PathLike) -> None:
        """Write the taxonomy as YAML or JSON (by extension), atomically."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        elif path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            raise ValueError(f"Cannot save a taxonomy to {str(path)!r}: use a .yaml, .yml or .json file name.")
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise ValueError(
            f"Invalid {what} {value!r}: use lowercase letters, digits, '-' and '_', starting with a letter or digit."
        )


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")


def coprov2_taxonomy() -> Taxonomy:
    """The packaged default taxonomy for real models: CoProV2's seven categories, a few concepts each."""
    return Taxonomy.from_file(Path(__file__).with_name("coprov2_taxonomy.yaml"))
