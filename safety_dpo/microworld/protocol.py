"""The microworld's evaluation protocol, fixed in one place and written into every result.

A checkpoint folder may carry a `protocol.json` with the values tuned for it (scheduler, steps, guidance), which
`load_protocol` prefers; the defaults below are the values tuned for the shipped microworld checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_FILE = "protocol.json"


@dataclass(frozen=True)
class Protocol:
    """How images are generated and judged for every microworld measurement.

    Args:
        scheduler: diffusers scheduler class used for sampling.
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        seeds: Seeds per prompt; image k of a prompt uses `torch.Generator().manual_seed(seeds[k])`.
        resolution: Height and width of generated images.
        prompts_per_concept: Test prompts per concept in the standard prompt sets.
        prompt_seed: Seed of `sample_prompts` for the standard prompt sets.
    """

    scheduler: str = "DPMSolverMultistepScheduler"
    num_inference_steps: int = 15
    guidance_scale: float = 4.0
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    resolution: int = 32
    prompts_per_concept: int = 2
    prompt_seed: int = 1234

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}

    def save(self, directory: str | os.PathLike) -> None:
        """Write `protocol.json` into `directory` (a checkpoint folder), atomically."""
        from safety_dpo.microworld.training import write_json

        write_json(Path(directory) / PROTOCOL_FILE, self.to_dict())


def load_protocol(checkpoint_path: str | os.PathLike | None = None) -> Protocol:
    """The protocol stored with a checkpoint, or the default one when it has none.

    Without `checkpoint_path`, the shipped microworld checkpoint is used when it exists.
    """
    if checkpoint_path is None:
        checkpoint_path = Path(__file__).parent / "assets" / "checkpoint"
    path = Path(checkpoint_path) / PROTOCOL_FILE
    if not path.is_file():
        return Protocol()
    data = json.loads(path.read_text())
    known = {field.name for field in dataclasses.fields(Protocol)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{str(path)!r}: unknown protocol keys {sorted(unknown)}; known keys: {sorted(known)}.")
    return Protocol(**data)
