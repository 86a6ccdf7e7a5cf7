"""Writing a baseline's result as a safety adapter folder, the same files a SafetyDPO adapter has.

```
ADAPTER_DIR/
  pytorch_lora_weights.safetensors   pipe.load_lora_weights(ADAPTER_DIR) in stock diffusers (scale folded in: alpha = r)
  safety_dpo.json                    kind "baseline", method, base model and UNet fingerprint, categories, concepts,
                                     the method's settings
  README.md                          the adapter card
```

`safety_dpo.json` is written last: its presence means the adapter is finished (`is_finished`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME, read_json_file, write_metadata


def baseline_metadata(
    components: Any, method: str, categories: list[str], concepts: list[str], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """What `safety_dpo.json` says of a baseline adapter made on `components` (`trainer.components.load_components`)."""
    return {
        "kind": "baseline",
        "method": method,
        "base_model": components.base_model,
        "unet_config_sha256": components.unet_fingerprint,
        "architecture": components.architecture,
        "categories": list(categories),
        "concepts": list(concepts),
        "settings": dict(settings),
    }


def write_lora_adapter(
    output_dir: str | os.PathLike,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: dict[str, Any],
    description: str,
) -> Path:
    """Write `layers` (UNet module name -> (up (out, r), down (r, in)), scale 1) as a diffusers-format LoRA, the card
    and, last, `safety_dpo.json`, each file atomically.

    Raises:
        ValueError: If a factor is not finite (nothing is written then).
    """
    from safetensors.torch import save_file

    from safety_dpo.hub import hub_id_or_none, render_model_card

    for layer, (up, down) in layers.items():
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(
                f"The {metadata.get('method')} weights of layer {layer!r} are not finite; refusing to save."
            )
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for layer, (up, down) in layers.items():
        state[f"unet.{layer}.lora_A.weight"] = down.detach().float().cpu().contiguous()
        state[f"unet.{layer}.lora_B.weight"] = up.detach().float().cpu().contiguous()
    ranks = sorted({down.shape[0] for _, down in layers.values()})
    metadata = {**metadata, "lora": {"rank": max(ranks, default=0), "ranks": ranks, "alpha": None, "scale": 1.0}}
    temporary = directory / f".{LORA_WEIGHT_NAME}.tmp-{os.getpid()}"
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, directory / LORA_WEIGHT_NAME)
    base_model = metadata.get("base_model")
    on_hub = hub_id_or_none(base_model) is not None
    card = render_model_card(
        base_model=base_model if on_hub else None,
        base_model_source=base_model,
        adapter_source=str(output_dir),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        model_name=f"{metadata.get('method')} safety adapter (a baseline of SafetyDPO)",
        description=description,
        categories=metadata.get("categories") or None,
        concepts=metadata.get("concepts") or None,
        weight_name=LORA_WEIGHT_NAME,
        training_config=dict(metadata.get("settings") or {}),
    )
    card_path = directory / "README.md"
    card.save(str(card_path.with_name(f"README.md.tmp-{os.getpid()}")))
    os.replace(card_path.with_name(f"README.md.tmp-{os.getpid()}"), card_path)
    write_metadata(directory, metadata)
    return directory


def is_finished(output_dir: str | os.PathLike, method: str, settings: Mapping[str, Any]) -> bool:
    """Whether `output_dir` holds a finished adapter of `method` made with exactly `settings`.

    Raises:
        FileExistsError: If it holds a finished adapter made otherwise (another method or other settings): it is
            never overwritten; choose another folder or delete it.
    """
    metadata = read_json_file(Path(output_dir) / METADATA_NAME)
    if metadata is None:
        return False
    if metadata.get("method") == method and metadata.get("settings") == dict(settings):
        return True
    raise FileExistsError(
        f"{output_dir} already holds a finished adapter ({metadata.get('kind')} {metadata.get('method')!r}) made with "
        "other settings; choose another --output-dir or delete that folder."
    )
