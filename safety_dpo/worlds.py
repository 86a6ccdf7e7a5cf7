"""Worlds: what "no model given" means, decided here and nowhere else.

A *world* is a text-to-image model that comes with everything needed to measure it exactly: its harm taxonomy, its
sampling and evaluation protocol, its prompt grammar, a judge that says what an image shows, and the metrics built
on that judge (`World`). When a user names no model, no taxonomy or no protocol, the library's layers (`data/`,
`trainer/`, `merging/`, `pipelines/`, `evaluation/`) ask `default_world()` for the piece they need; they never
import a world themselves.

The microworld (`safety_dpo.microworld`, docs/microworld.md) is the built-in default. It is registered below by an
import path, like an entry point, and imported on first use only: this module imports no world, and `import
safety_dpo` or `safety-dpo --help` load no model. A second world plugs in the same way:

```python
from safety_dpo.worlds import register_world, set_default_world

register_world("my-world", "my_package.world:MY_WORLD")  # a `World`, or the import path of one
set_default_world("my-world")  # what "no model" means from now on
```
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MICROWORLD_NAME = "safety_dpo-microworld"

# name -> World, or the "module:attribute" path of one (replaced by the World on first use).
_WORLDS: dict[str, World | str] = {MICROWORLD_NAME: "safety_dpo.microworld.plugin:MICROWORLD"}
_default_name = MICROWORLD_NAME


@dataclass(frozen=True)
class World:
    """Everything the library uses of a world: its model, taxonomy and protocol, its prompts, its judge and the
    metrics read by the judge. The microworld's is `safety_dpo.microworld.plugin.MICROWORLD`.

    Attributes:
        name: The world's model name, recorded wherever a model is named (a CoProV2 build's `generator_model`, an
            expert's `base_model`, results.json's `model`) and its key in the registry ("safety_dpo-microworld").
        load_pipeline: `(**from_pretrained_kwargs) -> pipeline`: the world's stock diffusers text-to-image pipeline.
        taxonomy: `() -> Taxonomy`: the world's concepts; a CoProV2 build given no taxonomy uses it.
        load_protocol: `() -> protocol`: how the world's images are drawn and judged, an object with `scheduler`,
            `num_inference_steps`, `guidance_scale`, `resolution`, `seeds`, `prompts_per_concept`, `prompt_seed`
            and `to_dict()`.
        protocol_prompts: `(kind, names=..., categories=..., protocol=...) -> items`: the standard evaluation
            prompts, items with `prompt`, `concept` and `category`; kind "unsafe" (names "trained" or "held-out")
            or "neutral".
        to_safe_prompt: `(prompt) -> str`: the minimal-edit safe counterpart of a harmful prompt.
        parse_prompt: `(prompt) -> parsed`: raises ValueError for a prompt the world cannot draw or judge.
        compose_pair: `(rng, concept, safe_name) -> (unsafe_prompt, safe_prompt)`: one prompt pair from the world's
            grammar, for the template prompt writer.
        judge_class: The judge's class: `from_pretrained(folder)`, and instances with `detect(images)`, `threshold`,
            `concept_ids`, `feature_dim` and a forward pass returning `{"features": (N, feature_dim)}`.
        load_judge: `() -> judge`: the judge that ships with the world (the "judge" detector, fd_judge features).
        default_judge_path: `() -> Path`: the folder of that judge.
        judge_weights_name: The judge's weights file in that folder (hashed into every report).
        resolution: The side, in pixels, of the images the judge reads.
        render: `(prompt, seed, resolution) -> PIL image`: the world's ground truth, the reference of fd_judge.
        prompt_fidelity: `(images, prompts) -> dict`: what the judge reads of each image against its prompt
            (`prompt_agreement`, concept rates, `descriptions`, ...).
        agreement_with_reference: `(descriptions, reference_descriptions, attributes) -> float`: the share of images
            the judge reads as their reference image.
    """

    name: str
    load_pipeline: Callable[..., Any]
    taxonomy: Callable[[], Any]
    load_protocol: Callable[[], Any]
    protocol_prompts: Callable[..., list]
    to_safe_prompt: Callable[[str], str]
    parse_prompt: Callable[[str], Any]
    compose_pair: Callable[..., tuple[str, str]]
    judge_class: type
    load_judge: Callable[[], Any]
    default_judge_path: Callable[[], Path]
    judge_weights_name: str
    resolution: int
    render: Callable[..., Any]
    prompt_fidelity: Callable[..., dict]
    agreement_with_reference: Callable[..., float]


def register_world(name: str, world: World | str, *, replace: bool = False) -> None:
    """Make a world known by its name.

    Args:
        name: The world's model name (`World.name`).
        world: The `World`, or the "module:attribute" path of one, imported when the world is first used.
        replace: Replace a world already registered under `name`.

    Raises:
        ValueError: For an empty name, a name already registered (without `replace`), a `World` whose name differs,
            or a path that is not "module:attribute".
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A world's name must be a non-empty string, got {name!r}.")
    if name in _WORLDS and not replace:
        raise ValueError(f"A world named {name!r} is registered already; pass replace=True to replace it.")
    if isinstance(world, World):
        _check_name(world, name, "the World given")
    elif not isinstance(world, str) or not all(world.partition(":")[::2]):
        raise ValueError(f"world must be a World or a 'module:attribute' path of one, got {world!r}.")
    _WORLDS[name] = world


def get_world(name: str) -> World:
    """The world registered as `name`, imported on first use.

    Raises:
        KeyError: For an unknown name, listing the known ones.
        ImportError: If the module of its import path cannot be imported.
        ValueError: If its import path names something other than a `World` of that name.
    """
    if name not in _WORLDS:
        raise KeyError(f"Unknown world {name!r}; registered worlds: {', '.join(_WORLDS)}.")
    entry = _WORLDS[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        world = getattr(importlib.import_module(module), attribute, None)
        if not isinstance(world, World):
            raise ValueError(f"World {name!r} is registered as {entry!r}, which is {world!r}, not a World.")
        _check_name(world, name, entry)
        _WORLDS[name] = entry = world
    return entry


def default_world() -> World:
    """The world used when no model is given: the microworld unless `set_default_world` chose another."""
    return get_world(_default_name)


def default_world_name() -> str:
    """`default_world().name`, without importing the world (for recording or comparing model names)."""
    return _default_name


def set_default_world(name: str) -> None:
    """Make the registered world `name` the one used when no model is given.

    Raises:
        KeyError: For an unknown name, listing the known ones.
    """
    if name not in _WORLDS:
        raise KeyError(f"Unknown world {name!r}; registered worlds: {', '.join(_WORLDS)}.")
    global _default_name
    _default_name = name


def _check_name(world: World, name: str, where: str) -> None:
    if world.name != name:
        raise ValueError(f"The world registered as {name!r} is named {world.name!r} ({where}); the names must agree.")
