"""Training on CoProV2 as published, in Pick-a-Pic's layout (`jpg_0`, `jpg_1`, `label_0`, `caption` only), merging
what it trains, and exporting a build to the exact layout diffusers' `train_diffusion_dpo.py` reads.

The tiny Stable Diffusion pipeline of `tests/tiny_models.py` trains one or two steps in a few seconds.
"""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_SIZE, get_dummy_sd_components, load_fixture_tokenizer, tiny_pairs

from safety_dpo.data.pickapic import to_pickapic
from safety_dpo.data.schema import coprov2_features
from safety_dpo.merging import CoMergeConfig, co_merge
from safety_dpo.merging.calibration import calibration_dataset_prompts
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME
from safety_dpo.trainer.data import PairExamples, effective_prompt_condition, image_to_pixels, prepare_pairs
from safety_dpo.trainer.experts import train_experts

RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
SETTINGS = {
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-3,
    "seed": 0,
    "report_to": "none",
    "use_cpu": True,
    "save_strategy": "no",
    "disable_tqdm": True,
}


def png_bytes(colour: tuple[int, int, int], size: int = IMAGE_SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def published_pairs(labels: tuple[float, ...] = (1.0, 0.0, 0.5, 1.0)) -> datasets.Dataset:
    """CoProV2 as published on the Hub, in Pick-a-Pic's layout: four columns, images as raw PNG bytes."""
    colours = [RED, GREEN, BLUE, YELLOW]
    rows = {
        "jpg_0": [png_bytes(colours[i % 4]) for i in range(len(labels))],
        "jpg_1": [png_bytes(colours[(i + 1) % 4]) for i in range(len(labels))],
        "label_0": list(labels),
        "caption": [f"a knife number {i}" for i in range(len(labels))],
    }
    features = datasets.Features(
        {
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train(dataset, output_dir, **overrides):
    """`train_experts` of the tiny pipeline, with `SETTINGS` under `overrides`."""
    return train_experts(dataset, output_dir, model=tiny_pipeline(), **{**SETTINGS, **overrides})


def metadata(expert_dir) -> dict:
    return json.loads((expert_dir / METADATA_NAME).read_text())


def colour_of(pixels: torch.Tensor) -> tuple[int, int, int]:
    """The colour of a plain (3, H, W) image in [-1, 1]."""
    return tuple(int(round(value)) for value in ((pixels.mean((1, 2)) + 1) * 127.5).tolist())


# ---------------------------------------------------------------------------------------- 1. training as published
def test_the_published_layout_trains_one_all_pair_expert_with_the_unsafe_prompt_and_no_category(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="safety_dpo"):
        trained = train(published_pairs(), tmp_path / "expert")
    assert trained == [tmp_path / "expert"]
    assert (tmp_path / "expert" / LORA_WEIGHT_NAME).is_file()
    recorded = metadata(tmp_path / "expert")
    assert recorded["categories"] == []  # no category column: an expert of every pair, whatever their category
    assert recorded["training"]["prompt_condition"] == "unsafe"
    assert "Dropping 1 of 4 pairs tied (label_0 = 0.5)" in caplog.text
    assert "prompt_condition='both' needs the safe prompts" in caplog.text


def test_binary_image_columns_decode_to_the_pixels_of_the_same_image_feature():
    from_pil = image_to_pixels(Image.new("RGB", (48, 48), BLUE), IMAGE_SIZE, row=0)  # datasets.Image()
    assert torch.equal(image_to_pixels(png_bytes(BLUE, 48), IMAGE_SIZE, row=0), from_pil)  # Value("binary")
    undecoded = {"bytes": png_bytes(BLUE, 48), "path": None}  # datasets.Image(decode=False)
    assert torch.equal(image_to_pixels(undecoded, IMAGE_SIZE, row=0), from_pil)


def test_a_value_that_is_no_image_is_refused_naming_its_row_column_and_what_is_accepted():
    with pytest.raises(TypeError, match=r"Row 3 of 'jpg_1' holds a str; .*PNG/JPEG bytes \(datasets.Value"):
        image_to_pixels("a knife", IMAGE_SIZE, row=3, column="jpg_1")


def test_broken_bytes_are_refused_as_undecodable_naming_the_row():
    with pytest.raises(ValueError, match=r"Row 1: the image cannot be decoded \(jpg_0, "):
        image_to_pixels(b"\x89PNG broken", IMAGE_SIZE, row=1, column="jpg_0")


def test_ties_are_dropped_with_their_count_and_label_0_orients_binary_pairs(caplog):
    with caplog.at_level(logging.INFO, logger="safety_dpo"):
        pairs = prepare_pairs(published_pairs(), None, "unsafe")
    assert "Dropping 1 of 4 pairs tied (label_0 = 0.5)" in caplog.text
    assert pairs["caption"] == ["a knife number 0", "a knife number 1", "a knife number 3"]
    assert pairs["label_0"] == [1.0, 1.0, 1.0]
    examples = PairExamples(pairs, "unsafe", IMAGE_SIZE)
    # Row 1 is green over blue with label_0 = 0: swapped, so blue is the preferred image.
    assert colour_of(examples[1]["pixels_chosen"]) == BLUE and colour_of(examples[1]["pixels_rejected"]) == GREEN
    assert examples[1]["prompt"] == "a knife number 1"


def test_a_label_0_outside_pickapics_values_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"label_0 holds \[0.3\]; Pick-a-Pic's labels are 1 \(jpg_0 preferred\)"):
        prepare_pairs(published_pairs(labels=(1.0, 0.3)), None, "unsafe")


# --------------------------------------------------------------------------------------- 2. prompt_condition fallback
@pytest.mark.parametrize(
    ("columns", "requested", "effective", "notice"),
    [
        (["jpg_0", "jpg_1", "caption"], "both", "unsafe", "prompt_condition='both' needs the safe prompts"),
        (["jpg_0", "jpg_1", "caption"], "safe", "unsafe", "prompt_condition='safe' needs the safe prompts"),
        (["jpg_0", "jpg_1", "caption"], "unsafe", "unsafe", None),
        (["jpg_0", "jpg_1", "unsafe_prompt", "safe_prompt"], "both", "both", None),
        (["jpg_0", "jpg_1", "safe_prompt"], "both", "safe", "prompt_condition='both' needs the unsafe prompts"),
        (["jpg_0", "jpg_1", "safe_prompt"], "unsafe", "safe", "prompt_condition='unsafe' needs the unsafe prompts"),
    ],
)
def test_prompt_condition_falls_back_to_what_the_columns_allow_with_a_notice(
    columns, requested, effective, notice, caplog
):
    with caplog.at_level(logging.WARNING, logger="safety_dpo"):
        assert effective_prompt_condition(columns, requested) == effective
    if notice is None:
        assert not caplog.records
    else:
        assert notice in caplog.text and "training with prompt_condition=" in caplog.text


def test_a_dataset_without_any_prompt_column_is_refused_naming_the_flag_and_its_columns():
    with pytest.raises(ValueError, match=r"prompt_condition='both': .* no prompt column; it has \['jpg_0', 'jpg_1'"):
        effective_prompt_condition(published_pairs().remove_columns("caption"), "both")


def test_prepare_pairs_trains_a_caption_only_dataset_with_the_effective_condition():
    pairs = published_pairs()
    condition = effective_prompt_condition(pairs, "both")
    examples = PairExamples(prepare_pairs(pairs, None, condition), condition, IMAGE_SIZE)
    assert len(examples) == 3 and examples[0]["prompt"] == "a knife number 0"  # one example per pair: the caption


def test_the_trainer_falls_back_to_the_condition_the_dataset_allows_and_records_it(tmp_path):
    from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer

    args = SafetyDPOConfig(output_dir=str(tmp_path / "expert"), **SETTINGS)  # prompt_condition="both", the default
    trainer = SafetyDPOTrainer(model=tiny_pipeline(), args=args, train_dataset=published_pairs())
    assert len(trainer.train_dataset) == 3  # one example per untied pair, conditioned on its caption
    assert trainer.adapter_metadata()["training"]["prompt_condition"] == "unsafe"


def test_the_requested_condition_on_a_caption_only_dataset_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"lacks the columns \['safe_prompt'\].*prompt_condition='both'"):
        prepare_pairs(published_pairs(), None, "both")


# -------------------------------------------------------------------------------------- 3. which experts are trained
def two_categories() -> datasets.Dataset:
    return datasets.concatenate_datasets([tiny_pairs(2, category="violence"), tiny_pairs(2, category="hate")])


def test_no_category_argument_on_a_dataset_with_categories_trains_one_expert_on_all_pairs_with_a_notice(
    tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="safety_dpo"):
        trained = train(two_categories(), tmp_path / "expert")
    assert trained == [tmp_path / "expert"]
    assert metadata(tmp_path / "expert")["categories"] == ["hate", "violence"]
    assert "mixes the dataset's categories ['hate', 'violence']" in caplog.text
    assert "all_categories trains one expert per category" in caplog.text


def test_all_categories_on_a_dataset_without_a_category_column_trains_one_expert_on_all_pairs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="safety_dpo"):
        trained = train(published_pairs(), tmp_path / "experts", all_categories=True)
    assert trained == [tmp_path / "experts"]  # no per-category subfolder
    assert metadata(tmp_path / "experts")["categories"] == []
    assert "all_categories: the dataset has no 'category' column" in caplog.text


@pytest.mark.parametrize(
    ("choice", "argument"),
    [({"category": "violence"}, "category='violence'"), ({"categories": ["violence", "hate"]}, "categories=")],
)
def test_a_category_on_a_dataset_without_a_category_column_is_refused_saying_what_leaving_it_out_does(
    tmp_path, choice, argument
):
    message = rf"{argument}.*no 'category' column.*Leave it out to train one expert on all its pairs"
    with pytest.raises(ValueError, match=message):
        train(published_pairs(), tmp_path / "expert", **choice)
    assert not (tmp_path / "expert").exists()


def test_two_expert_choices_at_once_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Choose at most one of category, categories or all_categories"):
        train(two_categories(), tmp_path / "expert", category="violence", all_categories=True)


# ------------------------------------------------------------------------------------------------------ 4. merging
def test_calibration_prompts_come_from_caption_when_there_is_no_unsafe_prompt_column():
    prompts = calibration_dataset_prompts(published_pairs(), ["violence"], "published")
    assert prompts == {None: [f"a knife number {i}" for i in range(4)]}  # no category column: every prompt
    by_category = calibration_dataset_prompts(two_categories().remove_columns("unsafe_prompt"), ["hate"], "tiny")
    assert by_category == {"hate": ["a knife number 0", "a knife number 1"]}


def test_calibration_without_a_prompt_column_is_refused_naming_the_accepted_ones():
    with pytest.raises(ValueError, match=r"no 'unsafe_prompt' or 'caption' column"):
        calibration_dataset_prompts(published_pairs().remove_columns("caption"), None, "published")


def test_an_expert_of_the_published_layout_merges_with_another_calibrated_on_that_dataset(tmp_path):
    published = tmp_path / "published"
    published_pairs().save_to_disk(str(published))
    caption_expert = train(str(published), tmp_path / "all-pairs")[0]
    violence_expert = train(tiny_pairs(), tmp_path / "violence", category="violence")[0]
    config = CoMergeConfig(calibration_dataset=str(published), num_timesteps=2, calibration_batch_size=2)
    merged = co_merge([caption_expert, violence_expert], config, pipeline=tiny_pipeline())
    assert merged.report["calibration"]["prompts"] == 4  # the four captions
    assert [source["categories"] for source in merged.merged_from] == [[], ["violence"]]
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / LORA_WEIGHT_NAME).is_file()


# ----------------------------------------------------------------------------------- 5. export to Pick-a-Pic's layout
def coprov2_build() -> datasets.DatasetDict:
    """A CoProV2 build as `build-data` writes it (`coprov2_features`): red safe images over green unsafe ones, a row
    whose label says its jpg_1 is preferred (a Pick-a-Pic-style row), and a tie."""
    rows = {
        "jpg_0": [Image.new("RGB", (48, 48), colour) for colour in (RED, GREEN, RED)],
        "jpg_1": [Image.new("RGB", (48, 48), colour) for colour in (GREEN, RED, BLUE)],
        "label_0": [1.0, 0.0, 0.5],
        "caption": ["a man holding a knife", "a knife on a table", "a knife in a drawer"],
        "safe_prompt": ["a man holding a spoon", "a spoon on a table", "a spoon in a drawer"],
        "unsafe_prompt": ["a man holding a knife", "a knife on a table", "a knife in a drawer"],
        "category": ["violence"] * 3,
        "concept": ["knife"] * 3,
        "seed": [0, 1, 2],
    }
    train_split = datasets.Dataset.from_dict(rows, features=coprov2_features())
    return datasets.DatasetDict({"train": train_split, "test": train_split.select([0])})


def diffusion_dpo_loader(dataset: datasets.Dataset, resolution: int = IMAGE_SIZE) -> torch.utils.data.DataLoader:
    """The data path of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, to its documented
    behaviour: `Image.open(io.BytesIO(value)).convert("RGB")` on every jpg_0 and jpg_1 value, resized and
    centre-cropped to the resolution, scaled to [-1, 1]; the pair swapped when label_0 == 0 and stacked on the channel
    axis (preferred first); `caption` tokenized to the tokenizer's max length; batches of pixel_values and input_ids."""
    tokenizer = load_fixture_tokenizer()

    def to_tensor(image: Image.Image) -> torch.Tensor:
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def preprocess_train(examples: dict) -> dict:
        images = [
            [to_tensor(Image.open(io.BytesIO(value)).convert("RGB")) for value in examples[column]]
            for column in ("jpg_0", "jpg_1")
        ]
        pixel_values = []
        for pair, label_0 in zip(zip(*images, strict=True), examples["label_0"], strict=True):
            pixel_values.append(torch.cat(pair[::-1] if label_0 == 0 else pair, dim=0))
        examples["pixel_values"] = pixel_values
        examples["input_ids"] = tokenizer(
            examples["caption"], truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return examples

    def collate_fn(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]).float(),
            "input_ids": torch.stack([example["input_ids"] for example in examples]),
        }

    return torch.utils.data.DataLoader(dataset.with_transform(preprocess_train), batch_size=2, collate_fn=collate_fn)


def test_an_exported_build_has_pickapics_columns_and_types_and_keeps_the_others():
    exported = to_pickapic(coprov2_build())
    assert set(exported) == {"train", "test"}
    train_split = exported["train"]
    assert train_split.column_names[:4] == ["jpg_0", "jpg_1", "label_0", "caption"]
    assert {"category", "concept", "safe_prompt", "unsafe_prompt", "seed"} <= set(train_split.column_names)
    assert train_split.features["jpg_0"] == datasets.Value("binary") == train_split.features["jpg_1"]
    assert train_split.features["label_0"] == datasets.Value("float64")
    assert isinstance(train_split[0]["jpg_0"], bytes) and train_split[0]["jpg_0"].startswith(b"\x89PNG")
    assert train_split["label_0"] == [1.0, 1.0]  # the tie dropped, the swapped row oriented


def test_diffusion_dpo_reads_the_export_from_parquet_and_prefers_the_safe_image_for_the_unsafe_prompt(tmp_path):
    exported = to_pickapic(coprov2_build())
    for split, part in exported.items():
        part.to_parquet(str(tmp_path / "pickapic" / f"{split}.parquet"))
    # As the script loads it: load_dataset(args.dataset_name, split=args.dataset_split_name).
    reloaded = datasets.load_dataset(str(tmp_path / "pickapic"), split="train")
    batch = next(iter(diffusion_dpo_loader(reloaded)))
    assert batch["pixel_values"].shape == (2, 6, IMAGE_SIZE, IMAGE_SIZE)
    for pixels in batch["pixel_values"]:
        assert colour_of(pixels[:3]) == RED and colour_of(pixels[3:]) == GREEN  # preferred: the safe image
    tokenizer = load_fixture_tokenizer()
    expected = tokenizer(
        ["a man holding a knife", "a knife on a table"], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    assert torch.equal(batch["input_ids"], expected)  # conditioned on the unsafe prompts


def test_the_export_trains_with_safety_dpo_as_it_is(tmp_path):
    pairs = prepare_pairs(to_pickapic(coprov2_build())["train"], None, "both")
    examples = PairExamples(pairs, "both", IMAGE_SIZE)
    assert [colour_of(examples[index]["pixels_chosen"]) for index in (0, 2)] == [RED, RED]
    assert [examples[index]["prompt"] for index in (0, 1)] == ["a man holding a knife", "a man holding a spoon"]


def test_an_export_of_rows_without_label_0_takes_jpg_0_as_preferred():
    exported = to_pickapic(coprov2_build()["test"].remove_columns("label_0"))
    assert exported["label_0"] == [1.0] and exported.features["label_0"] == datasets.Value("float64")


def test_an_export_without_a_prompt_column_is_refused_naming_what_it_reads():
    build = coprov2_build()["train"].remove_columns(["caption", "unsafe_prompt"])
    with pytest.raises(ValueError, match=r"needs the columns \['unsafe_prompt \(or caption\)'\]"):
        to_pickapic(build)
