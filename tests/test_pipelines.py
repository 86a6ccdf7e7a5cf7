"""Safety pipelines: `load_safety_adapter`, `unload_safety_adapter` and `set_safety_scale` on tiny SD 1.x and SDXL
pipelines, fused and unfused, from every kind of source, next to a user's own LoRA, and on bad input."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from tiny_models import attention_layers, get_dummy_sd_components, get_dummy_sdxl_components, random_unet_lora

from safety_dpo.data.generation import config_digest
from safety_dpo.hub import push_folder
from safety_dpo.pipelines.safe_pipelines import (
    StableDiffusionSafePipeline,
    StableDiffusionXLSafePipeline,
    enable_safety_adapters,
)

WEIGHTS = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------------------- helpers
def sd_pipeline() -> StableDiffusionSafePipeline:
    pipeline = StableDiffusionSafePipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sdxl_pipeline() -> StableDiffusionXLSafePipeline:
    pipeline = StableDiffusionXLSafePipeline(**get_dummy_sdxl_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_lora(unet, seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """A seeded diffusers-format UNet LoRA over the attention projections, large enough to change the output."""
    return random_unet_lora(unet, seed, rank, scale_up=0.5)


def write_adapter(directory, state: dict[str, torch.Tensor], **metadata):
    """An adapter folder: `pytorch_lora_weights.safetensors`, and `safety_dpo.json` when metadata is given."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS))
    if metadata:
        (directory / "safety_dpo.json").write_text(json.dumps(metadata))
    return directory


def sd_metadata(unet, **overrides) -> dict:
    return {
        "architecture": "sd",
        "unet_config_sha256": config_digest(unet),
        "base_model": "tiny-sd",
        "categories": ["violence"],
        **overrides,
    }


def latents(pipeline, prompt: str = "a knife") -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="latent").images


def images(pipeline, prompt: str = "a knife") -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def max_diff(a, b) -> float:
    return float(torch.as_tensor(a).detach().sub(torch.as_tensor(b).detach()).abs().max())


def peft_wrappers(unet) -> list[str]:
    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def weights(unet) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in unet.state_dict().items()}


def adapter_scaling(unet, adapter: str) -> float:
    """The weight `set_adapters` gave an adapter, read back from the first PEFT layer that has it."""
    for module in unet.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            return module.scaling[adapter] * module.r[adapter] / module.lora_alpha[adapter]
    raise AssertionError(f"no PEFT layer holds {adapter!r}")


@pytest.fixture
def pipe() -> StableDiffusionSafePipeline:
    return sd_pipeline()


@pytest.fixture
def adapter(pipe) -> dict[str, torch.Tensor]:
    return random_lora(pipe.unet, seed=1)


@pytest.fixture
def adapter_dir(tmp_path, pipe, adapter):
    return write_adapter(tmp_path / "adapter", adapter, **sd_metadata(pipe.unet))


# --------------------------------------------------------------------------------------- load, scale 0, unload
def test_loading_a_safety_adapter_changes_the_output(pipe, adapter_dir):
    base = latents(pipe)
    pipe.load_safety_adapter(adapter_dir)
    assert max_diff(latents(pipe), base) > 1e-3


def test_a_safety_adapter_at_scale_zero_reproduces_the_base_output(pipe, adapter_dir):
    base = latents(pipe)
    pipe.load_safety_adapter(adapter_dir, scale=0.0)
    assert max_diff(latents(pipe), base) <= 1e-6


def test_unloading_a_safety_adapter_restores_the_base_output_exactly(pipe, adapter_dir):
    base = latents(pipe)
    pipe.load_safety_adapter(adapter_dir)
    pipe.unload_safety_adapter("safety")
    assert torch.equal(latents(pipe), base)


def test_unloading_the_only_lora_leaves_plain_linear_layers(pipe, adapter_dir):
    names = list(attention_layers(pipe.unet))
    pipe.load_safety_adapter(adapter_dir)
    assert peft_wrappers(pipe.unet)
    pipe.unload_safety_adapter()
    assert peft_wrappers(pipe.unet) == []
    assert all(type(pipe.unet.get_submodule(name)) is torch.nn.Linear for name in names)


def test_unloading_a_safety_adapter_restores_requires_grad_of_the_unet_weights(pipe, adapter_dir):
    before = {name: parameter.requires_grad for name, parameter in pipe.unet.named_parameters()}
    pipe.load_safety_adapter(adapter_dir)
    pipe.unload_safety_adapter("safety")
    assert {name: parameter.requires_grad for name, parameter in pipe.unet.named_parameters()} == before


# ------------------------------------------------------------------------------------------------------- fusing
def test_a_fused_safety_adapter_draws_the_same_images_as_an_unfused_one(adapter_dir):
    unfused, fused = sd_pipeline(), sd_pipeline()
    unfused.load_safety_adapter(adapter_dir)
    fused.load_safety_adapter(adapter_dir, fuse=True)
    np.testing.assert_allclose(images(fused), images(unfused), atol=1e-4)


def test_a_fused_safety_adapter_leaves_no_peft_wrappers(pipe, adapter_dir):
    names = list(attention_layers(pipe.unet))
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    assert peft_wrappers(pipe.unet) == []
    assert all(type(pipe.unet.get_submodule(name)) is torch.nn.Linear for name in names)


def test_a_fused_safety_adapter_changes_the_base_weights(pipe, adapter_dir):
    before = weights(pipe.unet)
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    after = weights(pipe.unet)
    assert not all(torch.equal(after[name], before[name]) for name in before)


def test_unloading_a_fused_safety_adapter_restores_the_weights_bit_for_bit(pipe, adapter_dir):
    before = weights(pipe.unet)
    base = latents(pipe)
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.unload_safety_adapter("safety")
    after = weights(pipe.unet)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(latents(pipe), base)


# ---------------------------------------------------------------------------------------- set_safety_scale, info
def test_set_safety_scale_changes_the_output_of_an_unfused_adapter(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    full = latents(pipe)
    pipe.set_safety_scale(0.5)
    assert max_diff(latents(pipe), full) > 1e-3


def test_set_safety_scale_changes_the_output_of_a_fused_adapter(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    full = latents(pipe)
    pipe.set_safety_scale(0.5)
    assert max_diff(latents(pipe), full) > 1e-3


def test_set_safety_scale_gives_fused_and_unfused_adapters_the_same_output(adapter_dir):
    unfused, fused = sd_pipeline(), sd_pipeline()
    unfused.load_safety_adapter(adapter_dir)
    fused.load_safety_adapter(adapter_dir, fuse=True)
    unfused.set_safety_scale(0.5)
    fused.set_safety_scale(0.5)
    assert max_diff(latents(fused), latents(unfused)) < 1e-4


def test_set_safety_scale_matches_loading_at_that_scale(adapter_dir):
    rescaled, loaded = sd_pipeline(), sd_pipeline()
    rescaled.load_safety_adapter(adapter_dir)
    rescaled.set_safety_scale(0.5, adapter_name="safety")
    loaded.load_safety_adapter(adapter_dir, scale=0.5)
    assert torch.equal(latents(rescaled), latents(loaded))


def test_set_safety_scale_without_an_adapter_loaded_is_refused(pipe):
    with pytest.raises(ValueError, match="No safety adapter is loaded"):
        pipe.set_safety_scale(0.5)


def test_safety_adapters_lists_name_source_scale_fused_and_categories(pipe, adapter_dir, adapter):
    pipe.load_safety_adapter(adapter_dir, scale=0.8)
    pipe.load_safety_adapter(adapter, adapter_name="nudity", fuse=True)
    pipe.set_safety_scale(0.3, adapter_name="nudity")
    assert pipe.safety_adapters == {
        "safety": {"source": str(adapter_dir), "scale": 0.8, "fused": False, "categories": ["violence"]},
        "nudity": {"source": "state dict", "scale": 0.3, "fused": True, "categories": []},
    }


def test_safety_adapters_is_empty_after_unloading_all(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.unload_safety_adapter()
    assert pipe.safety_adapters == {}


# -------------------------------------------------------------------------------------------------------- sources
def test_hub_id_folder_file_and_state_dict_give_the_same_output(hub, tmp_path, pipe, adapter, adapter_dir):
    push_folder(adapter_dir, "tester/safety-adapter")
    outputs = {}
    for label, source in {
        "hub": "tester/safety-adapter",
        "folder": adapter_dir,
        "file": adapter_dir / WEIGHTS,
        "state dict": adapter,
    }.items():
        pipeline = sd_pipeline()
        pipeline.load_safety_adapter(source)
        outputs[label] = latents(pipeline)
    assert max_diff(outputs["folder"], latents(pipe)) > 1e-3
    for label in ("hub", "file", "state dict"):
        assert torch.equal(outputs[label], outputs["folder"]), label


def test_an_adapter_from_the_hub_keeps_its_metadata(hub, pipe, adapter_dir):
    push_folder(adapter_dir, "tester/safety-adapter")
    pipe.load_safety_adapter("tester/safety-adapter")
    assert pipe.safety_adapters["safety"]["categories"] == ["violence"]
    assert pipe.safety_adapters["safety"]["source"] == "tester/safety-adapter"


def test_weight_name_picks_the_weight_file_in_a_folder(tmp_path, pipe, adapter):
    folder = tmp_path / "named"
    folder.mkdir()
    save_file(adapter, str(folder / "safety.safetensors"))
    save_file(random_lora(sd_pipeline().unet, seed=7), str(folder / "other.safetensors"))
    by_name, by_dict = sd_pipeline(), sd_pipeline()
    by_name.load_safety_adapter(folder, weight_name="safety.safetensors")
    by_dict.load_safety_adapter(adapter)
    assert torch.equal(latents(by_name), latents(by_dict))


# --------------------------------------------------------------------------------- from_pretrained, upgrading
@pytest.fixture
def saved_base(tmp_path):
    base = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_from_pretrained_with_safety_adapter_equals_loading_it_by_hand(saved_base, adapter_dir):
    in_one_call = StableDiffusionSafePipeline.from_pretrained(saved_base, safety_adapter=adapter_dir)
    by_hand = StableDiffusionSafePipeline.from_pretrained(saved_base)
    by_hand.load_safety_adapter(adapter_dir)
    for pipeline in (in_one_call, by_hand):
        pipeline.set_progress_bar_config(disable=True)
    assert in_one_call.safety_adapters == by_hand.safety_adapters
    assert torch.equal(latents(in_one_call), latents(by_hand))


def test_from_pretrained_with_safety_adapter_changes_the_base_output(saved_base, adapter_dir):
    plain = StableDiffusionSafePipeline.from_pretrained(saved_base)
    safe = StableDiffusionSafePipeline.from_pretrained(saved_base, safety_adapter=adapter_dir, safety_scale=1.0)
    for pipeline in (plain, safe):
        pipeline.set_progress_bar_config(disable=True)
    assert max_diff(latents(safe), latents(plain)) > 1e-3


def test_from_pretrained_can_fuse_the_safety_adapter(saved_base, adapter_dir):
    pipeline = StableDiffusionSafePipeline.from_pretrained(
        saved_base, safety_adapter=adapter_dir, safety_scale=0.5, fuse_safety_adapter=True
    )
    assert pipeline.safety_adapters["safety"]["fused"] is True
    assert pipeline.safety_adapters["safety"]["scale"] == 0.5
    assert peft_wrappers(pipeline.unet) == []


def test_enable_safety_adapters_upgrades_a_plain_pipeline_in_place(adapter_dir):
    plain = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    upgraded = enable_safety_adapters(plain)
    assert upgraded is plain
    assert isinstance(plain, StableDiffusionSafePipeline)


def test_load_safety_adapter_works_on_an_upgraded_pipeline(adapter_dir):
    plain = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    base = latents(plain)
    enable_safety_adapters(plain).load_safety_adapter(adapter_dir)
    reference = sd_pipeline()
    reference.load_safety_adapter(adapter_dir)
    assert max_diff(latents(plain), base) > 1e-3
    assert torch.equal(latents(plain), latents(reference))


def test_enable_safety_adapters_refuses_an_object_without_a_unet():
    with pytest.raises(ValueError, match="cannot take a safety adapter"):
        enable_safety_adapters(object())


# ------------------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture
def xl_pipe() -> StableDiffusionXLSafePipeline:
    return sdxl_pipeline()


@pytest.fixture
def xl_adapter_dir(tmp_path, xl_pipe):
    metadata = {"architecture": "sdxl", "unet_config_sha256": config_digest(xl_pipe.unet), "base_model": "tiny-sdxl"}
    return write_adapter(tmp_path / "xl_adapter", random_lora(xl_pipe.unet, seed=2), **metadata)


def test_loading_a_safety_adapter_changes_the_sdxl_output(xl_pipe, xl_adapter_dir):
    base = latents(xl_pipe)
    xl_pipe.load_safety_adapter(xl_adapter_dir)
    assert max_diff(latents(xl_pipe), base) > 1e-3


def test_unloading_a_safety_adapter_restores_the_sdxl_output_exactly(xl_pipe, xl_adapter_dir):
    base = latents(xl_pipe)
    xl_pipe.load_safety_adapter(xl_adapter_dir)
    xl_pipe.unload_safety_adapter("safety")
    assert torch.equal(latents(xl_pipe), base)


def test_unloading_a_safety_adapter_restores_the_sdxl_output_up_to_float_rounding(xl_pipe, xl_adapter_dir):
    base = latents(xl_pipe)
    xl_pipe.load_safety_adapter(xl_adapter_dir)
    xl_pipe.unload_safety_adapter("safety")
    assert max_diff(latents(xl_pipe), base) < 1e-4


def test_unloading_a_safety_adapter_leaves_no_peft_wrappers_in_the_sdxl_unet(xl_pipe, xl_adapter_dir):
    xl_pipe.load_safety_adapter(xl_adapter_dir)
    xl_pipe.unload_safety_adapter("safety")
    assert peft_wrappers(xl_pipe.unet) == []


def test_unloading_a_fused_sdxl_safety_adapter_restores_the_output_exactly(xl_pipe, xl_adapter_dir):
    base = latents(xl_pipe)
    xl_pipe.load_safety_adapter(xl_adapter_dir, fuse=True)
    assert max_diff(latents(xl_pipe), base) > 1e-3
    xl_pipe.unload_safety_adapter("safety")
    assert torch.equal(latents(xl_pipe), base)


# ---------------------------------------------------------------------------------------- next to a style LoRA
@pytest.fixture
def styled(pipe, adapter_dir):
    """The tiny pipeline with a user's "style" LoRA at 0.7, and the safety adapter folder ready to load."""
    style = random_lora(pipe.unet, seed=3)
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    return pipe


def test_a_safety_adapter_loads_next_to_a_style_lora_and_both_are_active(styled, adapter_dir):
    styled.load_safety_adapter(adapter_dir, scale=0.6)
    assert sorted(styled.get_active_adapters()) == ["safety", "style"]
    assert adapter_scaling(styled.unet, "style") == pytest.approx(0.7)
    assert adapter_scaling(styled.unet, "safety") == pytest.approx(0.6)


def test_a_safety_adapter_next_to_a_style_lora_changes_the_style_only_output(styled, adapter_dir):
    style_only = latents(styled)
    styled.load_safety_adapter(adapter_dir)
    assert max_diff(latents(styled), style_only) > 1e-3


def test_a_safety_adapter_next_to_a_style_lora_equals_both_loaded_with_set_adapters(styled, adapter_dir, adapter):
    styled.load_safety_adapter(adapter_dir, scale=0.6)
    by_hand = sd_pipeline()
    by_hand.load_lora_weights(random_lora(by_hand.unet, seed=3), adapter_name="style")
    by_hand.load_lora_weights(adapter, adapter_name="safety")
    by_hand.set_adapters(["style", "safety"], [0.7, 0.6])
    assert max_diff(latents(styled), latents(by_hand)) < 1e-5


def test_unloading_the_safety_adapter_restores_the_style_only_output_exactly(styled, adapter_dir):
    style_only = latents(styled)
    styled.load_safety_adapter(adapter_dir)
    styled.unload_safety_adapter("safety")
    assert torch.equal(latents(styled), style_only)


def test_unloading_the_safety_adapter_keeps_the_style_lora_active_at_its_weight(styled, adapter_dir):
    styled.load_safety_adapter(adapter_dir)
    styled.unload_safety_adapter("safety")
    assert styled.get_active_adapters() == ["style"]
    assert adapter_scaling(styled.unet, "style") == pytest.approx(0.7)


def test_set_safety_scale_keeps_the_style_lora_at_its_weight(styled, adapter_dir):
    styled.load_safety_adapter(adapter_dir)
    styled.set_safety_scale(0.25)
    assert adapter_scaling(styled.unet, "style") == pytest.approx(0.7)
    assert adapter_scaling(styled.unet, "safety") == pytest.approx(0.25)


def test_a_fused_safety_adapter_next_to_a_style_lora_unloads_to_the_style_only_output(styled, adapter_dir):
    style_only = latents(styled)
    styled.load_safety_adapter(adapter_dir, fuse=True)
    assert max_diff(latents(styled), style_only) > 1e-3
    styled.unload_safety_adapter("safety")
    assert torch.equal(latents(styled), style_only)
    assert styled.get_active_adapters() == ["style"]


# ------------------------------------------------------------------------------------------------------ bad input
def test_an_sdxl_adapter_on_an_sd_pipeline_is_refused_naming_the_pipeline_to_use(tmp_path, pipe, adapter):
    folder = write_adapter(tmp_path / "xl", adapter, architecture="sdxl")
    with pytest.raises(ValueError, match="SDXL") as error:
        pipe.load_safety_adapter(folder)
    assert "StableDiffusionXLSafePipeline" in str(error.value)
    assert peft_wrappers(pipe.unet) == [] and pipe.safety_adapters == {}


def test_an_sd_adapter_on_an_sdxl_pipeline_is_refused_naming_the_pipeline_to_use(tmp_path, xl_pipe):
    folder = write_adapter(tmp_path / "sd", random_lora(xl_pipe.unet, seed=4), architecture="sd")
    with pytest.raises(ValueError, match="Stable Diffusion 1.x/2.x") as error:
        xl_pipe.load_safety_adapter(folder)
    assert "StableDiffusionSafePipeline" in str(error.value)
    assert "SDXL pipeline" in str(error.value)


def test_an_sdxl_shaped_adapter_without_metadata_on_an_sd_pipeline_names_the_layer_that_does_not_fit(tmp_path, pipe):
    xl_state = random_lora(sdxl_pipeline().unet, seed=5)
    file = tmp_path / "xl.safetensors"
    save_file(xl_state, str(file))
    with pytest.raises(ValueError, match=r"does not fit .* layer '[^']+\.attn\d\.to_") as error:
        pipe.load_safety_adapter(file)
    assert "xl.safetensors" in str(error.value)
    assert peft_wrappers(pipe.unet) == []


def test_a_safetensors_file_that_is_not_a_lora_is_refused(tmp_path, pipe):
    file = tmp_path / "unet.safetensors"
    save_file({name: value.contiguous() for name, value in list(pipe.unet.state_dict().items())[:3]}, str(file))
    with pytest.raises(ValueError, match="holds no LoRA weights") as error:
        pipe.load_safety_adapter(file)
    assert "unet.safetensors" in str(error.value)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path, pipe):
    file = tmp_path / "garbage.safetensors"
    file.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        pipe.load_safety_adapter(file)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_a_pickle_file_is_refused_without_being_read(tmp_path, pipe, adapter, monkeypatch, suffix):
    file = tmp_path / f"pytorch_lora_weights{suffix}"
    file.write_bytes(pickle.dumps(adapter))

    def fail(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle file")

    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(pickle, "load", fail)
    with pytest.raises(ValueError, match="pickle file"):
        pipe.load_safety_adapter(file)


def test_a_pickle_weight_name_is_refused_without_being_read(tmp_path, pipe, adapter, adapter_dir, monkeypatch):
    (adapter_dir / "adapter.bin").write_bytes(pickle.dumps(adapter))
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="pickle file"):
        pipe.load_safety_adapter(adapter_dir, weight_name="adapter.bin")


def test_a_missing_weight_name_lists_the_safetensors_files_found(pipe, adapter_dir):
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as error:
        pipe.load_safety_adapter(adapter_dir, weight_name="missing.safetensors")
    assert WEIGHTS in str(error.value)


def test_a_folder_without_weights_is_refused_listing_what_it_found(tmp_path, pipe):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no {WEIGHTS} \(.safetensors files found: none\)"):
        pipe.load_safety_adapter(folder)


def test_loading_twice_under_the_same_adapter_name_is_refused(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    with pytest.raises(ValueError, match="adapter_name='safety' is already loaded"):
        pipe.load_safety_adapter(adapter_dir)


def test_loading_under_the_name_of_a_users_lora_is_refused(styled, adapter_dir):
    with pytest.raises(ValueError, match="adapter_name='style' is already loaded"):
        styled.load_safety_adapter(adapter_dir, adapter_name="style")


def test_loading_a_fused_adapter_twice_under_the_same_name_is_refused(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_safety_adapter(adapter_dir, fuse=True)


def test_unloading_an_unknown_adapter_name_is_refused_listing_the_loaded_ones(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    with pytest.raises(ValueError, match=r"No safety adapter named 'nudity' is loaded; loaded: \['safety'\]"):
        pipe.unload_safety_adapter("nudity")


def test_unloading_a_users_lora_through_unload_safety_adapter_is_refused(styled):
    with pytest.raises(ValueError, match="No safety adapter named 'style'"):
        styled.unload_safety_adapter("style")
    assert styled.get_active_adapters() == ["style"]


def test_an_adapter_for_another_checkpoint_of_the_same_architecture_only_warns(tmp_path, pipe, adapter, caplog):
    metadata = sd_metadata(pipe.unet, unet_config_sha256="0" * 64, base_model="other-sd")
    folder = write_adapter(tmp_path / "other", adapter, **metadata)
    base = latents(pipe)
    with caplog.at_level(logging.WARNING, logger="safety_dpo.pipelines.mixin"):
        pipe.load_safety_adapter(folder)
    warnings = [r for r in caplog.records if r.name == "safety_dpo.pipelines.mixin" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'other-sd'" in warnings[0].getMessage()
    assert "safety" in pipe.safety_adapters
    assert max_diff(latents(pipe), base) > 1e-3


def test_an_adapter_for_this_checkpoint_does_not_warn(pipe, adapter_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="safety_dpo.pipelines.mixin"):
        pipe.load_safety_adapter(adapter_dir)
    assert not [r for r in caplog.records if r.name == "safety_dpo.pipelines.mixin"]
