"""examples/microworld/train_judge.py: a few steps, and resuming from its checkpoint."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from safety_dpo.microworld.judge import Judge

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "microworld" / "train_judge.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_judge", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, output: Path, checkpoints: Path, epochs: int) -> None:
    small = ["--train-size", "48", "--test-size", "16", "--batch-size", "16", "--width", "8"]
    script.main([*small, "--epochs", str(epochs), "--output-dir", str(output), "--checkpoint-dir", str(checkpoints)])


class Crash(Exception):
    pass


def test_a_resumed_run_ends_with_the_same_judge_as_an_uninterrupted_one(tmp_path, monkeypatch):
    script = _load_script()
    _run(script, tmp_path / "straight", tmp_path / "straight_ckpt", epochs=2)

    # The same run, killed right after its first epoch's checkpoint is written, then started again.
    save_checkpoint = script.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(script, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        _run(script, tmp_path / "resumed", tmp_path / "resumed_ckpt", epochs=2)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(script, "save_checkpoint", save_checkpoint)
    _run(script, tmp_path / "resumed", tmp_path / "resumed_ckpt", epochs=2)

    straight = Judge.from_pretrained(tmp_path / "straight").state_dict()
    resumed = Judge.from_pretrained(tmp_path / "resumed").state_dict()
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "resumed_ckpt" / "progress.json").read_text()) == {"epoch": 2}
