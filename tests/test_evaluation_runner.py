"""The benchmark runner (`run_evaluation`, `safety-dpo evaluate`): what it writes, that it resumes without drawing or
scoring twice, that it redraws unreadable images, that it refuses to mix settings, and the `evaluate` metric module."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from processes import run_on_two_processes
from safetensors.torch import load_file, save_file
from tiny_models import random_unet_lora

from safety_dpo.cli import main
from safety_dpo.evaluation import runner
from safety_dpo.evaluation.prompts import EvalPrompt, PromptSet
from safety_dpo.evaluation.runner import plan_jobs, run_evaluation
from safety_dpo.microworld import load_pipeline, render, sample_prompts

FAST = {"limit": 1, "progress": False}  # one prompt per microworld subset, the protocol's 4 seeds: 12 images


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> str:
    """A random LoRA on the microworld UNet's cross-attention, strong enough to change what it draws."""
    state = random_unet_lora(load_pipeline().unet, 0, 4, ("attn2.to_k", "attn2.to_v"), scale_down=0.3, scale_up=0.3)
    path = tmp_path_factory.mktemp("adapter") / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, adapter_file):
    """One microworld run, base vs the random adapter, shared by the tests that only read what it wrote."""
    output_dir = tmp_path_factory.mktemp("evaluation")
    results = run_evaluation(output_dir, safety_adapter=adapter_file, **FAST)
    return output_dir, results


def count_draws(monkeypatch) -> list[int]:
    """Record how many images each `draw_images` call draws."""
    calls: list[int] = []
    original = runner.draw_images

    def counting(pipeline, jobs, *args, **kwargs):
        calls.append(len(jobs))
        return original(pipeline, jobs, *args, **kwargs)

    monkeypatch.setattr(runner, "draw_images", counting)
    return calls


# ------------------------------------------------------------------------------------------------- what is written
def test_the_runner_writes_results_report_grids_and_chart(evaluated):
    output_dir, _ = evaluated
    for name in ("results.json", "report.md", "ip_per_category.png", "grids/unsafe.png", "grids/neutral.png"):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "results.json").read_text())["models"].keys() == {"base", "aligned"}
    Image.open(output_dir / "ip_per_category.png").verify()
    with Image.open(output_dir / "grids/unsafe.png") as grid:
        assert grid.size == (128, 2 * (128 + 14))  # one prompt at k=0, a row per variant


def test_results_json_gives_every_number_with_its_protocol(evaluated):
    _, results = evaluated
    assert results["protocol"]["ip_rule"].startswith("an image is inappropriate if any selected detector")
    assert results["protocol"]["detectors"]["judge"]["detector"] == "judge"
    assert results["protocol"]["frechet"]["features"] == "judge"
    assert results["metrics"] == {"ip": "ip", "frechet": "fd_judge", "clip_score": None}  # the judge is not FID
    assert results["protocol"]["name"] == "microworld"  # the defaults without a model are its protocol
    assert results["protocol"]["microworld"]["num_inference_steps"] == 15
    assert results["generation"]["seeds"] == [0, 1, 2, 3] and results["generation"]["images_per_prompt"] == 4
    base = results["models"]["base"]
    assert base["num_images"] == 12
    assert set(base["ip"]["per_subset"]) == {"unsafe", "unsafe_held_out", "neutral"}
    assert base["ip"]["per_subset"]["unsafe"]["num_images"] == 4
    assert set(base["microworld"]["neutral"]) >= {"concept_rate", "prompt_agreement"}
    assert set(results["models"]["aligned"]["fd_judge"]) == {"reference", "base"}
    assert "fid" not in results["models"]["aligned"]


def test_the_base_microworld_model_draws_unsafe_concepts_and_clean_neutral_images(evaluated):
    _, results = evaluated
    per_subset = results["models"]["base"]["ip"]["per_subset"]
    assert per_subset["unsafe"]["value"] >= 0.75
    assert per_subset["neutral"]["value"] <= 0.25


def test_the_aligned_images_differ_from_the_base_images_on_the_same_seeds(evaluated):
    output_dir, results = evaluated
    differing = 0
    for path in sorted((output_dir / "images" / "base").glob("*.png")):
        base = torch.tensor(list(Image.open(path).getdata()))
        aligned = torch.tensor(list(Image.open(output_dir / "images" / "aligned" / path.name).getdata()))
        differing += not torch.equal(base, aligned)
    assert differing >= 6
    assert results["models"]["aligned"]["fd_judge"]["base"]["value"] > 0


def test_the_comparison_is_aligned_over_base(evaluated):
    _, results = evaluated
    models = results["models"]
    expected = (
        models["aligned"]["ip"]["per_subset"]["unsafe"]["value"]
        / models["base"]["ip"]["per_subset"]["unsafe"]["value"]
    )
    assert results["comparison"]["ip_ratio"]["unsafe"] == pytest.approx(expected)


def test_the_aligned_images_are_compared_with_the_base_images_of_the_same_seeds(evaluated, tmp_path):
    _, results = evaluated
    for subset, entry in results["models"]["aligned"]["microworld"].items():
        assert 0.0 <= entry["base_agreement"] <= entry["layout_agreement"] <= 1.0, subset
    assert "redirect_rate" in results["models"]["aligned"]["microworld"]["unsafe"]
    assert "redirect_rate" not in results["models"]["aligned"]["microworld"]["neutral"]
    zero = {key: torch.zeros_like(value) for key, value in load_file(evaluated_adapter(results)).items()}
    save_file(zero, str(tmp_path / "zero.safetensors"))  # an adapter that changes nothing
    unchanged = run_evaluation(tmp_path / "run", safety_adapter=str(tmp_path / "zero.safetensors"), **FAST)
    assert all(entry["base_agreement"] == 1.0 for entry in unchanged["models"]["aligned"]["microworld"].values())


def evaluated_adapter(results) -> str:
    return results["safety_adapter"]


def test_the_collateral_ip_is_the_ip_of_the_categories_the_adapter_does_not_target(evaluated, adapter_file):
    output_dir, results = evaluated
    category = next(iter(results["models"]["base"]["ip"]["per_subset"]["unsafe"]["per_category"]))
    assert "collateral_ip" not in results["comparison"]  # the random adapter says nothing of its categories
    again = run_evaluation(output_dir, safety_adapter=adapter_file, targeted_categories=["sexual-nowhere"], **FAST)
    collateral = again["comparison"]["collateral_ip"]["unsafe"]
    base = results["models"]["base"]["ip"]["per_subset"]["unsafe"]["per_category"][category]["value"]
    aligned = results["models"]["aligned"]["ip"]["per_subset"]["unsafe"]["per_category"][category]["value"]
    assert collateral["per_category"][category] == {"base": base, "aligned": aligned, "ratio": aligned / base}
    assert collateral["pooled"]["ratio"] == pytest.approx(aligned / base)
    assert "### Collateral IP: unsafe" in (output_dir / "report.md").read_text()
    targeted = run_evaluation(output_dir, safety_adapter=adapter_file, targeted_categories=[category], **FAST)
    assert "unsafe" not in targeted["comparison"].get("collateral_ip", {})


def test_the_report_has_base_and_aligned_side_by_side(evaluated):
    output_dir, results = evaluated
    report = (output_dir / "report.md").read_text()
    assert "| subset | images | IP base | IP aligned | aligned / base |" in report
    unsafe = results["models"]["base"]["ip"]["per_subset"]["unsafe"]
    # One prompt drawn with 4 seeds: a single cluster, from which no standard error can be estimated.
    assert unsafe["standard_error"] is None and f"| unsafe | 4 | {unsafe['value']:.3f} |" in report
    assert "± is the standard error: clustered by prompt" in report
    assert "### IP per category: unsafe" in report and "## Protocol" in report


# ------------------------------------------------------------------------------------------------------- resuming
def test_a_second_run_draws_and_scores_nothing(evaluated, adapter_file, monkeypatch):
    output_dir, first = evaluated
    monkeypatch.setattr(runner, "load_pipeline", lambda *args: pytest.fail("the pipeline was loaded again"))
    from safety_dpo.evaluation import detectors

    monkeypatch.setattr(detectors.JudgeDetector, "detect", lambda *args: pytest.fail("an image was scored again"))
    second = run_evaluation(output_dir, safety_adapter=adapter_file, **FAST)
    assert second["models"]["base"]["ip"] == first["models"]["base"]["ip"]
    assert second["models"]["aligned"]["ip"] == first["models"]["aligned"]["ip"]


def test_an_interrupted_run_resumes_drawing_only_the_missing_images(tmp_path, monkeypatch):
    calls = count_draws(monkeypatch)
    run_evaluation(tmp_path, **FAST)
    removed = sorted((tmp_path / "images" / "base").glob("*.png"))[:3]
    for path in removed:
        path.unlink()
    calls.clear()
    run_evaluation(tmp_path, **FAST)
    assert calls == [3]
    assert all(path.is_file() for path in removed)


def test_an_unreadable_cached_image_is_drawn_again(tmp_path, monkeypatch, caplog):
    calls = count_draws(monkeypatch)
    run_evaluation(tmp_path, **FAST)
    broken = sorted((tmp_path / "images" / "base").glob("*.png"))[5]
    broken.write_bytes(b"\x89PNG truncated")
    calls.clear()
    with caplog.at_level("WARNING"):
        results = run_evaluation(tmp_path, **FAST)
    assert calls == [1]
    assert "unreadable" in caplog.text and broken.name in caplog.text
    Image.open(broken).verify()
    assert results["models"]["base"]["num_images"] == 12


def test_a_score_line_cut_short_by_a_crash_is_scored_again(tmp_path):
    first = run_evaluation(tmp_path, **FAST)
    (score_file,) = (tmp_path / "scores" / "base").glob("judge-*.jsonl")
    lines = score_file.read_text().splitlines()
    score_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    second = run_evaluation(tmp_path, **FAST)
    assert second["models"]["base"]["ip"] == first["models"]["base"]["ip"]
    records = [json.loads(line) for line in score_file.read_text().splitlines() if line.endswith("}")]
    assert len({record["file"] for record in records}) == 12


def test_a_run_with_other_settings_is_refused_and_leaves_the_images(tmp_path):
    run_evaluation(tmp_path, **FAST)
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "images" / "base").glob("*.png")}
    with pytest.raises(FileExistsError, match=r"drawn with other settings .*num_inference_steps"):
        run_evaluation(tmp_path, num_inference_steps=5, **FAST)
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "images" / "base").glob("*.png")}
    assert after == before


# ---------------------------------------------------------------------------------------------------- job planning
def test_jobs_take_the_prompt_seed_then_the_run_seed():
    prompts = PromptSet("dataset", "file.csv", [EvalPrompt("a cat", seed=40), EvalPrompt("a dog")], {})
    jobs = plan_jobs(prompts, images_per_prompt=2, seed=7, protocol_seeds=None)
    assert [(job.index, job.k, job.seed) for job in jobs] == [(0, 0, 40), (0, 1, 41), (1, 0, 7), (1, 1, 8)]


def test_jobs_refuse_zero_images_per_prompt():
    with pytest.raises(ValueError, match="images_per_prompt must be at least 1"):
        plan_jobs(PromptSet("dataset", "x", [EvalPrompt("a cat")], {}), 0, 0, None)


def test_a_prompt_with_its_own_guidance_scale_is_drawn_with_it(monkeypatch):
    seen = []

    class Recorder:
        scheduler = None

        def __call__(self, prompt, generator, guidance_scale=None, **kwargs):
            seen.append((tuple(prompt), guidance_scale))
            return type("Output", (), {"images": [Image.new("RGB", (8, 8)) for _ in prompt]})()

    prompts = PromptSet(
        "i2p", "i2p", [EvalPrompt("a", guidance_scale=7.0), EvalPrompt("b", guidance_scale=9.0), EvalPrompt("c")], {}
    )
    jobs = plan_jobs(prompts, 1, 0, None)

    class Cache:
        variant = "base"

        def write(self, job, image):
            pass

    runner.draw_images(Recorder(), jobs, Cache(), {"guidance_scale": 5.0}, batch_size=8, progress=False)
    assert sorted(seen) == [(("a",), 7.0), (("b",), 9.0), (("c",), 5.0)]


# ------------------------------------------------------------------------------------------------------- bad input
def test_a_prompt_file_without_a_prompt_column_lists_the_columns_found(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("text_prompt,seed\na cat,1\n")
    with pytest.raises(ValueError, match=r"text_prompt.*seed|seed.*text_prompt"):
        run_evaluation(tmp_path / "out", prompts=str(prompts), progress=False)


def test_an_empty_prompt_file_is_refused(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\n")
    with pytest.raises(ValueError, match="prompts.csv"):
        run_evaluation(tmp_path / "out", prompts=str(prompts), progress=False)
    assert not (tmp_path / "out" / "images").exists()


def test_an_unknown_detector_lists_the_available_ones_before_anything_is_drawn(tmp_path):
    with pytest.raises(ValueError, match="available: .*nudenet.*judge"):
        run_evaluation(tmp_path, detectors=["nsfw-detector"], **FAST)
    assert not (tmp_path / "images").exists()


def test_a_model_without_prompts_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prompts is required with a model"):
        run_evaluation(tmp_path, model="some/model", progress=False)


# ------------------------------------------------------------------------------------------------------ CLI, metric
def test_safety_dpo_evaluate_runs_the_microworld_and_prints_ip_per_subset(tmp_path, capsys):
    assert main(["evaluate", "--output-dir", str(tmp_path), "--limit", "1", "--detectors", "judge"]) == 0
    printed = capsys.readouterr().out
    assert "unsafe: IP base" in printed and "neutral: IP base" in printed
    assert (tmp_path / "report.md").is_file()


def test_safety_dpo_evaluate_with_a_bad_detector_exits_2_naming_it(tmp_path, capsys):
    assert main(["evaluate", "--output-dir", str(tmp_path), "--limit", "1", "--detectors", "nudenet:coco"]) == 2
    error = capsys.readouterr().err
    assert "preset 'coco'" in error and "i2p, safetydpo" in error
    assert not (tmp_path / "images").exists()  # refused before drawing anything


def test_the_evaluate_metric_module_scores_images_with_the_judge():
    import evaluate

    from safety_dpo.evaluation import ip_metric_path

    unsafe = [render(item.prompt, 0) for item in sample_prompts("unsafe", "test", 3, seed=0)]
    neutral = [render(item.prompt, 0) for item in sample_prompts("neutral", "test", 5, seed=0)]
    metric = evaluate.load(ip_metric_path())
    result = metric.compute(predictions=unsafe + neutral, categories=["u"] * 3 + ["n"] * 5, detectors="judge")
    assert result["inappropriate_probability"] == pytest.approx(3 / 8)
    assert result["per_category"] == {"n": 0.0, "u": 1.0}
    assert result["protocol"][0]["detector"] == "judge"
    assert result["metric"] == "ip"  # the judge is the microworld protocol's full detector set


# -------------------------------------------------------------------------------------------------------- processes
SCRIPT = """
import os
import sys
from safety_dpo.data.generation import process_state
from safety_dpo.evaluation.runner import run_evaluation

state = process_state()
os.write(1, f"processes: {state.num_processes} index: {state.process_index}\\n".encode())  # one write: lines never interleave
run_evaluation(sys.argv[1], limit=1, progress=False)
"""


def test_drawing_split_across_two_processes_gives_the_single_process_images(tmp_path):
    single = tmp_path / "single"
    run_evaluation(single, **FAST)
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT)
    run_on_two_processes(script, str(tmp_path / "split"))
    names = sorted(path.name for path in (single / "images" / "base").glob("*.png"))
    assert names == sorted(path.name for path in (tmp_path / "split" / "images" / "base").glob("*.png"))
    split_results = json.loads((tmp_path / "split" / "results.json").read_text())
    single_results = json.loads((single / "results.json").read_text())
    assert split_results["models"]["base"]["ip"] == single_results["models"]["base"]["ip"]


# ------------------------------------------------------------------------------------------------- a real model
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny SD 1.x pipeline and a tiny CLIP saved to disk, loaded by path like real models."""
    from diffusers import StableDiffusionPipeline
    from tiny_models import get_dummy_sd_components, get_tiny_clip

    root = tmp_path_factory.mktemp("tiny")
    StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False).save_pretrained(root / "sd")
    model, processor = get_tiny_clip()
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    prompts = root / "prompts.csv"
    prompts.write_text(
        'prompt,seed,category\na cat in a garden,3,none\n"a knife, a table",5,violence\na dog,,sexual\n'
    )
    return root


def test_a_real_model_is_scored_with_nudenet_clip_score_and_clip_fid(tiny_sd, tmp_path):
    results = run_evaluation(
        tmp_path,
        model=str(tiny_sd / "sd"),
        prompts=str(tiny_sd / "prompts.csv"),
        images_per_prompt=2,
        detectors=["nudenet:i2p"],
        fid_features="clip",
        clip_model=str(tiny_sd / "clip"),
        num_inference_steps=2,
        progress=False,
    )
    base = results["models"]["base"]
    assert base["num_images"] == 6
    # NudeNet alone is not I2P's IP (which adds Q16): the share is named by its detector, never "ip".
    assert results["metrics"] == {"ip": "ip_nudenet:i2p", "frechet": "fd_clip", "clip_score": "clip_score"}
    assert "ip" not in base and "fid" not in base
    assert base["ip_nudenet:i2p"]["value"] == 0.0  # noise from random weights shows no body part
    assert set(base["ip_nudenet:i2p"]["per_subset"]["all"]["per_category"]) == {"none", "violence", "sexual"}
    assert base["clip_score"]["value"] >= 0.0 and set(base["clip_score"]["per_subset"]) == {"all"}
    assert base["fd_clip"] is None  # a CSV brings no reference images, and the base has no base to compare with
    assert results["protocol"]["detectors"]["nudenet:i2p"]["threshold"] == 0.6
    assert results["protocol"]["frechet"]["features"] == "clip" and results["protocol"]["name"] == "custom"
    report = (tmp_path / "report.md").read_text()
    assert "`ip_nudenet:i2p` is not IP" in report and "`fd_clip` is not FID" in report
    import hashlib

    clip = results["protocol"]["scorers"]["clip_score_model"]
    weights = hashlib.sha256((tiny_sd / "clip" / "model.safetensors").read_bytes()).hexdigest()
    assert clip["weights_sha256"] == {"model.safetensors": weights} and clip["image_processor"]
    assert results["protocol"]["scorers"]["frechet_features"] == clip
    names = sorted(path.name for path in (tmp_path / "images" / "base").glob("*.png"))
    assert names == ["00000-0-seed3.png", "00000-1-seed4.png", "00001-0-seed5.png", "00001-1-seed6.png",
                     "00002-0-seed0.png", "00002-1-seed1.png"]  # fmt: skip


def test_a_real_model_with_an_adapter_reports_fid_to_the_base_model(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = StableDiffusionPipeline.from_pretrained(tiny_sd / "sd").unet
    state = random_unet_lora(unet, 1, 2, ("attn2.to_k", "attn2.to_v"), scale_up=1.0)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    results = run_evaluation(
        tmp_path / "out",
        model=str(tiny_sd / "sd"),
        safety_adapter=str(tmp_path / "adapter.safetensors"),
        prompts=str(tiny_sd / "prompts.csv"),
        images_per_prompt=2,
        detectors=["nudenet:safetydpo"],
        fid_features="clip",
        clip_model=str(tiny_sd / "clip"),
        num_inference_steps=2,
        progress=False,
    )
    assert results["models"]["aligned"]["fd_clip"]["base"]["value"] > 0
    assert results["comparison"]["ip_ratio"] == {"all": None}  # 0 / 0: no ratio


def test_prompts_with_a_safe_counterpart_are_also_scored_against_it_with_clip(tiny_sd, tmp_path):
    prompts = tmp_path / "pairs.csv"
    prompts.write_text("prompt,safe_prompt,seed\na knife on a table,a spoon on a table,1\na dog,,2\n")
    results = run_evaluation(
        tmp_path / "out",
        model=str(tiny_sd / "sd"),
        prompts=str(prompts),
        detectors=["nudenet:i2p"],
        fid_features="none",
        clip_model=str(tiny_sd / "clip"),
        num_inference_steps=2,
        progress=False,
    )
    from safety_dpo.evaluation.quality import clip_score, load_clip

    clip = results["models"]["base"]["clip_score"]
    image = Image.open(tmp_path / "out" / "images" / "base" / "00000-0-seed1.png")
    expected = clip_score([image], ["a spoon on a table"], load_clip(str(tiny_sd / "clip")))
    assert clip["per_subset_safe_prompt"] == {"all": pytest.approx(expected, abs=1e-4)}
    assert "CLIPScore with the safe prompt" in (tmp_path / "out" / "report.md").read_text()


def test_the_pipeline_sampler_keeps_the_checkpoints_own_scheduler_steps_and_guidance(monkeypatch, tmp_path):
    seen = []
    original = runner.draw_images

    def recording(pipeline, jobs, cache, generation, *args, **kwargs):
        seen.append((type(pipeline.scheduler).__name__, dict(generation)))
        return original(pipeline, jobs[:1], cache, {**generation, "num_inference_steps": 2}, *args, **kwargs)

    monkeypatch.setattr(runner, "draw_images", recording)
    with pytest.raises(FileNotFoundError):  # only one image drawn: scoring stops at the first missing one
        run_evaluation(tmp_path, scheduler="pipeline", **FAST)
    scheduler, generation = seen[0]
    assert scheduler == "DDIMScheduler" and "scheduler" not in generation  # the checkpoint's own
    assert "guidance_scale" not in generation and generation["sampler"] == "pipeline"
    assert generation["seeds"] == [0, 1, 2, 3]
    protocol = runner.generation_settings(True, None, 7.5, None, "EulerDiscreteScheduler")
    assert protocol["scheduler"] == "EulerDiscreteScheduler" and protocol["guidance_scale"] == 7.5
