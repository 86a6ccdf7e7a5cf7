"""Safety pipelines with diffusers' own tools: `save_pretrained` folders that stock `DiffusionPipeline.from_pretrained`
loads, `fuse_lora` / `unfuse_lora` / `unload_lora_weights` / `delete_adapters` on safety adapters, two fused adapters on
the same layers, and `load_safety_adapter` taking `load_lora_weights`' arguments (`subfolder`, `revision`, ...)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import HfApi, snapshot_download
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from tiny_models import (
    WEIGHTS,
    attention_layers,
    get_dummy_sd_components,
    get_dummy_sdxl_components,
    random_unet_lora,
    write_adapter,
)

from safety_dpo.data.generation import config_digest
from safety_dpo.hub import push_folder
from safety_dpo.pipelines import StableDiffusionSafePipeline, StableDiffusionXLSafePipeline, enable_safety_adapters

SAVED = "safety_adapters/safety"  # where save_pretrained puts an unfused adapter named "safety"


# ---------------------------------------------------------------------------------------------------------- helpers
def sd_pipeline() -> StableDiffusionSafePipeline:
    pipeline = StableDiffusionSafePipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def loaded(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipeline("a knife", num_inference_steps=2, generator=generator, output_type="latent").images


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def layer_weights(pipeline) -> dict[str, torch.Tensor]:
    """The weight of every attention projection (of its base layer where a PEFT wrapper holds it)."""
    return {name: pipeline._linear(name).weight.detach().clone() for name in LAYERS}


def unet_weights(pipeline) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pipeline.unet.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def peft_wrappers(unet) -> list[str]:
    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def saved_unet(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)


def read_json(path) -> dict:
    return json.loads(path.read_text())


LAYERS = list(attention_layers(get_dummy_sd_components()["unet"]))


@pytest.fixture
def pipe() -> StableDiffusionSafePipeline:
    return sd_pipeline()


@pytest.fixture
def adapter(pipe) -> dict[str, torch.Tensor]:
    return random_unet_lora(pipe.unet, 1, 2, scale_up=0.5)


@pytest.fixture
def other_adapter(pipe) -> dict[str, torch.Tensor]:
    return random_unet_lora(pipe.unet, 2, 2, scale_up=0.5)


@pytest.fixture
def metadata(pipe) -> dict:
    return {
        "architecture": "sd",
        "unet_config_sha256": config_digest(pipe.unet),
        "base_model": "tiny-sd",
        "categories": ["violence"],
    }


@pytest.fixture
def adapter_dir(tmp_path, adapter, metadata):
    return write_adapter(tmp_path / "adapter", adapter, **metadata)


# ------------------------------------------------------------------------------ saving: what stock diffusers loads
def test_a_saved_safe_pipeline_names_a_class_that_stock_diffusers_loads(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.save_pretrained(tmp_path / "saved")
    assert read_json(tmp_path / "saved" / "model_index.json")["_class_name"] == "StableDiffusionPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionPipeline


def test_a_pipeline_upgraded_by_enable_safety_adapters_saves_as_its_own_class(tmp_path, adapter_dir):
    upgraded = enable_safety_adapters(StableDiffusionImg2ImgPipeline(**get_dummy_sd_components()))
    upgraded.load_safety_adapter(adapter_dir)
    upgraded.save_pretrained(tmp_path / "saved")
    assert read_json(tmp_path / "saved" / "model_index.json")["_class_name"] == "StableDiffusionImg2ImgPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionImg2ImgPipeline


def test_the_saved_unet_of_an_unfused_adapter_holds_the_base_weights_without_peft_keys(tmp_path, pipe, adapter_dir):
    base = unet_weights(pipe)
    pipe.load_safety_adapter(adapter_dir)
    pipe.save_pretrained(tmp_path / "saved")
    assert same_weights(saved_unet(tmp_path / "saved"), base)


def test_an_unfused_adapter_is_saved_as_a_lora_with_its_safety_dpo_json_beside_the_pipeline(
    tmp_path, pipe, adapter_dir
):
    pipe.load_safety_adapter(adapter_dir, scale=0.7)
    pipe.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "saved" / SAVED
    assert (folder / WEIGHTS).is_file()
    assert read_json(folder / "safety_dpo.json")["categories"] == ["violence"]
    entry = read_json(tmp_path / "saved" / "model_index.json")["_safety_adapters"]["safety"]
    assert entry["subfolder"] == SAVED and entry["weight_name"] == WEIGHTS and entry["scale"] == 0.7
    assert entry["source"] == {"path_or_repo_id": str(adapter_dir)}
    assert entry["lora_sha256"] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def test_stock_diffusers_loads_the_saved_adapter_with_load_lora_weights(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, scale=0.7)
    pipe.save_pretrained(tmp_path / "saved")
    stock = loaded(DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert max_diff(latents(stock), latents(sd_pipeline())) == 0  # the base model, no adapter in it
    stock.load_lora_weights(tmp_path / "saved", subfolder=SAVED, weight_name=WEIGHTS, adapter_name="safety")
    stock.set_adapters(["safety"], [0.7])
    assert max_diff(latents(stock), latents(pipe)) < 1e-5


def test_from_pretrained_loads_the_saved_safety_adapter_back_at_its_scale(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, scale=0.7)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = loaded(StableDiffusionSafePipeline.from_pretrained(tmp_path / "saved"))
    info = reloaded.safety_adapters["safety"]
    assert (info["scale"], info["fused"], info["categories"]) == (0.7, False, ["violence"])
    assert torch.equal(latents(reloaded), latents(pipe))


def test_from_pretrained_can_leave_the_saved_adapters_out(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.save_pretrained(tmp_path / "saved")
    plain = StableDiffusionSafePipeline.from_pretrained(tmp_path / "saved", load_saved_safety_adapters=False)
    assert (tmp_path / "saved" / SAVED / WEIGHTS).is_file()
    assert plain.safety_adapters == {}


def test_saving_leaves_the_pipeline_its_adapter_and_its_config_as_they_were(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    before, wrappers = latents(pipe), peft_wrappers(pipe.unet)
    pipe.save_pretrained(tmp_path / "saved")
    assert peft_wrappers(pipe.unet) == wrappers
    assert "_safety_adapters" not in pipe.config and "_fused_safety_adapters" not in pipe.unet.config
    assert torch.equal(latents(pipe), before)


def test_saving_warns_that_a_users_unfused_lora_is_not_saved(tmp_path, pipe, adapter_dir, other_adapter, caplog):
    pipe.load_lora_weights(other_adapter, adapter_name="style")
    pipe.load_safety_adapter(adapter_dir)
    with caplog.at_level(logging.WARNING, logger="safety_dpo.pipelines.mixin"):
        pipe.save_pretrained(tmp_path / "saved")
    assert any("'style'" in record.getMessage() for record in caplog.records)
    assert list(read_json(tmp_path / "saved" / "model_index.json")["_safety_adapters"]) == ["safety"]


def test_a_saved_sdxl_safe_pipeline_loads_in_stock_diffusers_and_back_with_its_adapter(tmp_path):
    xl = loaded(StableDiffusionXLSafePipeline(**get_dummy_sdxl_components()))
    xl.load_safety_adapter(random_unet_lora(xl.unet, 3, 2, scale_up=0.5), scale=0.6)
    xl.save_pretrained(tmp_path / "saved")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionXLPipeline
    reloaded = loaded(StableDiffusionXLSafePipeline.from_pretrained(tmp_path / "saved"))
    assert reloaded.safety_adapters["safety"]["scale"] == 0.6
    assert torch.equal(latents(reloaded), latents(xl))


def test_push_to_hub_uploads_the_adapter_beside_the_pipeline(hub, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.push_to_hub("tester/pushed-pipeline")
    files = HfApi().list_repo_files("tester/pushed-pipeline")
    assert {f"{SAVED}/{WEIGHTS}", f"{SAVED}/safety_dpo.json", "model_index.json"} <= set(files)
    assert StableDiffusionSafePipeline.from_pretrained("tester/pushed-pipeline").safety_adapters.keys() == {"safety"}


# --------------------------------------------------------------------------------------- saving: a fused adapter
def test_a_fused_adapter_is_in_the_saved_unet_and_recorded_in_its_config(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, scale=0.5, fuse=True)
    fused = unet_weights(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    assert same_weights(saved_unet(tmp_path / "saved"), fused)
    [record] = read_json(tmp_path / "saved" / "unet" / "config.json")["_fused_safety_adapters"]
    assert record["name"] == "safety" and record["scale"] == 0.5
    assert record["source"] == {"path_or_repo_id": str(adapter_dir)}
    assert record["categories"] == ["violence"] and record["base_model"] == "tiny-sd"
    assert not (tmp_path / "saved" / "safety_adapters").exists()


def test_the_fused_record_names_the_sha256_of_the_lora_an_unfused_save_writes(tmp_path, adapter_dir):
    fused, unfused = sd_pipeline(), sd_pipeline()
    fused.load_safety_adapter(adapter_dir, fuse=True)
    unfused.load_safety_adapter(adapter_dir)
    fused.save_pretrained(tmp_path / "fused")
    unfused.save_pretrained(tmp_path / "unfused")
    [record] = read_json(tmp_path / "fused" / "unet" / "config.json")["_fused_safety_adapters"]
    assert record["lora_sha256"] == hashlib.sha256((tmp_path / "unfused" / SAVED / WEIGHTS).read_bytes()).hexdigest()


def test_the_fused_record_survives_a_stock_load_and_save(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.save_pretrained(tmp_path / "saved")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    stock.save_pretrained(tmp_path / "again")
    recorded = read_json(tmp_path / "saved" / "unet" / "config.json")["_fused_safety_adapters"]
    assert read_json(tmp_path / "again" / "unet" / "config.json")["_fused_safety_adapters"] == recorded


def test_a_stock_load_of_a_fused_save_draws_what_the_fused_pipeline_draws(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.save_pretrained(tmp_path / "saved")
    stock = loaded(DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert torch.equal(latents(stock), latents(pipe))
    assert max_diff(latents(stock), latents(sd_pipeline())) > 1e-3


def test_saving_a_reloaded_fused_pipeline_with_one_more_adapter_keeps_both_records(tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = StableDiffusionSafePipeline.from_pretrained(tmp_path / "saved")
    reloaded.load_safety_adapter(adapter_dir, adapter_name="again", scale=0.25, fuse=True)
    reloaded.save_pretrained(tmp_path / "twice")
    records = read_json(tmp_path / "twice" / "unet" / "config.json")["_fused_safety_adapters"]
    assert [(record["name"], record["scale"]) for record in records] == [("safety", 1.0), ("again", 0.25)]


# ---------------------------------------------------------------- diffusers' fuse_lora, unfuse_lora, unload_lora
def test_unfuse_lora_restores_the_base_weights_and_keeps_the_adapter_unfused(pipe, adapter_dir):
    base = layer_weights(pipe)
    pipe.load_safety_adapter(adapter_dir, scale=0.5, fuse=True)
    pipe.unfuse_lora()
    assert same_weights(layer_weights(pipe), base)
    assert pipe.safety_adapters["safety"]["fused"] is False
    reference = sd_pipeline()
    reference.load_safety_adapter(adapter_dir, scale=0.5)
    assert max_diff(latents(pipe), latents(reference)) < 1e-4  # fused and unfused round differently


def test_unfuse_lora_on_sdxl_restores_the_base_weights_of_a_fused_safety_adapter():
    xl = StableDiffusionXLSafePipeline(**get_dummy_sdxl_components())
    base = {name: xl._linear(name).weight.detach().clone() for name in attention_layers(xl.unet)}
    xl.load_safety_adapter(random_unet_lora(xl.unet, 3, 2, scale_up=0.5), fuse=True)
    xl.unfuse_lora()
    assert all(torch.equal(xl._linear(name).weight, weight) for name, weight in base.items())
    assert xl.safety_adapters["safety"]["fused"] is False


def test_unload_lora_weights_removes_a_fused_safety_adapter_bit_for_bit(pipe, adapter_dir):
    base = unet_weights(pipe)
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.unload_lora_weights()
    assert same_weights(unet_weights(pipe), base)
    assert pipe.safety_adapters == {}


def test_unload_lora_weights_after_unfuse_lora_removes_the_adapter(pipe, adapter_dir):
    base = unet_weights(pipe)
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert same_weights(unet_weights(pipe), base)
    assert pipe.safety_adapters == {} and peft_wrappers(pipe.unet) == []


def test_unload_lora_weights_forgets_an_unfused_safety_adapter(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.unload_lora_weights()
    assert pipe.safety_adapters == {}
    pipe.load_safety_adapter(adapter_dir)  # the name is free again
    assert "safety" in pipe.safety_adapters


def test_fuse_lora_fuses_a_safety_adapter_so_that_unloading_it_restores_the_base_weights(pipe, adapter_dir):
    base = unet_weights(pipe)
    pipe.load_safety_adapter(adapter_dir, scale=0.5)
    unfused = latents(pipe)
    pipe.fuse_lora()
    assert pipe.safety_adapters["safety"]["fused"] is True and peft_wrappers(pipe.unet) == []
    assert pipe.fused_loras == {"safety"} and pipe.num_fused_loras == 1
    assert max_diff(latents(pipe), unfused) < 1e-4  # fused and unfused round differently
    pipe.unload_safety_adapter()
    assert same_weights(unet_weights(pipe), base)


def test_fuse_lora_with_a_lora_scale_scales_the_safety_adapter_as_it_does_other_loras(pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir)
    pipe.fuse_lora(adapter_names=["safety"], lora_scale=0.5)
    reference = sd_pipeline()
    reference.load_safety_adapter(adapter_dir, scale=0.5, fuse=True)
    assert pipe.safety_adapters == reference.safety_adapters
    assert same_weights(unet_weights(pipe), unet_weights(reference))


def test_delete_adapters_unloads_a_safety_adapter_and_deletes_the_others(pipe, adapter_dir, other_adapter):
    base = layer_weights(pipe)
    pipe.load_lora_weights(other_adapter, adapter_name="style")
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.delete_adapters(["safety", "style"])
    assert pipe.safety_adapters == {} and not pipe.get_list_adapters().get("unet")
    assert same_weights(layer_weights(pipe), base)


def test_a_fused_adapter_unloads_cleanly_under_a_lora_fused_with_fuse_lora_on_top(pipe, adapter_dir, other_adapter):
    pipe.load_lora_weights(other_adapter, adapter_name="style")
    pipe.load_safety_adapter(adapter_dir, fuse=True)
    pipe.fuse_lora(adapter_names=["style"])
    pipe.unload_safety_adapter()  # the style LoRA's fused change stays
    style_only = sd_pipeline()
    style_only.load_lora_weights(other_adapter, adapter_name="style")
    style_only.fuse_lora(adapter_names=["style"])
    expected = layer_weights(style_only)
    assert all(torch.allclose(weight, expected[name], atol=1e-5) for name, weight in layer_weights(pipe).items())


# ------------------------------------------------------------------------ two fused adapters on the same layers
def test_unloading_one_of_two_fused_adapters_keeps_exactly_the_others_change(pipe, adapter, other_adapter):
    pipe.load_safety_adapter(adapter, adapter_name="violence", fuse=True)
    pipe.load_safety_adapter(other_adapter, adapter_name="nudity", fuse=True)
    pipe.unload_safety_adapter("violence")
    nudity_only = sd_pipeline()
    nudity_only.load_safety_adapter(other_adapter, adapter_name="nudity", fuse=True)
    assert same_weights(unet_weights(pipe), unet_weights(nudity_only))


def test_unloading_both_of_two_fused_adapters_restores_the_base_weights_bit_for_bit(pipe, adapter, other_adapter):
    base = unet_weights(pipe)
    pipe.load_safety_adapter(adapter, adapter_name="violence", fuse=True)
    pipe.load_safety_adapter(other_adapter, adapter_name="nudity", fuse=True)
    pipe.unload_safety_adapter("violence")
    pipe.unload_safety_adapter("nudity")
    assert same_weights(unet_weights(pipe), base)


def test_rescaling_one_of_two_fused_adapters_keeps_the_others_change(pipe, adapter, other_adapter):
    pipe.load_safety_adapter(adapter, adapter_name="violence", fuse=True)
    pipe.load_safety_adapter(other_adapter, adapter_name="nudity", fuse=True)
    pipe.set_safety_scale(0.5, adapter_name="violence")
    reference = sd_pipeline()
    reference.load_safety_adapter(adapter, adapter_name="violence", scale=0.5, fuse=True)
    reference.load_safety_adapter(other_adapter, adapter_name="nudity", fuse=True)
    assert same_weights(unet_weights(pipe), unet_weights(reference))


# ------------------------------------------------------------------- load_safety_adapter: load_lora_weights' args
@pytest.fixture
def nested(tmp_path, adapter, metadata):
    """A folder holding the adapter in "x/" and, with other metadata, in "x/sub/file.safetensors"."""
    root = tmp_path / "nested"
    write_adapter(root / "x", adapter, **metadata)
    write_adapter(root / "x" / "sub", adapter, name="file.safetensors", **{**metadata, "categories": ["nudity"]})
    return root


def test_subfolder_loads_the_adapter_and_its_safety_dpo_json_from_a_local_folder(pipe, nested, adapter):
    pipe.load_safety_adapter(nested, subfolder="x")
    assert pipe.safety_adapters["safety"]["categories"] == ["violence"]
    reference = sd_pipeline()
    reference.load_safety_adapter(adapter)
    assert torch.equal(latents(pipe), latents(reference))


def test_a_weight_name_in_a_sub_folder_reads_the_safety_dpo_json_beside_it(pipe, nested):
    pipe.load_safety_adapter(nested, subfolder="x", weight_name="sub/file.safetensors")
    assert pipe.safety_adapters["safety"]["categories"] == ["nudity"]


def test_the_safety_dpo_json_beside_a_weight_name_in_a_sub_folder_is_checked(tmp_path, pipe, adapter):
    write_adapter(tmp_path / "repo" / "sub", adapter, name="file.safetensors", architecture="sdxl")
    with pytest.raises(ValueError, match="made for SDXL"):
        pipe.load_safety_adapter(tmp_path / "repo", weight_name="sub/file.safetensors")


def test_a_missing_subfolder_is_reported_by_name(pipe, nested):
    with pytest.raises(FileNotFoundError, match="no folder 'y'"):
        pipe.load_safety_adapter(nested, subfolder="y")


def test_a_subfolder_that_climbs_out_is_refused_before_any_download(pipe):
    with pytest.raises(ValueError, match=r"subfolder='../x' points outside"):
        pipe.load_safety_adapter("org/adapter", subfolder="../x")


def test_a_subfolder_with_a_state_dict_is_refused(pipe, adapter):
    with pytest.raises(ValueError, match="subfolder='x' applies to a folder or Hub repo"):
        pipe.load_safety_adapter(adapter, subfolder="x")


def test_an_unknown_keyword_is_refused_naming_it_and_the_accepted_ones(pipe, adapter_dir):
    with pytest.raises(TypeError, match=r"\['subfolders'\].*subfolder, revision, token, cache_dir"):
        pipe.load_safety_adapter(adapter_dir, subfolders="x")
    assert pipe.safety_adapters == {}


def test_subfolder_and_weight_name_load_from_a_hub_repo_with_the_safety_dpo_json_beside(hub, pipe, nested):
    push_folder(nested, "tester/nested")
    pipe.load_safety_adapter("tester/nested", subfolder="x", weight_name="sub/file.safetensors", token=hub.token)
    assert pipe.safety_adapters["safety"] == {
        "source": "tester/nested",
        "scale": 1.0,
        "fused": False,
        "categories": ["nudity"],
    }


def test_a_hub_subfolder_and_its_safety_dpo_json_are_checked(hub, tmp_path, pipe, adapter):
    write_adapter(tmp_path / "repo" / "x", adapter, architecture="sdxl")
    push_folder(tmp_path / "repo", "tester/xl")
    with pytest.raises(ValueError, match="made for SDXL"):
        pipe.load_safety_adapter("tester/xl", subfolder="x")


def test_a_missing_hub_subfolder_is_reported_by_name(hub, pipe, nested):
    push_folder(nested, "tester/nested")
    with pytest.raises(FileNotFoundError, match="'tester/nested' has no .safetensors file in 'y'"):
        pipe.load_safety_adapter("tester/nested", subfolder="y")


def test_a_hub_cache_snapshot_given_by_path_loads_with_its_subfolder(hub, pipe, nested):
    """The snapshot's files are links into the repo cache's blobs/, outside the snapshot's sub-folder: allowed."""
    push_folder(nested, "tester/nested")
    snapshot = Path(snapshot_download("tester/nested"))
    assert (snapshot / "x" / WEIGHTS).is_symlink()
    pipe.load_safety_adapter(snapshot, subfolder="x", weight_name="sub/file.safetensors")
    assert pipe.safety_adapters["safety"]["categories"] == ["nudity"]


def test_revision_loads_the_adapter_as_it_was_at_that_commit(hub, tmp_path, adapter, other_adapter, metadata):
    api = HfApi()
    api.create_repo("tester/versions")
    first = api.upload_folder(
        folder_path=write_adapter(tmp_path / "v1" / "x", adapter, **metadata).parent, repo_id="tester/versions"
    )
    api.upload_folder(
        folder_path=write_adapter(tmp_path / "v2" / "x", other_adapter, **metadata).parent, repo_id="tester/versions"
    )
    pipelines = {}
    for label, revision in {"first": first.oid, "main": None}.items():
        pipelines[label] = sd_pipeline()
        pipelines[label].load_safety_adapter("tester/versions", subfolder="x", revision=revision)
    expected = {"first": adapter, "main": other_adapter}
    for label, state in expected.items():
        reference = sd_pipeline()
        reference.load_safety_adapter(state)
        assert torch.equal(latents(pipelines[label]), latents(reference)), label


def test_cache_dir_and_local_files_only_read_the_adapter_from_that_cache(hub, tmp_path, pipe, nested):
    push_folder(nested, "tester/nested")
    cache = tmp_path / "cache"
    pipe.load_safety_adapter("tester/nested", subfolder="x", cache_dir=cache)
    assert list(cache.glob("models--tester--nested/snapshots/*/x/" + WEIGHTS))
    requests = len(hub.server.store.requests)
    again = sd_pipeline()
    again.load_safety_adapter("tester/nested", subfolder="x", cache_dir=cache, local_files_only=True)
    assert len(hub.server.store.requests) == requests
    assert torch.equal(latents(again), latents(pipe))


def test_a_saved_pipeline_pushed_to_the_hub_loads_back_with_its_adapter(hub, tmp_path, pipe, adapter_dir):
    pipe.load_safety_adapter(adapter_dir, scale=0.7)
    pipe.save_pretrained(tmp_path / "saved")
    push_folder(tmp_path / "saved", "tester/safe-pipeline")
    reloaded = loaded(StableDiffusionSafePipeline.from_pretrained("tester/safe-pipeline"))
    assert reloaded.safety_adapters["safety"]["scale"] == 0.7
    assert torch.equal(latents(reloaded), latents(pipe))
    stock = loaded(DiffusionPipeline.from_pretrained("tester/safe-pipeline"))
    assert type(stock) is StableDiffusionPipeline
    stock.load_lora_weights("tester/safe-pipeline", subfolder=SAVED, weight_name=WEIGHTS, adapter_name="safety")
    stock.set_adapters(["safety"], [0.7])
    assert max_diff(latents(stock), latents(pipe)) < 1e-5
