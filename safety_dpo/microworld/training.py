"""Small helpers shared by the microworld's training scripts: checkpoints that never unpickle anything.

`torch.save` checkpoints are pickles; a resumed run would have to unpickle them. These helpers write the
optimizer's tensors (and any other tensors) as safetensors and the rest as JSON, each file atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as safetensors atomically."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temporary))
    os.replace(temporary, path)


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
