"""The microworld's tiny Stable Diffusion checkpoint, its tokenizer and its training script."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from safety_dpo.microworld import load_protocol, sample_prompts
from safety_dpo.microworld.checkpoint import MAX_PROMPT_TOKENS, checkpoint_path, microworld_vocabulary

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "microworld" / "train_microworld.py"


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_checkpoint_loads_with_the_stock_pipeline_and_generates_at_the_protocol_resolution(pipe):
    protocol = load_protocol()
    images = pipe(
        ["a man in red holding a knife on a beach", "a ball in a field"],
        num_inference_steps=3,
        guidance_scale=protocol.guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, protocol.resolution, protocol.resolution, 3)
    assert np.isfinite(images).all() and images.std() > 0.05


def test_the_shipped_checkpoint_is_safetensors_only_and_small():
    files = [path for path in checkpoint_path().rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(path.stat().st_size for path in files) <= 25_000_000


def test_the_latent_scheduler_does_not_clip_samples(pipe):
    assert pipe.scheduler.config.clip_sample is False


def test_the_protocol_is_stored_with_the_checkpoint():
    stored = json.loads((checkpoint_path() / "protocol.json").read_text())
    assert load_protocol().to_dict() == {**load_protocol().to_dict(), **stored}


def test_the_tokenizer_makes_every_grammar_word_one_token(pipe):
    tokenizer = pipe.tokenizer
    for word in microworld_vocabulary():
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    for kind in ("unsafe", "safe", "neutral"):
        for item in sample_prompts(kind, "train", 100, seed=0, names="held-out" if kind == "unsafe" else "trained"):
            ids = tokenizer(item.prompt).input_ids
            assert tokenizer.unk_token_id not in ids[1:-1], item.prompt
            assert len(ids) <= MAX_PROMPT_TOKENS, item.prompt


def test_an_out_of_vocabulary_word_does_not_fail(pipe):
    tokenizer = pipe.tokenizer
    # A word of known letters is spelled out in characters the model never saw in training; a character
    # outside the tokenizer's alphabet becomes the unknown token. Neither raises, and the pipeline still draws.
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    assert tokenizer("café").input_ids[1:-1][-2:] == [tokenizer.unk_token_id] * 2
    image = pipe("a zebra in a café", num_inference_steps=2, output_type="np").images
    assert image.shape[1:] == (32, 32, 3)


def _load_script():
    spec = importlib.util.spec_from_file_location("train_microworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Crash(Exception):
    pass


def _tiny_run(script, root: Path) -> None:
    script.main(
        [
            "--work-dir", str(root / "work"), "--output-dir", str(root / "out"), "--num-images", "32",
            "--vae-steps", "4", "--vae-batch-size", "4", "--unet-steps", "4", "--batch-size", "4",
            "--checkpoint-every", "2", "--unet-channels", "16", "32", "32", "--text-layers", "1",
        ]
    )  # fmt: skip


def test_a_training_run_killed_mid_unet_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    script = _load_script()
    _tiny_run(script, tmp_path / "straight")

    write_json = script.write_json

    def write_then_crash(path, data):
        write_json(path, data)
        if Path(path).parent.name == "unet_checkpoint" and data["step"] == 2:
            raise Crash

    monkeypatch.setattr(script, "write_json", write_then_crash)
    with pytest.raises(Crash):
        _tiny_run(script, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "out").exists()
    monkeypatch.setattr(script, "write_json", write_json)
    _tiny_run(script, tmp_path / "resumed")

    # Not bitwise: resumed runs differ by ~2e-6 after a few steps (float32 rounding in the restored optimizer and
    # EMA updates), so the comparison allows 1e-5.
    for component in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        straight = load_file(str(tmp_path / "straight" / "out" / f"{component}.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / "out" / f"{component}.safetensors"))
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-5, msg=f"{component}: {key}")
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "resumed" / "out").unet.config.sample_size == 8
