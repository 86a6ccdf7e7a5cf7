"""SafetyDPOTrainer: what training changes, checkpoints and resumption, SDXL, saving, and bad input."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from tiny_models import IMAGE_SIZE, get_dummy_sd_components, get_dummy_sdxl_components, tiny_pairs
from transformers import TrainerCallback

from safety_dpo.data import CoProV2Builder
from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME
from safety_dpo.trainer.components import encode_prompts
from safety_dpo.trainer.data import retain_prompts


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> datasets.Dataset:
    """A small microworld CoProV2 build: two violence and one hate concept, 4 pairs each."""
    builder = CoProV2Builder(
        concepts=["knife", "gun", "nazi"], pairs_per_concept=4, num_inference_steps=4, test_size=0
    )
    return builder.build(tmp_path_factory.mktemp("coprov2") / "out", progress=False)["train"]


def config(tmp_path, **overrides) -> SafetyDPOConfig:
    settings = {
        "output_dir": str(tmp_path / "expert"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return SafetyDPOConfig(**settings)


def lora_and_base_weights(trainer: SafetyDPOTrainer) -> tuple[dict, dict]:
    lora, base = {}, {}
    for name, parameter in trainer.components.unet.named_parameters():
        (lora if "lora_" in name else base)[name] = parameter.detach().clone()
    return lora, base


# ------------------------------------------------------------------------------------------------------ training
def test_training_changes_the_lora_and_leaves_the_base_weights_alone(pairs, tmp_path):
    trainer = SafetyDPOTrainer(args=config(tmp_path), train_dataset=pairs)
    lora_before, base_before = lora_and_base_weights(trainer)
    trainer.train()
    lora_after, base_after = lora_and_base_weights(trainer)
    assert lora_before and all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before if "lora_B" in k)
    assert all(torch.equal(base_before[name], base_after[name]) for name in base_before)
    assert not any(p.requires_grad for n, p in trainer.components.unet.named_parameters() if "lora_" not in n)


def test_metrics_are_logged_in_trl_naming(pairs, tmp_path):
    trainer = SafetyDPOTrainer(args=config(tmp_path, logging_steps=2), train_dataset=pairs)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in logged
    for key in ("mse/policy_chosen", "mse/policy_rejected", "mse/reference_chosen", "mse/reference_rejected"):
        assert logged[key] > 0
    assert logged["rewards/margins"] == pytest.approx(logged["rewards/chosen"] - logged["rewards/rejected"], rel=1e-5)


def test_implicit_accuracy_rises_on_an_easy_expert(pairs, tmp_path):
    args = config(tmp_path, max_steps=30, logging_steps=1, per_device_train_batch_size=8, learning_rate=2e-3)
    trainer = SafetyDPOTrainer(args=args, train_dataset=pairs)
    trainer.train()
    accuracies = [entry["rewards/accuracies"] for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert len(accuracies) == 30
    assert accuracies[0] == 0.5  # the LoRA's B factors start at zero: policy == reference, every pair a tie
    assert sum(accuracies[-10:]) / 10 > 0.85, accuracies


def test_both_prompt_conditions_use_every_pair_twice(pairs, tmp_path):
    both = SafetyDPOTrainer(args=config(tmp_path), train_dataset=pairs)
    unsafe = SafetyDPOTrainer(args=config(tmp_path, prompt_condition="unsafe"), train_dataset=pairs)
    assert len(both.train_dataset) == 2 * len(unsafe.train_dataset) == 2 * len(pairs)


def test_categories_select_the_rows_of_an_expert(pairs, tmp_path):
    trainer = SafetyDPOTrainer(args=config(tmp_path, categories=["hate"]), train_dataset=pairs)
    assert len(trainer.train_dataset) == 2 * 4
    assert trainer.adapter_metadata()["concepts"] == {"hate": ["nazi"]}


def test_training_without_precompute_gives_the_same_first_loss_as_with_it(pairs, tmp_path):
    losses = []
    for precompute in (True, False):
        args = config(tmp_path / str(precompute), precompute=precompute, max_steps=1, logging_steps=1)
        trainer = SafetyDPOTrainer(args=args, train_dataset=pairs)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# ---------------------------------------------------------------------------------------------- save and resume
class StopAt(TrainerCallback):
    """Crash the run after step `step`, as a killed process would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def test_a_run_stopped_at_a_checkpoint_resumes_to_the_uninterrupted_adapter(pairs, tmp_path):
    from safetensors.torch import load_file

    settings = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "empty_prompt_probability": 0.5}
    uninterrupted = SafetyDPOTrainer(args=config(tmp_path / "a", **settings), train_dataset=pairs)
    uninterrupted.train()
    uninterrupted.save_model()
    interrupted = SafetyDPOTrainer(args=config(tmp_path / "b", **settings), train_dataset=pairs, callbacks=[StopAt(6)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = SafetyDPOTrainer(args=config(tmp_path / "b", **settings), train_dataset=pairs)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint: step 4
    resumed.save_model()
    expected = load_file(str(tmp_path / "a" / "expert" / LORA_WEIGHT_NAME))
    actual = load_file(str(tmp_path / "b" / "expert" / LORA_WEIGHT_NAME))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), key


def test_save_model_writes_a_diffusers_lora_its_description_and_a_card(pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from safety_dpo.microworld import checkpoint_path, load_pipeline

    trainer = SafetyDPOTrainer(args=config(tmp_path, dataset_name="org/coprov2-micro"), train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    expert = tmp_path / "expert"
    metadata = json.loads((expert / METADATA_NAME).read_text())
    assert metadata["kind"] == "expert" and metadata["architecture"] == "sd"
    assert metadata["categories"] == ["hate", "violence"]
    assert metadata["concepts"] == {"hate": ["nazi"], "violence": ["gun", "knife"]}
    assert metadata["dataset"] == "org/coprov2-micro"
    assert metadata["lora"] == {"rank": 4, "alpha": 4.0, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
                                "dropout": 0.0, "init_sha256": trainer.lora_init_sha256}  # fmt: skip
    assert len(trainer.lora_init_sha256) == 64
    assert metadata["training"]["beta"] == 2500.0 and metadata["training"]["steps"] == 4
    assert metadata["unet_config_sha256"] == trainer.components.unet_fingerprint
    assert "SafetyDPO safety" in (expert / "README.md").read_text()
    pipe = load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and checkpoint_path()
    generator = torch.Generator().manual_seed(0)
    base = pipe("a knife on a beach", num_inference_steps=2, generator=generator, output_type="np").images
    pipe.load_lora_weights(str(expert))
    generator = torch.Generator().manual_seed(0)
    aligned = pipe("a knife on a beach", num_inference_steps=2, generator=generator, output_type="np").images
    assert not (base == aligned).all()


def test_push_to_hub_publishes_the_adapter_its_description_and_card(pairs, tmp_path, hub):
    from huggingface_hub import HfApi

    args = config(tmp_path, hub_model_id="tester/safety-expert")
    trainer = SafetyDPOTrainer(args=args, train_dataset=pairs)
    trainer.train()
    trainer.push_to_hub()
    files = set(HfApi().list_repo_files("tester/safety-expert"))
    assert {LORA_WEIGHT_NAME, METADATA_NAME, "README.md"} <= files
    assert not any(name.startswith("_precomputed") for name in files)


# -------------------------------------------------------------------------------------------------- other models
def test_sdxl_trains_with_pooled_embeddings_and_time_ids_and_saves_a_loadable_lora(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    trainer = SafetyDPOTrainer(model=pipe, args=config(tmp_path, max_steps=2), train_dataset=tiny_pairs())
    assert trainer.components.architecture == "sdxl"
    lora_before, _ = lora_and_base_weights(trainer)
    trainer.train()
    trainer.save_model()
    lora_after, _ = lora_and_base_weights(trainer)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    fresh = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    fresh.load_lora_weights(str(tmp_path / "expert"))
    assert any("lora" in name for name, _ in fresh.unet.named_parameters())


def test_v_prediction_models_train(tmp_path):
    from diffusers import StableDiffusionPipeline

    components = get_dummy_sd_components()
    components["scheduler"] = components["scheduler"].__class__.from_config(
        components["scheduler"].config, prediction_type="v_prediction"
    )
    trainer = SafetyDPOTrainer(
        model=StableDiffusionPipeline(**components), args=config(tmp_path, max_steps=2, logging_steps=1),
        train_dataset=tiny_pairs(),
    )  # fmt: skip
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_images_of_another_size_are_resized_and_label_0_orients_the_pairs(tmp_path):
    from diffusers import StableDiffusionPipeline

    rows = tiny_pairs(size=48).to_dict()
    rows["label_0"] = [1.0, 0.0, 0.5, 1.0]
    trainer = SafetyDPOTrainer(
        model=StableDiffusionPipeline(**get_dummy_sd_components()),
        args=config(tmp_path, precompute=False, prompt_condition="unsafe"),
        train_dataset=datasets.Dataset.from_dict(rows),
    )
    assert len(trainer.train_dataset) == 3  # the tie is dropped
    example = trainer.train_dataset[1]
    assert example["pixels_chosen"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # Row 1 is green over blue with label_0 = 0: swapped, so blue is the preferred image.
    assert example["pixels_chosen"][2].mean() > example["pixels_chosen"][1].mean()


# ------------------------------------------------------------------------------- the supervised and preservation terms
def tiny_trainer(tmp_path, name: str, **overrides) -> SafetyDPOTrainer:
    from diffusers import StableDiffusionPipeline

    settings = {"max_steps": 6, "learning_rate": 5e-2, "logging_steps": 1, "output_dir": str(tmp_path / name)}
    return SafetyDPOTrainer(
        model=StableDiffusionPipeline(**get_dummy_sd_components()),
        args=config(tmp_path, **{**settings, **overrides}),
        train_dataset=tiny_pairs(),
    )


@torch.no_grad()
def errors_after_training(trainer: SafetyDPOTrainer, prompts: list[str]) -> dict[str, float]:
    """On fixed noise and timesteps: the policy's denoising error on the safe images under `prompts`, and the mean
    squared difference between the policy's and the reference's predictions there."""
    generator = torch.Generator().manual_seed(0)
    cache = trainer.train_dataset.cache
    latents = cache["chosen_mean"][: len(prompts)]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(100, 900, (len(prompts),), generator=generator)
    noisy = trainer.components.noise_scheduler.add_noise(latents, noise, timesteps)
    embeds = encode_prompts(trainer.components, prompts)["prompt_embeds"]
    policy = trainer.model(noisy, timesteps, embeds)
    reference = trainer.model.reference(noisy, timesteps, embeds)
    return {"safe_error": float(((policy - noise) ** 2).mean()), "drift": float(((policy - reference) ** 2).mean())}


def test_the_supervised_term_lowers_the_safe_images_denoising_error_and_is_logged(tmp_path):
    unsafe_prompts = [f"a knife number {i}" for i in range(4)]
    errors = {}
    for name, rpo_alpha in (("dpo", None), ("rpo", 1.0)):
        trainer = tiny_trainer(tmp_path, name, rpo_alpha=rpo_alpha, beta=1.0)
        trainer.train()
        errors[name] = errors_after_training(trainer, unsafe_prompts)["safe_error"]
    assert errors["rpo"] < errors["dpo"]
    logged = [entry for entry in trainer.state.log_history if "loss/sft" in entry]
    assert logged and all("loss/dpo" in entry for entry in logged)


def test_the_preservation_term_keeps_predictions_on_benign_prompts_near_the_base_model(tmp_path):
    benign = ["a spoon number 0", "a cat", "a red ball", ""]
    drift = {}
    for name, weight in (("without", 0.0), ("with", 1000.0)):
        trainer = tiny_trainer(tmp_path, name, preservation_weight=weight, preservation_prompts=benign)
        trainer.train()
        drift[name] = errors_after_training(trainer, benign)["drift"]
    assert drift["without"] > 0 and drift["with"] < 0.5 * drift["without"]
    assert any("loss/preservation" in entry for entry in trainer.state.log_history)
    training = json.loads(json.dumps(trainer.adapter_metadata()["training"]))
    assert training["preservation_weight"] == 1000.0 and training["preservation_prompts"]["count"] == 4


def test_the_preservation_term_keeps_the_safe_prompts_and_the_other_categories_by_default(tmp_path):
    trainer = tiny_trainer(tmp_path, "safe", preservation_weight=1.0)
    assert len(trainer.preservation_conditioning["prompt_embeds"]) == 4  # "a spoon number 0" ... 3
    trainer.train()
    assert trainer.state.global_step == 6
    rows = datasets.concatenate_datasets([tiny_pairs(), tiny_pairs(category="sexual").map(
        lambda row: {"unsafe_prompt": row["unsafe_prompt"].replace("knife", "nude")}
    )])  # fmt: skip
    assert retain_prompts(rows, ["violence"]) == [f"a nude number {i}" for i in range(4)] + [
        f"a spoon number {i}" for i in range(4)
    ]
    assert retain_prompts(rows, None) == [f"a spoon number {i}" for i in range(4)]


# ----------------------------------------------------------------------------------------------------- bad input
def test_a_dataset_missing_columns_is_refused_with_the_columns_listed(pairs, tmp_path):
    # without safe_prompt, prompt_condition falls back to "unsafe" (test_published_format.py): only jpg_1 is missing
    with pytest.raises(ValueError, match=r"lacks the columns \['jpg_1'\]; it has \['caption', 'category'"):
        SafetyDPOTrainer(args=config(tmp_path), train_dataset=pairs.remove_columns(["jpg_1", "safe_prompt"]))
    with pytest.raises(ValueError, match=r"lacks the columns \['jpg_0', 'jpg_1'\]"):
        SafetyDPOTrainer(args=config(tmp_path), train_dataset=pairs.remove_columns(["jpg_0", "jpg_1"]))


def test_preservation_without_benign_prompts_is_refused(tmp_path):
    from diffusers import StableDiffusionPipeline

    with pytest.raises(ValueError, match="needs benign prompts: pass preservation_prompts"):
        SafetyDPOTrainer(
            model=StableDiffusionPipeline(**get_dummy_sd_components()),
            args=config(tmp_path, preservation_weight=1.0, prompt_condition="unsafe"),
            train_dataset=tiny_pairs().remove_columns("safe_prompt"),
        )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rpo_alpha", -0.5, "rpo_alpha must be >= 0"),
        ("preservation_weight", -1.0, "preservation_weight must be >= 0"),
        ("preservation_prompts", [], "preservation_prompts is empty"),
    ],
)
def test_config_rejects_bad_added_term_settings(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **{field: value})


def test_a_category_absent_from_the_dataset_is_refused_with_those_present(pairs, tmp_path):
    with pytest.raises(ValueError, match=r"Categories \['sexual'\] have no rows .* it has \['hate', 'violence'\]"):
        SafetyDPOTrainer(args=config(tmp_path, categories=["sexual"]), train_dataset=pairs)


def test_an_undecodable_image_is_refused_with_its_row(tmp_path):
    from diffusers import StableDiffusionPipeline

    rows = tiny_pairs().to_dict()
    features = tiny_pairs().features.copy()
    features["jpg_1"] = datasets.Image(decode=False)
    rows["jpg_1"] = [{"bytes": b"\x89PNG broken", "path": None} if i == 2 else image for i, image in
                     enumerate(rows["jpg_1"])]  # fmt: skip
    broken = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(ValueError, match="Row 2: the image cannot be decoded"):
        SafetyDPOTrainer(
            model=StableDiffusionPipeline(**get_dummy_sd_components()), args=config(tmp_path), train_dataset=broken
        )


def test_a_non_finite_loss_stops_with_a_clear_error_and_the_last_checkpoint_stays_loadable(
    pairs, tmp_path, monkeypatch
):
    import safety_dpo.trainer.trainer as trainer_module
    from safety_dpo.trainer.adapter_io import load_lora_into_unet

    calls = {"count": 0}
    original = trainer_module.per_sample_mse

    def poisoned(prediction, target):
        calls["count"] += 1
        errors = original(prediction, target)
        return errors * float("nan") if calls["count"] > 2 * 3 else errors  # two calls per step: steps 1-3 are fine

    monkeypatch.setattr(trainer_module, "per_sample_mse", poisoned)
    args = config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = SafetyDPOTrainer(args=args, train_dataset=pairs)
    with pytest.raises(FloatingPointError, match="The DPO loss is nan at step 3.*last checkpoint"):
        trainer.train()
    load_lora_into_unet(trainer.components.unet, tmp_path / "expert" / "checkpoint-2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "kto"}, "loss_type='kto' is not supported; use one of sigmoid, hinge, ipo"),
        ({"prompt_condition": "neutral"}, "prompt_condition='neutral' is not supported"),
        ({"beta": 0}, "beta must be > 0"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"empty_prompt_probability": 1.0}, r"empty_prompt_probability must be in \[0, 1\)"),
        ({"resolution": 30}, "resolution must be a multiple of 8"),
        ({"categories": []}, "categories is empty"),
    ],
)
def test_bad_settings_are_refused_with_what_is_accepted(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_evaluate_reports_the_loss_and_rewards_on_the_eval_pairs(pairs, tmp_path):
    trainer = SafetyDPOTrainer(args=config(tmp_path), train_dataset=pairs, eval_dataset=pairs.select(range(4)))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # before training: policy == reference
    assert metrics["eval_rewards/accuracies"] == 0.5
    assert {"eval_rewards/margins", "eval_mse/policy_chosen", "eval_mse/reference_rejected"} <= set(metrics)


def test_a_pipeline_folder_is_loaded_by_path(tmp_path):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(tmp_path / "tiny-sd")
    trainer = SafetyDPOTrainer(model=str(tmp_path / "tiny-sd"), args=config(tmp_path), train_dataset=tiny_pairs())
    assert trainer.components.base_model == str(tmp_path / "tiny-sd")
    assert trainer.adapter_metadata()["base_model"] == str(tmp_path / "tiny-sd")


def test_a_model_that_is_not_stable_diffusion_is_refused(pairs, tmp_path):
    with pytest.raises(ValueError, match="must be a Stable Diffusion 1.x/2.x or SDXL pipeline"):
        SafetyDPOTrainer(model=object(), args=config(tmp_path), train_dataset=pairs)
