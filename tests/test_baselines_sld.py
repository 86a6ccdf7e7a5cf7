"""Safe Latent Diffusion (`safety_dpo.baselines.sld`): the update rule against hand-computed numbers, the presets
against the paper's (as diffusers ships them), images identical to diffusers' `StableDiffusionPipelineSafe`, the
chunked safety concept, and SLD as the compared variant of `run_evaluation`, `safety-dpo evaluate` and `generate`."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import get_dummy_sd_components, get_dummy_sdxl_components, random_unet_lora

from safety_dpo.baselines import sld
from safety_dpo.baselines.sld import (
    METHODS,
    SLD_PRESETS,
    SLD_SAFETY_CONCEPT,
    SLDConfig,
    concept_token_chunks,
    default_safety_concept,
    encode_safety_concept,
    generate_sld,
    scale_warmup_steps,
    sld_config,
    sld_guidance,
)
from safety_dpo.cli import build_parser, main
from safety_dpo.evaluation import runner
from safety_dpo.evaluation.runner import run_evaluation
from safety_dpo.worlds import default_world

FAST = {"limit": 1, "progress": False}  # one prompt per microworld subset, the protocol's 4 seeds: 12 images
SHORT_CONCEPT = "violence, blood, weapons"  # fits the tiny tokenizer's 77 tokens


@pytest.fixture(scope="module")
def tiny_pipelines():
    """diffusers' deprecated SLD pipeline and a stock SD pipeline on the same tiny components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe

    components = get_dummy_sd_components()
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        components.pop(name)
    reference = StableDiffusionPipelineSafe(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None)
    for each in (reference, pipeline):
        each.set_progress_bar_config(disable=True)
    return reference, pipeline


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


# ------------------------------------------------------------------------------------------------ config and presets
def test_the_presets_are_the_papers_as_diffusers_ships_them():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for name, published in [("weak", SafetyConfig.WEAK), ("medium", SafetyConfig.MEDIUM),
                            ("strong", SafetyConfig.STRONG), ("max", SafetyConfig.MAX)]:  # fmt: skip
        preset = SLD_PRESETS[name]
        assert (preset.warmup_steps, preset.guidance_scale, preset.threshold) == (
            published["sld_warmup_steps"],
            published["sld_guidance_scale"],
            published["sld_threshold"],
        )
        assert (preset.momentum_scale, preset.momentum_beta) == (
            published["sld_momentum_scale"],
            published["sld_mom_beta"],
        )


def test_the_safety_concept_is_the_one_diffusers_uses():
    from diffusers import StableDiffusionPipelineSafe

    components = get_dummy_sd_components()
    components.pop("image_encoder")
    assert (
        StableDiffusionPipelineSafe(**components, requires_safety_checker=False).safety_concept == SLD_SAFETY_CONCEPT
    )


def test_sld_config_takes_the_method_or_the_preset_name():
    assert sld_config("sld-strong") == sld_config("strong") == SLD_PRESETS["strong"]
    assert [sld_config(method) for method in METHODS] == list(SLD_PRESETS.values())


def test_an_unknown_preset_is_refused_listing_the_accepted_names():
    with pytest.raises(ValueError, match="'sld-extreme'.*sld-weak, sld-medium, sld-strong, sld-max, weak, medium"):
        sld_config("sld-extreme")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("warmup_steps", -1, "warmup_steps must be an integer >= 0, got -1"),
        ("warmup_steps", 2.5, "warmup_steps must be an integer"),
        ("guidance_scale", 0, "guidance_scale must be > 0"),
        ("threshold", math.nan, "threshold must be a finite number"),
        ("momentum_scale", -0.1, "momentum_scale must be >= 0"),
        ("momentum_beta", 1.0, r"momentum_beta must be in \[0, 1\), got 1.0"),
    ],
)
def test_a_config_refuses_a_bad_value_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SLD_PRESETS["medium"], **{field: value})


def test_the_warmup_keeps_its_fraction_of_the_trajectory_and_is_published_at_50_steps():
    assert [scale_warmup_steps(p.warmup_steps, 50) for p in SLD_PRESETS.values()] == [15, 10, 7, 0]
    assert [scale_warmup_steps(p.warmup_steps, 15) for p in SLD_PRESETS.values()] == [5, 3, 2, 0]  # 4.5 rounds up
    assert scale_warmup_steps(7, 25) == 4 and scale_warmup_steps(7, 100) == 14 and scale_warmup_steps(10, 1) == 0


# ----------------------------------------------------------------------------------------------------- update rule
RULE = SLDConfig(warmup_steps=1, guidance_scale=10, threshold=0.05, momentum_scale=0.5, momentum_beta=0.6)
UNCOND = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
TEXT = torch.tensor([0.10, 0.20, 0.0, 0.5], dtype=torch.float64)
SAFETY = torch.tensor([0.12, 0.10, 0.3, 0.5], dtype=torch.float64)
# eps_p - eps_S = [-0.02, 0.10, -0.3, 0]: mu = [0.2 (10 x 0.02), 0 (0.10 >= threshold), 1 (3 clamped), 0 (no gap)]


def test_during_the_warmup_the_guidance_is_plain_cfg_and_the_momentum_builds_up():
    noise, momentum = sld_guidance(UNCOND, TEXT, SAFETY, None, 0, RULE, 2.0)
    assert torch.allclose(noise, 2.0 * TEXT)
    # gamma = mu * (eps_S - eps_u) = [0.024, 0, 0.3, 0]; nu = 0.4 * gamma
    assert torch.allclose(momentum, torch.tensor([0.0096, 0.0, 0.12, 0.0], dtype=torch.float64))


def test_after_the_warmup_the_guidance_subtracts_gamma_with_its_momentum():
    _, momentum = sld_guidance(UNCOND, TEXT, SAFETY, None, 0, RULE, 2.0)
    noise, momentum = sld_guidance(UNCOND, TEXT, SAFETY, momentum, 1, RULE, 2.0)
    # gamma = [0.024, 0, 0.3, 0] + 0.5 * nu = [0.0288, 0, 0.36, 0]; eps = 2 * (eps_p - gamma)
    assert torch.allclose(noise, torch.tensor([0.1424, 0.4, -0.72, 1.0], dtype=torch.float64))
    # nu' = 0.6 * nu + 0.4 * gamma
    assert torch.allclose(momentum, torch.tensor([0.01728, 0.0, 0.216, 0.0], dtype=torch.float64))


def test_an_element_at_the_threshold_is_left_alone():
    config = dataclasses.replace(RULE, warmup_steps=0, momentum_scale=0.0, threshold=0.125)
    text = torch.tensor([0.375, 0.3125, 0.265625], dtype=torch.float64)
    safety = torch.full((3,), 0.25, dtype=torch.float64)  # eps_p - eps_S: 0.125 (at the threshold), 0.0625, 1/64
    noise, _ = sld_guidance(torch.zeros(3, dtype=torch.float64), text, safety, None, 0, config, 1.0)
    # eps = eps_p - mu * eps_S, mu = 0 at the threshold, min(10 x 0.0625, 1) = 0.625 and 10 / 64 below it
    assert noise.tolist() == [0.375, 0.3125 - 0.625 * 0.25, 0.265625 - 0.15625 * 0.25]


# ------------------------------------------------------------------------------------------------- safety concept
def test_without_a_taxonomy_the_default_concept_is_slds():
    assert default_safety_concept() == SLD_SAFETY_CONCEPT
    with pytest.raises(ValueError, match="needs a taxonomy"):
        default_safety_concept(None, ["violence"])


def test_with_a_taxonomy_the_default_concept_names_the_trained_names_of_the_categories():
    taxonomy = default_world().taxonomy()
    violence = [name for c in taxonomy.harmful_concepts if c.category == "violence" for name in c.names]
    assert default_safety_concept(taxonomy, ["violence"]) == ", ".join(violence)
    everything = default_safety_concept(taxonomy).split(", ")
    assert everything == [name for c in taxonomy.harmful_concepts for name in c.names]
    assert not {name for c in taxonomy.harmful_concepts for name in c.held_out_names} & set(everything)
    with pytest.raises(KeyError, match="Unknown category 'arson'"):
        default_safety_concept(taxonomy, ["arson"])


def test_a_concept_over_the_context_is_encoded_in_chunks_with_their_own_start_and_end(tiny_pipelines):
    _, pipeline = tiny_pipelines
    tokenizer = pipeline.tokenizer
    tokens = tokenizer(SLD_SAFETY_CONCEPT, add_special_tokens=False).input_ids
    assert len(tokens) > tokenizer.model_max_length  # the fixture's word-level tokenizer spells most of it out
    chunks = concept_token_chunks(tokenizer, SLD_SAFETY_CONCEPT)
    assert len(chunks) == math.ceil(len(tokens) / (tokenizer.model_max_length - 2))
    assert all(len(chunk) == tokenizer.model_max_length and chunk[0] == tokenizer.bos_token_id for chunk in chunks)
    assert [t for chunk in chunks for t in chunk[1 : chunk.index(tokenizer.eos_token_id)]] == tokens
    embeds = encode_safety_concept(pipeline, SLD_SAFETY_CONCEPT, "cpu")
    assert embeds.shape == (1, len(chunks) * tokenizer.model_max_length, pipeline.text_encoder.config.hidden_size)
    # the first chunk is what a truncating encoder (diffusers' SLD) reads; the second is encoded on its own
    first = pipeline.encode_prompt(SLD_SAFETY_CONCEPT, "cpu", 1, False)[0]
    assert torch.equal(embeds[:, : tokenizer.model_max_length], first)
    second = pipeline.text_encoder(torch.tensor([chunks[1]]))[0]
    assert torch.equal(embeds[:, tokenizer.model_max_length : 2 * tokenizer.model_max_length], second)


def test_a_concept_that_fits_is_encoded_as_the_pipeline_encodes_a_prompt(tiny_pipelines):
    _, pipeline = tiny_pipelines
    expected = pipeline.encode_prompt(SHORT_CONCEPT, "cpu", 1, False)[0]
    assert torch.equal(encode_safety_concept(pipeline, SHORT_CONCEPT, "cpu"), expected)


def test_the_microworld_concept_is_chunked_to_its_24_token_context():
    pipeline = default_world().load_pipeline()
    concept = default_safety_concept(default_world().taxonomy())
    tokens = pipeline.tokenizer(concept, add_special_tokens=False).input_ids
    embeds = encode_safety_concept(pipeline, concept, "cpu")
    assert pipeline.tokenizer.model_max_length == 24
    assert embeds.shape[1] == 24 * math.ceil(len(tokens) / 22)


# ------------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("preset", list(SLD_PRESETS))
def test_generate_sld_draws_the_images_of_diffusers_sld_pipeline(tiny_pipelines, preset):
    reference, pipeline = tiny_pipelines
    config = SLD_PRESETS[preset]
    reference.safety_concept = SHORT_CONCEPT
    expected = reference(
        ["a cat", "a dog"],
        generator=generators(0, 1),
        output_type="np",
        sld_warmup_steps=config.warmup_steps,
        sld_guidance_scale=config.guidance_scale,
        sld_threshold=config.threshold,
        sld_momentum_scale=config.momentum_scale,
        sld_mom_beta=config.momentum_beta,
    ).images
    images = generate_sld(
        pipeline,
        ["a cat", "a dog"],
        config,
        SHORT_CONCEPT,
        generator=generators(0, 1),
        output_type="np",
        progress=False,
    ).images
    assert images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    plain = pipeline(["a cat", "a dog"], generator=generators(0, 1), output_type="np").images
    assert np.abs(images - plain).max() > 1e-5  # the guidance changed what was drawn


def test_the_warmup_is_scaled_to_the_steps_drawn(tiny_pipelines, monkeypatch):
    _, pipeline = tiny_pipelines
    seen = []
    original = sld.sld_guidance

    def recording(*args):
        seen.append((args[4], args[5].warmup_steps))
        return original(*args)

    monkeypatch.setattr(sld, "sld_guidance", recording)
    generate_sld(pipeline, "a cat", SLD_PRESETS["strong"], SHORT_CONCEPT, num_inference_steps=15, progress=False)
    assert seen == [(step, 2) for step in range(15)]


def test_generate_sld_samples_with_the_pipelines_own_scheduler_and_loras(tiny_pipelines):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    components = get_dummy_sd_components()
    pipeline = StableDiffusionPipeline(**components)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    settings = {"num_inference_steps": 4, "guidance_scale": 4.0, "generator": generators(0), "output_type": "np"}
    plain = pipeline("a cat", **settings).images
    settings["generator"] = generators(0)
    guided = generate_sld(pipeline, "a cat", SLD_PRESETS["max"], SLD_SAFETY_CONCEPT, progress=False, **settings)
    assert np.abs(guided.images - plain).max() > 1e-4
    pipeline.load_lora_weights(random_unet_lora(pipeline.unet, 0))
    settings["generator"] = generators(0)
    with_lora = generate_sld(pipeline, "a cat", SLD_PRESETS["max"], SLD_SAFETY_CONCEPT, progress=False, **settings)
    assert np.abs(with_lora.images - guided.images).max() > 1e-4


def test_generate_sld_returns_pil_images_at_the_pipelines_default_size(tiny_pipelines):
    _, pipeline = tiny_pipelines
    images = generate_sld(pipeline, "a cat", SLD_PRESETS["weak"], num_inference_steps=2, progress=False).images
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (32, 32)


def test_generate_sld_refuses_sdxl_naming_what_is_supported():
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    with pytest.raises(ValueError, match=r"Stable Diffusion 1.x/2.x pipelines.*got StableDiffusionXLPipeline"):
        generate_sld(pipeline, "a cat", SLD_PRESETS["strong"])


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_generate_sld_refuses_sampling_without_classifier_free_guidance(tiny_pipelines, guidance_scale):
    _, pipeline = tiny_pipelines
    with pytest.raises(ValueError, match=f"guidance_scale > 1.*got guidance_scale={guidance_scale}"):
        generate_sld(pipeline, "a cat", SLD_PRESETS["strong"], guidance_scale=guidance_scale)


# ------------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def evaluated_sld(tmp_path_factory):
    """One microworld run, base vs SLD-max, shared by the tests that only read what it wrote."""
    output_dir = tmp_path_factory.mktemp("evaluation-sld")
    return output_dir, run_evaluation(output_dir, method="sld-max", **FAST)


def test_sld_is_the_compared_variant_and_draws_other_images_from_the_same_seeds(evaluated_sld):
    output_dir, results = evaluated_sld
    assert set(results["models"]) == {"base", "aligned"}
    base_files = sorted((output_dir / "images" / "base").glob("*.png"))
    assert len(base_files) == 12
    differing = 0
    for path in base_files:
        base = np.asarray(Image.open(path))
        differing += not np.array_equal(base, np.asarray(Image.open(output_dir / "images" / "aligned" / path.name)))
    assert differing >= 6
    assert "ip_ratio" in results["comparison"]


def test_results_and_the_image_cache_record_the_method(evaluated_sld):
    output_dir, results = evaluated_sld
    concept = default_safety_concept(default_world().taxonomy())
    expected = {
        "name": "sld-max",
        "config": dataclasses.asdict(SLD_PRESETS["max"]),
        "warmup_steps_used": 0,
        "safety_concept": concept,
    }
    assert results["method"] == expected
    assert json.loads((output_dir / "results.json").read_text())["method"] == expected
    assert json.loads((output_dir / "images" / "aligned" / "generation.json").read_text())["method"] == expected
    assert "method" not in json.loads((output_dir / "images" / "base" / "generation.json").read_text())


def test_a_folder_drawn_with_one_preset_refuses_another(evaluated_sld):
    output_dir, _ = evaluated_sld
    before = sorted(path.stat().st_mtime_ns for path in (output_dir / "images" / "aligned").glob("*.png"))
    with pytest.raises(FileExistsError, match="aligned images drawn with other settings.*method"):
        run_evaluation(output_dir, method="sld-strong", **FAST)
    assert sorted(path.stat().st_mtime_ns for path in (output_dir / "images" / "aligned").glob("*.png")) == before


def test_a_run_without_a_method_records_none(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "draw_images", lambda *args, **kwargs: None)
    from safety_dpo.evaluation import scoring

    monkeypatch.setattr(scoring, "score_run", lambda *args, **kwargs: {})
    monkeypatch.setattr("safety_dpo.evaluation.report.write_report", lambda *args, **kwargs: None)
    assert run_evaluation(tmp_path, **FAST)["method"] is None


def test_the_concept_is_restricted_to_the_targeted_categories(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(runner, "draw_images", lambda *args, **kwargs: seen.append(args[8] if len(args) > 8 else None))
    from safety_dpo.evaluation import scoring

    monkeypatch.setattr(scoring, "score_run", lambda *args, **kwargs: {})
    monkeypatch.setattr("safety_dpo.evaluation.report.write_report", lambda *args, **kwargs: None)
    results = run_evaluation(tmp_path, method="sld-weak", targeted_categories=["violence"], **FAST)
    concept = default_safety_concept(default_world().taxonomy(), ["violence"])
    assert seen == [None, {"name": "sld-weak", "safety_concept": concept}]
    assert results["method"]["safety_concept"] == concept and results["method"]["warmup_steps_used"] == 5


def test_a_method_with_a_safety_adapter_is_refused_before_anything_is_written(tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="method='sld-strong' and safety_adapter='adapter.safetensors'"):
        run_evaluation(output_dir, safety_adapter="adapter.safetensors", method="sld-strong", **FAST)
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "esd"}, "Unknown method 'esd'; choose one of sld-weak, sld-medium, sld-strong, sld-max"),
        ({"safety_concept": "knife"}, "safety_concept is SLD's; it needs method="),
        ({"method": "sld-max", "safety_concept": " "}, "safety concept must be a non-blank text"),
    ],
)
def test_an_unknown_method_or_a_concept_without_one_is_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_evaluation(tmp_path / "run", **kwargs, **FAST)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------- CLI
def _choices(command: str) -> tuple[str, ...]:
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    (action,) = [action for action in subparser._actions if action.dest == "method"]
    return tuple(action.choices)


def test_evaluate_and_generate_offer_exactly_the_sld_presets():
    assert _choices("evaluate") == _choices("generate") == METHODS


def test_evaluate_passes_the_method_and_concept_to_run_evaluation(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runner, "run_evaluation", lambda *args, **kwargs: seen.update(kwargs) or {})
    command = ["evaluate", "--output-dir", str(tmp_path), "--method", "sld-strong", "--safety-concept", "knife, gun"]
    assert main(command) == 0
    assert (seen["method"], seen["safety_concept"]) == ("sld-strong", "knife, gun")
    assert main(["evaluate", "--output-dir", str(tmp_path)]) == 0
    assert (seen["method"], seen["safety_concept"]) == (None, None)


def test_evaluate_refuses_an_unknown_method_listing_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--output-dir", str(tmp_path), "--method", "sld-extreme"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.replace("'", "")  # Python 3.12 quotes the choices, 3.11 does not
    assert "invalid choice: sld-extreme (choose from sld-weak, sld-medium, sld-strong, sld-max)" in error


def test_generate_draws_with_sld_records_it_and_refuses_a_folder_drawn_otherwise(tmp_path, capsys):
    out = tmp_path / "images"
    command = ["generate", "a knife", "--output-dir", str(out), "--num-inference-steps", "2"]
    assert main([*command, "--method", "sld-max"]) == 0
    with Image.open(out / "000-seed0.png") as image:
        record = json.loads(image.text["safety_dpo"])
    concept = default_safety_concept(default_world().taxonomy())
    assert record["method"] == {
        "name": "sld-max",
        "config": dataclasses.asdict(SLD_PRESETS["max"]),
        "warmup_steps_used": 0,
        "safety_concept": concept,
    }
    assert json.loads((out / "images.json").read_text())["method"]["name"] == "sld-max"
    before = (out / "000-seed0.png").stat().st_mtime_ns
    assert main([*command, "--method", "sld-max"]) == 0  # resumes: nothing redrawn
    assert (out / "000-seed0.png").stat().st_mtime_ns == before
    for other in (["--method", "sld-weak"], []):
        assert main([*command, *other]) == 2
        assert "holds images drawn otherwise" in capsys.readouterr().err
    assert (out / "000-seed0.png").stat().st_mtime_ns == before
