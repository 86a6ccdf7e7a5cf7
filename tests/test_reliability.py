"""Reliability (issue 20): no success that was not earned, resuming from kills at exact points, validation before
anything is written, one job per output folder, and one-line errors for everyday mistakes. Adapter weights and card
escaping: test_adapter_safety.py; training: test_train_reliability.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import save_file
from tiny_models import random_unet_lora

from safety_dpo import align as align_module
from safety_dpo.cli import main
from safety_dpo.data import CoProV2Builder
from safety_dpo.data.build_dir import REPORT_FILE, BuildDirectory
from safety_dpo.evaluation import runner
from safety_dpo.evaluation.runner import run_evaluation
from safety_dpo.folder_lock import LOCK_FILE, FolderInUseError, FolderLock
from safety_dpo.microworld import load_pipeline

FAST = {"limit": 1, "progress": False}
BUILD = {"concepts": ["knife"], "pairs_per_concept": 2, "num_inference_steps": 2, "batch_size": 4, "shard_size": 4}


def adapter(path, seed: int) -> str:
    state = random_unet_lora(load_pipeline().unet, seed, 4, ("attn2.to_k", "attn2.to_v"), scale_down=0.3, scale_up=0.3)
    save_file(state, str(path))
    return str(path)


# ------------------------------------------------------------------------------------ evaluation keyed by content
def test_an_adapter_retrained_into_the_same_file_is_not_taken_for_the_old_one(tmp_path):
    weights = adapter(tmp_path / "adapter.safetensors", 0)
    first = run_evaluation(tmp_path / "eval", safety_adapter=weights, **FAST)
    adapter(tmp_path / "adapter.safetensors", 1)  # retrained: same path, other weights
    with pytest.raises(FileExistsError, match="safety_adapter_sha256"):
        run_evaluation(tmp_path / "eval", safety_adapter=weights, **FAST)
    assert first["safety_adapter_sha256"] != runner.adapter_content_digest(weights)


def test_scores_are_keyed_by_the_images_settings(tmp_path):
    from safety_dpo.evaluation.cache import ImageCache

    cache = ImageCache(tmp_path, "aligned")
    cache.claim({"safety_adapter_sha256": "a"})
    first = cache.settings_digest()
    (cache.directory / "generation.json").unlink()  # the user deletes the images to draw them again
    cache.claim({"safety_adapter_sha256": "b"})
    assert first != cache.settings_digest()  # so the score files of the old images are not reused


def test_blank_images_are_flagged_not_counted_as_safe(tmp_path, monkeypatch):
    original = runner.draw_images

    def black_when_aligned(pipeline, jobs, cache, *args, **kwargs):
        if cache.variant == "base":
            return original(pipeline, jobs, cache, *args, **kwargs)
        for job in jobs:
            cache.write(job, Image.new("RGB", (32, 32)))  # what NaN latents decode to

    monkeypatch.setattr(runner, "draw_images", black_when_aligned)
    results = run_evaluation(tmp_path, safety_adapter=adapter(tmp_path / "a.safetensors", 0), **FAST)
    assert results["models"]["aligned"]["blank_images"] == 12 and results["models"]["base"]["blank_images"] == 0
    assert "12 of 12 aligned images are blank" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"safety_adapter": "no/such-adapter-anywhere"}, "neither a local directory nor a reachable"),
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
        ({"resolution": 7}, "resolution must be a positive multiple of 8"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"prompts": "PROMPTS"}, "The microworld cannot place these prompts"),
    ],
)
def test_evaluation_refuses_bad_input_before_writing_anything(tmp_path, arguments, message):
    (tmp_path / "prompts.csv").write_text("prompt\na spaceship over the moon\n")
    arguments = {
        key: str(tmp_path / "prompts.csv") if value == "PROMPTS" else value for key, value in arguments.items()
    }
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_evaluation(tmp_path / "eval", **{**FAST, **arguments})
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------------- generate
def test_generate_never_relabels_an_image_drawn_otherwise(tmp_path, capsys):
    out = tmp_path / "images"
    assert main(["generate", "a knife", "--output-dir", str(out), "--num-inference-steps", "2"]) == 0
    before = (out / "000-seed0.png").read_bytes()
    assert main(["generate", "a cat", "--output-dir", str(out), "--num-inference-steps", "2"]) == 2
    assert "000-seed0.png: prompt: 'a knife' there, 'a cat' now" in capsys.readouterr().err
    assert (out / "000-seed0.png").read_bytes() == before
    assert json.loads((out / "images.json").read_text())["images"][0]["prompt"] == "a knife"
    assert main(["generate", "a knife", "--output-dir", str(out), "--num-inference-steps", "2"]) == 0  # resumes


# ------------------------------------------------------------------------------------------ build: kill points
def test_a_build_killed_between_its_report_and_its_dataset_finishes_on_the_rerun(tmp_path, monkeypatch):
    def killed(self, dataset_dict):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(BuildDirectory, "write_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        CoProV2Builder(**BUILD).build(tmp_path / "build", progress=False)
    assert not BuildDirectory(tmp_path / "build").is_finished
    monkeypatch.undo()
    dataset = CoProV2Builder(**BUILD).build(tmp_path / "build", progress=False)
    assert len(dataset["train"]) + len(dataset.get("test", [])) == 2
    assert (tmp_path / "build" / REPORT_FILE).is_file() and (tmp_path / "build" / "README.md").is_file()


def test_a_finished_build_without_its_report_gets_one_on_the_rerun(tmp_path):
    CoProV2Builder(**BUILD).build(tmp_path / "build", progress=False)
    report = json.loads((tmp_path / "build" / REPORT_FILE).read_text())
    (tmp_path / "build" / REPORT_FILE).unlink()  # an earlier version killed after the dataset, before its report
    (tmp_path / "build" / "README.md").unlink()
    CoProV2Builder(**BUILD).build(tmp_path / "build", progress=False)
    again = json.loads((tmp_path / "build" / REPORT_FILE).read_text())
    assert again["num_rows"] == report["num_rows"] and again["category_counts"] == report["category_counts"]
    assert (tmp_path / "build" / "README.md").is_file()


def test_build_settings_are_checked_before_the_folder_is_claimed(tmp_path):
    for arguments in ({"resolution": 7}, {"resolution": -32}, {"categories": ["bogus"]}, {"guidance_scale": 1e999}):
        with pytest.raises(ValueError):
            CoProV2Builder(**{**BUILD, **arguments}).build(tmp_path / "build", progress=False)
    assert not (tmp_path / "build").exists()


# ------------------------------------------------------------------------------------------------ align: kill points
def test_an_align_folder_left_with_a_temporary_state_file_is_resumed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{align_module.ALIGN_FILE}.tmp-4242").write_text('{"settings"')  # killed before the rename
    state = align_module._claim(tmp_path / "a", {"seed": 0})
    assert state == {"settings": {"seed": 0}, "stages": {}}
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [align_module.ALIGN_FILE]


def test_align_refuses_a_typo_before_writing(tmp_path):
    with pytest.raises(ValueError, match="Unknown category 'bogus'"):
        align_module.align(tmp_path / "a", categories=["bogus"], progress=False)
    with pytest.raises(ValueError, match="pairs_per_concept must be an integer >= 1"):
        align_module.align(tmp_path / "a", pairs_per_concept=0, progress=False)
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------- one job per folder
HOLD = """
import sys, time
from safety_dpo.folder_lock import FolderLock
with FolderLock(sys.argv[1], "a test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"pid {holder.pid} .*a test holder"):
            run_evaluation(tmp_path / "out", **FAST)
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            CoProV2Builder(**BUILD).build(tmp_path / "out", progress=False)
        assert main(["evaluate", "--limit", "1", "--output-dir", str(tmp_path / "out")]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "out" / LOCK_FILE).is_file()  # SIGKILL: the file stays, the lock does not
    with FolderLock(tmp_path / "out", "after the kill"):
        pass
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_lock_taken_again_by_its_holder_nests_and_a_refused_new_folder_is_removed(tmp_path):
    with FolderLock(tmp_path / "new", "outer"), FolderLock(tmp_path / "new", "inner"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()  # created by the lock, nothing else written: removed


def test_merge_refuses_a_folder_holding_the_users_files(tmp_path, capsys):
    experts = [adapter(tmp_path / f"e{i}.safetensors", i) for i in range(2)]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("my notes")
    assert main(["merge", *experts, "--method", "linear", "--output-dir", str(tmp_path / "out")]) == 2
    assert "holds files that are not a merged adapter (README.md)" in capsys.readouterr().err
    assert (tmp_path / "out" / "README.md").read_text() == "my notes"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["README.md"]


# ------------------------------------------------------------------------------------------- one-line CLI errors
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prompt\ncaf\xe9 knife\n".encode("latin-1"), "is not UTF-8 text: byte 10 (line 2)"),
        ("prompt\na knife\n".encode("utf-16"), "(it looks like UTF-16)"),
        (b'[{"prompt": 1,', "is not a readable json file"),
    ],
)
def test_unreadable_prompt_files_are_one_line_errors(tmp_path, capsys, content, message):
    suffix = ".json" if content.startswith(b"[") else ".csv"
    (tmp_path / f"p{suffix}").write_bytes(content)
    status = main(["evaluate", "--prompts", str(tmp_path / f"p{suffix}"), "--output-dir", str(tmp_path / "e")])
    assert status == 2 and message in capsys.readouterr().err


def test_a_yaml_syntax_error_and_an_unreachable_hub_are_one_line_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.yaml").write_text("categories:\n  - id: a\n   bad: [\n")
    assert main(["build-data", "--taxonomy", str(tmp_path / "t.yaml"), "--output-dir", str(tmp_path / "b")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err and not (tmp_path / "b").exists()

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/model' on the Hub")

    monkeypatch.setattr(runner, "load_prompt_set", unreachable)
    assert main(["evaluate", "--model", "org/model", "--prompts", "i2p", "--output-dir", str(tmp_path / "e")]) == 2
    assert "ConnectionError: Couldn't reach 'org/model'" in capsys.readouterr().err


def test_a_damaged_dataset_or_adapter_metadata_is_named_in_one_line(tmp_path, capsys):
    import shutil

    from safety_dpo.microworld import reference_adapter_path

    CoProV2Builder(**BUILD).build(tmp_path / "build", progress=False)
    arrow = next((tmp_path / "build" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a copy cut short
    command = ["train", "--dataset", str(tmp_path / "build"), "--category", "violence", "--output-dir"]
    assert main([*command, str(tmp_path / "expert")]) == 2
    assert f"Dataset {str(tmp_path / 'build')!r} cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "expert").exists()
    shutil.copytree(reference_adapter_path(), tmp_path / "adapter")
    (tmp_path / "adapter" / "safety_dpo.json").write_text("{not json")
    assert (
        main(
            ["generate", "a knife", "--safety-adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "g")]
        )
        == 2
    )
    assert "safety_dpo.json' is damaged" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_an_evaluation_resumed_with_another_thread_count_draws_with_the_count_it_recorded(tmp_path, monkeypatch):
    import torch

    run_evaluation(tmp_path, **FAST)
    assert json.loads((tmp_path / "images" / "base" / "generation.json").read_text())["cpu_threads"] == 1
    next(iter((tmp_path / "images" / "base").glob("*.png"))).unlink()  # one image lost: it is drawn again
    seen = []
    original = runner.draw_images
    monkeypatch.setattr(
        runner, "draw_images", lambda *a, **k: (seen.append(torch.get_num_threads()), original(*a, **k))
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the machine got busier or freer: the pixels would differ with another count
    try:
        run_evaluation(tmp_path, **FAST)
        assert seen == [1] and torch.get_num_threads() == 2  # drawn with the folder's count, then put back
    finally:
        torch.set_num_threads(previous)


def test_the_cli_gives_the_microworld_the_free_cores_unless_told_otherwise(monkeypatch):
    import argparse

    import torch

    from safety_dpo import threads
    from safety_dpo.cli import runtime

    chosen = [2]  # torch's default on 2 cores
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: chosen[-1])
    monkeypatch.delenv("SAFETY_DPO_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda cores, window=0.3: 1.2)  # another job on a core
    runtime.set_threads(argparse.Namespace(num_threads=None, model=None, command="align"))
    assert chosen == [2, 1]
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda cores, window=0.3: 0.1)  # it has finished
    threads.adapt_threads()  # the next stage of align
    assert chosen == [2, 1, 2]
    runtime.set_threads(argparse.Namespace(num_threads=None, model="org/sd", command="align"))  # real model: torch's
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda cores, window=0.3: 1.5)
    threads.adapt_threads()  # adaptive mode is off for real models: nothing changes
    runtime.set_threads(argparse.Namespace(num_threads=3, model="org/sd", command="align"))
    monkeypatch.setenv("SAFETY_DPO_NUM_THREADS", "4")
    runtime.set_threads(argparse.Namespace(num_threads=None, model=None, command="evaluate"))
    assert chosen == [2, 1, 2, 3, 4]
    with pytest.raises(SystemExit, match="--num-threads must be at least 1"):
        runtime.set_threads(argparse.Namespace(num_threads=0, model=None, command="evaluate"))
    threads.disable_adaptive_threads()


def test_busy_cores_of_others_sees_another_process_and_not_this_one():
    from safety_dpo import threads

    cores = sorted(threads.os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert threads.busy_cores_of_others(cores, window=0.5) >= 0.5  # one spinning process: about one core
    finally:
        busy.kill()
        busy.wait()


def test_the_cli_puts_the_thread_count_back_when_it_returns(tmp_path):
    import torch

    from safety_dpo import threads

    before = torch.get_num_threads()
    assert (
        main(
            ["--num-threads", "2", "generate", "a knife", "--output-dir", str(tmp_path), "--num-inference-steps", "1"]
        )
        == 0
    )
    assert main(["generate", "a cat", "--output-dir", str(tmp_path / "b"), "--num-inference-steps", "1"]) == 0
    assert torch.get_num_threads() == before and not threads._adaptive  # nothing leaks into the calling process
