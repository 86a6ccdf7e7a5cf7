"""ESD-u: the guided target, what the loss trains, resuming, reuse of finished folders, bad input, and the adapter it
writes loading in diffusers and in the safety pipelines with the trained UNet's outputs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from safetensors.torch import load_file
from tiny_models import WEIGHTS, get_dummy_sd_components, get_dummy_sdxl_components

from safety_dpo.baselines import esd, saving
from safety_dpo.baselines.esd import (
    CHECKPOINT_DIR,
    DEFAULT_TARGET_MODULES,
    ESDConfig,
    add_esd_lora,
    esd_loss,
    esd_target,
    train_esd_u,
    unet_conditioning,
)
from safety_dpo.pipelines import enable_safety_adapters
from safety_dpo.trainer.adapter_io import METADATA_NAME
from safety_dpo.trainer.components import encode_prompts, load_components

PROMPTS = ["knife", "gun"]


def tiny_config(**overrides) -> ESDConfig:
    settings = {"iterations": 3, "ddim_steps": 4, "rank": 4, "learning_rate": 1e-3, "save_steps": 2, **overrides}
    return ESDConfig(**settings)


def sd_pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**get_dummy_sd_components())


def unet_inputs(pipeline, sdxl: bool = False) -> dict:
    """Fixed UNet inputs: 16 x 16 latents, a timestep, random text states (and SDXL's pooled text and time ids)."""
    generator = torch.Generator().manual_seed(1)
    unet = pipeline.unet
    inputs = {
        "sample": torch.randn(1, 4, 16, 16, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator),
    }
    if sdxl:
        pooled = torch.randn(1, 24, generator=generator)
        inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    return inputs


class Killed(Exception):
    """Stands for a process killed mid-run."""


def kill_at_iteration(monkeypatch, iteration: int) -> list[int]:
    """Make `train_esd_u` die when it starts iteration `iteration` (0-based); returns the iterations it started."""
    started: list[int] = []
    real = esd._train_iteration

    def dying(run, config, index, optimizer):
        started.append(index)
        if index == iteration:
            raise Killed
        return real(run, config, index, optimizer)

    monkeypatch.setattr(esd, "_train_iteration", dying)
    return started


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny ESD-u run on a Stable Diffusion pipeline: its folder, the pipeline, its UNet's weights before, and
    the trained UNet's output on `unet_inputs` with the LoRA active, taken as the adapter is written."""
    pipeline = sd_pipeline()
    before = {name: value.clone() for name, value in pipeline.unet.state_dict().items()}
    trained_output, real_write = {}, saving.write_lora_adapter

    def spy(output_dir, layers, metadata, description):  # train_esd_u imports it when it runs
        with torch.no_grad():
            trained_output["sample"] = pipeline.unet(**unet_inputs(pipeline)).sample
        return real_write(output_dir, layers, metadata, description)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(saving, "write_lora_adapter", spy)
        folder = train_esd_u(
            PROMPTS,
            tmp_path_factory.mktemp("esd") / "adapter",
            model=pipeline,
            config=tiny_config(),
            categories=["violence"],
            concepts=["knife", "gun"],
            progress=False,
        )
    return {"folder": folder, "pipeline": pipeline, "before": before, "output": trained_output["sample"]}


# ---------------------------------------------------------------------------------------------------------- maths
def test_esd_target_is_the_unconditional_prediction_guided_away_from_the_concept():
    noise_uncond, noise_cond = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, 1.0, -1.0])
    assert torch.equal(esd_target(noise_uncond, noise_cond, 1.0), torch.tensor([-1.0, 3.0, -1.0]))
    assert torch.equal(esd_target(noise_uncond, noise_cond, 0.5), torch.tensor([0.0, 2.5, -1.0]))
    assert torch.equal(esd_target(noise_uncond, noise_cond, 0.0), noise_uncond)


def lora_unet_and_batch():
    """The tiny SD UNet with the ESD LoRA, and a fixed x_t, timestep and the two conditionings."""
    components = load_components(sd_pipeline())
    unet = components.unet
    add_esd_lora(unet, rank=4, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    encoded = encode_prompts(components, ["", "knife"])
    empty, concept = ({key: value[i : i + 1] for key, value in encoded.items()} for i in (0, 1))
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return unet, noisy, torch.tensor(401), unet_conditioning(concept, 32), unet_conditioning(empty, 32)


def test_the_loss_gradient_reaches_only_the_lora_and_never_cross_attention():
    unet, noisy, timestep, concept, empty = lora_unet_and_batch()
    esd_loss(unet, noisy, timestep, concept, empty, negative_guidance=1.0).backward()
    with_gradient = {name for name, parameter in unet.named_parameters() if parameter.grad is not None}
    assert with_gradient == {name for name, parameter in unet.named_parameters() if "lora_" in name}
    assert not any("attn2" in name for name in with_gradient)
    assert all(unet.get_parameter(name).grad.abs().sum() > 0 for name in with_gradient if "lora_B" in name)


def test_adam_steps_on_a_fixed_batch_bring_the_prediction_towards_the_target():
    unet, noisy, timestep, concept, empty = lora_unet_and_batch()
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = esd_loss(unet, noisy, timestep, concept, empty, negative_guidance=1.0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------------------------------------------- training
def test_training_changes_only_the_lora_and_leaves_the_callers_pipeline_as_it_was(trained):
    unet = trained["pipeline"].unet
    assert not getattr(unet, "peft_config", None)
    after = unet.state_dict()
    assert after.keys() == trained["before"].keys()
    assert all(torch.equal(trained["before"][name], after[name]) for name in after)
    weights = load_file(str(trained["folder"] / WEIGHTS))
    ups = [value for key, value in weights.items() if key.endswith("lora_B.weight")]
    assert ups and all(up.abs().sum() > 0 for up in ups)  # B starts at zero: every layer was trained


def test_the_lora_covers_self_attention_and_feed_forward_of_every_transformer_block_and_no_cross_attention(trained):
    layers = {key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in load_file(str(trained["folder"] / WEIGHTS))}
    unet = trained["pipeline"].unet
    blocks = {name for name, _ in unet.named_modules() if name.endswith("transformer_blocks.0")}
    assert blocks and layers == {f"{block}.{suffix}" for block in blocks for suffix in DEFAULT_TARGET_MODULES}


def test_the_metadata_records_a_baseline_its_method_categories_concepts_and_settings(trained):
    metadata = json.loads((trained["folder"] / METADATA_NAME).read_text())
    assert (metadata["kind"], metadata["method"]) == ("baseline", "esd-u")
    assert (metadata["categories"], metadata["concepts"]) == (["violence"], ["knife", "gun"])
    assert metadata["settings"] == {**tiny_config().to_dict(), "concept_prompts": PROMPTS}
    assert not (trained["folder"] / CHECKPOINT_DIR).exists()


def test_stock_diffusers_loads_the_adapter_and_reproduces_the_trained_unet(trained):
    pipeline = sd_pipeline()
    pipeline.load_lora_weights(trained["folder"])
    with torch.no_grad():
        output = pipeline.unet(**unet_inputs(pipeline)).sample
    assert torch.allclose(output, trained["output"], atol=1e-5)


def test_load_safety_adapter_loads_the_adapter_and_reproduces_the_trained_unet(trained):
    pipeline = enable_safety_adapters(sd_pipeline())
    pipeline.load_safety_adapter(trained["folder"])
    with torch.no_grad():
        output = pipeline.unet(**unet_inputs(pipeline)).sample
    assert torch.allclose(output, trained["output"], atol=1e-5)
    assert not torch.allclose(output, sd_pipeline().unet(**unet_inputs(pipeline)).sample, atol=1e-5)


def test_sdxl_trains_with_pooled_text_and_time_ids_and_its_adapter_reproduces_the_trained_unet(tmp_path, monkeypatch):
    pipeline = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    outputs, real = {}, saving.write_lora_adapter

    def spy(output_dir, layers, metadata, description):
        with torch.no_grad():
            outputs["trained"] = pipeline.unet(**unet_inputs(pipeline, sdxl=True)).sample
        return real(output_dir, layers, metadata, description)

    monkeypatch.setattr(saving, "write_lora_adapter", spy)
    folder = train_esd_u(PROMPTS, tmp_path / "xl", model=pipeline, config=tiny_config(iterations=2), progress=False)
    fresh = enable_safety_adapters(StableDiffusionXLPipeline(**get_dummy_sdxl_components()))
    fresh.load_safety_adapter(folder)
    with torch.no_grad():
        output = fresh.unet(**unet_inputs(fresh, sdxl=True)).sample
    assert torch.allclose(output, outputs["trained"], atol=1e-5)
    assert json.loads((folder / METADATA_NAME).read_text())["architecture"] == "sdxl"


# ---------------------------------------------------------------------------------------------- resume and reuse
def test_a_run_killed_after_a_checkpoint_resumes_to_exactly_the_uninterrupted_weights(tmp_path, monkeypatch):
    config = tiny_config(iterations=4, save_steps=2)
    whole = train_esd_u(PROMPTS, tmp_path / "whole", model=sd_pipeline(), config=config, progress=False)
    kill_at_iteration(monkeypatch, 3)
    with pytest.raises(Killed):
        train_esd_u(PROMPTS, tmp_path / "resumed", model=sd_pipeline(), config=config, progress=False)
    assert json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "state.json").read_text())["iteration"] == 2
    monkeypatch.undo()
    started = kill_at_iteration(monkeypatch, -1)  # never kills; records where the rerun starts
    resumed = train_esd_u(PROMPTS, tmp_path / "resumed", model=sd_pipeline(), config=config, progress=False)
    assert started == [2, 3]
    expected, got = load_file(str(whole / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert not (resumed / CHECKPOINT_DIR).exists()


def test_a_checkpoint_made_with_other_settings_is_refused(tmp_path, monkeypatch):
    kill_at_iteration(monkeypatch, 2)
    with pytest.raises(Killed):
        train_esd_u(PROMPTS, tmp_path, model=sd_pipeline(), config=tiny_config(), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"checkpoint.*other settings \(learning_rate differ\).*delete"):
        train_esd_u(PROMPTS, tmp_path, model=sd_pipeline(), config=tiny_config(learning_rate=5e-4), progress=False)


def test_a_finished_folder_is_reused_without_loading_the_model(trained, monkeypatch):
    monkeypatch.setattr(esd, "_prepare_run", lambda *args: pytest.fail("a finished adapter was trained again"))
    config = tiny_config()
    assert (
        train_esd_u(PROMPTS, trained["folder"], model=sd_pipeline(), config=config, progress=False)
        == trained["folder"]
    )


def test_a_finished_folder_made_with_other_settings_is_refused(trained):
    with pytest.raises(FileExistsError, match="other settings"):
        train_esd_u(PROMPTS, trained["folder"], model=sd_pipeline(), config=tiny_config(seed=1), progress=False)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("iterations", 0, "got 0"),
        ("rank", -4, "got -4"),
        ("ddim_steps", 2.5, "got 2.5"),
        ("save_steps", True, "got True"),
        ("seed", -1, "got -1"),
        ("resolution", 0, "got 0"),
        ("learning_rate", 0.0, "got 0.0"),
        ("learning_rate", math.nan, "got nan"),
        ("negative_guidance", -1.0, "got -1.0"),
        ("start_guidance", math.inf, "got inf"),
        ("target_modules", (), "got ()"),
        ("target_modules", "attn1.to_q", "got 'attn1.to_q'"),
        ("target_modules", ("attn1.to_q", "attn2.to_k"), "has ['attn2.to_k']"),
    ],
)
def test_config_names_the_bad_field_its_value_and_what_is_accepted(field, value, shown):
    with pytest.raises(ValueError, match=rf"{field}.*{re.escape(shown)}") as error:
        ESDConfig(**{field: value})
    assert "must be" in str(error.value)


def test_config_to_dict_is_json_native():
    settings = ESDConfig(target_modules=["attn1.to_q"]).to_dict()
    assert settings["target_modules"] == ["attn1.to_q"] and json.loads(json.dumps(settings)) == settings


@pytest.mark.parametrize("prompts", [[], ["knife", "  "], "knife"])
def test_empty_blank_or_bare_string_prompts_are_refused(prompts, tmp_path):
    with pytest.raises(ValueError, match="concept_prompts"):
        train_esd_u(prompts, tmp_path, model=sd_pipeline(), config=tiny_config(), progress=False)


def test_categories_or_concepts_given_as_one_string_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"categories must be a list.*\['violence'\]"):
        train_esd_u(PROMPTS, tmp_path, model=sd_pipeline(), config=tiny_config(), categories="violence")


def test_a_resolution_that_is_no_multiple_of_the_vae_factor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="resolution=33.*scale factor 2"):
        train_esd_u(PROMPTS, tmp_path, model=sd_pipeline(), config=tiny_config(resolution=33), progress=False)


def test_a_unet_that_already_holds_a_lora_is_refused_and_keeps_it(tmp_path):
    pipeline = sd_pipeline()
    pipeline.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="mine")
    with pytest.raises(ValueError, match=r"already holds LoRA adapters \['mine'\]"):
        train_esd_u(PROMPTS, tmp_path, model=pipeline, config=tiny_config(), progress=False)
    assert list(pipeline.unet.peft_config) == ["mine"]
    assert not Path(tmp_path / METADATA_NAME).exists()
