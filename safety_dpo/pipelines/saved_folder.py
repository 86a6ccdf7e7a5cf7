"""The folder `save_pretrained` writes for a pipeline with safety adapters: `saved_form` gives the pipeline that form
while diffusers saves it.

A saved pipeline is a stock diffusers pipeline folder, with its safety adapters recorded where stock diffusers
passes over them (keys starting with "_"):

```
SAVED_PIPELINE/
  model_index.json     "_class_name": the stock pipeline (StableDiffusionPipeline, ...);
                       "_safety_adapters": the unfused safety adapters saved beside it: name -> subfolder,
                       weight_name, scale, source, lora_sha256
  unet/config.json     "_fused_safety_adapters": the safety adapters fused into these UNet weights: name, source,
                       lora_sha256, scale (kept by diffusers through from_pretrained and save_pretrained)
  unet/...             the UNet without PEFT wrappers; fused adapters are in its weights
  safety_adapters/NAME/pytorch_lora_weights.safetensors, safety_dpo.json   one unfused safety adapter
```

`lora_sha256` is the sha256 of the adapter's `pytorch_lora_weights.safetensors` as `save_pretrained` writes it (the
same weights give the same bytes), so a fused record names the file that an unfused save of the same adapter holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safety_dpo.pipelines.adapter_state import SafetyAdapterState
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, write_metadata

logger = logging.getLogger(__name__)

SAFETY_ADAPTERS_FOLDER = "safety_adapters"
SAVED_ADAPTERS_KEY = "_safety_adapters"  # model_index.json; private ("_"), so stock diffusers passes over it
FUSED_ADAPTERS_KEY = "_fused_safety_adapters"  # unet/config.json; diffusers keeps private keys through load and save


@contextlib.contextmanager
def saved_form(
    pipeline: Any, save_directory: str | os.PathLike, states: list[SafetyAdapterState], unsaved: list[str]
) -> Iterator[None]:
    """Write the unfused safety adapters into `save_directory` and, while diffusers saves the pipeline inside this
    context, give it the form stock diffusers loads: their list in its config, the fused adapters' records in its
    UNet's config, no PEFT wrapper in its UNet. Everything is as before afterwards.

    Args:
        pipeline: The pipeline being saved.
        save_directory: Its folder.
        states: Its safety adapters.
        unsaved: The names of the unfused LoRAs that are not safety adapters (not saved: a warning names them).
    """
    saved = {}
    for index, state in enumerate(state for state in states if not state.fused):
        subfolder = f"{SAFETY_ADAPTERS_FOLDER}/{_folder_name(state.name, index)}"
        digest = _write_lora_folder(Path(save_directory) / subfolder, state)
        saved[state.name] = {"subfolder": subfolder, "weight_name": LORA_WEIGHT_NAME, **_identity(state, digest)}
    fused = list(pipeline.unet.config.get(FUSED_ADAPTERS_KEY) or [])  # baked in before this pipeline was loaded
    fused += [{"name": state.name, **_identity(state, _lora_sha256(state.layers))} for state in states if state.fused]
    if unsaved:
        logger.warning(
            "save_pretrained does not save the unfused LoRA adapters %s (only safety adapters are saved beside the "
            "pipeline); save them with save_lora_weights, or fuse them first with fuse_lora.",
            unsaved,
        )
    with (
        _config_entries(pipeline, {SAVED_ADAPTERS_KEY: saved} if saved else {}),
        _config_entries(pipeline.unet, {FUSED_ADAPTERS_KEY: fused} if fused else {}),
        _without_peft_wrappers(pipeline.unet),
    ):
        yield


def _folder_name(adapter_name: str, index: int) -> str:
    """The adapter's name when it is a plain folder name, else `_adapter_<index>` (which no plain name can be)."""
    plain = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", adapter_name) is not None
    return adapter_name if plain else f"_adapter_{index}"


def _lora_bytes(layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    """The adapter as a diffusers-format LoRA `.safetensors` file (the LoRA scale folded in: alpha = r), the same
    bytes for the same weights."""
    from safetensors.torch import save

    state = {}
    for layer, (up, down) in layers.items():
        state[f"unet.{layer}.lora_A.weight"] = down.detach().float().cpu().contiguous()
        state[f"unet.{layer}.lora_B.weight"] = up.detach().float().cpu().contiguous()
    return save(state, metadata={"format": "pt"})


def _lora_sha256(layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    return hashlib.sha256(_lora_bytes(layers)).hexdigest()


def _identity(state: SafetyAdapterState, lora_sha256: str) -> dict[str, Any]:
    """What says which adapter this is: its source, the sha256 of its LoRA file as `save_pretrained` writes it
    (`pytorch_lora_weights.safetensors` of an unfused save), its scale, and what its `safety_dpo.json` says."""
    described = {
        key: state.metadata[key] for key in ("base_model", "architecture", "categories") if key in state.metadata
    }
    return {
        "source": {"path_or_repo_id": state.source, **state.details},
        "lora_sha256": lora_sha256,
        "scale": state.scale,
        **described,
    }


def _write_lora_folder(folder: Path, state: SafetyAdapterState) -> str:
    """Write the adapter as `pytorch_lora_weights.safetensors` and `safety_dpo.json`; returns the file's sha256."""
    data = _lora_bytes(state.layers)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{LORA_WEIGHT_NAME}.tmp-{os.getpid()}"
    temporary.write_bytes(data)
    os.replace(temporary, folder / LORA_WEIGHT_NAME)
    ranks = sorted({down.shape[0] for _, down in state.layers.values()})
    lora = {**(state.metadata.get("lora") or {}), "rank": max(ranks), "ranks": ranks, "alpha": None, "scale": 1.0}
    write_metadata(folder, {**state.metadata, "weight_name": LORA_WEIGHT_NAME, "lora": lora})  # alpha = r now
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _config_entries(configurable: Any, entries: dict[str, Any]) -> Iterator[None]:
    """Add `entries` to a diffusers object's config while saving; its config is as before afterwards."""
    previous = configurable._internal_dict
    if entries:
        configurable.register_to_config(**entries)
    try:
        yield
    finally:
        configurable._internal_dict = previous


@contextlib.contextmanager
def _without_peft_wrappers(model: torch.nn.Module) -> Iterator[None]:
    """Put each PEFT-wrapped layer's base layer in its place while saving (the saved weights are then those of a
    plain model, with fused LoRAs in them), and the wrappers back afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    names: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or any(name.startswith(f"{outer}.") for outer in names):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        swapped.append((parent, child, module))
        names.append(name)
    try:
        yield
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)
