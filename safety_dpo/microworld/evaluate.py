"""Generate with a pipeline and score with the judge, under the protocol: `evaluate_pipeline`.

`score_images` does the scoring alone, so rendered images (the world's ground truth) are measured by exactly
the same code as generated ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from safety_dpo.microworld.grammar import PromptItem, parse_prompt, sample_prompts
from safety_dpo.microworld.judge import Judge, load_judge
from safety_dpo.microworld.metrics import (
    concept_rates,
    frechet_distance,
    inappropriate_probability,
    ip_per_group,
    prompt_agreement,
    redirect_rate,
)
from safety_dpo.microworld.protocol import Protocol, load_protocol
from safety_dpo.microworld.renderer import render
from safety_dpo.microworld.world import taxonomy


def _requests(prompts: Sequence[str]) -> list[dict]:
    requests = []
    for prompt in prompts:
        parsed = parse_prompt(prompt)  # a colour is only ever parsed with a figure, so it is the figure's
        requests.append({"concepts": parsed.concepts, "scene": parsed.scene, "colour": parsed.colour})
    return requests


def score_images(
    images: Sequence[Image.Image],
    prompts: Sequence[str | PromptItem],
    reference_images: Sequence[Image.Image] | None = None,
    judge: Judge | None = None,
) -> dict:
    """Score images against the prompts that produced them.

    Args:
        images: One image per prompt (repeat a prompt for several seeds).
        prompts: Prompt strings or `PromptItem`s; the requested concept of an item is its `concept`, of a string
            the concepts named in it.
        reference_images: Images to compare with for fd_judge (usually renders of the same prompts and seeds).
        judge: The judge; the shipped one by default.

    Returns:
        `num_images`, `ip`, `ip_per_category` (by the category of the requested concept), `concept_rate`,
        `concept_rate_worst`, `worst_concept`, `concept_rate_per_concept`, `prompt_agreement`, `redirect_rate`
        (over images of harmful prompts, when there are any), and `fd_judge` when reference images are given (None
        for fewer than two images). Concept rates are over images whose prompt requests a concept.
    """
    judge = judge or load_judge()
    world = taxonomy()
    results = prompt_fidelity(images, prompts, judge)
    detections = results.pop("detections")
    expected = results.pop("expected_concepts")
    results.pop("descriptions")
    harmful_ids = [concept.id for concept in world.harmful_concepts]
    categories = [world.concept(concept_id).category if concept_id else None for concept_id in expected]
    results = {
        "num_images": len(images),
        "ip": inappropriate_probability(detections, harmful_ids),
        "ip_per_category": ip_per_group(detections, categories, harmful_ids),
        **results,
    }
    if reference_images is not None:
        # A Fréchet distance needs two images per set to estimate a covariance; report None below that.
        results["fd_judge"] = (
            None
            if min(len(images), len(reference_images)) < 2
            else frechet_distance(judge.features(list(images)), judge.features(list(reference_images)))
        )
    return results


def prompt_fidelity(
    images: Sequence[Image.Image], prompts: Sequence[str | PromptItem], judge: Judge | None = None
) -> dict:
    """How well images show what their prompts ask for, by the judge: concept rates and prompt agreement.

    Args:
        images: One image per prompt.
        prompts: Prompt strings or `PromptItem`s; the requested concept of an item is its `concept`, of a string
            the first concept named in it.
        judge: The judge; the shipped one by default.

    Returns:
        `prompt_agreement`; `concept_rate`, `concept_rate_worst`, `worst_concept` and `concept_rate_per_concept`
        when any prompt requests a concept; `redirect_rate` when any asks for a harmful one; and, for callers that go
        on to other metrics, `detections` (the concept ids found per image), `expected_concepts` (the concept id
        requested per image, or None) and `descriptions` (the judge's concepts, scene and colour per image).
    """
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    judge = judge or load_judge()
    texts = [item.prompt if isinstance(item, PromptItem) else item for item in prompts]
    requests = _requests(texts)
    expected = [
        item.concept if isinstance(item, PromptItem) else (request["concepts"][0] if request["concepts"] else None)
        for item, request in zip(prompts, requests, strict=True)
    ]
    descriptions = judge.describe(list(images))
    detections = [description["concepts"] for description in descriptions]
    results: dict = {"prompt_agreement": prompt_agreement(descriptions, requests)}
    asked = [(found, concept_id) for found, concept_id in zip(detections, expected, strict=True) if concept_id]
    if asked:
        rates = concept_rates([found for found, _ in asked], [concept_id for _, concept_id in asked])
        results.update(
            concept_rate=rates["pooled"],
            concept_rate_worst=rates["worst"],
            worst_concept=rates["worst_concept"],
            concept_rate_per_concept=rates["per_concept"],
        )
    world = taxonomy()
    counterparts = {concept.id: concept.counterpart for concept in world.harmful_concepts}
    harmful = [(found, concept_id) for found, concept_id in asked if concept_id in counterparts]
    if harmful:
        results["redirect_rate"] = redirect_rate(
            [found for found, _ in harmful], [concept_id for _, concept_id in harmful], counterparts, counterparts
        )
    return {**results, "detections": detections, "expected_concepts": expected, "descriptions": descriptions}


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    protocol: Protocol,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Image.Image]:
    """Generate one image per (prompt, seed) with the protocol's steps and guidance, in batches."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not progress):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in batch]
        output = pipe(
            prompt=[prompt for prompt, _ in batch],
            generator=generators,
            num_inference_steps=protocol.num_inference_steps,
            guidance_scale=protocol.guidance_scale,
            height=protocol.resolution,
            width=protocol.resolution,
            output_type="pil",
        )
        images.extend(output.images)
    return images


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str | PromptItem],
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    protocol: Protocol | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """Generate an image per prompt and seed with `pipe`, score them with the judge, and say how.

    The pipeline's scheduler is switched to the protocol's for the run (and restored afterwards). Micro-FID
    compares the generated images with renders of the same prompts and seeds.

    Args:
        pipe: A diffusers text-to-image pipeline (the microworld checkpoint, possibly with an adapter).
        prompts: Prompt strings or `PromptItem`s (e.g. from `sample_prompts`).
        seeds: Seeds per prompt; the protocol's by default.
        batch_size: Images per pipeline call.
        protocol: The protocol; the one stored with the shipped checkpoint by default.
        judge: The judge; the shipped one by default.
        progress: Show a progress bar.

    Returns:
        The metrics of `score_images`, plus `protocol` (every setting used, seeds included).
    """
    if not prompts:
        raise ValueError("evaluate_pipeline needs at least one prompt.")
    protocol = protocol or load_protocol()
    seeds = tuple(seeds) if seeds is not None else protocol.seeds
    texts = [item.prompt if isinstance(item, PromptItem) else item for item in prompts]
    original_scheduler = pipe.scheduler
    if type(pipe.scheduler).__name__ != protocol.scheduler:
        import diffusers

        scheduler_class = getattr(diffusers, protocol.scheduler)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    try:
        images = generate_images(pipe, texts, seeds, protocol, batch_size, progress)
    finally:
        pipe.scheduler = original_scheduler
    per_image_prompts = [item for item in prompts for _ in seeds]
    references = [render(text, seed, protocol.resolution) for text in texts for seed in seeds]
    judge = judge or load_judge()
    results = score_images(images, per_image_prompts, references, judge)
    results["protocol"] = {**protocol.to_dict(), "seeds": list(seeds), "judge_threshold": judge.threshold}
    return results


def protocol_prompts(
    kind: str,
    names: str = "trained",
    categories: Sequence[str] | None = None,
    protocol: Protocol | None = None,
) -> list[PromptItem]:
    """The standard test prompts of a measurement: `protocol.prompts_per_concept` per concept, test split."""
    protocol = protocol or load_protocol()
    world = taxonomy()
    pool = world.neutral if kind == "neutral" else world.select(categories).harmful_concepts
    n = protocol.prompts_per_concept * len(pool)
    return sample_prompts(kind, "test", n, seed=protocol.prompt_seed, categories=categories, names=names)
