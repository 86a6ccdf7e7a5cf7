"""What every prompt writer shares: the request it answers (`PairRequest`), its answer (`WrittenPairs`), the protocol
it follows (`PromptWriter`) and the error that stops a build (`PromptWriterError`).

The writers themselves are in `safety_dpo.data.writers` (the template writer, `load_prompt_writer`) and
`safety_dpo.data.llm_writers` (language models); both build on this module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from safety_dpo.data.taxonomy import Category, Concept


@dataclass(frozen=True)
class PairRequest:
    """What the builder asks a writer for.

    Attributes:
        concept: The harmful concept (with its names, description and category).
        category: Its category (id and description).
        counterpart: The safe name that should replace the concept (a hint for language models).
        num_pairs: How many pairs to write.
        seed: Seed for this request; the same request with the same seed should give the same answer.
    """

    concept: Concept
    category: Category
    counterpart: str
    num_pairs: int
    seed: int


@dataclass
class WrittenPairs:
    """A writer's answer: candidate (unsafe, safe) prompt tuples and unusable answers counted by reason."""

    candidates: list[tuple[str, str]] = field(default_factory=list)
    rejections: Counter[str] = field(default_factory=Counter)


@runtime_checkable
class PromptWriter(Protocol):
    """The protocol every prompt writer follows.

    `name` is recorded in the dataset card ("template", "transformers:Qwen/Qwen2.5-7B-Instruct", ...);
    `to_dict()` returns every setting that changes what the writer writes, for the build's fingerprint.
    """

    name: str

    def write(self, request: PairRequest) -> WrittenPairs: ...

    def to_dict(self) -> dict[str, Any]: ...


class PromptWriterError(RuntimeError):
    """A writer cannot go on (e.g. its server stays unreachable after the retries)."""
