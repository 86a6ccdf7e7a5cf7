"""The random draws of a Diffusion-DPO step, fixed per example in evaluation.

Training draws its noise, timesteps and VAE posterior samples from torch's global generator, as diffusers'
`train_diffusion_dpo.py` does. Evaluation draws them per eval example from a generator of its own, seeded by
`eval_seed` and the example's index, so that the same weights give the same `eval_loss` whatever the batch size,
order or device, and it leaves the global random state as it found it, so that a run with evaluations trains as one
without (and `load_best_model_at_end` / early stopping compare like with like).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class IndexedExamples(torch.utils.data.Dataset):
    """Eval examples with their index (`example_index`), which seeds their noise, timestep and latent samples."""

    def __init__(self, examples: torch.utils.data.Dataset) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "example_index": torch.tensor(index)}


def example_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator of its own for eval example `index`: its draws depend on neither batch nor device."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def randn_like(tensor: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """`torch.randn_like`; with generators, row i drawn from generator i."""
    if generators is None:
        return torch.randn_like(tensor)
    rows = [torch.randn(tensor.shape[1:], generator=generator) for generator in generators]
    return torch.stack(rows).to(tensor.device, tensor.dtype)


def randint(high: int, like: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One timestep in [0, high) per row of `like`; with generators, row i's from generator i."""
    if generators is None:
        return torch.randint(0, high, (like.shape[0],), device=like.device)
    rows = [torch.randint(0, high, (1,), generator=generator) for generator in generators]
    return torch.cat(rows).to(like.device)


@contextlib.contextmanager
def global_random_state_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
