"""Small helpers shared by the microworld's training scripts: checkpoints that never unpickle anything.

`torch.save` checkpoints are pickles; a resumed run would have to unpickle them. These helpers write the
optimizer's tensors (and any other tensors) as safetensors and the rest as JSON, each file atomically.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from safety_dpo.data.build_dir import write_json, write_tensors

__all__ = ["load_optimizer", "save_optimizer", "write_json", "write_tensors"]


def save_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Save an optimizer's per-parameter tensors (e.g. Adam moments and step counts) as safetensors."""
    state = optimizer.state_dict()["state"]
    tensors = {
        f"{index}.{key}": value
        for index, values in state.items()
        for key, value in values.items()
        if torch.is_tensor(value)
    }
    write_tensors(path, tensors)


def load_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_optimizer` wrote into an optimizer built over the same parameters."""
    state = optimizer.state_dict()
    for name, value in load_file(str(path)).items():
        index, key = name.split(".", 1)
        state["state"].setdefault(int(index), {})[key] = value
    optimizer.load_state_dict(state)
