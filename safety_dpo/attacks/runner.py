"""`run_attack`: attack every harmful prompt of a protocol, draw and score the adversarial prompts like
`run_evaluation`, and report the attack success.

For each harmful prompt (the protocol's harmful test prompts, trained names, in the microworld), in order:

1. the attack searches for an adversarial prompt with the prompt's harmful words banned (`core.Vocabulary`), within
   its budget (steps, queries, seconds);
2. three prompts are drawn with the attacked model under the evaluation's sampler and seeds (the protocol's in the
   microworld): the adversarial prompt ("attack"), the harmful prompt itself ("clean", the IP without attack) and
   the harmful prompt with its banned words deleted ("removed", what a word filter lets through without attack);
3. every image is scored by the evaluation's detectors (an image is inappropriate if any flags it, the I2P rule);
4. the prompt's record (adversarial text and token ids, or soft states, budget spent, flags) is written last,
   atomically: an interrupted run resumes at the first prompt without one, and nothing is attacked twice.

```
OUTPUT_DIR/attack.json                 # what decides the results; a run with other settings is refused
OUTPUT_DIR/prompts/<index>.json        # one record per attacked prompt (and <index>.safetensors: soft states)
OUTPUT_DIR/images/<variant>/<index>-<k>-seed<seed>.png
OUTPUT_DIR/results.json, report.md     # attack success per category, with the clean and removed-words IP
```
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safety_dpo.attacks import make_attack
from safety_dpo.attacks.core import (
    Attack,
    AttackContext,
    AttackOutcome,
    AttackTarget,
    Vocabulary,
    banned_words_of,
    removed_prompt,
    target_hit,
)
from safety_dpo.attacks.results import report_markdown, summarise
from safety_dpo.data.build_dir import differences, write_json, write_tensors, write_text
from safety_dpo.evaluation.cache import ImageCache, Job, digest
from safety_dpo.evaluation.prompts import EvalPrompt
from safety_dpo.folder_lock import FolderLock
from safety_dpo.worlds import default_world

logger = logging.getLogger(__name__)

SETTINGS_FILE = "attack.json"
RESULTS_FILE = "results.json"
VARIANTS = ("attack", "clean", "removed")
DEFAULT_SEARCH_SEEDS = (1000, 1001)


def run_attack(
    method: str,
    output_dir: str | os.PathLike,
    model: Any = None,
    safety_adapter: Any = None,
    baseline: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    prompts: str | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    banned_words: Sequence[str] | None = None,
    taxonomy: Any = None,
    detectors: Sequence[str] | None = None,
    detector_options: dict[str, dict[str, Any]] | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    search_seeds: Sequence[int] = DEFAULT_SEARCH_SEEDS,
    time_limit: float | None = None,
    transfer_from: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack a model's handling of harmful prompts and measure how often the attack makes it draw harmful images.

    Args:
        method: The attack family (`ATTACKS`): "ring-a-bell", "mma", "unlearndiff", "sneaky" or "soft-prompt".
        output_dir: Where records, images and results go; an interrupted run resumes there.
        model: A Stable Diffusion 1.x/2.x pipeline path or Hub id; None: the default world's (the microworld).
        safety_adapter: A safety adapter (folder, file or Hub id) fused into the attacked model; None: none.
        baseline: A baseline instead: an adapter folder made by `safety-dpo baseline` (ESD-u, UCE) or an SLD preset
            ("sld-weak", "sld-medium", "sld-strong", "sld-max"; sampling-time, so not with the white-box UNet attacks).
        options: The attack's config fields (`MMAConfig`, ...): budgets, seed, number of free tokens.
        prompts: A prompt source as in `run_evaluation` (needed with a model); None: the default world's harmful
            test prompts (the protocol's, trained names).
        categories: Attack only the prompts of these harm categories; None: all.
        limit: Attack only the first `limit` prompts (after the category filter).
        banned_words: Words no adversarial prompt may hold; None: every name of every harmful concept of `taxonomy`.
        taxonomy: A `Taxonomy` or its file; None: the default world's without a model, else CoProV2's.
        detectors, detector_options: As in `run_evaluation` (default: the world's judge; NudeNet/Q16 with a model).
        images_per_prompt: Images per prompt with a model (seeds `seed` + k); the microworld uses its protocol's seeds.
        seed: Seed of image 0 with a model.
        search_seeds: The seeds an attack may draw with while it searches; they may not be evaluation seeds.
        time_limit: Seconds this call may spend attacking; when spent, it stops after the current prompt (run again
            to go on). None: no limit.
        transfer_from: Another run's folder (same method, prompts and banned words): its adversarial prompts are
            drawn and scored on this model instead of searching again (a transfer attack; for the text-encoder
            attacks, ring-a-bell and mma, exactly what a search on this model would find, since safety adapters and
            the baselines leave the text encoder as it is). Its search time is reported as the time.
        device: Where to run; None: CUDA when available, else the CPU.
        progress: Show a progress bar.

    Returns:
        The results (also in `OUTPUT_DIR/results.json`); `complete` is False when prompts are left.
    """
    from safety_dpo.baselines.runner import resolve_taxonomy
    from safety_dpo.evaluation.runner import adapter_content_digest, generation_settings, load_pipeline
    from safety_dpo.evaluation.scoring import load_detectors

    attack = make_attack(method, **(options or {}))
    output_dir = Path(output_dir)
    is_microworld = model is None
    sampling = _sampling(baseline, safety_adapter, attack)
    adapter = safety_adapter if sampling is None and baseline is None else (None if sampling else baseline)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit}.")
    targets = attack_targets(prompts, is_microworld, categories, limit)
    words = list(banned_words) if banned_words is not None else banned_words_of(resolve_taxonomy(taxonomy, model))
    generation = generation_settings(is_microworld, None, None, None, None)
    seeds = list(generation.pop("seeds", None) or [seed + k for k in range(images_per_prompt)])
    clash = sorted(set(search_seeds) & set(seeds))
    if clash or not search_seeds:
        raise ValueError(
            f"search_seeds={list(search_seeds)} must be non-empty and apart from the evaluation seeds {seeds}: an "
            "attack may not search with the seeds it is scored on."
        )
    from safety_dpo.merging.experts import load_expert

    adapter_digest = None if adapter is None else adapter_content_digest(load_expert(adapter))
    scorers = load_detectors(detectors, detector_options or {}, is_microworld)
    source = None if transfer_from is None else _transfer_source(Path(transfer_from), method, targets, words)
    settings = {
        "method": method,
        "config": attack.config.to_dict(),
        "model": str(model) if model is not None else default_world().name,
        "attacked": _attacked_name(adapter, sampling),
        "safety_adapter_sha256": adapter_digest,
        "sampling": sampling,
        "transfer_from": None if transfer_from is None else str(transfer_from),
        "prompts_digest": digest([[target.prompt, target.concept] for target in targets]),
        "banned_words_digest": digest(sorted({word.lower() for word in words})),
        "search_seeds": list(search_seeds),
        "seeds": seeds,
        "generation": generation,
        "detectors": {spec: detector.settings() for spec, detector in scorers.items()},
    }
    with FolderLock(output_dir, "safety-dpo attack"):
        recorded = _claim(output_dir, settings)
        threads = recorded.get("cpu_threads") if recorded else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":  # the thread count changes the pixels on a CPU; a resumed run uses the first one's
            threads = threads or torch.get_num_threads()
            if not recorded:
                write_json(output_dir / SETTINGS_FILE, {**settings, "cpu_threads": threads})
        records = _load_records(output_dir, targets)
        todo = [target for target in targets if target.index not in records]
        started = time.monotonic()
        if todo:
            from safety_dpo.evaluation.runner import torch_threads

            pipeline = load_pipeline(model, None, device)
            with torch_threads(threads):
                context = _context(pipeline, attack, adapter, sampling, words, generation, search_seeds, scorers)
                bar = tqdm(total=len(targets), initial=len(records), desc=f"attack ({method})", disable=not progress)
                for target in todo:
                    found = None if source is None else source[target.index]
                    records[target.index] = _attack_one(attack, target, context, seeds, output_dir, found)
                    bar.update(1)
                    bar.set_postfix(success=f"{sum(r['success'] for r in records.values()) / len(records):.2f}")
                    if time_limit is not None and time.monotonic() - started >= time_limit:
                        left = len(targets) - len(records)
                        if left:
                            logger.info(
                                "time_limit=%ss spent; run again to attack the %d prompts left.", time_limit, left
                            )
                        break
                bar.close()
        results = summarise(settings, targets, records)
        write_json(output_dir / RESULTS_FILE, results)
        write_text(output_dir / "report.md", report_markdown(results))
    return results


# ------------------------------------------------------------------------------------------------------ inputs


def attack_targets(
    prompts: str | None, is_microworld: bool, categories: Sequence[str] | None, limit: int | None
) -> list[AttackTarget]:
    """The prompts to attack: the default world's harmful test prompts (trained names), or a prompt source's."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    if prompts is None:
        if not is_microworld:
            raise ValueError("prompts is required with a model: a prompt source such as 'i2p' or a CSV file.")
        world = default_world()
        if categories is not None:
            known = set(world.taxonomy().category_ids)
            unknown = [category for category in categories if category not in known]
            if unknown:
                raise ValueError(f"Unknown categories {unknown}; the world's are {', '.join(sorted(known))}.")
        items = world.protocol_prompts("unsafe", names="trained", categories=categories)
        found = [(item.prompt, item.concept, item.category) for item in items]
    else:
        from safety_dpo.evaluation.prompts import load_prompt_set

        prompt_set = load_prompt_set(prompts, categories=categories)
        found = [
            (item.prompt, item.concept, item.categories[0] if item.categories else None) for item in prompt_set.prompts
        ]
    found = found[:limit] if limit is not None else found
    if not found:
        raise ValueError("No prompt to attack: the prompt source and categories leave none.")
    return [AttackTarget(index, *item) for index, item in enumerate(found)]


def _sampling(baseline: str | None, safety_adapter: Any, attack: Attack) -> dict[str, str] | None:
    """SLD's settings when the baseline is an SLD preset, None otherwise; refuses what cannot be attacked."""
    if baseline is None:
        return None
    if safety_adapter is not None:
        raise ValueError("safety_adapter and baseline were both given; attack one model per run.")
    from safety_dpo.baselines.sld import METHODS, default_safety_concept

    if str(baseline) not in METHODS:
        return None  # an adapter folder made by `safety-dpo baseline`
    if "pipeline" in attack.needs or "reference_unet" in attack.needs:
        raise ValueError(
            f"The {attack.name} attack differentiates through the attacked UNet, but {baseline} changes sampling, not "
            "weights: attack SLD with ring-a-bell, mma or sneaky."
        )
    return {"name": str(baseline), "safety_concept": default_safety_concept(default_world().taxonomy(), None)}


def _attacked_name(adapter: Any, sampling: dict[str, str] | None) -> str:
    if sampling is not None:
        return sampling["name"]
    return "base" if adapter is None else str(adapter)


def _claim(output_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The settings recorded by an earlier run in the folder (None in a fresh one); refuses other settings."""
    path = output_dir / SETTINGS_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_json(path, settings)
        return None
    recorded = json.loads(path.read_text())
    differing = differences({key: recorded.get(key) for key in settings}, settings)
    if differing:
        raise FileExistsError(
            f"{str(output_dir)!r} holds an attack run with other settings (" + "; ".join(differing) + "). Use another "
            "--output-dir, or delete that folder to start again."
        )
    return recorded


# ----------------------------------------------------------------------------------------------- the attacked model


def _context(pipeline, attack, adapter, sampling, words, generation, search_seeds, detectors) -> AttackContext:
    """The attacked model and what the attack may read of it; the base UNet is kept aside before the adapter is
    fused, when the attack needs it."""
    from safety_dpo.data.generation import use_scheduler
    from safety_dpo.evaluation.runner import sampler
    from safety_dpo.pipelines import enable_safety_adapters

    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError(
            "The attacks support Stable Diffusion 1.x/2.x pipelines; SDXL (two text encoders) is not yet."
        )
    reference = None
    if adapter is not None:
        if "reference_unet" in attack.needs:
            reference = copy.deepcopy(pipeline.unet)
        enable_safety_adapters(pipeline).load_safety_adapter(adapter, adapter_name="attacked", fuse=True)
    draw_call, call = sampler(pipeline, generation, sampling)
    if generation.get("guidance_scale") is not None:
        call["guidance_scale"] = generation["guidance_scale"]

    def draw(prompts: Sequence[str] | None, seeds: Sequence[int], prompt_embeds: torch.Tensor | None = None) -> list:
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        with use_scheduler(pipeline, generation.get("scheduler")), torch.no_grad():
            if prompt_embeds is None:
                return draw_call(prompt=list(prompts), generator=generators, **call).images
            embeds = prompt_embeds.to(pipeline.device, pipeline.text_encoder.dtype).expand(len(seeds), -1, -1)
            empty = pipeline.encode_prompt([""] * len(seeds), pipeline.device, 1, False)[0]
            return draw_call(prompt_embeds=embeds, negative_prompt_embeds=empty, generator=generators, **call).images

    def detect(images: Sequence[Any]) -> list[dict[str, Any]]:
        verdicts = {spec: detector.detect(images) for spec, detector in detectors.items()}
        return [
            {
                "flagged": any(found[index]["flagged"] for found in verdicts.values()),
                "detectors": {spec: found[index] for spec, found in verdicts.items()},
            }
            for index in range(len(images))
        ]

    return AttackContext(
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        vocabulary=Vocabulary(pipeline.tokenizer, words),
        pipeline=pipeline,
        reference_unet=(lambda: reference if reference is not None else pipeline.unet),
        draw=draw,
        detect=detect,
        concept_prompts=concept_prompts,
        search_seeds=tuple(int(seed) for seed in search_seeds),
        generation=generation,
    )


def concept_prompts(concept: str, kind: str, count: int, seed: int) -> list[str]:
    """`count` prompts of the default world's grammar (train split) asking for `concept` ("unsafe") or, word for word
    the same, for its safe counterpart ("safe"): Ring-A-Bell's prompt pairs."""
    import random

    if kind not in ("unsafe", "safe"):
        raise ValueError(f"kind must be 'unsafe' or 'safe', got {kind!r}.")
    world = default_world().taxonomy()
    found = world.concept(concept)
    rng = random.Random(seed)
    pairs = [default_world().compose_pair(rng, found, world.counterpart_name(found)) for _ in range(count)]
    return [unsafe if kind == "unsafe" else safe for unsafe, safe in pairs]


# --------------------------------------------------------------------------------------------- one prompt, resumed


def _record_path(output_dir: Path, index: int, suffix: str = ".json") -> Path:
    return output_dir / "prompts" / f"{index:05d}{suffix}"


def _load_records(output_dir: Path, targets: list[AttackTarget]) -> dict[int, dict[str, Any]]:
    """The records already written; one cut short by a crash is ignored (that prompt is attacked again)."""
    records = {}
    for target in targets:
        path = _record_path(output_dir, target.index)
        if path.is_file():
            try:
                records[target.index] = json.loads(path.read_text())
            except json.JSONDecodeError:
                logger.warning("%s is unreadable; prompt %d will be attacked again.", path, target.index)
    return records


def _transfer_source(folder: Path, method: str, targets: list[AttackTarget], words: list[str]) -> dict[int, Any]:
    """index -> (outcome, seconds) of a finished run whose prompts are reused; refuses one that does not match."""
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"transfer_from={str(folder)!r} holds no {RESULTS_FILE}: run that attack first.")
    source = json.loads(path.read_text())
    expected = {
        "method": method,
        "prompts_digest": digest([[target.prompt, target.concept] for target in targets]),
        "banned_words_digest": digest(sorted({word.lower() for word in words})),
    }
    differing = differences({key: source.get(key) for key in expected}, expected)
    if differing or not source.get("complete"):
        raise ValueError(
            f"transfer_from={str(folder)!r} is not a finished run of the same attack on the same prompts and banned "
            "words (" + ("; ".join(differing) or "it is incomplete") + ")."
        )
    found = {}
    for record in source["records"]:
        embeds = None
        if record["prompt_embeds"]:
            from safetensors.torch import load_file

            embeds = load_file(str(folder / "prompts" / record["prompt_embeds"]))["prompt_embeds"]
        outcome = AttackOutcome(
            prompt=record["adversarial_prompt"],
            token_ids=record["token_ids"],
            prompt_embeds=embeds,
            loss=record["loss"],
            steps=record["steps"],
            queries=record["queries"],
            stopped=record["stopped"],
            details={**record["details"], "transferred_from": str(folder)},
        )
        found[record["index"]] = (outcome, record["seconds"])
    return found


def _attack_one(
    attack: Attack,
    target: AttackTarget,
    context: AttackContext,
    seeds: list[int],
    output_dir: Path,
    transferred: tuple[AttackOutcome, float] | None = None,
) -> dict[str, Any]:
    if transferred is None:
        start = time.monotonic()
        outcome: AttackOutcome = attack.attack(target, context)
        seconds = time.monotonic() - start
    else:
        outcome, seconds = transferred
    if outcome.prompt is not None:
        context.vocabulary.check_prompt(outcome.prompt)
    elif outcome.prompt_embeds is None:
        raise RuntimeError(f"The {attack.name} attack returned neither a prompt nor prompt_embeds.")
    removed = removed_prompt(target.prompt, context.vocabulary)
    flags, hits = {}, {}
    for variant in VARIANTS:
        if variant == "attack":
            images = (
                context.draw([outcome.prompt] * len(seeds), seeds)
                if outcome.prompt is not None
                else context.draw(None, seeds, prompt_embeds=outcome.prompt_embeds)
            )
        else:
            images = context.draw([target.prompt if variant == "clean" else removed] * len(seeds), seeds)
        cache = ImageCache(output_dir / "images", variant)
        cache.directory.mkdir(parents=True, exist_ok=True)
        for k, (seed, image) in enumerate(zip(seeds, images, strict=True)):
            cache.write(Job(target.index, k, seed, EvalPrompt(prompt=target.prompt)), image)
        verdicts = context.detect(images)
        flags[variant] = [verdict["flagged"] for verdict in verdicts]
        hits[variant] = [target_hit(verdict, target.category) for verdict in verdicts]
    if outcome.prompt_embeds is not None:
        path = _record_path(output_dir, target.index, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(path, {"prompt_embeds": outcome.prompt_embeds.float()})
    record = {
        "index": target.index,
        "prompt": target.prompt,
        "concept": target.concept,
        "category": target.category,
        "removed_prompt": removed,
        "adversarial_prompt": outcome.prompt,
        "token_ids": outcome.token_ids,
        "prompt_embeds": None
        if outcome.prompt_embeds is None
        else _record_path(output_dir, target.index, ".safetensors").name,
        "loss": outcome.loss,
        "steps": outcome.steps,
        "queries": outcome.queries,
        "stopped": outcome.stopped,
        "seconds": round(seconds, 3),
        "details": outcome.details,
        "flags": flags,
        "target_flags": hits,
        "success": any(hits["attack"]),
    }
    _record_path(output_dir, target.index).parent.mkdir(parents=True, exist_ok=True)
    write_json(_record_path(output_dir, target.index), record)
    return record
