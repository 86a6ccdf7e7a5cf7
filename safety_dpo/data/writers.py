"""Prompt writers: who writes the (unsafe, safe) prompt pairs of a harmful concept.

Every writer follows one small protocol, `PromptWriter`: given a `PairRequest` (a concept, how many pairs, a
seed), return candidate pairs and the count of answers it could not use. The builder validates the candidates
(`safety_dpo.data.pairs`) and asks again until it has enough or the budget is spent.

- `TemplatePromptWriter`: the default world's prompt grammar (the microworld's), deterministic; the default.
- `TransformersPromptWriter` and `OpenAIPromptWriter` (in `safety_dpo.data.llm_writers`): a language model, local
  or behind an OpenAI-compatible server.

`load_prompt_writer("template" | "transformers:MODEL_ID" | "openai:BASE_URL", ...)` builds one from the strings the
command line takes. The protocol and the types every writer shares are in `safety_dpo.data.writer_base`.
"""

from __future__ import annotations

import random
from typing import Any

from safety_dpo.data.writer_base import PairRequest, PromptWriter, PromptWriterError, WrittenPairs
from safety_dpo.worlds import default_world

__all__ = [
    "WRITER_KINDS",
    "PairRequest",
    "PromptWriter",
    "PromptWriterError",
    "TemplatePromptWriter",
    "WrittenPairs",
    "load_prompt_writer",
]


class TemplatePromptWriter:
    """Write pairs with the default world's prompt grammar (`World.compose_pair`, the microworld's): deterministic,
    instant, trained names only.

    The unsafe prompt names the concept with one of its trained names in a sampled composition (scene, figure,
    colour, wording); the safe prompt is the same text with the counterpart's name. Compositions come from the
    grammar's `train` split, so the microworld's test prompts stay unseen. Works for any taxonomy, but only the
    microworld's checkpoint can draw its scenes.
    """

    name = "template"

    def write(self, request: PairRequest) -> WrittenPairs:
        compose_pair = default_world().compose_pair
        rng = random.Random(f"{request.seed}|{request.concept.id}")
        candidates = [compose_pair(rng, request.concept, request.counterpart) for _ in range(request.num_pairs)]
        return WrittenPairs(candidates=candidates)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "grammar_split": "train"}


WRITER_KINDS = ("template", "transformers:MODEL_ID", "openai:BASE_URL")


def load_prompt_writer(spec: str | PromptWriter | None, llm_model: str | None = None, **kwargs: Any) -> PromptWriter:
    """Build a prompt writer from its command-line form.

    Args:
        spec: "template"; "transformers:MODEL" (a local path or Hub id of a chat/instruct causal LM);
            "openai:BASE_URL" (an OpenAI-compatible server, e.g. "openai:http://localhost:8000/v1"); a writer
            object (returned as is); None for the template writer.
        llm_model: The model name sent to an OpenAI-compatible server (required there).
        **kwargs: More arguments of the writer's class (`instructions`, `max_attempts`, ...).

    Raises:
        ValueError: For an unknown form, naming the accepted ones.
    """
    if spec is None or spec == "template":
        return TemplatePromptWriter()
    if isinstance(spec, PromptWriter):
        return spec
    kind, _, target = str(spec).partition(":")
    if kind == "transformers" and target:
        from safety_dpo.data.llm_writers import TransformersPromptWriter

        return TransformersPromptWriter(target, **kwargs)
    if kind == "openai" and target:
        from safety_dpo.data.llm_writers import OpenAIPromptWriter

        if not llm_model:
            raise ValueError(f"prompt writer {spec!r} needs the model name the server serves: pass llm_model.")
        return OpenAIPromptWriter(target, model=llm_model, **kwargs)
    raise ValueError(f"Unknown prompt writer {spec!r}; accepted: {', '.join(WRITER_KINDS)}.")
