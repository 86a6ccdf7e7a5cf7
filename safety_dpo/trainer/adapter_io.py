"""Saving and loading a safety expert: diffusers-format LoRA weights, the training settings that made them,
`safety_dpo.json` and the model card; and telling a whole Trainer checkpoint from one a kill cut short.

```
EXPERT_DIR/
  pytorch_lora_weights.safetensors   loads with stock diffusers: pipe.load_lora_weights(EXPERT_DIR)
  training_settings.json             everything that decided the weights: base model, dataset fingerprint and every
                                     SafetyDPOConfig field but where files go and what is logged
  README.md                          the model card (hub_cards/adapter_card.md)
  safety_dpo.json                    base model and UNet fingerprint, architecture, categories, concepts, dataset,
                                     LoRA and training settings
```

The files are written in this order, each atomically, and `safety_dpo.json` last: its presence means the expert is
finished. A Trainer checkpoint (`checkpoint-N/`) holds the same files, then the optimizer's, and `trainer_state.json`
last (`checkpoint_gaps` says what an interrupted one lacks).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import safety_dpo

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "safety_dpo.json"
TRAINING_SETTINGS_NAME = "training_settings.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's names, which it does not export
OPTIMIZER_NAMES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_NAME = "scheduler.pt"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def save_expert(
    output_dir: str | os.PathLike,
    unet: Any,
    architecture: str,
    metadata: dict[str, Any],
    training_settings: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> None:
    """Write the UNet's LoRA (adapter "default"), `training_settings.json`, the card and, last, `safety_dpo.json`
    into `output_dir`: a process killed on the way leaves no `safety_dpo.json`, so the expert does not pass for
    finished (`repo_id` goes into the card)."""
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
    if training_settings is not None:
        _write_json(output_dir / TRAINING_SETTINGS_NAME, training_settings)
    write_card(output_dir, metadata, repo_id=repo_id)
    write_metadata(output_dir, metadata)


def write_metadata(output_dir: str | os.PathLike, metadata: dict[str, Any]) -> None:
    data = {"safety_dpo_version": safety_dpo.__version__, "weight_name": LORA_WEIGHT_NAME, **metadata}
    _write_json(Path(output_dir) / METADATA_NAME, data)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """An adapter's `safety_dpo.json`, None where it has none.

    Raises:
        ValueError: Naming the file, when it is not a JSON object.
    """
    return read_json_file(Path(directory) / METADATA_NAME)


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path` (None when there is no such file); a damaged file is a ValueError naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is damaged ({error}); restore it, or train or download the adapter again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object; restore it.")
    return data


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tensors of a LoRA `.safetensors` file, and the PEFT config that diffusers' `save_lora_weights` stores in
    its header (UNet entries, "unet." prefix removed), or None where the file has none. Nothing is unpickled.

    Raises:
        ValueError: Naming the file, when it is not a readable `.safetensors` file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file ({error}).") from error
    if "lora_adapter_metadata" not in header:
        return state, None
    stored = json.loads(header["lora_adapter_metadata"])
    return state, {key.removeprefix("unet."): value for key, value in stored.items() if key.startswith("unet.")}


def read_training_settings(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training settings an expert or checkpoint recorded; None where it recorded none
    (written before safety_dpo recorded them)."""
    return read_json_file(Path(directory) / TRAINING_SETTINGS_NAME)


def check_training_settings(directory: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Refuse to reuse or resume what `directory` (an expert or a checkpoint) holds with other training settings.

    Only the settings both sides know are compared: a field that another transformers version adds or drops is not
    a difference. A directory that recorded none (written before safety_dpo recorded them) passes with a warning.

    Raises:
        ValueError: Listing the settings that differ.
    """
    from safety_dpo.data.build_dir import differences

    recorded = read_training_settings(directory)
    if recorded is None:
        logger.warning(
            "%s records no training settings (an older safety_dpo wrote it); they cannot be compared with this run's.",
            directory,
        )
        return
    shared = recorded.keys() & settings.keys()
    differing = differences({key: recorded[key] for key in shared}, {key: settings[key] for key in shared})
    if differing:
        raise ValueError(
            f"{str(directory)!r} was trained with other settings than this run's: " + "; ".join(differing) + ". "
            "Nothing was trained. To train with these settings, use another --output-dir (output_dir); to reuse or "
            "resume what is there, use the settings it recorded (its training_settings.json)."
        )


def saves_optimizer(args: Any) -> bool:
    """Whether the Trainer's checkpoints hold `optimizer.pt` and `scheduler.pt` (not with DeepSpeed or FSDP, which
    write their own, nor with `save_only_model`)."""
    return not (args.save_only_model or args.deepspeed or args.fsdp)


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The Trainer checkpoints (`checkpoint-N/`) in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match[1]), path) for path in output_dir.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def checkpoint_gaps(checkpoint: str | os.PathLike, with_optimizer: bool = True) -> list[str]:
    """What a Trainer checkpoint lacks to be resumed from: its LoRA weights, its optimizer and scheduler states
    (`with_optimizer`: unless the run saves the model only, or leaves them to DeepSpeed or FSDP) and a readable
    `trainer_state.json`, which the Trainer writes last. An empty list for a complete checkpoint."""
    checkpoint = Path(checkpoint)
    gaps = [] if (checkpoint / LORA_WEIGHT_NAME).is_file() else [LORA_WEIGHT_NAME]
    if with_optimizer:
        if not any((checkpoint / name).is_file() for name in OPTIMIZER_NAMES):
            gaps.append(OPTIMIZER_NAMES[0])
        if not (checkpoint / SCHEDULER_NAME).is_file():
            gaps.append(SCHEDULER_NAME)
    try:
        json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        gaps.append(TRAINER_STATE_NAME)
    except (ValueError, OSError):
        gaps.append(f"{TRAINER_STATE_NAME} (cut short)")
    return gaps


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
    """Render the adapter card for an expert and save it as `README.md` (atomically)."""
    from safety_dpo.hub import hub_id_or_none, render_model_card

    base_model = metadata.get("base_model")
    on_hub = hub_id_or_none(base_model) is not None
    dataset = hub_id_or_none(metadata.get("dataset"))
    card = render_model_card(
        repo_id=repo_id,
        base_model=base_model if on_hub else None,
        base_model_source=base_model,
        adapter_source=repo_id or str(output_dir),  # the Hub repo once pushed, else the folder it is saved to
        library_name="diffusers",
        pipeline_tag="text-to-image",
        datasets=[dataset] if dataset else None,
        description=f"A SafetyDPO safety expert trained on {str(base_model)!r}." if not on_hub else None,
        categories=metadata.get("categories"),
        concepts=metadata.get("concepts") or None,
        weight_name=LORA_WEIGHT_NAME,
        training_config={**metadata.get("lora", {}), **metadata.get("training", {})},
    )
    path = Path(output_dir) / "README.md"
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    card.save(str(temporary))
    os.replace(temporary, path)
