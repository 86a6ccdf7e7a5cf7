"""UCE (`safety_dpo.baselines.uce`): the closed form against a least-squares solve and its limits, exact LoRA factors,
token alignment, the config, and `edit_uce` end to end on tiny SD 1.x and SDXL pipelines."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_models import get_dummy_sd_components, get_dummy_sdxl_components, load_fixture_tokenizer

from safety_dpo.baselines import uce
from safety_dpo.baselines.uce import (
    UCEConfig,
    aligned_token_indices,
    cross_attention_projections,
    edit_uce,
    exact_low_rank_factors,
    last_token_positions,
    uce_closed_form,
    uce_delta_factors,
    uce_embeddings,
)
from safety_dpo.pipelines import enable_safety_adapters
from safety_dpo.trainer.components import load_components


# ---------------------------------------------------------------------------------------------------------- helpers
def random_problem(out: int = 6, d: int = 5, n: int = 3, m: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {"weight": draw(out, d), "erase": draw(n, d), "guide": draw(n, d), "preserve": draw(m, d)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.double()).norm() / expected.double().norm())


def sd_pipeline() -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(**get_dummy_sd_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def expected_edits(pipeline, erase, guides, preserve, config: UCEConfig) -> dict[str, torch.Tensor]:
    """W* of every edited layer, from `uce_closed_form` one layer at a time."""
    components = load_components(pipeline)
    preserved = [""] + list(preserve) if config.preserve_empty_prompt else list(preserve)
    embeddings = uce_embeddings(components, erase, guides, preserved, config.token_selection)
    scale = config.resolved_preserve_scale(len(preserved))
    return {
        name: uce_closed_form(module.weight.detach(), *embeddings, config.lamb, config.erase_scale, scale)
        for name, module in cross_attention_projections(pipeline.unet, config.targets).items()
    }


# ------------------------------------------------------------------------------------------------------ the maths
def test_closed_form_equals_least_squares_solution():
    problem = random_problem()
    weight, erase, guide, preserve = problem.values()
    lamb, erase_scale, preserve_scale = 0.5, 2.0, 0.3
    d = weight.shape[1]
    system = torch.cat([math.sqrt(lamb) * torch.eye(d, dtype=torch.float64), math.sqrt(erase_scale) * erase])
    system = torch.cat([system, math.sqrt(preserve_scale) * preserve])
    targets = torch.cat(
        [
            math.sqrt(lamb) * weight.T,
            math.sqrt(erase_scale) * (weight @ guide.T).T,
            math.sqrt(preserve_scale) * (weight @ preserve.T).T,
        ]
    )
    expected = torch.linalg.lstsq(system, targets).solution.T

    edited = uce_closed_form(weight, erase, guide, preserve, lamb, erase_scale, preserve_scale)

    assert edited.dtype == torch.float64
    assert relative_error(edited, expected) < 1e-10


def test_closed_form_maps_erased_embedding_to_its_guide_with_large_erase_scale():
    weight, erase, guide, _ = random_problem(n=2).values()
    no_preserve = torch.zeros(0, weight.shape[1], dtype=torch.float64)

    edited = uce_closed_form(weight, erase, guide, no_preserve, lamb=0.5, erase_scale=1e6, preserve_scale=0.0)

    assert relative_error(edited @ erase.T, weight @ guide.T) < 1e-5
    assert relative_error(weight @ erase.T, weight @ guide.T) > 0.5  # it was not so before


def test_closed_form_keeps_preserved_embeddings_with_large_preserve_scale():
    weight, erase, guide, preserve = random_problem(d=8, n=2, m=3).values()

    edited = uce_closed_form(weight, erase, guide, preserve, lamb=0.5, erase_scale=1.0, preserve_scale=1e6)

    assert relative_error(edited @ preserve.T, weight @ preserve.T) < 1e-5
    assert relative_error(edited, weight) > 1e-2  # the erased embeddings still moved it


def test_closed_form_without_edits_is_the_old_weight():
    weight, erase, guide, preserve = random_problem().values()

    edited = uce_closed_form(weight, erase, erase, preserve, lamb=0.5, erase_scale=1.0, preserve_scale=1.0)

    assert relative_error(edited, weight) < 1e-12


@pytest.mark.parametrize(("out", "d", "n"), [(6, 5, 3), (4, 5, 9), (7, 5, 9), (3, 3, 3)])
def test_delta_factors_reproduce_the_edit_exactly_at_rank_min_n_out_d(out, d, n):
    weight, erase, guide, preserve = random_problem(out=out, d=d, n=n).values()
    edited = uce_closed_form(weight, erase, guide, preserve, 0.5, 1.0, 0.2)

    up, down = uce_delta_factors(weight, erase, guide, preserve, 0.5, 1.0, 0.2)

    assert up.shape == (out, min(n, out, d)) and down.shape == (min(n, out, d), d)
    assert relative_error(weight + up @ down, edited) < 1e-12
    assert relative_error(up @ down, edited - weight) < 1e-10


def test_exact_low_rank_factors_keep_the_product_and_balance_the_factors():
    generator = torch.Generator().manual_seed(1)
    up, down = 1e3 * torch.randn(4, 9, generator=generator), 1e-3 * torch.randn(9, 6, generator=generator)

    new_up, new_down = exact_low_rank_factors(up, down)

    assert new_up.shape == (4, 4) and new_down.shape == (4, 6)
    assert relative_error(new_up @ new_down, up.double() @ down.double()) < 1e-12
    assert torch.allclose(new_up.norm(dim=0), new_down.norm(dim=1))


@pytest.mark.parametrize(
    ("weight_shape", "erase_shape", "guide_shape", "message"),
    [
        ((6,), (3, 5), (3, 5), "weight must be a matrix"),
        ((6, 5), (3, 4), (3, 4), "erase_embeddings must be (n, 5)"),
        ((6, 5), (3, 5), (2, 5), "must pair row by row"),
    ],
)
def test_closed_form_rejects_shapes_that_do_not_fit(weight_shape, erase_shape, guide_shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        uce_closed_form(
            torch.zeros(weight_shape), torch.zeros(erase_shape), torch.zeros(guide_shape), torch.zeros(0, 5), 1, 1, 1
        )


def test_closed_form_rejects_a_negative_scale():
    weight, erase, guide, preserve = random_problem().values()
    with pytest.raises(ValueError, match="erase_scale must be a finite number >= 0; got -1"):
        uce_closed_form(weight, erase, guide, preserve, 0.5, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------- tokens
def test_last_token_positions_are_the_token_before_end_of_text():
    tokenizer = load_fixture_tokenizer()
    words = len(tokenizer("a photo of a knife").input_ids) - 2

    positions = last_token_positions(tokenizer, ["a photo of a knife", "", " "])

    assert positions == [words, 0, 0]  # the empty prompt: the start token, as upstream's mask.sum() - 2


def test_aligned_tokens_start_at_each_last_token_and_share_one_length():
    assert aligned_token_indices(3, 0, 8, "last_token_to_end") == ([3, 4, 5, 6, 7], [0, 1, 2, 3, 4])
    assert aligned_token_indices(1, 2, 5, "last_token_to_end") == ([1, 2, 3], [2, 3, 4])
    assert aligned_token_indices(3, 0, 8, "last_token") == ([3], [0])


def test_uce_embeddings_pick_the_aligned_tokens_and_all_preserved_tokens():
    pipeline = sd_pipeline()
    components = load_components(pipeline)
    prompts = ["a knife", "", "an apple"]
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipeline.text_encoder(ids)[0].double()  # (3, 77, D)
    knife = len(pipeline.tokenizer("a knife").input_ids) - 2

    erase, guide, preserve = uce_embeddings(components, ["a knife"], [""], ["", "an apple"], "last_token_to_end")

    assert torch.allclose(erase, hidden[0, knife:])
    assert torch.allclose(guide, hidden[1, : 77 - knife])
    assert torch.allclose(preserve, torch.cat([hidden[1], hidden[2]]))
    last = uce_embeddings(components, ["a knife"], [""], ["an apple"], "last_token")
    apple = len(pipeline.tokenizer("an apple").input_ids) - 2
    assert [tensor.shape[0] for tensor in last] == [1, 1, 1]
    assert torch.allclose(last[0][0], hidden[0, knife]) and torch.allclose(last[1][0], hidden[1, 0])
    assert torch.allclose(last[2][0], hidden[2, apple])


# ----------------------------------------------------------------------------------------------------- config
def test_config_defaults_are_the_official_codes_and_serialise_to_json():
    config = UCEConfig()

    assert (config.lamb, config.erase_scale, config.preserve_scale) == (0.5, 1.0, None)
    assert config.token_selection == "last_token_to_end" and config.preserve_empty_prompt
    assert config.targets == ["to_k", "to_v"] and config.guide_prompt == ""
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert UCEConfig(targets=("to_v",)).to_dict()["targets"] == ["to_v"]
    assert config.resolved_preserve_scale(1) == 1.0 and config.resolved_preserve_scale(57) == 0.1
    assert UCEConfig(preserve_scale=0.3).resolved_preserve_scale(57) == 0.3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lamb": 0}, "UCEConfig.lamb must be a finite number > 0; got 0"),
        ({"erase_scale": float("nan")}, "UCEConfig.erase_scale must be a finite number > 0; got nan"),
        ({"preserve_scale": -1.0}, "UCEConfig.preserve_scale must be None .* or a finite number >= 0; got -1.0"),
        ({"token_selection": "eos"}, "UCEConfig.token_selection must be one of .*last_token_to_end.*; got 'eos'"),
        ({"targets": ["to_q"]}, r"UCEConfig.targets must be .* from \['to_k', 'to_v'\]; got \['to_q'\]"),
        ({"targets": []}, "UCEConfig.targets must be a non-empty list"),
        ({"preserve_empty_prompt": "yes"}, "UCEConfig.preserve_empty_prompt must be True or False; got 'yes'"),
        ({"guide_prompt": None}, "UCEConfig.guide_prompt must be a string"),
    ],
)
def test_config_rejects_bad_values_naming_field_value_and_choices(overrides, message):
    with pytest.raises(ValueError, match=message):
        UCEConfig(**overrides)


# ------------------------------------------------------------------------------------------------- edit_uce
def test_saved_adapter_reproduces_the_closed_form_through_the_project_loader(tmp_path):
    erase, guides, preserve = ["a knife", "a gun"], ["an apple", ""], ["a cat"]
    config = UCEConfig()
    pipeline = sd_pipeline()
    before = {name: tensor.clone() for name, tensor in pipeline.unet.state_dict().items()}
    expected = expected_edits(pipeline, erase, guides, preserve, config)

    folder = edit_uce(erase, tmp_path / "uce", pipeline, guides, preserve, config, ["violence"], ["knife"], False)

    assert all(torch.equal(tensor, before[name]) for name, tensor in pipeline.unet.state_dict().items())
    metadata = json.loads((folder / "safety_dpo.json").read_text())
    assert metadata["method"] == "uce" and metadata["categories"] == ["violence"] and metadata["concepts"] == ["knife"]
    assert metadata["settings"] == {
        **config.to_dict(),
        "erase_prompts": erase,
        "guide_prompts": guides,
        "preserve_prompts": preserve,
    }
    enable_safety_adapters(pipeline).load_safety_adapter(folder, fuse=True)
    after = pipeline.unet.state_dict()
    edited = {f"{name}.weight" for name in expected}
    assert len(edited) == 8  # to_k and to_v of the tiny UNet's four cross-attention blocks
    assert all(torch.equal(after[name], before[name]) for name in before if name not in edited)
    for name, weight in expected.items():
        assert relative_error(after[f"{name}.weight"], weight) < 1e-5, name
        assert relative_error(after[f"{name}.weight"], before[f"{name}.weight"]) > 1e-3, name


def test_saved_adapter_loads_in_stock_diffusers_on_attn2_keys_and_values_only(tmp_path):
    erase = ["a knife"]
    expected = expected_edits(sd_pipeline(), erase, [""], [], UCEConfig())
    folder = edit_uce(erase, tmp_path / "uce", sd_pipeline(), progress=False)
    pipeline = sd_pipeline()

    pipeline.load_lora_weights(folder)
    pipeline.fuse_lora()

    wrapped = {name for name, module in pipeline.unet.named_modules() if hasattr(module, "base_layer")}
    assert wrapped == set(expected)
    for name, weight in expected.items():
        fused = pipeline.unet.get_submodule(name).base_layer.weight
        assert relative_error(fused, weight) < 1e-5, name


def test_edit_uce_works_on_sdxl(tmp_path):
    erase, guides = ["a knife"], ["an apple"]
    config = UCEConfig(token_selection="last_token")
    expected = expected_edits(sdxl_pipeline(), erase, guides, [], config)
    assert {module.in_features for module in cross_attention_projections(sdxl_pipeline().unet).values()} == {80}

    folder = edit_uce(erase, tmp_path / "uce", sdxl_pipeline(), guides, config=config, progress=False)

    pipeline = enable_safety_adapters(sdxl_pipeline())
    pipeline.load_safety_adapter(folder, fuse=True)
    assert json.loads((folder / "safety_dpo.json").read_text())["architecture"] == "sdxl"
    for name, weight in expected.items():
        assert relative_error(pipeline.unet.get_submodule(name).weight, weight) < 1e-5, name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"erase_prompts": []}, "erase_prompts is empty"),
        ({"erase_prompts": ["a knife", "  "]}, r"erase_prompts\[1\] is '  '; every prompt must be a non-blank string"),
        ({"erase_prompts": "a knife"}, "erase_prompts must be a list of prompts"),
        ({"preserve_prompts": [""]}, r"preserve_prompts\[0\] is ''"),
        ({"guide_prompts": ["", ""]}, "guide_prompts has 2 prompts but erase_prompts has 1"),
        ({"guide_prompts": [None]}, r"guide_prompts\[0\] is None"),
    ],
)
def test_edit_uce_rejects_bad_prompts_before_loading_a_model(tmp_path, monkeypatch, arguments, message):
    monkeypatch.setattr("safety_dpo.trainer.components.load_components", pytest.fail)
    arguments = {"erase_prompts": ["a knife"], **arguments}
    with pytest.raises(ValueError, match=message):
        edit_uce(output_dir=tmp_path / "uce", progress=False, **arguments)
    assert not (tmp_path / "uce").exists()


def test_edit_uce_reuses_a_finished_folder_and_refuses_one_made_otherwise(tmp_path, monkeypatch):
    folder = edit_uce(["a knife"], tmp_path / "uce", sd_pipeline(), progress=False)
    written = (folder / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("safety_dpo.trainer.components.load_components", pytest.fail)

    assert edit_uce(["a knife"], folder, sd_pipeline(), progress=False) == folder
    assert (folder / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == written
    with pytest.raises(FileExistsError, match="other settings"):
        edit_uce(["a knife"], folder, sd_pipeline(), config=UCEConfig(lamb=0.1), progress=False)


def test_cross_attention_projections_refuses_a_unet_without_them():
    with pytest.raises(ValueError, match="no cross-attention projections"):
        cross_attention_projections(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_module_docstring_cites_the_official_code():
    assert "train_erase.py" in uce.__doc__ and "uce_sd_erase.py" in uce.__doc__
