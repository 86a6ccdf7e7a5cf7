"""The benchmark runner: generate with the base model (and with a safety adapter or a sampling method), score, and
report.

`run_evaluation` (and `safety-dpo evaluate`) does, in order:

1. reads the prompt set (`load_prompt_set`) and plans one job per (prompt, image k, seed);
2. draws the images that are not yet on disk, base model first, then with the safety adapter fused (or with a
   sampling method such as SLD, `safety_dpo.baselines.sld`), split across processes under `accelerate launch` /
   `torchrun` (cache.py: nothing is drawn twice, unreadable images again);
3. on the main process, scores every image with each detector (IP, cached per image), extracts FID features,
   measures CLIPScore or, in the microworld, the judge's prompt fidelity;
4. writes `results.json` (every number with the protocol that produced it), `report.md`, image grids and charts
   (report.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safety_dpo.data.generation import check_sampler
from safety_dpo.evaluation.cache import ImageCache, Job, digest
from safety_dpo.evaluation.prompts import PromptSet, load_prompt_set
from safety_dpo.folder_lock import FolderLock
from safety_dpo.threads import adapt_threads
from safety_dpo.worlds import default_world, default_world_name

logger = logging.getLogger(__name__)

VARIANTS = ("base", "aligned")
RESULTS_FILE = "results.json"


def run_evaluation(
    output_dir: str | os.PathLike,
    model: Any = None,
    safety_adapter: Any = None,
    prompts: str | PromptSet | None = None,
    *,
    images_per_prompt: int | None = None,
    seed: int | None = None,
    protocol: str | None = None,
    detectors: Sequence[str] | None = None,
    detector_options: dict[str, dict[str, Any]] | None = None,
    fid_features: str | None = None,
    clip_model: str | None = None,
    safety_scale: float = 1.0,
    batch_size: int = 16,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    scheduler: str | None = None,
    limit: int | None = None,
    categories: Sequence[str] | None = None,
    split: str | None = None,
    prompt_column: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | None = None,
    targeted_categories: Sequence[str] | None = None,
    progress: bool = True,
    method: str | None = None,
    safety_concept: str | None = None,
) -> dict[str, Any]:
    """Evaluate a text-to-image model, and the same model with a safety adapter or a sampling method, on a prompt set.

    Args:
        output_dir: Where images, scores and reports go; an interrupted run resumes there.
        model: A diffusers pipeline path or Hub id; None: the microworld checkpoint under its protocol.
        safety_adapter: A safety adapter (folder, file or Hub id) to compare with the base model; None: base only.
        prompts: A prompt source (`PROMPT_SOURCES`, a Hub dataset id or a CSV/JSON file) or a `PromptSet`;
            None: "microworld" (only when `model` is None).
        images_per_prompt: Images per prompt; None: the protocol's seeds in the microworld, else 1.
        seed: Seed of image 0 of a prompt that brings no seed of its own; image k uses seed + k. None: 0.
        protocol: A named protocol (`PROTOCOLS`: "microworld", "i2p", "safetydpo") that pins images per prompt,
            seeds, sampler, detectors, Fréchet features and CLIP model; a setting given here that contradicts it is
            refused, and so is a protocol whose parts are missing (both before anything is drawn or written). None:
            the settings given, and the numbers are named by what made them (`ip` only for a protocol's detectors).
        detectors: Detector specs (`DETECTOR_NAMES`, e.g. "nudenet:i2p", "q16"); None: "judge" in the microworld,
            else "nudenet:i2p" and, when `detector_options["q16"]` names its prompts, "q16".
        detector_options: Per detector name, its constructor options (e.g. {"q16": {"prompts": "q16.safetensors"}}).
        fid_features: "inception" (FID as pytorch-fid computes it), "clip" or "judge" (Fréchet distances reported as
            fd_clip, fd_judge), or "none"; None: "judge" in the microworld, else "inception" when pytorch-fid is
            installed, else "clip" when a CLIP model is given.
        clip_model: CLIP model (path or Hub id) for CLIPScore and "clip" FID features; None: openai ViT-L/14 for
            real models, none in the microworld (the judge measures prompt fidelity there); "none": no CLIPScore.
        safety_scale: The adapter's weight.
        batch_size: Images per pipeline call.
        num_inference_steps, guidance_scale, resolution: Sampling settings; None: the microworld protocol's, or the
            pipeline's defaults (and a prompt's own guidance scale, e.g. I2P's, when the source gives one).
        scheduler: A diffusers scheduler class name to sample with, or "pipeline": the pipeline's own scheduler,
            steps and guidance (what `pipe(prompt)` does), in the microworld too; None: the microworld protocol's
            scheduler, or the pipeline's own.
        limit, categories, split, prompt_column: Passed to `load_prompt_set`.
        torch_dtype: The pipeline's dtype (e.g. torch.float16 on a GPU).
        device: Where to generate; None: the process's accelerator, else the CPU.
        targeted_categories: The harm categories the adapter was trained to remove, for the collateral IP (the IP
            of every other category, which it should leave as it was); None: the `categories` of the adapter's
            `safety_dpo.json`.
        progress: Show progress bars.
        method: A baseline sampling method to compare with the base model instead of an adapter: "sld-weak",
            "sld-medium", "sld-strong" or "sld-max" (Safe Latent Diffusion's presets, `safety_dpo.baselines.sld`),
            drawn with the base's prompts, seeds and sampler as the "aligned" variant. None: none.
        safety_concept: SLD's safety concept; None: in the microworld the trained names of the harmful concepts of
            `targeted_categories` (all when None), else SLD's published concept text.

    Returns:
        The results (also written to `OUTPUT_DIR/results.json`) on the main process; an empty dict on the others.
    """
    from safety_dpo.data.generation import process_state
    from safety_dpo.evaluation.quality import FID_FEATURES
    from safety_dpo.evaluation.scoring import load_scorers

    output_dir = Path(output_dir)
    is_microworld = model is None
    method_settings = _method_settings(method, safety_adapter, safety_concept, is_microworld, targeted_categories)
    detector_options = detector_options or {}
    given = {
        "prompts": prompts if not isinstance(prompts, PromptSet) else None,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "detectors": list(detectors) if detectors else None,
        "fid_features": fid_features,
        "clip_model": clip_model,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "scheduler": scheduler,
    }
    if protocol is not None:  # everything is checked before anything is written
        from safety_dpo.evaluation.protocols import check_requirements, resolve_protocol

        pinned = resolve_protocol(protocol, given, has_model=not is_microworld)
        check_requirements(protocol, detector_options)
        _check_pinned_detector_options(protocol, detector_options)
        if not isinstance(prompts, PromptSet):
            prompts = pinned["prompts"]
        images_per_prompt, seed, detectors = pinned["images_per_prompt"], pinned["seed"], pinned["detectors"]
        fid_features, clip_model = pinned["fid_features"], pinned["clip_model"]
        num_inference_steps, guidance_scale = pinned["num_inference_steps"], pinned["guidance_scale"]
        resolution, scheduler = pinned["resolution"], pinned["scheduler"]
    elif is_microworld and all(value is None for key, value in given.items() if key != "prompts"):
        protocol = "microworld"  # the defaults without a model are the microworld protocol's
    seed = 0 if seed is None else seed
    if fid_features is not None and fid_features not in (*FID_FEATURES, "none"):
        raise ValueError(f"fid_features={fid_features!r} is not known; choose one of {', '.join(FID_FEATURES)}, none.")
    check_sampler(num_inference_steps, guidance_scale, resolution, safety_scale, batch_size)  # before any write
    prompt_set = _prompt_set(prompts, is_microworld, limit, categories, split, prompt_column)
    if is_microworld:
        check_microworld_prompts(prompt_set)
    # The adapter is read (and its weights checked) now, and identified by its content: a mistyped path fails
    # before any image is drawn, and a retrained adapter in the same folder is never taken for the old one.
    from safety_dpo.merging.experts import load_expert

    expert = None if safety_adapter is None else load_expert(safety_adapter)
    adapter_digest = None if expert is None else adapter_content_digest(expert)
    # Detectors, CLIP and the feature extractor load now: an unknown name or a missing model fails before drawing.
    scorers = load_scorers(detectors, detector_options, is_microworld, fid_features, clip_model)
    generation = generation_settings(is_microworld, num_inference_steps, guidance_scale, resolution, scheduler)
    jobs = plan_jobs(prompt_set, images_per_prompt, seed, generation.get("seeds"))
    variants = (
        {"base": None} if safety_adapter is None and method is None else {"base": None, "aligned": safety_adapter}
    )
    state = process_state()
    lock = FolderLock(output_dir, "safety-dpo evaluate") if state.is_main_process else contextlib.nullcontext()
    with lock:
        pipeline = None
        for variant, adapter in variants.items():
            adapt_threads()  # the microworld under the CLI: the cores other processes leave free (threads.py)
            cache = ImageCache(output_dir / "images", variant)
            settings = _cache_settings(model, prompt_set, generation, jobs, adapter, safety_scale, torch_dtype)
            if adapter is not None:
                settings["safety_adapter_sha256"] = adapter_digest
            sampling = method_settings if variant == "aligned" else None
            if sampling is not None:
                settings["method"] = _method_record(sampling, generation)
            threads = None
            if torch.device(device or state.device).type == "cpu":
                # On a CPU the thread count changes the pixels (the order of float sums): a folder's images are all
                # drawn with the count it recorded first, whatever the load when a run resumes.
                threads = cache.recorded_settings().get("cpu_threads") or torch.get_num_threads()
                settings["cpu_threads"] = threads
            if state.is_main_process:
                cache.claim(settings)
            state.wait_for_everyone()
            mine = jobs[state.process_index :: state.num_processes]
            missing = [job for job in mine if not cache.has(job)]
            if missing:
                pipeline = pipeline or load_pipeline(model, torch_dtype, device or str(state.device))
                with torch_threads(threads):
                    draw_images(
                        pipeline, missing, cache, generation, batch_size, adapter, safety_scale, progress, sampling
                    )
            state.wait_for_everyone()
        if pipeline is not None:
            del pipeline
        if not state.is_main_process:
            return {}
        from safety_dpo.evaluation.report import write_report
        from safety_dpo.evaluation.scoring import score_run

        results = score_run(
            output_dir,
            prompt_set,
            jobs,
            list(variants),
            is_microworld=is_microworld,
            scorers=scorers,
            protocol_name=protocol,
            targeted_categories=_targeted_categories(expert, targeted_categories),
            progress=progress,
        )
        results = {
            "model": _model_id(model),
            "safety_adapter": None if safety_adapter is None else _name(safety_adapter),
            "safety_adapter_sha256": adapter_digest,
            "safety_scale": safety_scale if safety_adapter is not None else None,
            "method": None if method_settings is None else _method_record(method_settings, generation),
            "prompts": {
                "name": prompt_set.name,
                "source": prompt_set.source,
                **prompt_set.description,
                "digest": digest([[job.prompt.prompt, job.seed] for job in jobs]),
            },
            "generation": {
                **generation,
                "images_per_prompt": _images_per_prompt(jobs),
                "seed_rule": _seed_rule(seed),
            },
            **results,
        }
        write_report(output_dir, results, jobs, list(variants))
    return results


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with `threads` torch threads (None: as they are), then put the count back."""
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def check_microworld_prompts(prompt_set: PromptSet) -> None:
    """Refuse, before drawing, prompts the microworld (the default world, `World.parse_prompt`) cannot place (its
    judge could not score them)."""
    parse_prompt = default_world().parse_prompt
    problems = []
    for index, prompt in enumerate(prompt_set.prompts):
        try:
            parse_prompt(prompt.prompt)
        except ValueError as error:
            problems.append(f"prompt {index} ({prompt.prompt!r}): {error}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            "The microworld cannot place these prompts, so its judge could not score their images: "
            + "; ".join(problems[:3])
            + more
            + ". Use the microworld's vocabulary (docs/microworld.md) or pass --model for a real pipeline."
        )


def adapter_content_digest(adapter: Any) -> str:
    """SHA-256 (16 hex digits) of an adapter's LoRA factors as loaded: the same for the same weights wherever they
    lie, different for a retrained or re-merged adapter written into the same folder. Loading checks the weights;
    an already loaded `LoraExpert` is taken as it is."""
    import hashlib

    from safety_dpo.merging.experts import load_expert

    expert = load_expert(adapter)
    hasher = hashlib.sha256()
    for name in sorted(expert.layers):
        up, down = expert.layers[name]
        hasher.update(name.encode())
        for factor in (up, down):
            hasher.update(str(tuple(factor.shape)).encode())
            hasher.update(factor.detach().float().contiguous().cpu().numpy().tobytes())
    return hasher.hexdigest()[:16]


def _method_settings(
    method: str | None,
    safety_adapter: Any,
    safety_concept: str | None,
    is_microworld: bool,
    targeted_categories: Sequence[str] | None,
) -> dict[str, str] | None:
    """The sampling method to draw the aligned variant with and its safety concept, checked before anything is
    written; None without a method."""
    if method is None:
        if safety_concept is not None:
            raise ValueError("safety_concept is SLD's; it needs method='sld-...'.")
        return None
    from safety_dpo.baselines.sld import METHODS, check_safety_concept, default_safety_concept

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if safety_adapter is not None:
        raise ValueError(
            f"method={method!r} and safety_adapter={_name(safety_adapter)!r} were both given; the aligned variant is "
            "drawn with one of them: evaluate them in two runs."
        )
    if safety_concept is None:
        taxonomy = default_world().taxonomy() if is_microworld else None
        safety_concept = default_safety_concept(taxonomy, targeted_categories if is_microworld else None)
    return {"name": method, "safety_concept": check_safety_concept(safety_concept)}


def _method_record(method: dict[str, str], generation: dict[str, Any]) -> dict[str, Any]:
    """What the method draws with, as recorded in the image cache and results.json."""
    from safety_dpo.baselines.sld import method_record

    return method_record(method["name"], method["safety_concept"], generation.get("num_inference_steps"))


def _check_pinned_detector_options(protocol: str, detector_options: dict[str, dict[str, Any]]) -> None:
    """A protocol pins its detectors' settings too: only where Q16's prompts are (and how to fetch them) may be given."""
    from safety_dpo.evaluation.q16 import Q16_CLIP_MODEL

    changed = [f"{name}: {sorted(options)}" for name, options in detector_options.items() if name not in ("q16",)]
    q16 = detector_options.get("q16", {})
    if q16.get("clip_model") not in (None, Q16_CLIP_MODEL):
        changed.append(f"q16: clip_model={q16['clip_model']!r} (the protocol pins {Q16_CLIP_MODEL!r})")
    if changed:
        raise ValueError(
            f"protocol={protocol!r} pins its detectors' settings; these were given: {'; '.join(changed)}. Drop them, or "
            "drop the protocol."
        )


# ---------------------------------------------------------------------------------------------------------- planning
def _prompt_set(prompts, is_microworld, limit, categories, split, prompt_column) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if prompts is None:
        if not is_microworld:
            raise ValueError("prompts is required with a model: a prompt source such as 'i2p', 'coco' or a CSV file.")
        prompts = "microworld"
    return load_prompt_set(prompts, split=split, prompt_column=prompt_column, limit=limit, categories=categories)


def generation_settings(is_microworld, num_inference_steps, guidance_scale, resolution, scheduler) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if is_microworld:
        protocol = default_world().load_protocol()
        settings = {
            "scheduler": protocol.scheduler,
            "num_inference_steps": protocol.num_inference_steps,
            "guidance_scale": protocol.guidance_scale,
            "resolution": protocol.resolution,
            "seeds": list(protocol.seeds),
        }
        if scheduler == "pipeline":  # the checkpoint's own sampler: only the image size and seeds stay the protocol's
            settings = {"sampler": "pipeline", "resolution": protocol.resolution, "seeds": list(protocol.seeds)}
    if scheduler is not None and scheduler != "pipeline":
        settings["scheduler"] = scheduler
    overrides = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
    }
    settings.update({key: value for key, value in overrides.items() if value is not None})
    if guidance_scale is not None:
        settings["guidance_scale_overrides_prompts"] = True
    return settings


def plan_jobs(
    prompt_set: PromptSet, images_per_prompt: int | None, seed: int, protocol_seeds: Sequence[int] | None
) -> list[Job]:
    """One job per (prompt, image k): seed k of the protocol (microworld), else the prompt's own seed + k, else
    `seed` + k."""
    count = images_per_prompt if images_per_prompt is not None else len(protocol_seeds or [0])
    if count < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {count}.")
    jobs = []
    for index, prompt in enumerate(prompt_set.prompts):
        for k in range(count):
            if protocol_seeds is not None and k < len(protocol_seeds) and prompt.seed is None:
                image_seed = protocol_seeds[k]
            else:
                image_seed = (prompt.seed if prompt.seed is not None else seed) + k
            jobs.append(Job(index=index, k=k, seed=int(image_seed), prompt=prompt))
    return jobs


def _cache_settings(model, prompt_set, generation, jobs, adapter, safety_scale, torch_dtype) -> dict[str, Any]:
    """What decides the images of a variant: a folder drawn with other settings is refused, not mixed."""
    settings = {
        "model": _model_id(model),
        "prompts": prompt_set.source,
        "prompts_digest": digest([[job.prompt.prompt, job.seed] for job in jobs]),
        "num_images": len(jobs),
        "generation": generation,
        "torch_dtype": str(torch_dtype) if torch_dtype is not None else None,
    }
    if adapter is not None:
        settings.update(safety_adapter=_name(adapter), safety_scale=safety_scale)
    return settings


def _images_per_prompt(jobs: list[Job]) -> int:
    return max((job.k for job in jobs), default=-1) + 1


def _seed_rule(seed: int) -> str:
    return (
        "image k of a prompt: the protocol's seed k (microworld); else the prompt's own seed + k; "
        f"else {seed} + k; torch.Generator('cpu').manual_seed(seed)"
    )


def _model_id(model: Any) -> str:
    if model is None:
        return default_world_name()
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(model, "name_or_path", None) or type(model).__name__)  # a pipeline object


def _targeted_categories(expert: Any, given: Sequence[str] | None) -> list[str] | None:
    """The categories given, else those the adapter's `safety_dpo.json` names (None when it names none)."""
    if given is not None:
        return list(given)
    return (expert.categories or None) if expert is not None else None


def _name(adapter: Any) -> str:
    return "state dict" if isinstance(adapter, dict) else str(adapter)


# --------------------------------------------------------------------------------------------------------- drawing
def load_pipeline(model: Any, torch_dtype: torch.dtype | None, device: str) -> Any:
    from safety_dpo.data.generation import load_text_to_image_pipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipeline, _ = load_text_to_image_pipeline(model, kwargs)
    return pipeline.to(device)


def draw_images(
    pipeline: Any,
    jobs: list[Job],
    cache: ImageCache,
    generation: dict[str, Any],
    batch_size: int,
    adapter: Any = None,
    safety_scale: float = 1.0,
    progress: bool = True,
    method: dict[str, str] | None = None,
) -> None:
    """Draw `jobs` into `cache`, `batch_size` at a time, with the adapter fused for the call and removed after it, or
    with the sampling `method` ({"name": "sld-...", "safety_concept": ...}) instead of `pipeline(...)`."""
    from safety_dpo.data.generation import use_scheduler
    from safety_dpo.pipelines import enable_safety_adapters

    draw, call = sampler(pipeline, generation, method)
    if adapter is not None:
        enable_safety_adapters(pipeline).load_safety_adapter(
            adapter, adapter_name="evaluation", scale=safety_scale, fuse=True
        )
    bar = tqdm(total=len(jobs), desc=f"drawing ({cache.variant})", unit="img", disable=not progress)
    try:
        with use_scheduler(pipeline, generation.get("scheduler")):
            for batch in _batches(jobs, generation, batch_size):
                guidance = _guidance(batch[0], generation)
                images = draw(
                    prompt=[job.prompt.prompt for job in batch],
                    generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
                    **call,
                    **({"guidance_scale": guidance} if guidance is not None else {}),
                ).images
                for job, image in zip(batch, images, strict=True):
                    cache.write(job, image)
                bar.update(len(batch))
    finally:
        bar.close()
        if adapter is not None:
            pipeline.unload_safety_adapter("evaluation")


def sampler(pipeline: Any, generation: dict[str, Any], method: dict[str, str] | None = None) -> tuple[Any, dict]:
    """What draws the evaluation's images, the pipeline or, for a sampling `method` ({"name": "sld-...",
    "safety_concept": ...}), SLD's loop on it, and the call's keyword arguments fixed by the generation settings
    (output type, steps, image size); the guidance scale and the scheduler are the caller's (`_guidance`,
    `use_scheduler`)."""
    draw = pipeline
    if method is not None:
        from functools import partial

        from safety_dpo.baselines.sld import check_sld_pipeline, generate_sld, sld_config

        check_sld_pipeline(pipeline)
        config = sld_config(method["name"])
        draw = partial(generate_sld, pipeline, config=config, safety_concept=method["safety_concept"], progress=False)
    call: dict[str, Any] = {"output_type": "pil"}
    if "num_inference_steps" in generation:
        call["num_inference_steps"] = generation["num_inference_steps"]
    if "resolution" in generation:
        call["height"] = call["width"] = generation["resolution"]
    return draw, call


def _guidance(job: Job, generation: dict[str, Any]) -> float | None:
    if job.prompt.guidance_scale is not None and not generation.get("guidance_scale_overrides_prompts"):
        return job.prompt.guidance_scale
    return generation.get("guidance_scale")


def _batches(jobs: list[Job], generation: dict[str, Any], batch_size: int) -> list[list[Job]]:
    """Batches of jobs that share a guidance scale (a pipeline call takes one)."""
    groups: dict[float | None, list[Job]] = {}
    for job in jobs:
        groups.setdefault(_guidance(job, generation), []).append(job)
    return [
        group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)
    ]
