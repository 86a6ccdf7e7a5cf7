"""`train_experts` and `SafetyDPOTrainer` under reruns and kills: a finished expert is reused only with the settings
that made it, a checkpoint resumes only with its own settings, bad numbers are refused before anything is written,
and a kill at any write leaves a folder that the rerun finishes.

Kills are exceptions raised at an exact point (monkeypatched), never timing. The tiny Stable Diffusion pipeline of
`tests/tiny_models.py` trains two steps in a few seconds.
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from tiny_models import get_dummy_sd_components, tiny_pairs
from transformers import TrainerState

from safety_dpo.cli import main
from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer, adapter_io
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME, TRAINING_SETTINGS_NAME
from safety_dpo.trainer.experts import train_experts

SETTINGS = {
    "category": "violence",
    "max_steps": 2,
    "save_steps": 1,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-3,
    "seed": 0,
    "report_to": "none",
    "use_cpu": True,
    "disable_tqdm": True,
}


class Killed(BaseException):
    """What a SIGKILL does to the process, as far as the files are concerned: it stops where it is."""


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**get_dummy_sd_components())


def train(tmp_path, dataset=None, **overrides):
    """`train_experts` of the tiny pipeline into `tmp_path/expert`, with `SETTINGS` under `overrides`."""
    dataset = tiny_pairs() if dataset is None else dataset
    return train_experts(dataset, tmp_path / "expert", model=tiny_pipeline(), **{**SETTINGS, **overrides})


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Stop the run right after checkpoint-`step` is completely written."""
    original = SafetyDPOTrainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step == step:
            raise Killed

    monkeypatch.setattr(SafetyDPOTrainer, "_save_checkpoint", save_then_die)


def kill_while_writing_trainer_state(monkeypatch, step: int) -> None:
    """Stop the run as it writes checkpoint-`step`/trainer_state.json, the checkpoint's last file."""
    original = TrainerState.save_to_json

    def die_in_checkpoint(self, json_path):
        if f"checkpoint-{step}" in str(json_path):
            raise Killed
        return original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", die_in_checkpoint)


def forbid_training(monkeypatch) -> None:
    """Make any work (building a trainer: loading, precomputing, training) fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a trainer was built: work was done")

    monkeypatch.setattr(SafetyDPOTrainer, "__init__", fail)


def metadata(tmp_path) -> dict:
    return json.loads((tmp_path / "expert" / METADATA_NAME).read_text())


# -------------------------------------------------------------------------------------- 1. finished experts
def test_a_finished_expert_is_reused_with_the_same_settings_and_says_nothing_was_trained(
    tmp_path, monkeypatch, caplog
):
    expert = tmp_path / "expert"
    first = train(tmp_path)
    assert first == [expert] and first.reused == [] and first.trained == [expert]
    assert json.loads((expert / TRAINING_SETTINGS_NAME).read_text())["learning_rate"] == 1e-3
    written = (expert / LORA_WEIGHT_NAME).stat().st_mtime_ns
    forbid_training(monkeypatch)
    with caplog.at_level(logging.INFO, logger="safety_dpo"):
        again = train(tmp_path, logging_steps=1, save_steps=5, disable_tqdm=False)  # none of these decides weights
    assert again == [expert] and again.reused == [expert] and again.trained == []
    assert "trained with these settings; nothing was trained" in caplog.text
    assert (expert / LORA_WEIGHT_NAME).stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("overrides", "differing"),
    [
        ({"learning_rate": 2e-3}, "learning_rate: 0.001 there, 0.002 now"),
        ({"dataset": tiny_pairs(num_rows=3)}, "dataset_fingerprint: "),
        ({"max_steps": 3}, "max_steps: 2 there, 3 now"),
        ({"beta": 100.0}, "beta: 2500.0 there, 100.0 now"),
        ({"rank": 2}, "rank: 4 there, 2 now"),
        ({"seed": 1}, "seed: 0 there, 1 now"),
    ],
)
def test_a_finished_expert_refuses_other_settings_and_lists_them(tmp_path, monkeypatch, overrides, differing):
    train(tmp_path)
    written = (tmp_path / "expert" / LORA_WEIGHT_NAME).stat().st_mtime_ns
    forbid_training(monkeypatch)
    with pytest.raises(ValueError, match=f"{differing}.*Nothing was trained.*another --output-dir"):
        train(tmp_path, **overrides)
    assert (tmp_path / "expert" / LORA_WEIGHT_NAME).stat().st_mtime_ns == written


def test_an_expert_that_recorded_no_settings_is_reused_with_a_warning(tmp_path, monkeypatch, caplog):
    expert = tmp_path / "expert"
    train(tmp_path)
    (expert / TRAINING_SETTINGS_NAME).unlink()  # as experts written before the settings were recorded
    forbid_training(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="safety_dpo"):
        assert train(tmp_path).reused == [expert]
    assert "records no training settings" in caplog.text


# ------------------------------------------------------------------------------------------------ 2. resuming
@pytest.mark.parametrize(
    ("overrides", "differing"),
    [
        ({"learning_rate": 2e-3}, "learning_rate: 0.001 there, 0.002 now"),
        ({"dataset": tiny_pairs(num_rows=3)}, "dataset_fingerprint: "),
    ],
)
def test_resuming_a_checkpoint_with_other_settings_is_refused_before_any_work(
    tmp_path, monkeypatch, overrides, differing
):
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, 1)
        with pytest.raises(Killed):
            train(tmp_path)
    with monkeypatch.context() as patch:
        forbid_training(patch)
        with pytest.raises(ValueError, match=f"checkpoint-1' was trained with other settings.*{differing}"):
            train(tmp_path, **overrides)
    resumed = train(tmp_path)  # the settings it was started with
    assert resumed.trained == [tmp_path / "expert"] and metadata(tmp_path)["training"]["steps"] == 2


def test_the_trainer_refuses_to_resume_a_checkpoint_with_other_settings(tmp_path, monkeypatch):
    def args(**overrides):
        settings = {key: value for key, value in SETTINGS.items() if key != "category"}
        return SafetyDPOConfig(output_dir=str(tmp_path / "expert"), **{**settings, **overrides})

    kill_after_checkpoint(monkeypatch, 1)
    with pytest.raises(Killed):
        SafetyDPOTrainer(model=tiny_pipeline(), args=args(), train_dataset=tiny_pairs()).train()
    trainer = SafetyDPOTrainer(model=tiny_pipeline(), args=args(learning_rate=5e-3), train_dataset=tiny_pairs())
    with pytest.raises(ValueError, match="learning_rate: 0.001 there, 0.005 now"):
        trainer.train(resume_from_checkpoint=True)


def test_a_run_stopped_before_its_first_checkpoint_does_not_bind_the_next_run(tmp_path, monkeypatch):
    def die(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(SafetyDPOTrainer, "compute_loss", die)
        with pytest.raises(Killed):
            train(tmp_path)
    train(tmp_path, learning_rate=2e-3)  # nothing was trained: other settings are not a conflict
    assert metadata(tmp_path)["training"]["learning_rate"] == 2e-3


# -------------------------------------------------------------------------------------------- 3. bad numbers
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": 0}, r"max_steps must be a whole number >= 1 .* or -1 to train num_train_epochs epochs"),
        ({"max_steps": -5}, "max_steps must be a whole number >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0 and finite, got 0.0"),
        ({"learning_rate": -1e-3}, "learning_rate must be > 0 and finite"),
        ({"learning_rate": float("nan")}, "learning_rate must be > 0 and finite, got nan"),
        ({"learning_rate": float("inf")}, "learning_rate must be > 0 and finite, got inf"),
        ({"beta": float("inf")}, "beta must be > 0 and finite"),
        ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs must be > 0 and finite"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a whole number >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a whole number >= 1"),
        ({"preservation_weight": float("inf")}, "preservation_weight must be >= 0 and finite"),
    ],
)
def test_invalid_numbers_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tmp_path, **overrides)
    assert not (tmp_path / "expert").exists()


def test_the_train_command_refuses_max_steps_0_in_one_line(tmp_path, capsys):
    datasets.DatasetDict({"train": tiny_pairs()}).save_to_disk(str(tmp_path / "data"))
    command = ["train", "--dataset", str(tmp_path / "data"), "--category", "violence", "--output-dir"]
    assert main([*command, str(tmp_path / "expert"), "--max-steps", "0"]) == 2
    error = capsys.readouterr().err
    assert "max_steps must be a whole number >= 1" in error and "Traceback" not in error


def test_a_corrected_command_is_not_refused_for_what_a_refused_one_tried(tmp_path):
    with pytest.raises(ValueError, match="Categories \\['violense'\\] have no rows"):
        train(tmp_path, category="violense")
    with pytest.raises(ValueError, match="max_steps must be"):
        train(tmp_path, max_steps=0)
    assert train(tmp_path).trained == [tmp_path / "expert"]


# ---------------------------------------------------------------------------------- 4. incomplete checkpoints
def test_a_checkpoint_cut_short_by_a_kill_is_set_aside_and_the_rerun_finishes(tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        kill_while_writing_trainer_state(patch, 2)
        with pytest.raises(Killed):
            train(tmp_path)
    expert = tmp_path / "expert"
    assert not (expert / "checkpoint-2" / "trainer_state.json").exists()
    with caplog.at_level(logging.WARNING, logger="safety_dpo"):
        assert train(tmp_path).trained == [expert]  # resumes from checkpoint-1
    assert "checkpoint-2 is incomplete (it lacks trainer_state.json" in caplog.text
    assert (expert / "_incomplete" / "checkpoint-2").is_dir()
    assert metadata(tmp_path)["training"]["steps"] == 2 and (expert / "README.md").is_file()
    assert not adapter_io.checkpoint_gaps(expert / "checkpoint-2")  # written again, whole


@pytest.mark.parametrize("missing", ["optimizer.pt", LORA_WEIGHT_NAME])
def test_a_checkpoint_missing_a_file_is_not_resumed(tmp_path, monkeypatch, missing):
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, 2)
        with pytest.raises(Killed):
            train(tmp_path)
    expert = tmp_path / "expert"
    (expert / "checkpoint-2" / missing).unlink()
    train(tmp_path)
    assert not (expert / "_incomplete" / "checkpoint-2" / missing).exists()
    assert metadata(tmp_path)["training"]["steps"] == 2


def test_a_run_whose_only_checkpoint_is_incomplete_starts_again(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        kill_while_writing_trainer_state(patch, 1)
        with pytest.raises(Killed):
            train(tmp_path)
    train(tmp_path)
    assert (tmp_path / "expert" / "_incomplete" / "checkpoint-1").is_dir()
    assert metadata(tmp_path)["training"]["steps"] == 2


# ------------------------------------------------------------------------------------------------- 5. the card
def test_a_kill_before_the_card_is_written_leaves_an_unfinished_expert_that_the_rerun_finishes(tmp_path, monkeypatch):
    expert = tmp_path / "expert"
    original = adapter_io.write_card

    def die_at_the_experts_card(output_dir, *args, **kwargs):
        if str(output_dir) == str(expert):
            raise Killed
        return original(output_dir, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(adapter_io, "write_card", die_at_the_experts_card)
        with pytest.raises(Killed):
            train(tmp_path)
    assert not (expert / METADATA_NAME).exists()  # not finished: the weights are there, the card is not
    assert train(tmp_path).trained == [expert]
    assert "SafetyDPO safety" in (expert / "README.md").read_text() and (expert / METADATA_NAME).is_file()


def test_a_finished_expert_without_its_card_gets_it_on_the_rerun(tmp_path, monkeypatch):
    expert = tmp_path / "expert"
    train(tmp_path)
    (expert / "README.md").unlink()  # as a kill left it before the card was written before safety_dpo.json
    forbid_training(monkeypatch)
    assert train(tmp_path).reused == [expert]
    assert "SafetyDPO safety" in (expert / "README.md").read_text()
