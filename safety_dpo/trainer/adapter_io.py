"""Saving and loading a safety expert: diffusers-format LoRA weights, `safety_dpo.json` and the model card.

```
EXPERT_DIR/
  pytorch_lora_weights.safetensors   loads with stock diffusers: pipe.load_lora_weights(EXPERT_DIR)
  safety_dpo.json                    base model and UNet fingerprint, architecture, categories, concepts, dataset,
                                     LoRA and training settings
  README.md                          the model card (hub_cards/adapter_card.md)
```
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safety_dpo

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "safety_dpo.json"


def save_expert(output_dir: str | os.PathLike, unet: Any, architecture: str, metadata: dict[str, Any]) -> None:
    """Write the UNet's LoRA (adapter "default") and `safety_dpo.json` into `output_dir`, each file atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {key: value.detach().float().cpu().contiguous() for key, value in state.items()}
    pipeline_class = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    staging = output_dir / f".saving-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline_class.save_lora_weights(
        staging,
        unet_lora_layers=state,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    os.replace(staging / LORA_WEIGHT_NAME, output_dir / LORA_WEIGHT_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    write_metadata(output_dir, metadata)


def write_metadata(output_dir: str | os.PathLike, metadata: dict[str, Any]) -> None:
    data = {"safety_dpo_version": safety_dpo.__version__, "weight_name": LORA_WEIGHT_NAME, **metadata}
    path = Path(output_dir) / METADATA_NAME
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / METADATA_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def load_lora_into_unet(unet: Any, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load a saved expert's LoRA weights into the UNet's adapter `adapter_name` (which must already exist).

    Raises:
        FileNotFoundError: If the directory has no `pytorch_lora_weights.safetensors`.
        ValueError: If the weights do not fit the adapter (different rank or target modules).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {LORA_WEIGHT_NAME}; it is not a saved safety expert.")
    state = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    state = convert_unet_state_dict_to_peft(state)
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"The LoRA in {str(path)!r} does not fit this UNet's adapter: {error}") from error
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"The LoRA in {str(path)!r} has weights this adapter lacks: {sorted(unexpected)[:5]} ...")


def write_card(output_dir: str | os.PathLike, metadata: dict[str, Any], repo_id: str | None = None) -> None:
    """Render the adapter card for an expert and save it as `README.md`."""
    from safety_dpo.hub import hub_id_or_none, render_model_card

    base_model = metadata.get("base_model")
    on_hub = hub_id_or_none(base_model) is not None
    dataset = hub_id_or_none(metadata.get("dataset"))
    card = render_model_card(
        repo_id=repo_id,
        base_model=base_model if on_hub else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        datasets=[dataset] if dataset else None,
        description=f"A SafetyDPO safety expert trained on {str(base_model)!r}." if not on_hub else None,
        categories=metadata.get("categories"),
        concepts=metadata.get("concepts") or None,
        weight_name=LORA_WEIGHT_NAME,
        training_config={**metadata.get("lora", {}), **metadata.get("training", {})},
    )
    card.save(str(Path(output_dir) / "README.md"))
