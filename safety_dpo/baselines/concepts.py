"""What a baseline is asked to erase, read from a taxonomy: the prompts it erases, their guides and what it keeps.

SafetyDPO learns from CoProV2 image pairs; the baselines are given the same concepts as text, the way their papers
use them: ESD-u and UCE erase a concept's *name* ("nudity", "Van Gogh"). Only the concepts' trained names are given,
never their held-out names, so the IP on held-out names measures how each method generalises, as it does for
SafetyDPO's experts (which are trained on prompts with the trained names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErasureTargets:
    """The text a baseline works from.

    Attributes:
        categories: The harm categories erased.
        concepts: The harmful concept ids erased.
        erase_prompts: One per trained name of every erased concept.
        guide_prompts: The safe counterpart's name of each erase prompt (CoProV2's minimal edit; UCE's guide).
        preserve_prompts: The names of every neutral concept and of every harmful concept *not* erased (what UCE
            preserves).
    """

    categories: list[str]
    concepts: list[str]
    erase_prompts: list[str]
    guide_prompts: list[str]
    preserve_prompts: list[str]


def erasure_targets(
    taxonomy: Any, categories: Sequence[str] | None = None, concepts: Sequence[str] | None = None
) -> ErasureTargets:
    """The erase, guide and preserve prompts of `categories` (None: all) and, within them, `concepts` (None: all).

    Raises:
        KeyError: For an unknown category or concept, listing the known ones.
        ValueError: For a neutral concept, or concepts outside the categories chosen.
    """
    chosen = taxonomy.select(list(categories) if categories is not None else None)
    if concepts is not None:
        neutral = [c for c in concepts if taxonomy.concept(c).category is None]
        if neutral:
            raise ValueError(f"Concepts {neutral} are neutral; only harmful concepts can be erased.")
        outside = [c for c in concepts if taxonomy.concept(c).category not in chosen.category_ids]
        if outside:
            raise ValueError(
                f"Concepts {outside} are not in the categories chosen ({', '.join(chosen.category_ids)}); add their "
                "categories or leave them out."
            )
        chosen = chosen.select_concepts(list(concepts))
    erased = chosen.harmful_concepts
    erased_ids = {concept.id for concept in erased}
    erase, guide = [], []
    for concept in erased:
        for name in concept.names:
            erase.append(name)
            guide.append(taxonomy.counterpart_name(concept))
    kept = [c for c in taxonomy.harmful_concepts if c.id not in erased_ids]
    preserve = [name for concept in (*taxonomy.neutral, *kept) for name in concept.names]
    return ErasureTargets(
        categories=list(chosen.category_ids),
        concepts=[concept.id for concept in erased],
        erase_prompts=erase,
        guide_prompts=guide,
        preserve_prompts=list(dict.fromkeys(preserve)),
    )
