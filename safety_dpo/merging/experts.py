"""Loading safety experts for merging, and checking that they can be merged.

An expert is a local folder (a `safety-dpo train` output), a `.safetensors` file, a Hub id, or a state dict. Its
UNet LoRA becomes one `(up, down)` pair per targeted layer, with the LoRA scale `alpha / r` folded into `up`, so
`up @ down` is the layer's delta weight whatever the expert's alpha was.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class LoraExpert:
    """One expert's UNet LoRA, layer by layer.

    Args:
        name: How errors and the merged adapter's `merged_from` name it (its path, Hub id or "state dict k").
        layers: Module name (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") -> (up (out, r) with
            the LoRA scale folded in, down (r, in)).
        metadata: Its `safety_dpo.json`, or {} when it has none.
    """

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        return list(self.metadata.get("categories") or [])

    def delta(self, layer: str) -> torch.Tensor:
        up, down = self.layers[layer]
        return up @ down


def load_experts(experts: list[Any], **hub_kwargs: Any) -> list[LoraExpert]:
    """Load experts given as folders, `.safetensors` files, Hub ids or state dicts, and check they can be merged.

    Raises:
        ValueError: If no expert is given, if one is not a UNet LoRA, or if they do not fit together (see
            `check_compatible`).
        FileNotFoundError: If a path or Hub id cannot be found.
    """
    if not experts:
        raise ValueError("co_merge needs at least one expert (a folder, .safetensors file, Hub id or state dict).")
    loaded = [load_expert(expert, index, **hub_kwargs) for index, expert in enumerate(experts)]
    check_compatible(loaded)
    return loaded


def load_expert(expert: Any, index: int = 0, weight_name: str | None = None, **hub_kwargs: Any) -> LoraExpert:
    """One expert (or any UNet LoRA), from a state dict, a `.safetensors` file, a folder or a Hub id.

    Args:
        expert: The source.
        index: Its position, to name a state dict in errors.
        weight_name: The weight file inside a folder or Hub repo, relative to it ("sub/file.safetensors" is fine);
            None: the one `safety_dpo.json` names, else `pytorch_lora_weights.safetensors`, else the folder's only
            `.safetensors` file.
        **hub_kwargs: `huggingface_hub` download arguments.

    Raises:
        ValueError: If the source is not a UNet LoRA, is a pickle file, holds NaN or infinite values, or if the weight
            file (`weight_name`, or the one `safety_dpo.json` names) lies outside the folder or repo.
        FileNotFoundError: If the source or `weight_name` cannot be found.
    """
    if isinstance(expert, LoraExpert):
        check_finite(expert)
        return expert
    if isinstance(expert, Mapping):
        return expert_from_state_dict(dict(expert), name=f"state dict {index}")
    if not isinstance(expert, (str, os.PathLike)):
        raise ValueError(
            f"Expert {index} is a {type(expert).__name__}; pass a folder, a .safetensors file, a Hub id or a state dict."
        )
    path = Path(expert).expanduser()
    name = str(expert)
    if path.suffix in _PICKLE_SUFFIXES:
        raise ValueError(
            f"Expert {name!r} is a pickle file; only .safetensors weights are read (nothing is unpickled)."
        )
    if path.is_file():
        return _from_file(path, name, _read_json(path.parent / METADATA_NAME) if path.name == LORA_WEIGHT_NAME else {})
    from_hub = not path.is_dir()
    if weight_name is not None:
        _check_relative(weight_name, name, "weight_name")
    if from_hub:
        from safety_dpo.hub import ensure_local_or_download

        patterns = [weight_name or "*.safetensors", METADATA_NAME]
        path = ensure_local_or_download(name, allow_patterns=patterns, **hub_kwargs)
    metadata = _read_json(path / METADATA_NAME)
    if weight_name is not None:
        if Path(weight_name).suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"weight_name={weight_name!r} is a pickle file; only .safetensors weights are read.")
        weight_file = _inside(path, weight_name, name, "weight_name", from_hub)
        if not weight_file.is_file():
            found = ", ".join(item.name for item in sorted(path.glob("*.safetensors"))) or "none"
            raise FileNotFoundError(
                f"{name!r} has no weight file {weight_name!r} (.safetensors files there: {found}); pass one of "
                "them as weight_name."
            )
        return _from_file(weight_file, name, metadata)
    weight_name = metadata.get("weight_name", LORA_WEIGHT_NAME)
    _check_relative(weight_name, name, f"{METADATA_NAME} weight_name")
    weight_file = _inside(path, weight_name, name, f"{METADATA_NAME} weight_name", from_hub)
    if weight_file.is_file():
        return _from_file(weight_file, name, metadata)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return _from_file(
            _inside(path, candidates[0].name, name, "the only .safetensors file", from_hub), name, metadata
        )
    pickles = sorted(item.name for item in path.iterdir() if item.suffix in _PICKLE_SUFFIXES)
    found = ", ".join(item.name for item in candidates) or "none"
    raise FileNotFoundError(
        f"Expert {name!r} has no {LORA_WEIGHT_NAME} (.safetensors files found: {found})"
        + (f"; {pickles} are pickle files, which are never read" if pickles else "")
        + ". Pass the weight file itself, or a `safety-dpo train` output folder."
    )


def _check_relative(weight_name: Any, name: str, what: str) -> None:
    """Refuse a weight file name that is not a plain relative path: absolute (POSIX or Windows) or with ".."."""
    if not isinstance(weight_name, str) or not weight_name:
        raise ValueError(f"Expert {name!r}: {what}={weight_name!r} is not a file name; pass a path inside the folder.")
    windows = PureWindowsPath(weight_name)  # splits on both "/" and "\\"
    if PurePosixPath(weight_name).is_absolute() or windows.anchor or ".." in windows.parts:
        raise ValueError(
            f"{what}={weight_name!r} points outside the adapter folder or repo {name!r}: it must be a path "
            "relative to it, without '..' (e.g. 'pytorch_lora_weights.safetensors' or 'sub/file.safetensors')."
        )


def _inside(folder: Path, weight_name: str, name: str, what: str, from_hub: bool) -> Path:
    """`folder / weight_name`, refused unless it resolves inside `folder` (symlinks followed).

    A Hub snapshot's files are symlinks into its cache's `blobs` folder, which counts as inside; for a snapshot the
    name alone was checked (`_check_relative`), as huggingface_hub wrote its links.
    """
    candidate = folder / weight_name
    if from_hub or not candidate.exists():
        return candidate  # nothing to follow yet: the file does not exist, and a missing file is reported as such
    root = folder.resolve()
    resolved = candidate.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # a Hub cache snapshot given by path: models--org--name/snapshots/<sha>
        allowed.append(root.parent.parent / "blobs")
    if not any(resolved.is_relative_to(place) for place in allowed):
        raise ValueError(
            f"{what}={weight_name!r} points outside the adapter folder {str(folder)!r} (it resolves to "
            f"{str(resolved)!r}); the weight file must lie inside the adapter folder."
        )
    return candidate


def expert_from_state_dict(
    state: dict[str, torch.Tensor],
    name: str,
    metadata: dict[str, Any] | None = None,
    lora_config: dict | None = None,
    *,
    source: str | None = None,
) -> LoraExpert:
    """Parse a UNet LoRA state dict into layers with the scale folded in: diffusers/PEFT keys, with or without the
    "unet." prefix (what `safety-dpo train`, diffusers' `train_diffusion_dpo.py` and other diffusers scripts save),
    older "lora.down/up" and attention-processor keys, and Kohya-style "lora_unet_*" files, the last two converted
    by diffusers' own `lora_state_dict`.

    The scale of a layer is `alpha / r`, alpha taken from `.alpha` keys, else from `lora_config` (the PEFT config
    diffusers stores in the file), else from `metadata["lora"]`, else alpha = r (diffusers' default).

    `source` (the file the state dict was read from) only makes errors name it.

    Raises:
        ValueError: If the state dict holds no UNet LoRA weights, holds text-encoder or DoRA weights, a layer
            lacks one of its two factors, or a tensor or a layer's scale is NaN or infinite.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    metadata = metadata or {}
    _check_finite_tensors(state, f"Expert {name!r}" + (f" ({source})" if source else ""))
    text_encoder = sorted(key for key in state if key.startswith(("text_encoder", "te_", "lora_te")))
    if text_encoder:
        raise ValueError(
            f"Expert {name!r} has text-encoder LoRA weights ({text_encoder[0]}, ...); merging handles UNet LoRAs "
            "(what `safety-dpo train` writes) only."
        )
    state, network_alphas = _from_other_formats(state, name)
    state = {key.removeprefix("unet."): value for key, value in state.items()}
    if not any("lora" in key for key in state):
        sample = ", ".join(sorted(state)[:3]) or "no keys at all"
        raise ValueError(
            f"Expert {name!r} holds no LoRA weights (keys like '<layer>.lora_A.weight'); found {sample}. Pass a "
            "diffusers-format LoRA (pytorch_lora_weights.safetensors), not a model checkpoint."
        )
    alphas = {key.removesuffix(".alpha"): float(value) for key, value in state.items() if key.endswith(".alpha")}
    alphas.update(network_alphas)
    state = convert_unet_state_dict_to_peft({key: value for key, value in state.items() if not key.endswith(".alpha")})
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key and key.endswith(".weight"):
                factors.setdefault(key.split(marker)[0], {})[part] = value
                break
        else:
            raise ValueError(
                f"Expert {name!r} has a weight merging does not handle: {key!r} (only plain LoRA factors "
                "'<layer>.lora_A.weight' / '<layer>.lora_B.weight'; no DoRA, biases or embeddings)."
            )
    layers = {}
    for layer, parts in sorted(factors.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"Expert {name!r}: layer {layer!r} has {sorted(parts)} but needs lora_A and lora_B.")
        down, up = parts["lora_A"].float(), parts["lora_B"].float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"Expert {name!r}: layer {layer!r} is not a linear LoRA (lora_A {tuple(down.shape)}, lora_B "
                f"{tuple(up.shape)}); merging handles linear layers only."
            )
        rank = down.shape[0]
        alpha = alphas.get(layer, _configured_alpha(layer, rank, lora_config, metadata))
        layers[layer] = ((up * (alpha / rank)).contiguous(), down.contiguous())
    expert = LoraExpert(name=name, layers=layers, metadata=metadata)
    check_finite(expert)  # a NaN or huge alpha (from the PEFT config or safety_dpo.json) folded into `up`
    return expert


def check_finite(expert: LoraExpert) -> None:
    """Raise if a factor of the expert holds NaN or infinite values (in float32, with the LoRA scale folded in).

    Such an adapter turns every image it touches black (NaN latents), which would read as "nothing unsafe drawn".

    Raises:
        ValueError: Naming the expert, the first broken layer and its factor.
    """
    for layer, (up, down) in expert.layers.items():
        for factor, tensor in (("up (lora_B, scale folded in)", up), ("down (lora_A)", down)):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"Expert {expert.name!r}: layer {layer!r} {factor} holds {_non_finite_summary(tensor)}; the "
                    "adapter is broken (a diverged training run or a damaged file), and would draw black images. "
                    "Retrain or re-download it."
                )


def _check_finite_tensors(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the first floating-point tensor (in the state dict's order) that holds NaN or infinite values."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{what}: tensor {key!r} holds {_non_finite_summary(value)}; the adapter is broken (a diverged "
                "training run or a damaged file), and would draw black images. Retrain or re-download it."
            )


def _non_finite_summary(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    infinite = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {infinite} infinite values (of {tensor.numel()})"


def _from_other_formats(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Kohya-style ("lora_unet_*") and attention-processor ("*.processor.to_q_lora.down.weight") LoRAs in diffusers'
    keys, with their alphas by layer, through diffusers' `lora_state_dict` (the conversion `load_lora_weights` uses).
    Other state dicts pass through unchanged."""
    if not any(key.startswith("lora_unet_") or ".processor." in key for key in state):
        return state, {}
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        converted, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(
            f"Expert {name!r} looks like a Kohya or attention-processor LoRA, but diffusers cannot convert it "
            f"({error}); save it in diffusers' format (pipe.load_lora_weights, then pipe.save_lora_weights) first."
        ) from error
    alphas = {}
    for key, alpha in (network_alphas or {}).items():  # "unet.<module>.processor.to_q_lora.down.weight.alpha"
        weight_key = key.removesuffix(".alpha").removeprefix("unet.")
        weight_key = weight_key if weight_key.endswith(".weight") else f"{weight_key}.weight"
        (peft_key,) = convert_unet_state_dict_to_peft({weight_key: torch.zeros(())})
        alphas[peft_key.split(".lora_")[0]] = float(alpha)
    return converted, alphas


def check_compatible(experts: list[LoraExpert]) -> None:
    """Raise if the experts cannot be merged: different architectures or base UNets (fingerprints), or different
    shapes of a layer they both target. A different `base_model` name with the same fingerprint warns; different
    targeted layers are fine (each layer is merged among the experts that target it).

    Raises:
        ValueError: Naming the first expert that differs from the first one, and how.
    """
    first = experts[0]
    for other in experts[1:]:
        for key, what in (("architecture", "architecture"), ("unet_config_sha256", "base UNet (fingerprint)")):
            mine, theirs = first.metadata.get(key), other.metadata.get(key)
            if mine and theirs and mine != theirs:
                raise ValueError(
                    f"Expert {other.name!r} was trained on a different {what} than {first.name!r} ({key}: {theirs!r} "
                    f"vs {mine!r}); only experts of the same base model can be merged."
                )
        mine, theirs = first.metadata.get("base_model"), other.metadata.get("base_model")
        if mine and theirs and mine != theirs:
            logger.warning(
                "Experts %r and %r name different base models (%s, %s) with the same UNet layout; merging them anyway.",
                first.name,
                other.name,
                mine,
                theirs,
            )
    shapes: dict[str, tuple[int, int, str]] = {}  # layer -> (in, out, the first expert that targets it)
    for expert in experts:
        for layer, (up, down) in expert.layers.items():
            features_in, features_out, owner = shapes.setdefault(layer, (down.shape[1], up.shape[0], expert.name))
            if (down.shape[1], up.shape[0]) != (features_in, features_out):
                raise ValueError(
                    f"Expert {expert.name!r}: layer {layer!r} maps {down.shape[1]} -> {up.shape[0]} features "
                    f"but {owner!r}'s maps {features_in} -> {features_out}; the experts come from different models."
                )
    layer_sets = {frozenset(expert.layers) for expert in experts}
    if len(layer_sets) > 1:
        logger.info(
            "The experts target different layers (%s); each layer is merged among the experts that target it.",
            ", ".join(f"{expert.name}: {len(expert.layers)}" for expert in experts),
        )


def check_shared_initialisation(experts: list[LoraExpert]) -> None:
    """Raise unless every expert records the same initial LoRA factors (`safety_dpo.json` `lora.init_sha256`, written
    by `SafetyDPOTrainer`).

    A LoRA's factors are defined only up to a change of basis (`B R^-1`, `R A` give the same delta), so merging
    factor entries of different experts builds products `B_e[:, k] A_f[k, :]` that no expert had, unless the experts
    started from the same factors and so share their basis. This is the condition factor-wise Co-Merge needs.

    Raises:
        ValueError: Naming the first expert that records no initialisation or another one than the first expert.
    """
    if len(experts) < 2:
        return
    digests = [(expert.metadata.get("lora") or {}).get("init_sha256") for expert in experts]
    for expert, digest in zip(experts, digests, strict=True):
        if digest is None or digest != digests[0]:
            why = (
                "records no LoRA initialisation (safety_dpo.json lora.init_sha256, written by safety-dpo train)"
                if digest is None
                else f"started from other LoRA factors than {experts[0].name!r} (lora.init_sha256 differs)"
            )
            raise ValueError(
                f"granularity='lora_factor' merges the entries of the experts' LoRA factors, which is only correct "
                f"for experts trained from the same initial factors; expert {expert.name!r} {why}. Use "
                "granularity='row' (the default) or 'element', whose result depends only on each expert's delta "
                "weight, or train the experts with the same seed, rank and target modules."
            )


def _from_file(path: Path, name: str, metadata: dict[str, Any]) -> LoraExpert:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Expert {name!r}: {str(path)!r} is not a readable .safetensors file ({error}).") from error
    lora_config = None
    if "lora_adapter_metadata" in header:  # diffusers' save_lora_weights: the PEFT config, keys prefixed "unet."
        stored = json.loads(header["lora_adapter_metadata"])
        lora_config = {key.removeprefix("unet."): value for key, value in stored.items() if key.startswith("unet.")}
    return expert_from_state_dict(
        state, name=name, metadata=metadata, lora_config=lora_config, source=f"weight file {str(path)!r}"
    )


def _configured_alpha(layer: str, rank: int, lora_config: dict | None, metadata: dict[str, Any]) -> float:
    if lora_config:
        for pattern, alpha in (lora_config.get("alpha_pattern") or {}).items():
            if layer == pattern or layer.endswith(f".{pattern}"):
                return float(alpha)
        if lora_config.get("lora_alpha") is not None:
            return float(lora_config["lora_alpha"])
    lora = metadata.get("lora") or {}
    if isinstance(lora.get("alpha"), (int, float)) and lora.get("rank") == rank:
        return float(lora["alpha"])
    return float(rank)


def _read_json(path: Path) -> dict[str, Any]:
    from safety_dpo.trainer.adapter_io import read_json_file

    return read_json_file(path) or {}
