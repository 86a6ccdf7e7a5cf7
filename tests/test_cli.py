"""The `safety-dpo` command line."""

import subprocess
import sys

import pytest

from safety_dpo import __version__
from safety_dpo.align import MICROWORLD_TRAINING
from safety_dpo.cli import build_parser, main


def test_help_lists_only_the_subcommands_that_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "env" in capsys.readouterr().out
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == {
        "env",
        "build-data",
        "export-pickapic",
        "train",
        "merge",
        "baseline",
        "generate",
        "evaluate",
        "attack",
        "convert-q16",
        "align",
    }


def test_evaluate_offers_every_fid_feature_extractor():
    from safety_dpo.evaluation.quality import FID_FEATURES

    evaluate = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    (fid,) = [action for action in evaluate._actions if action.dest == "fid_features"]
    assert tuple(fid.choices) == (*FID_FEATURES, "none")


def test_merge_offers_exactly_the_librarys_choices():
    from safety_dpo.merging import config

    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    choices = {action.dest: tuple(action.choices) for action in merge._actions if action.choices}
    assert choices == {
        "method": (*config.METHODS, *config.RENAMED_METHODS),
        "granularity": config.GRANULARITIES,
        "inputs": config.INPUTS,
        "storage": config.STORAGES,
    }


def test_help_answers_without_importing_torch():
    script = """
import sys
from safety_dpo.cli import main
for arguments in (["--help"], ["merge", "--help"], ["evaluate", "--help"], ["generate", "--help"]):
    try:
        main(arguments)
    except SystemExit:
        pass
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_env_prints_the_versions_of_the_stack(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for package in ("torch", "diffusers", "transformers", "peft", "trl", "datasets", "huggingface_hub"):
        assert f"- {package}: " in out
    assert f"- safety_dpo: {__version__}" in out


def test_no_subcommand_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    assert "usage: safety-dpo" in capsys.readouterr().out


def test_an_unknown_subcommand_fails_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_console_script_module_runs():
    result = subprocess.run([sys.executable, "-m", "safety_dpo.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_build_data_builds_the_microworld_dataset_into_the_output_dir(tmp_path, capsys):
    import datasets

    arguments = ["--concepts", "knife,gun", "--pairs-per-concept", "2", "--num-inference-steps", "2"]
    assert main(["build-data", *arguments, "--output-dir", str(tmp_path / "out")]) == 0
    assert "load it with datasets.load_from_disk" in capsys.readouterr().out
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(set(dataset["train"]["concept"]) | set(dataset["test"]["concept"])) == ["gun", "knife"]


def test_build_data_reports_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["build-data", "--categories", "violense", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "error: Unknown category 'violense'; known categories: hate, harassment" in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_train_all_categories_writes_one_expert_per_category_and_skips_finished_ones(tmp_path, capsys):
    import json

    from safety_dpo.data import CoProV2Builder

    CoProV2Builder(concepts=["knife", "nazi"], pairs_per_concept=2, num_inference_steps=2).build(
        tmp_path / "data", progress=False
    )
    command = ["train", "--dataset", str(tmp_path / "data"), "--all-categories", "--output-dir", str(tmp_path / "x"),
               "--max-steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--beta", "1000"]  # fmt: skip
    assert main(command) == 0
    for category in ("hate", "violence"):
        metadata = json.loads((tmp_path / "x" / category / "safety_dpo.json").read_text())
        assert metadata["categories"] == [category] and metadata["training"]["beta"] == 1000.0  # the flag wins
        assert metadata["dataset"] == str(tmp_path / "data")
        # no --model: the microworld's settings of `safety-dpo align` under the flags, not the paper's defaults
        assert metadata["lora"]["target_modules"] == MICROWORLD_TRAINING["target_modules"]
        assert metadata["training"]["rpo_alpha"] == MICROWORLD_TRAINING["rpo_alpha"]
        assert metadata["training"]["steps"] == 2
    written = (tmp_path / "x" / "hate" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert main(command) == 0  # both finished: nothing is retrained
    assert (tmp_path / "x" / "hate" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == written
    output = capsys.readouterr().out
    assert (
        output.count("Safety expert written to") == 2
        and output.count("nothing was trained") == 2
        and "No --model: the microworld" in output
    )


def test_export_pickapic_writes_parquet_that_load_dataset_reads_with_the_safe_image_first(tmp_path, capsys):
    import io

    import datasets
    from PIL import Image

    from safety_dpo.data import CoProV2Builder

    build = CoProV2Builder(concepts=["knife"], pairs_per_concept=2, num_inference_steps=2).build(
        tmp_path / "data", progress=False
    )
    assert main(["export-pickapic", str(tmp_path / "data"), "--output-dir", str(tmp_path / "pap")]) == 0
    exported = datasets.load_dataset(str(tmp_path / "pap"), split="train")
    assert exported.features["jpg_0"] == datasets.Value("binary") and set(exported["label_0"]) == {1.0}
    first = build["train"][0]
    assert exported[0]["caption"] == first["unsafe_prompt"]
    safe = Image.open(io.BytesIO(exported[0]["jpg_0"])).convert("RGB")
    assert list(safe.getdata()) == list(first["jpg_0"].convert("RGB").getdata())  # the safe image, unchanged
    assert main(["export-pickapic", str(tmp_path / "data"), "--output-dir", str(tmp_path / "pap")]) == 2  # kept
    assert "choose a new --output-dir" in capsys.readouterr().err


def test_train_refuses_an_unknown_config_flag_rather_than_taking_it_for_an_abbreviation(tmp_path, capsys):
    command = ["train", "--dataset", str(tmp_path), "--category", "hate", "--output-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--learning_rat", "1e-3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning_rat 1e-3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["train", "align"])
def test_help_lists_every_config_flag_in_the_dashed_style(command, capsys):
    import dataclasses

    from safety_dpo.trainer.config import SafetyDPOConfig

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    own = {"output_dir", "categories", "seed", "push_to_hub"}  # the subcommand's own flags of the same name
    for field in dataclasses.fields(SafetyDPOConfig):
        if field.init and field.name not in own:
            assert f"--{field.name.replace('_', '-')}" in out, field.name
    assert "--learning_rate" not in out and "--output_dir" not in out  # one style shown: dashes


def test_every_flag_is_accepted_with_dashes_or_underscores():
    for spelling in (
        ["--output-dir", "d", "--learning-rate", "1e-4"],
        ["--output_dir", "d", "--learning_rate", "1e-4"],
    ):
        args = build_parser("train").parse_args(["train", "--dataset", "x", *spelling, "--all_categories"])
        assert (args.output_dir, args.learning_rate, args.all_categories) == ("d", 1e-4, True)
    args = build_parser().parse_args(["evaluate", "--safety_adapter", "a", "--images_per_prompt", "2"])
    assert (args.safety_adapter, args.images_per_prompt) == ("a", 2)


def test_train_passes_only_the_config_flags_given(tmp_path, monkeypatch):
    from safety_dpo.trainer import experts

    seen = {}

    def fake_train_experts(**kwargs):
        seen.update(kwargs)
        return experts.ExpertDirectories([])

    monkeypatch.setattr(experts, "train_experts", fake_train_experts)
    command = ["train", "--dataset", "d", "--output-dir", str(tmp_path), "--model", "m", "--beta", "1000", "--bf16"]
    assert main([*command, "--max_steps", "3"]) == 0
    assert seen["max_steps"] == 3 and seen["model"] == "m"
    settings = {key: value for key, value in seen.items() if key not in ("dataset", "output_dir", "model")}
    assert settings == {"category": None, "categories": None, "all_categories": False, "max_steps": 3,
                        "beta": 1000.0, "bf16": True}  # fmt: skip


def _cli(arguments: list[str], hub) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hub.home), "HF_HUB_OFFLINE": "0"}
    return subprocess.run(
        [sys.executable, "-m", "safety_dpo.cli", *arguments], capture_output=True, text=True, env=env
    )


def test_other_libraries_log_quietly_unless_verbose(tmp_path, hub):
    command = ["merge", "org/missing-expert", "--method", "linear", "--output-dir", str(tmp_path / "out")]
    quiet = _cli(command, hub)
    assert quiet.returncode == 2 and "org/missing-expert" in quiet.stderr
    assert "HTTP Request" not in quiet.stderr  # the Hub client's requests are not printed by default
    verbose = _cli(["-v", *command], hub)
    assert verbose.returncode == 2 and "HTTP Request" in verbose.stderr


def test_other_commands_refuse_unknown_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["env", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_generate_writes_one_image_per_prompt_and_seed_and_keeps_those_already_written(tmp_path):
    import json

    out = tmp_path / "images"
    command = ["generate", "a knife", "a cat", "--output-dir", str(out), "--images-per-prompt", "2"]
    assert main([*command, "--seed", "5", "--num-inference-steps", "2"]) == 0
    names = sorted(path.name for path in out.glob("*.png"))
    assert names == ["000-seed5.png", "000-seed6.png", "001-seed5.png", "001-seed6.png"]
    record = json.loads((out / "images.json").read_text())
    assert record["images"][2] == {"file": "001-seed5.png", "prompt": "a cat", "seed": 5}
    before = (out / "000-seed5.png").stat().st_mtime_ns
    assert main([*command, "--seed", "5", "--num-inference-steps", "2"]) == 0
    assert (out / "000-seed5.png").stat().st_mtime_ns == before


def test_generate_refuses_a_pickled_adapter_in_one_line(tmp_path, capsys):
    adapter = tmp_path / "adapter.bin"
    adapter.write_bytes(b"never read")
    command = ["generate", "a knife", "--output-dir", str(tmp_path / "out"), "--safety-adapter", str(adapter)]
    assert main(command) == 2
    assert "pickle" in capsys.readouterr().err
