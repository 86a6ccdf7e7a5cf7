"""Labelled renders for training and checking the judge, and the degradations generated images show.

Scenes are sampled directly (not through prompt text) so that the judge also sees what prompts rarely ask
for: empty scenes and two objects side by side. Compositions are taken from one split only, so the judge's
accuracy on the test split is measured on combinations it never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from safety_dpo.microworld.grammar import ParsedPrompt, Split, composition_split
from safety_dpo.microworld.judge import NO_FIGURE, Judge
from safety_dpo.microworld.renderer import render_parsed
from safety_dpo.microworld.world import FIGURE_COLOURS, FIGURES, SCENES, taxonomy

EMPTY_SHARE = 0.05  # scenes without any object
PAIR_SHARE = 0.10  # scenes with two objects


@dataclass
class LabelledRenders:
    """Rendered images with their labels, as tensors.

    Attributes:
        pixels: uint8 (N, 3, 32, 32).
        concepts: float multi-hot (N, num_concepts), columns in `concept_ids` order.
        scene: long (N,), index into `scenes`.
        colour: long (N,), index into `colours` (the last is "none").
    """

    pixels: torch.Tensor
    concepts: torch.Tensor
    scene: torch.Tensor
    colour: torch.Tensor
    concept_ids: list[str]
    scenes: list[str]
    colours: list[str]


def label_sets() -> tuple[list[str], list[str], list[str]]:
    """The judge's (concept ids, scenes, colours) in head order."""
    return [c.id for c in taxonomy().concepts], list(SCENES), [*FIGURE_COLOURS, NO_FIGURE]


def sample_scene(rng: random.Random, split: Split) -> ParsedPrompt:
    """A random scene whose (first concept, scene, colour) composition belongs to `split`."""
    concept_ids = [c.id for c in taxonomy().concepts]
    while True:
        scene = rng.choice(list(SCENES))
        colour = rng.choice([None, *FIGURE_COLOURS])
        draw = rng.random()
        if draw < EMPTY_SHARE:
            concepts: tuple[str, ...] = ()
        elif draw < EMPTY_SHARE + PAIR_SHARE:
            concepts = tuple(rng.sample(concept_ids, 2))
        else:
            concepts = (rng.choice(concept_ids),)
        key = concepts[0] if concepts else "-"
        if composition_split(key, scene, colour) == split:
            figure = rng.choice(list(FIGURES)) if colour is not None else None
            return ParsedPrompt(concepts, scene, figure, colour)


def render_labelled(n: int, seed: int, split: Split) -> LabelledRenders:
    """Render `n` random scenes of `split`, deterministically from `seed`."""
    concept_ids, scenes, colours = label_sets()
    rng = random.Random(f"judge|{seed}|{split}")
    pixels = np.empty((n, 32, 32, 3), dtype=np.uint8)
    concepts = torch.zeros(n, len(concept_ids))
    scene_index = torch.empty(n, dtype=torch.long)
    colour_index = torch.empty(n, dtype=torch.long)
    for i in range(n):
        parsed = sample_scene(rng, split)
        pixels[i] = np.asarray(render_parsed(parsed, seed=rng.getrandbits(31)))
        for concept_id in parsed.concepts:
            concepts[i, concept_ids.index(concept_id)] = 1.0
        scene_index[i] = scenes.index(parsed.scene)
        colour_index[i] = colours.index(parsed.colour or NO_FIGURE)
    return LabelledRenders(
        torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        concepts,
        scene_index,
        colour_index,
        concept_ids,
        scenes,
        colours,
    )


def degrade(pixels: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Blur, noise and colour shifts like those of generated images, drawn at random per image.

    Args:
        pixels: float (N, 3, H, W) in [-1, 1].
        generator: Source of randomness (seeded by the caller).
        strength: Scales every degradation; 0 returns the input.

    Returns:
        float (N, 3, H, W) in [-1, 1].
    """
    n = pixels.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    # Blur: a 3x3 Gaussian whose sigma varies per image, mixed with the sharp image.
    blurred = torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    mix = (uniform(n, 1, 1, 1) * strength).clamp(max=1.0)
    out = pixels * (1 - mix) + blurred * mix
    # Colour shift: per-channel offset and gain, as when a model gets a hue slightly wrong.
    out = out * (1 + (uniform(n, 3, 1, 1) - 0.5) * 0.3 * strength) + (uniform(n, 3, 1, 1) - 0.5) * 0.3 * strength
    # Noise: Gaussian, per pixel.
    sigma = uniform(n, 1, 1, 1) * 0.15 * strength
    out = out + torch.randn(out.shape, generator=generator) * sigma
    return out.clamp(-1, 1)


@torch.no_grad()
def judge_report(judge: Judge, n: int, seed: int = 1, split: Split = "test") -> dict:
    """How well `judge` reads `n` rendered scenes of `split`, clean and degraded.

    An image is read correctly when the detected concept set equals the true set exactly (no miss, no false
    alarm). Per-concept accuracy is over the single-object images of that concept, as prompts of the grammar
    name one object; scenes with two objects and with none are reported on their own.

    Returns:
        A dict with `clean` and `degraded`, each holding `exact` (all images), `single`, `pair` and `empty`
        (exact accuracy per number of objects), `scene`, `colour` (accuracies), `worst_concept` and
        `worst_concept_accuracy`; and `per_concept` (id -> {"clean": accuracy, "degraded": accuracy, "images": n}).
    """
    data = render_labelled(n, seed, split)
    judge.eval()
    clean = data.pixels.float() / 127.5 - 1.0
    objects = data.concepts.sum(dim=1)
    report: dict = {"images": n, "split": split, "per_concept": {}}
    for name, pixels in (("clean", clean), ("degraded", degrade(clean, torch.Generator().manual_seed(seed)))):
        outputs = {key: torch.cat(values) for key, values in _batched(judge, pixels).items()}
        detected = torch.sigmoid(outputs["concepts"]) > judge.threshold
        exact = (detected == data.concepts.bool()).all(dim=1)
        per_concept = {}
        for column, concept_id in enumerate(data.concept_ids):
            shown = data.concepts[:, column].bool() & (objects == 1)
            accuracy = exact[shown].float().mean().item() if shown.any() else float("nan")
            per_concept[concept_id] = accuracy
            report["per_concept"].setdefault(concept_id, {"images": int(shown.sum())})[name] = accuracy
        worst = min(per_concept, key=lambda key: per_concept[key])
        report[name] = {
            "exact": exact.float().mean().item(),
            **{
                label: exact[objects == count].float().mean().item()
                for label, count in (("empty", 0), ("single", 1), ("pair", 2))
            },
            "scene": (outputs["scene"].argmax(1) == data.scene).float().mean().item(),
            "colour": (outputs["colour"].argmax(1) == data.colour).float().mean().item(),
            "worst_concept": worst,
            "worst_concept_accuracy": per_concept[worst],
        }
    return report


def _batched(judge: Judge, pixels: torch.Tensor, batch_size: int = 512) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(pixels), batch_size):
        for key, value in judge(pixels[start : start + batch_size]).items():
            outputs.setdefault(key, []).append(value)
    return outputs
