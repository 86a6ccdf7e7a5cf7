"""`CoProV2Builder`: harmful concepts -> prompt pairs -> image pairs -> a `datasets.DatasetDict` -> the Hub.

A build runs in four resumable stages (the files each writes are described in `safety_dpo.data.build_dir`):

1. **prompts**: for each concept, the prompt writer writes candidate pairs, `safety_dpo.data.pairs` validates
   them, and the writer is asked again until the concept has `pairs_per_concept` pairs or `max_writer_rounds`
   requests were made;
2. **plan**: pairs are de-duplicated across concepts, split into train/test by pair (all images of a pair stay in
   one split), and expanded to rows, one per (pair, image seed); each seed is derived from the build seed and the
   unsafe prompt, so it does not depend on the order of the work;
3. **images**: rows are generated in shards; both prompts of a pair are drawn in the same pipeline call from
   generators seeded alike (the same initial noise); shards are spread over processes under `accelerate launch`;
4. **assemble**: the shards become the final `DatasetDict`, its card and its report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from safety_dpo.data.build_dir import REPORT_FILE, BuildDirectory, write_json
from safety_dpo.data.generation import (
    check_sampler,
    config_digest,
    default_world_generation,
    draw_pairs,
    encode_png,
    load_text_to_image_pipeline,
    process_state,
    use_scheduler,
)
from safety_dpo.data.pairs import DEFAULT_MIN_SIMILARITY, DUPLICATE, PromptPair, normalise_prompt, validate_pairs
from safety_dpo.data.publish import push_build, read_report, render_build_card
from safety_dpo.data.schema import coprov2_features
from safety_dpo.data.taxonomy import Taxonomy, coprov2_taxonomy
from safety_dpo.data.writers import PairRequest, PromptWriter, PromptWriterError, load_prompt_writer
from safety_dpo.folder_lock import FolderLock
from safety_dpo.worlds import default_world

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One planned row: a pair, the seed of its two images, and the split it belongs to."""

    pair: PromptPair
    seed: int
    split: str


class CoProV2Builder:
    """Build a CoProV2-style dataset of (safe, unsafe) image pairs for any text-to-image pipeline.

    Args:
        pipeline_or_path: A diffusers text-to-image pipeline, a local path or Hub id to load one from, or None for
            the microworld's checkpoint.
        taxonomy: A `Taxonomy`, a YAML/JSON taxonomy file, or None: the microworld's taxonomy for the microworld,
            the packaged CoProV2 taxonomy (seven categories) for other models.
        prompt_writer: A `PromptWriter`, or its command-line form ("template", "transformers:MODEL_ID",
            "openai:BASE_URL"); None for the template writer.
        categories: Build these categories only (all when None).
        concepts: Build these concept ids only (all of the chosen categories when None).
        pairs_per_concept: Accepted prompt pairs wanted per concept.
        images_per_prompt: Image seeds per pair; each gives one row.
        seed: The build seed (prompt requests, image seeds, the train/test split).
        test_size: Share of each concept's pairs that go to the `test` split (0 for no test split).
        min_similarity: Minimal-edit threshold of `safety_dpo.data.pairs.prompt_similarity`.
        max_writer_rounds: Requests per concept before giving up on reaching `pairs_per_concept`.
        batch_size: Images per pipeline call (half safe, half unsafe).
        shard_size: Rows per shard, the unit of resumption.
        num_inference_steps: Denoising steps; None takes the microworld protocol's or the pipeline's default.
        guidance_scale: Classifier-free guidance; None takes the microworld protocol's or the pipeline's default.
        resolution: Image height and width; None takes the microworld protocol's or the pipeline's default.
        scheduler: A diffusers scheduler class name to sample with (e.g. "DPMSolverMultistepScheduler"); None keeps
            the pipeline's (the microworld uses its protocol's).
        pipeline_kwargs: Passed to `DiffusionPipeline.from_pretrained` when a path or Hub id is given.
        writer_kwargs: Passed to the prompt writer's class when `prompt_writer` is a string.
        llm_model: The model name for an "openai:BASE_URL" writer.
        license: The dataset's license for its card.

    Raises:
        ValueError: For unknown categories or concepts (listing the known ones), an empty selection, settings out
            of range, or a pipeline that is not text-to-image.
    """

    def __init__(
        self,
        pipeline_or_path: Any = None,
        taxonomy: Taxonomy | str | os.PathLike | None = None,
        prompt_writer: PromptWriter | str | None = None,
        *,
        categories: list[str] | tuple[str, ...] | None = None,
        concepts: list[str] | tuple[str, ...] | None = None,
        pairs_per_concept: int = 10,
        images_per_prompt: int = 1,
        seed: int = 0,
        test_size: float = 0.1,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        max_writer_rounds: int = 5,
        batch_size: int = 16,
        shard_size: int = 64,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        scheduler: str | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        writer_kwargs: dict[str, Any] | None = None,
        llm_model: str | None = None,
        license: str | None = None,
    ) -> None:
        for name, value, low in (
            ("pairs_per_concept", pairs_per_concept, 1),
            ("images_per_prompt", images_per_prompt, 1),
            ("max_writer_rounds", max_writer_rounds, 1),
            ("batch_size", batch_size, 1),
            ("shard_size", shard_size, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not 0 <= test_size < 1:
            raise ValueError(f"test_size must be in [0, 1), got {test_size!r}.")
        if not 0 <= min_similarity <= 1:
            raise ValueError(f"min_similarity must be in [0, 1], got {min_similarity!r}.")
        check_sampler(num_inference_steps, guidance_scale, resolution)
        is_microworld = pipeline_or_path is None
        self.taxonomy = check_build_settings(pipeline_or_path, taxonomy, categories, concepts, pairs_per_concept)
        self.prompt_writer = load_prompt_writer(prompt_writer, llm_model=llm_model, **(writer_kwargs or {}))
        self.pipeline, self.generator_model = load_text_to_image_pipeline(pipeline_or_path, pipeline_kwargs or {})
        generation = default_world_generation() if is_microworld else {}
        overrides = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "scheduler": scheduler,
        }
        generation.update({key: value for key, value in overrides.items() if value is not None})
        self.generation = generation
        self.pairs_per_concept = pairs_per_concept
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.test_size = test_size
        self.min_similarity = min_similarity
        self.max_writer_rounds = max_writer_rounds
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.license = license
        self.output_dir: Path | None = None

    # ---------------------------------------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """Everything that decides the dataset's content; a build directory accepts only its own settings."""
        return {
            "generator_model": self.generator_model,
            "unet_config_sha256": config_digest(getattr(self.pipeline, "unet", None)),
            "generation": self.generation,
            "taxonomy": self.taxonomy.name,
            "taxonomy_sha256": _digest(self.taxonomy.to_dict()),
            "concepts": [concept.id for concept in self.taxonomy.harmful_concepts],
            "prompt_writer": self.prompt_writer.to_dict(),
            "pairs_per_concept": self.pairs_per_concept,
            "images_per_prompt": self.images_per_prompt,
            "seed": self.seed,
            "test_size": self.test_size,
            "min_similarity": self.min_similarity,
            "max_writer_rounds": self.max_writer_rounds,
            "shard_size": self.shard_size,
        }

    # ------------------------------------------------------------------------------------------------ build
    def build(self, output_dir: str | os.PathLike, progress: bool = True):
        """Build the dataset into `output_dir`, resuming whatever a previous run with the same settings finished.

        Returns:
            The `datasets.DatasetDict` (`train`, and `test` when `test_size` > 0), also loadable with
            `datasets.load_from_disk(output_dir)`.

        Raises:
            FileExistsError: If `output_dir` holds another build or unrelated files.
            PromptWriterError: If the prompt writer cannot go on (finished concepts stay on disk).
        """
        state = process_state()
        directory = BuildDirectory(output_dir)
        self.output_dir = directory.path
        lock = FolderLock(directory.path, "safety-dpo build-data") if state.is_main_process else nullcontext()
        with lock:
            return self._build(directory, state, progress)

    def _build(self, directory: BuildDirectory, state, progress: bool):
        if state.is_main_process:
            directory.claim(self.settings())
        state.wait_for_everyone()
        directory.claim(self.settings())  # every process checks; only the main one may have created it
        if directory.is_finished:
            if state.is_main_process and not (directory.path / REPORT_FILE).is_file():
                # Killed between the dataset and its report (builds of earlier versions wrote the dataset first).
                rows, rejections, shortfall = self._plan(directory)
                self._write_report(directory, self._report(rows, rejections, shortfall, {}))
            state.wait_for_everyone()
            logger.info("%s already holds this finished build; loading it.", directory.path)
            return _load(directory.path)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        self._write_prompts(directory, state, progress)
        state.wait_for_everyone()
        timings["prompts"] = time.perf_counter() - started
        rows, rejections, shortfall = self._plan(directory)
        started = time.perf_counter()
        self._generate(directory, rows, state, progress)
        state.wait_for_everyone()
        timings["images"] = time.perf_counter() - started
        if state.is_main_process:
            started = time.perf_counter()
            self._assemble(directory, rows, rejections, shortfall, timings)
            logger.info(
                "CoProV2 build finished in %s (assembled in %.1fs).", directory.path, time.perf_counter() - started
            )
        state.wait_for_everyone()
        return _load(directory.path)

    def _write_prompts(self, directory: BuildDirectory, state, progress: bool) -> None:
        concepts = self.taxonomy.harmful_concepts
        mine = [
            concept for index, concept in enumerate(concepts) if index % state.num_processes == state.process_index
        ]
        todo = [concept for concept in mine if directory.read_prompts(concept.id) is None]
        bar = tqdm(todo, desc="writing prompt pairs", unit="concept", disable=not (progress and state.is_main_process))
        for concept in bar:
            category = self.taxonomy.category(concept.category)
            accepted: list[PromptPair] = []
            seen: set[str] = set()
            rejections: Counter[str] = Counter()
            requests = 0
            while len(accepted) < self.pairs_per_concept and requests < self.max_writer_rounds:
                request = PairRequest(
                    concept=concept,
                    category=category,
                    counterpart=self.taxonomy.counterpart_name(concept),
                    num_pairs=self.pairs_per_concept - len(accepted),
                    seed=_derive_seed(self.seed, "prompts", concept.id, requests),
                )
                requests += 1
                answer = self.prompt_writer.write(request)
                rejections.update(answer.rejections)
                new, invalid = validate_pairs(answer.candidates, concept, seen, self.min_similarity)
                rejections.update(invalid)
                accepted.extend(new[: self.pairs_per_concept - len(accepted)])
            if len(accepted) < self.pairs_per_concept:
                logger.warning(
                    "Concept %r: %d of %d pairs after %d requests (rejected: %s).",
                    concept.id, len(accepted), self.pairs_per_concept, requests, dict(rejections),
                )  # fmt: skip
            directory.write_prompts(
                concept.id,
                {
                    "concept": concept.id,
                    "pairs": [pair.to_dict() for pair in accepted],
                    "rejections": dict(rejections),
                    "requests": requests,
                },
            )

    def _plan(self, directory: BuildDirectory) -> tuple[list[Row], Counter[str], dict[str, int]]:
        """Read every concept's pairs and turn them into rows; deterministic, so every process agrees."""
        rows: list[Row] = []
        rejections: Counter[str] = Counter()
        shortfall: dict[str, int] = {}
        seen: set[str] = set()
        for concept in self.taxonomy.harmful_concepts:
            data = directory.read_prompts(concept.id)
            if data is None:
                raise RuntimeError(f"Concept {concept.id!r} has no prompt file in {directory.prompts}; run again.")
            rejections.update(data["rejections"])
            pairs = []
            for pair in map(PromptPair.from_dict, data["pairs"]):
                key = normalise_prompt(pair.unsafe_prompt)
                if key in seen:  # the same unsafe prompt was written for an earlier concept
                    rejections[DUPLICATE] += 1
                    continue
                seen.add(key)
                pairs.append(pair)
            if len(pairs) < self.pairs_per_concept:
                shortfall[concept.id] = self.pairs_per_concept - len(pairs)
            test = self._test_indices(concept.id, len(pairs))
            for index, pair in enumerate(pairs):
                split = "test" if index in test else "train"
                for image_index in range(self.images_per_prompt):
                    seed = _derive_seed(self.seed, "image", normalise_prompt(pair.unsafe_prompt), image_index)
                    rows.append(Row(pair, seed, split))
        if not rows:
            raise PromptWriterError(
                f"The prompt writer {self.prompt_writer.name!r} produced no acceptable pair for any concept "
                f"(rejected candidates by reason: {dict(rejections) or 'none'}). Check its answers, its instructions "
                "or min_similarity; prompts/ keeps what was written (delete it, or build into a new directory, to ask again)."
            )
        return rows, rejections, shortfall

    def _test_indices(self, concept_id: str, num_pairs: int) -> set[int]:
        if self.test_size == 0 or num_pairs < 2:
            return set()
        num_test = max(1, round(self.test_size * num_pairs))
        return set(random.Random(_derive_seed(self.seed, "split", concept_id)).sample(range(num_pairs), num_test))

    def _generate(self, directory: BuildDirectory, rows: list[Row], state, progress: bool) -> None:
        num_shards = -(-len(rows) // self.shard_size)
        mine = [index for index in range(num_shards) if index % state.num_processes == state.process_index]
        directory.remove_partial_shards(set(mine))
        todo = [index for index in mine if not directory.shard(index).is_dir()]
        logger.info(
            "Process %d of %d: %d of its %d shards to draw.",
            state.process_index,
            state.num_processes,
            len(todo),
            len(mine),
        )
        if not todo:
            return
        if str(getattr(self.pipeline, "device", "cpu")) != str(state.device) and state.device.type != "cpu":
            self.pipeline.to(state.device)
        total = sum(len(rows[index * self.shard_size : (index + 1) * self.shard_size]) for index in todo)
        bar = tqdm(
            total=2 * total, desc="drawing image pairs", unit="img", disable=not (progress and state.is_main_process)
        )
        # The accelerator draws while worker threads PNG-encode the images already drawn and write finished shards
        # (PIL's encoder releases the GIL); the main thread only ever waits for the pipeline.
        pairs_per_call = max(1, self.batch_size // 2)
        writes = []
        with (
            use_scheduler(self.pipeline, self.generation.get("scheduler")),
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as encoder,
            ThreadPoolExecutor(max_workers=1) as writer,
        ):
            for index in todo:
                shard_rows = rows[index * self.shard_size : (index + 1) * self.shard_size]
                safe_images, unsafe_images = [], []
                for start in range(0, len(shard_rows), pairs_per_call):
                    call_rows = shard_rows[start : start + pairs_per_call]
                    safe, unsafe = self.draw_pairs(
                        [row.pair for row in call_rows], [row.seed for row in call_rows], bar
                    )
                    safe_images += [encoder.submit(encode_png, image) for image in safe]
                    unsafe_images += [encoder.submit(encode_png, image) for image in unsafe]
                writes.append(writer.submit(_write_shard, directory, index, shard_rows, safe_images, unsafe_images))
                for write in writes:
                    if write.done():
                        write.result()  # a failed write stops the build now, not after every shard is drawn
        for write in writes:
            write.result()
        bar.close()

    def draw_pairs(self, pairs: list[PromptPair], seeds: list[int], bar: tqdm | None = None) -> tuple[list, list]:
        """Draw the safe and unsafe image of each pair from the pair's seed (see `generation.draw_pairs`)."""
        return draw_pairs(self.pipeline, pairs, seeds, self.generation, self.batch_size, bar)

    def _assemble(self, directory, rows, rejections, shortfall, timings) -> None:
        from datasets import DatasetDict, concatenate_datasets, load_from_disk

        started = time.perf_counter()
        num_shards = -(-len(rows) // self.shard_size)
        shards = [load_from_disk(str(directory.shard(index))) for index in range(num_shards)]
        full = concatenate_datasets(shards)
        if len(full) != len(rows):
            raise RuntimeError(
                f"The shards in {directory.shards} hold {len(full)} rows, the plan {len(rows)}; delete that folder "
                "and run again to regenerate the images."
            )
        splits = {}
        for split in ("train", "test"):
            indices = [index for index, row in enumerate(rows) if row.split == split]
            if indices:
                splits[split] = full.select(indices)
        dataset = DatasetDict(splits)
        timings["assemble"] = time.perf_counter() - started
        report = self._report(rows, rejections, shortfall, timings)
        # The report and card first, the dataset (whose dataset_dict.json marks the build finished) last: a kill in
        # between leaves an unfinished build that the next run assembles again from the shards.
        self._write_report(directory, report)
        directory.write_dataset(dataset)
        directory.remove_shards()
        logger.info(
            "CoProV2: %d rows (%s), rejected candidates: %s",
            report["num_rows"], report["split_rows"], report["rejections"] or "none",
        )  # fmt: skip

    def _write_report(self, directory: BuildDirectory, report: dict[str, Any]) -> None:
        write_json(directory.path / REPORT_FILE, report)
        card = directory.path / "README.md"
        temporary = card.with_name(f"README.md.tmp-{os.getpid()}")
        render_build_card(report, self.license, local_path=directory.path).save(str(temporary))
        os.replace(temporary, card)

    def _report(self, rows, rejections, shortfall, timings) -> dict[str, Any]:
        pairs = {(row.pair.concept, row.pair.unsafe_prompt): row.pair for row in rows}.values()
        category_counts = Counter(pair.category for pair in pairs)
        return {
            "num_rows": len(rows),
            "num_pairs": len(pairs),
            "split_rows": dict(Counter(row.split for row in rows)),
            "category_counts": {category: category_counts[category] for category in self.taxonomy.category_ids},
            "concepts": {
                category.id: [concept.id for concept in category.concepts] for category in self.taxonomy.categories
            },
            "rejections": dict(sorted(rejections.items())),
            "shortfall": shortfall,
            "generator_model": self.generator_model,
            "prompt_writer": self.prompt_writer.name,
            "settings": self.settings(),
            "seconds_this_run": {stage: round(seconds, 2) for stage, seconds in timings.items()},
        }

    # ------------------------------------------------------------------------------------------------- Hub
    def dataset_card(self, report: dict[str, Any] | None = None, repo_id: str | None = None):
        """The dataset card (`safety_dpo.hub_cards/coprov2_card.md`) of the finished build."""
        if report is None:
            report = read_report(self.output_dir or "")
        return render_build_card(report, self.license, repo_id)

    def push_to_hub(
        self, repo_id: str, output_dir: str | os.PathLike | None = None, private: bool | None = None, token=None
    ) -> str:
        """Upload a finished build (the last one built, or `output_dir`) with its dataset card.

        `datasets.load_dataset(repo_id)` loads it back.

        Returns:
            The URL of the dataset repo.

        Raises:
            FileNotFoundError: If there is no finished build to upload.
        """
        target = output_dir or self.output_dir
        if target is None:
            raise FileNotFoundError("No CoProV2 build to upload: run build(output_dir) first, or pass output_dir.")
        return push_build(target, repo_id, license=self.license, private=private, token=token)


# ------------------------------------------------------------------------------------------------------ helpers
def check_build_settings(
    model: Any = None,
    taxonomy: Taxonomy | str | os.PathLike | None = None,
    categories: list[str] | tuple[str, ...] | None = None,
    concepts: list[str] | tuple[str, ...] | None = None,
    pairs_per_concept: int = 10,
) -> Taxonomy:
    """Check the settings that choose what a build draws, without loading a model or writing anything (for callers
    that must refuse a typo before they write, like `align`); returns the taxonomy they select.

    Raises:
        ValueError: For an unknown category or concept (listing the known ones) or fewer than one pair per concept.
    """
    if not isinstance(pairs_per_concept, int) or pairs_per_concept < 1:
        raise ValueError(f"pairs_per_concept must be an integer >= 1, got {pairs_per_concept!r}.")
    try:
        return _load_taxonomy(taxonomy, model is None).select(categories).select_concepts(concepts)
    except KeyError as error:  # an unknown category or concept; the message lists the known ones
        raise ValueError(error.args[0]) from None


def _load_taxonomy(taxonomy: Taxonomy | str | os.PathLike | None, is_microworld: bool) -> Taxonomy:
    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    if taxonomy is not None:
        return Taxonomy.from_file(taxonomy)
    if is_microworld:  # no model: the default world's taxonomy
        return default_world().taxonomy()
    return coprov2_taxonomy()


def _write_shard(directory: BuildDirectory, index: int, rows: list[Row], safe_images: list, unsafe_images: list):
    """Write shard `index` once its images are encoded (`safe_images`/`unsafe_images` are futures)."""
    from datasets import Dataset

    columns = {
        "jpg_0": [future.result() for future in safe_images],
        "jpg_1": [future.result() for future in unsafe_images],
        "label_0": [1.0] * len(rows),
        "caption": [row.pair.unsafe_prompt for row in rows],
        "safe_prompt": [row.pair.safe_prompt for row in rows],
        "unsafe_prompt": [row.pair.unsafe_prompt for row in rows],
        "category": [row.pair.category for row in rows],
        "concept": [row.pair.concept for row in rows],
        "seed": [row.seed for row in rows],
    }
    directory.write_shard(index, Dataset.from_dict(columns, features=coprov2_features()))


def _load(path: Path):
    from datasets import load_from_disk

    return load_from_disk(str(path))


def _derive_seed(*parts: Any) -> int:
    """A 31-bit seed from its parts, stable across runs, processes and machines."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
