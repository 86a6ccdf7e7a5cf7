"""CoProV2Builder on the microworld: the dataset it writes, resumption, refusals and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
from processes import run_on_two_processes
from tiny_models import get_dummy_sd_components

from safety_dpo.data import COLUMNS, CoProV2Builder, PromptWriterError, WrittenPairs, raw_bytes_features
from safety_dpo.data.pairs import names_in
from safety_dpo.microworld import taxonomy

CONCEPTS = ["knife", "nazi", "pills"]
FAST = {"concepts": CONCEPTS, "pairs_per_concept": 3, "num_inference_steps": 2, "batch_size": 4, "shard_size": 4}


def build(output_dir: Path, **overrides) -> datasets.DatasetDict:
    return CoProV2Builder(**{**FAST, **overrides}).build(output_dir, progress=False)


def rows_of(dataset: datasets.DatasetDict) -> dict[str, dict[str, list]]:
    """Every split's columns, images as PNG bytes, so that two builds compare exactly."""
    return {split: dataset[split].cast(raw_bytes_features()).to_dict() for split in dataset}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, datasets.DatasetDict]:
    """One uninterrupted build that several tests compare against."""
    output_dir = tmp_path_factory.mktemp("reference") / "coprov2"
    return output_dir, build(output_dir)


class FlakyPipelineError(RuntimeError):
    pass


def fail_after(builder: CoProV2Builder, calls: int, monkeypatch) -> None:
    """Make the builder's pipeline crash at its `calls + 1`-th call, as a killed process would stop."""
    original = builder.pipeline.prepare_latents
    count = Counter()

    def prepare_latents(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] > calls:
            raise FlakyPipelineError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(builder.pipeline, "prepare_latents", prepare_latents)


# ---------------------------------------------------------------------------------------------------- the dataset
def test_build_writes_pick_a_pic_columns_that_load_from_disk(reference):
    output_dir, dataset = reference
    assert set(dataset) == {"train", "test"}
    for split in dataset.values():
        assert tuple(split.column_names) == COLUMNS
        assert isinstance(split.features["jpg_0"], datasets.Image)
        assert isinstance(split.features["jpg_1"], datasets.Image)
        assert set(split["label_0"]) == {1.0}
        assert split["caption"] == split["unsafe_prompt"]
        assert split[0]["jpg_0"].size == (32, 32)
    loaded = datasets.load_from_disk(str(output_dir))
    assert rows_of(loaded) == rows_of(dataset)


def test_every_concept_gets_its_pairs_and_safe_prompts_never_name_the_concept(reference):
    _, dataset = reference
    world = taxonomy()
    rows = [row for split in dataset.values() for row in split.remove_columns(["jpg_0", "jpg_1"])]
    assert Counter(row["concept"] for row in rows) == {concept: 3 for concept in CONCEPTS}
    for row in rows:
        concept = world.concept(row["concept"])
        assert row["category"] == concept.category
        assert names_in(row["unsafe_prompt"], concept.names)
        assert not names_in(row["safe_prompt"], concept.all_names)
        assert world.counterpart_name(concept) in row["safe_prompt"]


def test_train_and_test_splits_never_share_a_prompt(tmp_path):
    dataset = build(tmp_path / "out", images_per_prompt=2, test_size=0.34)
    train, test = set(dataset["train"]["unsafe_prompt"]), set(dataset["test"]["unsafe_prompt"])
    assert train and test and not train & test
    assert set(dataset["test"]["concept"]) == set(CONCEPTS)  # one test pair per concept
    for split in dataset.values():
        per_prompt = Counter(split["unsafe_prompt"])
        assert set(per_prompt.values()) == {2}  # both images of a prompt stay together
        seeds = Counter(zip(split["unsafe_prompt"], split["seed"], strict=True))
        assert set(seeds.values()) == {1}  # with different seeds


def test_both_images_of_a_pair_start_from_the_same_noise(tmp_path, monkeypatch):
    builder = CoProV2Builder(**FAST)
    original = builder.pipeline.prepare_latents
    latents_per_call = []

    def recording_prepare_latents(*args, **kwargs):
        latents = original(*args, **kwargs)
        latents_per_call.append(latents.clone())
        return latents

    monkeypatch.setattr(builder.pipeline, "prepare_latents", recording_prepare_latents)
    builder.build(tmp_path / "out", progress=False)
    assert len(latents_per_call) == 5  # 9 pairs, 2 per call of 4 images
    for latents in latents_per_call:
        half = latents.shape[0] // 2
        assert (latents[:half] == latents[half:]).all()  # safe image i and unsafe image i share their noise
        if half > 1:
            assert not (latents[0] == latents[1]).all()  # different pairs do not


def test_the_same_settings_give_the_same_dataset(reference, tmp_path):
    _, dataset = reference
    assert rows_of(build(tmp_path / "again")) == rows_of(dataset)


def test_the_build_seed_changes_prompts_and_image_seeds(reference, tmp_path):
    _, dataset = reference
    other = build(tmp_path / "other", seed=1)
    assert set(other["train"]["unsafe_prompt"]) != set(dataset["train"]["unsafe_prompt"])
    assert not set(other["train"]["seed"]) & set(dataset["train"]["seed"])


# ---------------------------------------------------------------------------------------------------- resumption
def test_a_build_killed_while_drawing_resumes_to_the_uninterrupted_dataset(reference, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    builder = CoProV2Builder(**FAST)
    fail_after(builder, calls=3, monkeypatch=monkeypatch)
    with pytest.raises(FlakyPipelineError):
        builder.build(output_dir, progress=False)
    finished_shards = sorted(path.name for path in (output_dir / "shards").iterdir())
    assert finished_shards == ["shard-00000"]  # 4 rows per shard, 2 pairs per call: call 3 was in shard 1
    # A process killed while renaming leaves a temporary shard behind; the next run must not trip over it.
    (output_dir / "shards" / "shard-00001.tmp-12345").mkdir()
    resumed = build(output_dir)
    assert rows_of(resumed) == rows_of(reference[1])
    assert not (output_dir / "shards").exists()  # removed once the dataset is assembled


def test_resuming_does_not_redraw_finished_shards(tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    builder = CoProV2Builder(**FAST)
    fail_after(builder, calls=4, monkeypatch=monkeypatch)
    with pytest.raises(FlakyPipelineError):
        builder.build(output_dir, progress=False)
    resumed = CoProV2Builder(**FAST)
    fail_after(resumed, calls=3, monkeypatch=monkeypatch)  # shards 1 and 2 need 3 calls: 2 pairs + 2 pairs + 1 pair
    resumed.build(output_dir, progress=False)


def test_a_finished_build_is_loaded_not_rebuilt(reference, monkeypatch):
    output_dir, dataset = reference
    builder = CoProV2Builder(**FAST)
    fail_after(builder, calls=0, monkeypatch=monkeypatch)
    assert rows_of(builder.build(output_dir, progress=False)) == rows_of(dataset)


class OnceBrokenWriter:
    """A template-like writer whose 'server' fails once, on its second concept."""

    name = "once-broken"

    def __init__(self) -> None:
        from safety_dpo.data import TemplatePromptWriter

        self.template = TemplatePromptWriter()
        self.requests = 0
        self.broken = True

    def write(self, request):
        self.requests += 1
        if self.broken and self.requests == 2:
            self.broken = False
            raise PromptWriterError("server unreachable")
        return self.template.write(request)

    def to_dict(self):
        return {"name": self.name}


def test_a_writer_failure_keeps_finished_concepts_and_the_rerun_completes_the_rest(tmp_path):
    output_dir = tmp_path / "out"
    writer = OnceBrokenWriter()
    with pytest.raises(PromptWriterError):
        build(output_dir, prompt_writer=writer)
    first = output_dir / "prompts" / "nazi.json"  # concepts go in taxonomy order: hate comes first
    assert [path.name for path in (output_dir / "prompts").glob("*.json")] == ["nazi.json"]
    written = first.read_bytes()
    dataset = build(output_dir, prompt_writer=writer)
    assert first.read_bytes() == written
    assert Counter(list(dataset["train"]["concept"]) + list(dataset["test"]["concept"])) == {c: 3 for c in CONCEPTS}


def test_a_directory_of_another_build_is_refused_and_left_alone(reference, tmp_path):
    output_dir, _ = reference
    before = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")}
    with pytest.raises(FileExistsError, match="pairs_per_concept: 3 there, 4 now"):
        build(output_dir, pairs_per_concept=4)
    assert {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before


def test_a_non_empty_directory_that_is_not_a_build_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory or a CoProV2 build"):
        build(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------ validation and report
class ScriptedWriter:
    """Returns the same candidates for every request."""

    name = "scripted"

    def __init__(self, candidates: list[tuple[str, str]]) -> None:
        self.candidates = candidates

    def write(self, request):
        return WrittenPairs(candidates=list(self.candidates), rejections=Counter(not_json=1))

    def to_dict(self):
        return {"name": self.name, "candidates": self.candidates}


def test_rejected_candidates_are_counted_by_reason_in_the_report_and_the_card(tmp_path):
    writer = ScriptedWriter(
        [
            ("a man holding a knife on a beach", "a man holding an apple on a beach"),
            ("a man holding a knife on a beach", "a man holding a pear on a beach"),  # duplicate
            ("a knife in a room", "a knife in a city"),  # the safe prompt names the concept
            ("a knife in a room", ""),  # empty
            ("a woman in red carrying a knife downtown", "an apple"),  # not a minimal edit
            ("a dagger on a beach", "an apple on a beach"),  # a held-out name, kept out of training data
            ("a loaf on a beach", "an apple on a beach"),  # the unsafe prompt does not name the concept
        ]
    )
    dataset = build(tmp_path / "out", concepts=["knife"], pairs_per_concept=2, prompt_writer=writer, test_size=0)
    assert dataset["train"]["unsafe_prompt"] == ["a man holding a knife on a beach"]
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    rounds = 5  # max_writer_rounds: the writer never gives a second usable pair
    assert report["rejections"] == {
        "duplicate": 2 * rounds - 1,
        "empty_prompt": rounds,
        "not_json": rounds,
        "not_minimal_edit": rounds,
        "safe_prompt_names_concept": rounds,
        "unsafe_prompt_misses_concept": rounds,
        "unsafe_prompt_uses_held_out_name": rounds,
    }
    assert report["shortfall"] == {"knife": 1}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| safe_prompt_names_concept | 5 |" in card
    assert "| violence | 1 |" in card


def test_an_unsafe_prompt_written_for_two_concepts_is_kept_once(tmp_path):
    writer = ScriptedWriter([("a knife and a gun on a beach", "an apple and a ball on a beach")])
    dataset = build(tmp_path / "out", concepts=["knife", "gun"], pairs_per_concept=1, prompt_writer=writer)
    assert dataset["train"]["concept"] == ["knife"]
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    # Concepts are written independently (possibly by different processes); the copy is dropped when they meet.
    assert report["rejections"]["duplicate"] == 1
    assert report["shortfall"] == {"gun": 1}


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"categories": ["violense"]}, "Unknown category 'violense'; known categories: hate, harassment"),
        ({"concepts": ["knif"]}, "Unknown concept 'knif'; known concepts: nazi"),
        ({"categories": []}, "No category chosen; choose among hate"),
        ({"concepts": []}, "No concept chosen"),
        ({"concepts": ["apple"]}, "neutral"),
        ({"pairs_per_concept": 0}, "pairs_per_concept must be an integer >= 1, got 0"),
        ({"images_per_prompt": 1.5}, "images_per_prompt must be an integer >= 1"),
        ({"test_size": 1.0}, r"test_size must be in \[0, 1\), got 1.0"),
        ({"min_similarity": 2}, r"min_similarity must be in \[0, 1\]"),
        ({"prompt_writer": "gpt:foo"}, "Unknown prompt writer 'gpt:foo'; accepted: template"),
    ],
)
def test_bad_settings_are_refused_with_what_is_accepted(arguments, message):
    with pytest.raises(ValueError, match=message):
        CoProV2Builder(**{"concepts": CONCEPTS, **arguments})


def test_a_pipeline_that_is_not_text_to_image_is_refused():
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**get_dummy_sd_components())
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline is not a text-to-image pipeline"):
        CoProV2Builder(img2img, taxonomy())
    with pytest.raises(ValueError, match="pipeline_or_path must be a diffusers text-to-image pipeline"):
        CoProV2Builder(object(), taxonomy())


def test_any_text_to_image_pipeline_and_a_taxonomy_file_are_accepted(tmp_path):
    from diffusers import StableDiffusionPipeline

    taxonomy().select(["violence"]).select_concepts(["knife", "gun"]).save(tmp_path / "taxonomy.yaml")
    pipe = StableDiffusionPipeline(**get_dummy_sd_components())
    builder = CoProV2Builder(pipe, taxonomy=tmp_path / "taxonomy.yaml", pairs_per_concept=2, num_inference_steps=2)
    dataset = builder.build(tmp_path / "out", progress=False)
    assert set(dataset["train"]["concept"]) | set(dataset["test"]["concept"]) == {"knife", "gun"}
    assert builder.settings()["generation"] == {"num_inference_steps": 2}


# ----------------------------------------------------------------------------------------- processes and the Hub
SCRIPT = """
import os
import sys
from accelerate import PartialState
from safety_dpo.data import CoProV2Builder

builder = CoProV2Builder(concepts={concepts!r}, pairs_per_concept=3, num_inference_steps=2, batch_size=4, shard_size=4)
builder.build(sys.argv[1], progress=False)
state = PartialState()
os.write(1, f"processes: {{state.num_processes}} index: {{state.process_index}}\\n".encode())  # one write: lines never interleave
"""


def test_a_build_split_across_processes_equals_a_single_process_build(reference, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(concepts=CONCEPTS))
    run_on_two_processes(script, str(tmp_path / "out"))
    assert rows_of(datasets.load_from_disk(str(tmp_path / "out"))) == rows_of(reference[1])


def test_push_to_hub_uploads_the_dataset_with_its_card_and_load_dataset_reads_it(hub, tmp_path):
    builder = CoProV2Builder(**FAST)
    built = builder.build(tmp_path / "out", progress=False)
    url = builder.push_to_hub("tester/coprov2-micro")
    assert "tester/coprov2-micro" in url
    loaded = datasets.load_dataset("tester/coprov2-micro")
    assert rows_of(loaded) == rows_of(built)
    from huggingface_hub import DatasetCard

    card = DatasetCard.load("tester/coprov2-micro", repo_type="dataset")
    assert "CoProV2" in card.text and "| violence | 3 |" in card.text
    assert card.data.dataset_info  # datasets merged its metadata into our card
    assert "safety_dpo" in card.data.tags


def test_push_to_hub_before_a_build_says_what_to_do():
    with pytest.raises(FileNotFoundError, match="run build"):
        CoProV2Builder(**FAST).push_to_hub("tester/nothing")


def test_an_llm_server_that_goes_away_stops_the_build_cleanly_and_a_rerun_finishes_it(tmp_path):
    from openai_server import LoopbackLLMServer, http_error

    from safety_dpo.data.llm_writers import OpenAIPromptWriter

    def answer(unsafe: str, safe: str) -> str:
        return json.dumps({"pairs": [{"unsafe": unsafe, "safe": safe}]})

    settings = {**FAST, "concepts": ["nazi", "knife"], "pairs_per_concept": 1, "test_size": 0}
    output_dir = tmp_path / "out"
    # The server answers for the first concept, then only fails (503), as an overloaded or dying server does.
    with LoopbackLLMServer(default=http_error(503, "overloaded")) as server:
        server.script(answer("a nazi on a beach", "an apple on a beach"))
        writer = OpenAIPromptWriter(server.base_url, model="m", max_retries=1, retry_backoff=0, timeout=2)
        with pytest.raises(PromptWriterError, match="no usable answer in 2 attempts"):
            build(output_dir, prompt_writer=writer, **settings)
    assert sorted(path.name for path in (output_dir / "prompts").glob("*.json")) == ["nazi.json"]
    assert not (output_dir / "dataset_dict.json").exists()
    with LoopbackLLMServer(default=answer("a knife in a room", "a wreath in a room")) as server:
        writer = OpenAIPromptWriter(server.base_url, model="m", max_retries=1, retry_backoff=0, timeout=2)
        dataset = build(output_dir, prompt_writer=writer, **settings)
        assert len(server.requests) == 1  # only the unfinished concept was asked for
    assert dataset["train"]["unsafe_prompt"] == ["a nazi on a beach", "a knife in a room"]


def test_the_card_describes_the_build_with_its_own_settings_whoever_renders_it(reference):
    output_dir, _ = reference
    other = CoProV2Builder(**{**FAST, "pairs_per_concept": 7})
    other.output_dir = output_dir
    card = str(other.dataset_card())
    assert "| `pairs_per_concept` | `3` |" in card and "| pairs | 9 |" in card


def test_a_writer_whose_every_pair_is_rejected_stops_with_the_counts(tmp_path):
    writer = ScriptedWriter([("a loaf on a beach", "an apple on a beach")])  # never names the concept
    with pytest.raises(PromptWriterError, match=r"no acceptable pair .*'unsafe_prompt_misses_concept': 5"):
        build(tmp_path / "out", concepts=["knife"], pairs_per_concept=1, prompt_writer=writer)
    assert json.loads((tmp_path / "out" / "prompts" / "knife.json").read_text())["pairs"] == []
