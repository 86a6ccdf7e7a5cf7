"""Loading safety experts for merging, and checking that they can be merged.

An expert is a local folder (a `safety-dpo train` output), a `.safetensors` file, a Hub id, or a state dict. Its
UNet LoRA becomes one `(up, down)` pair per targeted layer, with the LoRA scale `alpha / r` folded into `up`, so
`up @ down` is the layer's delta weight whatever the expert's alpha was.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, METADATA_NAME, read_json_file, read_lora_file

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")  # huggingface_hub's repo cache folders


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


def load_experts(experts: list[Any], subfolder: str | None = None, **hub_kwargs: Any) -> list[LoraExpert]:
    """Load experts given as folders, `.safetensors` files, Hub ids or state dicts, and check they can be merged.

    Args:
        experts: The sources.
        subfolder: The adapter folder inside each folder or Hub repo (see `load_expert`).
        **hub_kwargs: `weight_name` and `huggingface_hub` download arguments, the same for every expert.

    Raises:
        ValueError: If no expert is given, if one is not a UNet LoRA, or if they do not fit together (see
            `check_compatible`).
        FileNotFoundError: If a path or Hub id cannot be found.
    """
    if not experts:
        raise ValueError("co_merge needs at least one expert (a folder, .safetensors file, Hub id or state dict).")
    loaded = [load_expert(expert, index, subfolder=subfolder, **hub_kwargs) for index, expert in enumerate(experts)]
    check_compatible(loaded)
    return loaded


def load_expert(
    expert: Any, index: int = 0, weight_name: str | None = None, subfolder: str | None = None, **hub_kwargs: Any
) -> LoraExpert:
    """One expert (or any UNet LoRA), from a state dict, a `.safetensors` file, a folder or a Hub id.

    Args:
        expert: The source.
        index: Its position, to name a state dict in errors.
        weight_name: The weight file inside the adapter folder, relative to it ("sub/file.safetensors" is fine);
            None: the one `safety_dpo.json` names, else `pytorch_lora_weights.safetensors`, else the folder's only
            `.safetensors` file. `safety_dpo.json` is read from the folder that holds the weight file.
        subfolder: The adapter folder inside the folder or Hub repo, relative to it, as in diffusers'
            `load_lora_weights`; None: the folder or repo itself. From the Hub, only the files needed are downloaded.
        **hub_kwargs: `huggingface_hub` download arguments.

    Raises:
        ValueError: If the source is not a UNet LoRA, is a pickle file, holds NaN or infinite values, if `subfolder`
            is given for a state dict or a file, or if `subfolder` or the weight file (`weight_name`, or the one
            `safety_dpo.json` names) lies outside the folder or repo (names are checked before any download).
        FileNotFoundError: If the source, `subfolder` or `weight_name` cannot be found.
    """
    path = Path(expert).expanduser() if isinstance(expert, (str, os.PathLike)) else None
    if subfolder is not None and (path is None or path.is_file()):
        raise ValueError(f"subfolder={subfolder!r} applies to a folder or Hub repo, not to a file or a state dict.")
    if isinstance(expert, LoraExpert):
        check_finite(expert)
        return expert
    if isinstance(expert, Mapping):
        return expert_from_state_dict(dict(expert), name=f"state dict {index}")
    if path is None:
        raise ValueError(
            f"Expert {index} is a {type(expert).__name__}; pass a folder, a .safetensors file, a Hub id or a state dict."
        )
    name = str(expert)
    if path.suffix in _PICKLE_SUFFIXES:
        raise ValueError(
            f"Expert {name!r} is a pickle file; only .safetensors weights are read (nothing is unpickled)."
        )
    if path.is_file():
        beside = read_json_file(path.parent / METADATA_NAME) if path.name == LORA_WEIGHT_NAME else None
        return _from_file(path, name, beside or {})
    folder = _adapter_folder(path, name, subfolder or None, weight_name, hub_kwargs)  # "" is no subfolder
    inner = _posix(subfolder) if subfolder else ""
    return _from_folder(folder, f"{name.rstrip('/')}/{inner}" if inner else name, weight_name)


def _adapter_folder(
    path: Path, name: str, subfolder: str | None, weight_name: str | None, hub_kwargs: dict[str, Any]
) -> Path:
    """The local folder that holds the adapter: `path` or a snapshot of the Hub repo `name`, or its `subfolder`.

    `subfolder` and `weight_name` are checked before anything is downloaded; from the Hub, only the weight file (or
    the adapter folder's `.safetensors` files) and the `safety_dpo.json` beside it are downloaded.
    """
    prefix = ""
    if subfolder is not None:
        _check_relative(subfolder, name, "subfolder")
        prefix = _posix(subfolder)
    if weight_name is not None:
        _check_relative(weight_name, name, "weight_name")
        if Path(weight_name).suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"weight_name={weight_name!r} is a pickle file; only .safetensors weights are read.")
    root, from_hub = path, not path.is_dir()
    if from_hub:
        from safety_dpo.hub import ensure_local_or_download

        weight = _posix(weight_name) if weight_name else "*.safetensors"
        patterns = [posixpath.join(prefix, weight), posixpath.join(prefix, posixpath.dirname(weight), METADATA_NAME)]
        root = ensure_local_or_download(name, allow_patterns=patterns, **hub_kwargs)
    folder = root / prefix if prefix else root
    if not folder.is_dir():
        if not from_hub:
            raise FileNotFoundError(f"{name!r} has no folder {prefix!r}.")
        wanted = f"{posixpath.join(prefix, weight_name)!r}" if weight_name else ".safetensors file"
        raise FileNotFoundError(f"The Hub repo {name!r} has no {wanted}" + (f" in {prefix!r}." if prefix else "."))
    if prefix and not folder.resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"subfolder={subfolder!r} points outside {name!r} (it resolves to {str(folder.resolve())!r}); the adapter "
            "folder must lie inside the folder or repo."
        )
    return folder


def _from_folder(folder: Path, name: str, weight_name: str | None) -> LoraExpert:
    """The adapter in `folder`: `weight_name` and the `safety_dpo.json` beside it, or the weight file that
    `folder`'s `safety_dpo.json` names (see `load_expert`)."""
    if weight_name is not None:
        weight_file = _inside(folder, weight_name, "weight_name")
        if not weight_file.is_file():
            found = ", ".join(item.name for item in sorted(folder.glob("*.safetensors"))) or "none"
            raise FileNotFoundError(
                f"{name!r} has no weight file {weight_name!r} (.safetensors files there: {found}); pass one of "
                "them as weight_name."
            )
        return _from_file(weight_file, name, read_json_file(weight_file.parent / METADATA_NAME) or {})
    metadata = read_json_file(folder / METADATA_NAME) or {}
    weight_name = metadata.get("weight_name", LORA_WEIGHT_NAME)
    _check_relative(weight_name, name, f"{METADATA_NAME} weight_name")
    weight_file = _inside(folder, weight_name, f"{METADATA_NAME} weight_name")
    if weight_file.is_file():
        return _from_file(weight_file, name, metadata)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return _from_file(_inside(folder, candidates[0].name, "the only .safetensors file"), name, metadata)
    pickles = sorted(item.name for item in folder.iterdir() if item.suffix in _PICKLE_SUFFIXES)
    found = ", ".join(item.name for item in candidates) or "none"
    raise FileNotFoundError(
        f"Expert {name!r} has no {weight_name} (.safetensors files found: {found})"
        + (f"; {pickles} are pickle files, which are never read" if pickles else "")
        + ". Pass the weight file itself, or a `safety-dpo train` output folder."
    )


def _posix(relative: str) -> str:
    """A relative path checked by `_check_relative` as the Hub writes it: "/"-separated, without "." parts."""
    return "/".join(part for part in relative.split("/") if part not in ("", "."))


def _check_relative(relative: Any, name: str, what: str) -> None:
    """Refuse a file or folder name that is not a plain relative path: absolute (POSIX or Windows) or with ".."."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"Expert {name!r}: {what}={relative!r} is not a file name; pass a path inside the folder.")
    windows = PureWindowsPath(relative)  # splits on both "/" and "\\"
    if PurePosixPath(relative).is_absolute() or windows.anchor or ".." in windows.parts:
        raise ValueError(
            f"{what}={relative!r} points outside the adapter folder or repo {name!r}: it must be a path "
            "relative to it, without '..' (e.g. 'pytorch_lora_weights.safetensors' or 'sub/file.safetensors')."
        )


def _inside(folder: Path, weight_name: str, what: str) -> Path:
    """`folder / weight_name`, refused unless it resolves (symlinks followed) inside `folder` or, for a folder in a
    Hub cache snapshot, inside that repo cache's `blobs` folder, where the snapshot's files link to."""
    candidate = folder / weight_name
    if not candidate.exists():
        return candidate  # nothing to follow: a missing file is reported as such
    resolved = candidate.resolve()
    root = folder.resolve()
    allowed = [root]
    for snapshot in (root, *root.parents):  # a Hub cache: models--org--name/snapshots/<sha>/<subfolder>
        repo_cache = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo_cache.name.startswith(_HUB_CACHE_PREFIXES):
            allowed.append(repo_cache / "blobs")
            break
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
    try:
        state, lora_config = read_lora_file(path)
    except ValueError as error:
        raise ValueError(f"Expert {name!r}: {error}") from error
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
