"""SafetyDPOTrainer where it meets transformers' and trl's habits: deterministic evaluation, `load_best_model_at_end`,
`peft_config=LoraConfig(...)`, and pushes that hold what docs/hub.md says (weights, `safety_dpo.json`, card) and
never a pickle.

Every test trains the seeded tiny Stable Diffusion pipeline of `tests/tiny_models.py` for a few steps on a CPU.
"""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import get_dummy_sd_components, tiny_pairs
from transformers import TrainerCallback

from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_safety_expert.py"
PUSHED = {".gitattributes", LORA_WEIGHT_NAME, METADATA_NAME, "README.md"}  # .gitattributes: the Hub's first commit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def config(tmp_path: Path, **overrides) -> SafetyDPOConfig:
    settings = {
        "output_dir": str(tmp_path / "expert"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 5e-2,  # large, so that a few steps move the tiny LoRA far from its start
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return SafetyDPOConfig(**settings)


def tiny_trainer(args: SafetyDPOConfig, **kwargs) -> SafetyDPOTrainer:
    from diffusers import StableDiffusionPipeline

    return SafetyDPOTrainer(
        model=StableDiffusionPipeline(**get_dummy_sd_components()), args=args, train_dataset=tiny_pairs(), **kwargs
    )


def lora_weights(trainer: SafetyDPOTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.components.unet.named_parameters() if "lora_" in name}


def saved_lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / LORA_WEIGHT_NAME))


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


# ------------------------------------------------------------------------------------------ deterministic evaluation
@pytest.mark.parametrize("precompute", [True, False])
def test_evaluating_the_same_weights_twice_gives_the_same_eval_loss(tmp_path, precompute):
    trainer = tiny_trainer(config(tmp_path, precompute=precompute), eval_dataset=tiny_pairs())
    trainer.train()  # before training every pair is a tie (loss log 2) whatever the noise: train first
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] != pytest.approx(0.6931, abs=1e-3)
    assert first["eval_loss"] == second["eval_loss"]
    assert first["eval_rewards/margins"] == second["eval_rewards/margins"]


def test_the_eval_loss_does_not_depend_on_the_eval_batch_size(tmp_path):
    trainer = tiny_trainer(config(tmp_path), eval_dataset=tiny_pairs())
    trainer.train()
    losses = []
    for batch_size in (8, 3, 1):  # 8 examples: one batch; 3 + 3 + 2; one at a time
        trainer.args.per_device_eval_batch_size = batch_size
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_the_eval_seed_chooses_the_draws(tmp_path):
    trainer = tiny_trainer(config(tmp_path), eval_dataset=tiny_pairs())
    trainer.train()
    seed_0 = trainer.evaluate()["eval_loss"]
    trainer.args.eval_seed = 1
    assert trainer.evaluate()["eval_loss"] != seed_0


def test_evaluation_leaves_the_global_random_state_as_it_was(tmp_path):
    trainer = tiny_trainer(config(tmp_path), eval_dataset=tiny_pairs())
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))


def test_a_run_with_evaluations_trains_the_same_adapter_as_one_without(tmp_path):
    plain = tiny_trainer(config(tmp_path / "plain"))
    plain.train()
    evaluated = tiny_trainer(config(tmp_path / "eval", eval_strategy="steps", eval_steps=1), eval_dataset=tiny_pairs())
    evaluated.train()
    assert sum("eval_loss" in entry for entry in evaluated.state.log_history) == 3
    assert_same_tensors(lora_weights(plain), lora_weights(evaluated))


# -------------------------------------------------------------------------------------------- load_best_model_at_end
class ScriptedEvalLoss(TrainerCallback):
    """Replace each evaluation's `eval_loss` by a scripted one (step -> loss), so the best step is known."""

    def __init__(self, losses: dict[int, float]) -> None:
        self.losses = losses

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = self.losses[state.global_step]


def test_load_best_model_at_end_ends_with_and_saves_the_best_checkpoints_lora(tmp_path):
    args = config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                  load_best_model_at_end=True)  # fmt: skip
    assert args.metric_for_best_model == "loss"  # transformers' default with load_best_model_at_end: eval_loss
    scripted = ScriptedEvalLoss({1: 0.5, 2: 0.2, 3: 0.4, 4: 0.3})
    trainer = tiny_trainer(args, eval_dataset=tiny_pairs(), callbacks=[scripted])
    trainer.train()
    expert = tmp_path / "expert"
    assert trainer.state.best_model_checkpoint == str(expert / "checkpoint-2")
    best, last = saved_lora(expert / "checkpoint-2"), saved_lora(expert / "checkpoint-4")
    assert any(not torch.equal(best[key], last[key]) for key in last)
    trainer.save_model()  # from the UNet's LoRA as training left it
    assert_same_tensors(best, saved_lora(expert))
    training = json.loads((expert / METADATA_NAME).read_text())["training"]
    assert training["steps"] == 2 and training["steps_trained"] == 4
    assert training["metric_for_best_model"] == "loss" and training["best_metric"] == 0.2


# ------------------------------------------------------------------------------------------------------ peft_config
def test_a_peft_lora_config_sets_the_experts_lora_and_the_saved_adapter_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    args = config(tmp_path, max_steps=1)
    peft_config = LoraConfig(r=2, lora_alpha=8, target_modules=["to_v", "to_k"], lora_dropout=0.1)
    trainer = tiny_trainer(args, peft_config=peft_config)
    assert (args.rank, args.alpha) == (4, 4.0)  # the caller's config is left alone
    adapter = trainer.components.unet.peft_config["default"]
    assert (adapter.r, adapter.lora_alpha, adapter.target_modules) == (2, 8.0, {"to_k", "to_v"})
    trainer.train()
    trainer.save_model()
    lora = json.loads((tmp_path / "expert" / METADATA_NAME).read_text())["lora"]
    assert {k: lora[k] for k in ("rank", "alpha", "target_modules", "dropout")} == {
        "rank": 2, "alpha": 8.0, "target_modules": ["to_k", "to_v"], "dropout": 0.1
    }  # fmt: skip
    pipe = StableDiffusionPipeline(**get_dummy_sd_components())
    pipe.load_lora_weights(str(tmp_path / "expert"))
    loaded = {name: p.shape for name, p in pipe.unet.named_parameters() if "lora_A" in name}
    assert loaded and all(name.split(".lora_A")[0].endswith(("to_k", "to_v")) for name in loaded)
    assert all(shape[0] == 2 for shape in loaded.values())


@pytest.mark.parametrize(
    ("make_peft_config", "error", "message"),
    [
        (lambda peft: "r=4", TypeError, "peft_config must be a peft.LoraConfig, got str"),
        (lambda peft: peft.LoHaConfig(target_modules=["to_k"]), TypeError, "got LoHaConfig"),
        (lambda peft: peft.LoraConfig(task_type="CAUSAL_LM"), ValueError, "peft_config.task_type='CAUSAL_LM'"),
        (lambda peft: peft.LoraConfig(use_dora=True), ValueError, "peft_config.use_dora=True is not supported"),
        (lambda peft: peft.LoraConfig(init_lora_weights="pissa"), ValueError, "peft_config.init_lora_weights"),
        (lambda peft: peft.LoraConfig(target_modules="to_.*"), ValueError, "peft_config.target_modules='to_.*'"),
    ],
)
def test_peft_config_takes_a_plain_lora_config_and_names_what_it_refuses(tmp_path, make_peft_config, error, message):
    import peft

    with pytest.raises(error, match=message):
        SafetyDPOTrainer(args=config(tmp_path), train_dataset=tiny_pairs(), peft_config=make_peft_config(peft))


# ------------------------------------------------------------------------------------------------------------ pushes
def repo_files(repo_id: str) -> set[str]:
    from huggingface_hub import HfApi

    return set(HfApi().list_repo_files(repo_id))


def test_a_push_holds_the_weights_the_description_and_the_card_and_never_a_pickle(tmp_path, hub):
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, report_to="tensorboard",
                  push_to_hub=True, hub_model_id="tester/expert")  # fmt: skip
    trainer = tiny_trainer(args)
    trainer.train()  # pushes checkpoints 1 and 2 as they are saved (hub_strategy="every_save")
    trainer.save_state()
    trainer.save_model()  # the final push
    expert = tmp_path / "expert"
    assert any((expert / "runs").rglob("events.out.tfevents*")) and (expert / "trainer_state.json").is_file()
    assert repo_files("tester/expert") == PUSHED
    commits = hub.server.store.get("model", "tester/expert").commits
    assert len(commits) >= 3  # the Hub's first commit, the checkpoints' and the final one
    assert not [path for commit in commits for path in commit.files if path.endswith(PICKLE_SUFFIXES)]
    assert not [path for path in expert.rglob("training_args.bin")]
    resumed = tiny_trainer(config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1))
    resumed.train(resume_from_checkpoint=str(expert / "checkpoint-1"))  # needs no pickled TrainingArguments
    assert resumed.state.global_step == 2


def test_safety_dpo_train_push_to_hub_pushes_the_expert_files_only(tmp_path, hub):
    from diffusers import StableDiffusionPipeline

    from safety_dpo.trainer.experts import train_experts

    train_experts(
        tiny_pairs(), tmp_path / "expert", model=StableDiffusionPipeline(**get_dummy_sd_components()),
        category="violence", max_steps=2, save_steps=1, per_device_train_batch_size=2, report_to="tensorboard",
        use_cpu=True, disable_tqdm=True, push_to_hub=True, hub_model_id="tester/expert",
    )  # fmt: skip
    assert repo_files("tester/expert") == PUSHED
    assert (tmp_path / "expert" / "trainer_state.json").is_file()  # written, and kept local


def test_a_finished_expert_that_is_reused_is_still_pushed_when_asked(tmp_path, hub):
    from diffusers import StableDiffusionPipeline

    from safety_dpo.trainer.experts import train_experts

    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(tmp_path / "model")
    settings = {"model": str(tmp_path / "model"), "category": "violence", "max_steps": 1, "report_to": "none",
                "per_device_train_batch_size": 2, "use_cpu": True, "disable_tqdm": True}  # fmt: skip
    train_experts(tiny_pairs(), tmp_path / "expert", **settings)
    again = train_experts(
        tiny_pairs(), tmp_path / "expert", push_to_hub=True, hub_model_id="tester/expert", **settings
    )
    assert again.reused == [tmp_path / "expert"]  # nothing trained (push settings are not training settings)
    assert repo_files("tester/expert") == PUSHED
    assert 'load_safety_adapter("tester/expert")' in (tmp_path / "expert" / "README.md").read_text()


def test_all_categories_pushes_each_expert_to_a_repo_of_its_own(tmp_path, hub):
    import datasets
    from diffusers import StableDiffusionPipeline

    from safety_dpo.trainer.experts import train_experts

    pairs = datasets.concatenate_datasets([tiny_pairs(category="violence"), tiny_pairs(category="hate")])
    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(tmp_path / "model")  # each expert loads it
    train_experts(
        pairs, tmp_path / "experts", model=str(tmp_path / "model"),
        all_categories=True, max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True,
        disable_tqdm=True, push_to_hub=True, hub_model_id="tester/experts",
    )  # fmt: skip
    from huggingface_hub import hf_hub_download

    for category in ("hate", "violence"):
        assert repo_files(f"tester/experts-{category}") == PUSHED
        metadata = Path(hf_hub_download(f"tester/experts-{category}", METADATA_NAME))
        assert json.loads(metadata.read_text())["categories"] == [category]


def test_the_tensorboard_runs_are_pushed_only_when_asked(tmp_path, hub):
    args = config(tmp_path, max_steps=1, report_to="tensorboard", logging_steps=1, push_to_hub=True,
                  hub_model_id="tester/expert", push_logs=True)  # fmt: skip
    trainer = tiny_trainer(args)
    trainer.train()
    trainer.push_to_hub()
    files = repo_files("tester/expert")
    logs = {name for name in files if name.startswith("runs/")}
    assert logs and all("events.out.tfevents" in name for name in logs)
    assert files - logs == PUSHED


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategies_that_push_checkpoints_are_refused(tmp_path, strategy):
    with pytest.raises(ValueError, match=f"hub_strategy='{strategy}' is not supported; use one of every_save, end"):
        config(tmp_path, hub_strategy=strategy)


def test_the_example_script_pushes_the_expert_once(tmp_path, hub, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import HfApi

    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(tmp_path / "tiny-sd")
    tiny_pairs().save_to_disk(str(tmp_path / "pairs"))
    commits = []
    create_commit = HfApi.create_commit
    monkeypatch.setattr(
        HfApi, "create_commit", lambda self, *a, **k: commits.append(1) or create_commit(self, *a, **k)
    )
    argv = ["train_safety_expert.py", "--dataset", str(tmp_path / "pairs"), "--model", str(tmp_path / "tiny-sd"),
            "--output_dir", str(tmp_path / "expert"), "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "True",
            "--push_to_hub", "--hub_model_id", "tester/expert"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert len(commits) == 1
    assert repo_files("tester/expert") == PUSHED
    assert (tmp_path / "expert" / METADATA_NAME).is_file()


# ------------------------------------------------------------------------------------------------------------- card
def test_an_experts_card_loads_it_from_its_folder_with_no_placeholder(tmp_path):
    trainer = tiny_trainer(config(tmp_path, max_steps=1))
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "expert" / "README.md").read_text()
    assert f"pipe.load_safety_adapter({json.dumps(str(tmp_path / 'expert'))})" in card
    assert "<base-model-id>" not in card and "<this-repo-id>" not in card


# ------------------------------------------------------------------------------------------------------ config flags
def test_train_experts_takes_config_flags_under_its_keywords_and_refuses_unknown_ones(tmp_path):
    from diffusers import StableDiffusionPipeline

    from safety_dpo.trainer.experts import train_experts

    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(tmp_path / "model")
    settings = {"model": str(tmp_path / "model"), "category": "violence", "max_steps": 1, "report_to": "none",
                "per_device_train_batch_size": 2, "use_cpu": True, "disable_tqdm": True}  # fmt: skip
    with pytest.raises(ValueError, match=r"Unknown training flags \['--bta', '9'\]"):
        train_experts(tiny_pairs(), tmp_path / "bad", config_flags=["--bta", "9"], **settings)
    assert not (tmp_path / "bad").exists()
    (expert,) = train_experts(
        tiny_pairs(), tmp_path / "expert", config_flags=["--beta", "1000", "--rank", "2"], rank=4, **settings
    )
    training = json.loads((expert / METADATA_NAME).read_text())
    assert training["training"]["beta"] == 1000.0  # the flag
    assert training["lora"]["rank"] == 4  # a keyword wins over a flag
