"""`SafetyAdapterState`: what a pipeline remembers of one loaded safety adapter (`SafetyAdapterMixin` keeps one per
adapter; `saved_folder` writes them out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SafetyAdapterState:
    """What the pipeline remembers of one loaded safety adapter."""

    name: str
    source: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (up with the LoRA scale folded in, down)
    metadata: dict[str, Any]
    scale: float
    fused: bool
    details: dict[str, str] = field(default_factory=dict)  # subfolder, weight_name, revision: where in `source`
    # unfused only: diffusers' PEFT injection freezes every UNet parameter; unloading gives the flags back
    requires_grad: list[tuple[torch.nn.Parameter, bool]] = field(default_factory=list)
