"""`SafetyAdapterMixin`: `pipe.load_safety_adapter("org/adapter")` for any Stable Diffusion 1.x/2.x or SDXL pipeline.

A safety adapter is a UNet LoRA (a SafetyDPO expert or a Co-Merge adapter, or any diffusers-format UNet LoRA).
Unfused, it is loaded through diffusers' PEFT LoRA loading as a named adapter and composes with the user's other
LoRAs, each with its own weight. Fused (`fuse=True`), `scale * B @ A` is added to the base weights directly: no PEFT
wrapper stays in the UNet, so inference costs exactly what the base model costs; a CPU copy of each touched weight
as it was before any safety adapter was fused into it is kept, so that unloading the last one restores it bit for
bit, and unloading one of several leaves exactly the others' change.

diffusers' own LoRA methods see safety adapters: `fuse_lora` fuses them this way, `unfuse_lora` turns them back
into unfused adapters, `unload_lora_weights` and `delete_adapters` remove them, and `save_pretrained` writes a folder
that stock `DiffusionPipeline.from_pretrained` loads (the folder's layout: saved_folder.py).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Iterable
from typing import Any, Literal

import torch

from safety_dpo.merging.experts import load_expert
from safety_dpo.pipelines.adapter_state import SafetyAdapterState
from safety_dpo.pipelines.saved_folder import saved_form

logger = logging.getLogger(__name__)

Architecture = Literal["sd", "sdxl"]
_ARCHITECTURE_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL"}
_PIPELINES = {"sd": "StableDiffusionSafePipeline", "sdxl": "StableDiffusionXLSafePipeline"}

HUB_ARGUMENTS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")

Term = tuple[torch.Tensor, torch.Tensor, float]  # one fused adapter's share of a layer: (up, down, scale)


class SafetyAdapterMixin:
    """Adds `load_safety_adapter`, `unload_safety_adapter`, `set_safety_scale` and `safety_adapters` to a diffusers
    pipeline with a `unet` and diffusers' LoRA loading (`load_lora_weights`, `set_adapters`, `delete_adapters`), and
    makes its `fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `delete_adapters` and `save_pretrained` handle
    safety adapters.

    The mixin has no `__init__`; its state lives in `_safety_adapter_states` and `_safety_fused_bases`, created on
    first use.
    """

    # ---------------------------------------------------------------------------------------------- public API
    def load_safety_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        adapter_name: str = "safety",
        weight_name: str | None = None,
        scale: float = 1.0,
        fuse: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        force_download: bool | None = None,
        **unexpected: Any,
    ) -> None:
        """Load a safety adapter into the UNet.

        Args:
            pretrained_model_name_or_path_or_dict: A Hub id, a local folder, a `.safetensors` file, or a UNet LoRA
                state dict.
            adapter_name: The adapter's name, as in `set_adapters`; it must not be in use.
            weight_name: The weight file in the folder or repo (or its `subfolder`), "sub/file.safetensors" allowed;
                None: the one `safety_dpo.json` names, or `pytorch_lora_weights.safetensors`. `safety_dpo.json` is
                read from the folder that holds the weight file.
            scale: The adapter's weight, a finite number (1.0: as trained; 0.0: no effect).
            fuse: Add the adapter to the base weights: zero inference overhead, scale fixed until
                `set_safety_scale` re-fuses it.
            subfolder: The adapter's folder inside the folder or repo, as in `load_lora_weights`.
            revision: The Hub revision (branch, tag or commit) to download; ignored for local sources.
            token: The Hub token (None: the logged-in one).
            cache_dir: The Hub cache folder.
            local_files_only: Use the Hub cache only, never the network.
            force_download: Download again even if the files are cached.

        Raises:
            TypeError: If an argument that `load_safety_adapter` does not take is given (the message lists those it
                takes).
            ValueError: If the adapter is not a UNet LoRA, is a pickle file, holds NaN or infinite values or values
                too large for the UNet's dtype at this scale, was made for another architecture (SD 1.x/2.x vs SDXL)
                or other layer shapes, if its weight file or `subfolder` lies outside its folder, if `subfolder` is
                given for a file or state dict, if `scale` is not a finite number, or if `adapter_name` is taken.
            FileNotFoundError: If the source, `subfolder` or `weight_name` cannot be found.

        A base-model fingerprint that differs from this pipeline's UNet (an adapter trained on another checkpoint of
        the same architecture) only warns.
        """
        if unexpected:
            raise TypeError(
                f"load_safety_adapter() got unexpected keyword argument(s) {sorted(unexpected)}; it takes "
                "adapter_name, weight_name, scale, fuse and the download arguments of diffusers' load_lora_weights: "
                f"{', '.join(HUB_ARGUMENTS)}."
            )
        scale = _finite_scale(scale)
        states = self._safety_states()
        if adapter_name in states or adapter_name in self._peft_adapter_names():
            raise ValueError(
                f"adapter_name={adapter_name!r} is already loaded; unload it first or choose another adapter_name."
            )
        source = pretrained_model_name_or_path_or_dict
        hub_kwargs = {"subfolder": subfolder, "weight_name": weight_name, "revision": revision, "token": token}
        hub_kwargs |= {"cache_dir": cache_dir, "local_files_only": local_files_only, "force_download": force_download}
        hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
        details = {key: hub_kwargs[key] for key in ("subfolder", "weight_name", "revision") if key in hub_kwargs}
        label = "a state dict" if isinstance(source, dict) else repr(str(source))
        label += "".join(f" ({key}={value!r})" for key, value in details.items() if key != "revision")
        try:
            adapter = load_expert(source, **hub_kwargs)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"Cannot load the safety adapter {label}: {error}") from error
        self._check_fits(label, adapter.layers, adapter.metadata)
        state = SafetyAdapterState(
            name=adapter_name,
            source="state dict" if isinstance(source, dict) else str(source),
            layers=adapter.layers,
            metadata=adapter.metadata,
            scale=scale,
            fused=fuse,
            details=details,
        )
        if fuse:
            self._fuse_state(state)  # checks each fused weight against the UNet's dtype
        else:
            self._check_range(state)
            self._attach_peft(state)
            states[adapter_name] = state
        logger.info(
            "Loaded safety adapter %s as %r (scale %s%s).", label, adapter_name, scale, ", fused" if fuse else ""
        )

    def unload_safety_adapter(self, adapter_name: str | None = None) -> None:
        """Remove one safety adapter (None: all of them); the pipeline draws exactly as before it was loaded.

        The user's other LoRAs stay loaded with their weights.
        """
        states = self._safety_states()
        names = list(states) if adapter_name is None else [self._known(adapter_name)]
        for name in names:
            state = states[name]
            if state.fused:
                self._unfuse_state(state, remove=True)
            else:
                states.pop(name)
                self._detach_peft(state)

    def set_safety_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Change a safety adapter's weight (None: every safety adapter). A fused adapter is re-fused.

        Raises:
            ValueError: If `scale` is not a finite number, if no (or no such) safety adapter is loaded, or if an
                adapter's weights at this scale exceed the UNet's dtype (that adapter keeps its old scale).
        """
        scale = _finite_scale(scale)
        states = self._safety_states()
        names = list(states) if adapter_name is None else [self._known(adapter_name)]
        if not names:
            raise ValueError("No safety adapter is loaded; call load_safety_adapter first.")
        for name in names:  # check every adapter before changing any
            if not states[name].fused:
                self._check_range(states[name], scale)
        weights = self._active_adapter_weights()
        for name in names:
            state = states[name]
            if state.fused:
                before = self._fused_terms(state.layers)
                previous, state.scale = state.scale, scale
                try:
                    self._write_fused(state.layers, before, state)
                except ValueError:
                    state.scale = previous  # nothing was written
                    raise
            else:
                state.scale = scale
                weights[name] = scale
        if any(not states[name].fused for name in names):
            self.set_adapters(list(weights), list(weights.values()))

    @property
    def safety_adapters(self) -> dict[str, dict[str, Any]]:
        """The loaded safety adapters: name -> source, scale, fused, and the categories they remove."""
        return {
            name: {
                "source": state.source,
                "scale": state.scale,
                "fused": state.fused,
                "categories": list(state.metadata.get("categories") or []),
            }
            for name, state in self._safety_states().items()
        }

    # ------------------------------------------------------------------ diffusers' LoRA methods, safety-aware
    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `fuse_lora`; the unfused safety adapters among `adapter_names` (None: the active adapters)
        are fused the safety adapter way (as `load_safety_adapter(..., fuse=True)`, at their scale times
        `lora_scale`), so that unloading them restores the base weights exactly."""
        arguments = _bound(super().fuse_lora, args, kwargs)
        states = self._safety_states()
        requested = arguments.get("adapter_names")
        if "unet" in (arguments.get("components") or []):
            if requested is not None:
                candidates = list(requested)
            else:
                candidates = self.get_active_adapters() if self._peft_adapter_names() else []
            for name in [name for name in candidates if name in states and not states[name].fused]:
                state = states[name]
                scale = _finite_scale(state.scale * arguments.get("lora_scale", 1.0))
                self._detach_peft(state)
                previous, state.scale = state.scale, scale
                try:
                    self._fuse_state(state)
                except ValueError:
                    state.scale = previous
                    self._attach_peft(state)
                    raise
            if requested is not None:
                requested = [name for name in requested if not (name in states and states[name].fused)]
                if not requested:
                    return  # only safety adapters were named: nothing is left for diffusers to fuse
                kwargs = {**arguments, "adapter_names": requested}
                args = ()
        super().fuse_lora(*args, **kwargs)

    def unfuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `unfuse_lora`; fused safety adapters become unfused ones at the same scale (the base weights
        come back exactly, the adapter stays loaded and active), as diffusers does with a LoRA it fused."""
        arguments = _bound(super().unfuse_lora, args, kwargs)
        super().unfuse_lora(*args, **kwargs)
        if "unet" not in (arguments.get("components") or []):
            return
        for state in [state for state in self._safety_states().values() if state.fused]:
            self._check_range(state)  # unfused, PEFT computes in the UNet's dtype; refuse before changing anything
            self._unfuse_state(state, remove=False)
            self._attach_peft(state)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `unload_lora_weights`, which also removes every safety adapter, fused ones included (their
        base weights come back exactly)."""
        self.unload_safety_adapter()
        super().unload_lora_weights(*args, **kwargs)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """diffusers' `delete_adapters`; a safety adapter among them is unloaded with `unload_safety_adapter`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        states = self._safety_states()
        for name in [name for name in names if name in states]:
            self.unload_safety_adapter(name)
        others = [name for name in names if name not in states]
        if others:
            super().delete_adapters(others)

    @property
    def fused_loras(self) -> set[str]:
        """The names of the fused LoRAs: those `fuse_lora` fused and the fused safety adapters."""
        fused = {name for name, state in self._safety_states().items() if state.fused}
        return set(super().fused_loras) | fused

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, writing a folder that stock `DiffusionPipeline.from_pretrained` loads.

        `model_index.json` names the stock pipeline class this one extends. The UNet is saved without PEFT
        wrappers: an unfused safety adapter is saved beside it, in `safety_adapters/<adapter_name>/` (a diffusers
        LoRA and its `safety_dpo.json`) and listed, with its scale, under `_safety_adapters` in `model_index.json`;
        a fused one is in the UNet's weights and recorded under `_fused_safety_adapters` in `unet/config.json`
        (its source, the sha256 of its LoRA, its scale). Other unfused LoRAs are not saved (a warning names them);
        LoRAs fused with `fuse_lora` are in the UNet's weights, as diffusers saves them. The pipeline itself is
        left as it was.

        Args:
            save_directory: The folder.
            *args: diffusers' `save_pretrained` arguments (`safe_serialization`, `variant`, `push_to_hub`, ...).
            **kwargs: As `*args`.
        """
        states = list(self._safety_states().values())
        unsaved = self._peft_adapter_names() - {state.name for state in states} - set(super().fused_loras)
        with saved_form(self, save_directory, states, sorted(unsaved)):
            super().save_pretrained(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """The configuration as diffusers writes it, with the stock pipeline's class name (`model_index.json` must
        name a class that stock diffusers can import)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = saved_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # ---------------------------------------------------------------------------------------------- internals
    def _safety_states(self) -> dict[str, SafetyAdapterState]:
        if "_safety_adapter_states" not in self.__dict__:
            self.__dict__["_safety_adapter_states"] = {}
        return self.__dict__["_safety_adapter_states"]

    def _fused_bases(self) -> dict[str, torch.Tensor]:
        """Layer -> CPU copy of its weight as it was before any safety adapter was fused into it."""
        if "_safety_fused_bases" not in self.__dict__:
            self.__dict__["_safety_fused_bases"] = {}
        return self.__dict__["_safety_fused_bases"]

    def _known(self, adapter_name: str) -> str:
        states = self._safety_states()
        if adapter_name not in states:
            raise ValueError(
                f"No safety adapter named {adapter_name!r} is loaded; loaded: {sorted(states) or 'none'}."
            )
        return adapter_name

    def _architecture(self) -> Architecture:
        return "sdxl" if getattr(self.unet.config, "addition_embed_type", None) == "text_time" else "sd"

    def _check_fits(self, label: str, layers: dict, metadata: dict[str, Any]) -> None:
        from safety_dpo.data.generation import config_digest

        mine = self._architecture()
        theirs = metadata.get("architecture")
        if theirs and theirs != mine:
            raise ValueError(
                f"The safety adapter {label} was made for {_ARCHITECTURE_NAMES.get(theirs, theirs)} (its safety_dpo.json "
                f"says architecture {theirs!r}) but this is a {_ARCHITECTURE_NAMES[mine]} pipeline "
                f"({type(self).__name__}); load it into a {_PIPELINES.get(theirs, theirs)} of its base model."
            )
        for layer, (up, down) in layers.items():
            module = self._linear(layer)
            if module is None or (module.in_features, module.out_features) != (down.shape[1], up.shape[0]):
                found = "no such layer" if module is None else f"{module.in_features} -> {module.out_features}"
                raise ValueError(
                    f"The safety adapter {label} does not fit this {_ARCHITECTURE_NAMES[mine]} pipeline's UNet: layer "
                    f"{layer!r} maps {down.shape[1]} -> {up.shape[0]} features in the adapter ({found} in the UNet). "
                    "It was made for another architecture or model size."
                )
        fingerprint = metadata.get("unet_config_sha256")
        if fingerprint and fingerprint != config_digest(self.unet):
            logger.warning(
                "The safety adapter %s was trained on %r, whose UNet configuration differs from this pipeline's; it "
                "loads, but its effect on this model was not measured.",
                label,
                metadata.get("base_model"),
            )

    def _linear(self, layer: str) -> torch.nn.Linear | None:
        try:
            module = self.unet.get_submodule(layer)
        except AttributeError:
            return None
        module = getattr(module, "base_layer", module)  # a layer wrapped by another LoRA
        return module if isinstance(module, torch.nn.Linear) else None

    # ---------------------------------------------------------------------------------------- unfused: PEFT
    def _attach_peft(self, state: SafetyAdapterState) -> None:
        """Load the adapter through diffusers as a PEFT adapter, active beside the active ones at their weights."""
        weights = self._active_adapter_weights()
        state.requires_grad = [(parameter, parameter.requires_grad) for parameter in self.unet.parameters()]
        lora = {}
        for layer, (up, down) in state.layers.items():  # the LoRA scale is folded in: diffusers' alpha = r
            lora[f"unet.{layer}.lora_A.weight"] = down
            lora[f"unet.{layer}.lora_B.weight"] = up
        self.load_lora_weights(lora, adapter_name=state.name)
        weights[state.name] = state.scale
        self.set_adapters(list(weights), list(weights.values()))

    def _detach_peft(self, state: SafetyAdapterState) -> None:
        weights = self._active_adapter_weights()
        weights.pop(state.name, None)
        super().delete_adapters(state.name)
        if not self._peft_adapter_names():
            super().unload_lora_weights()  # no LoRA left: take the PEFT wrappers out as well
        elif weights:
            self.set_adapters(list(weights), list(weights.values()))
        for parameter, requires_grad in state.requires_grad:
            parameter.requires_grad_(requires_grad)
        state.requires_grad = []

    # ----------------------------------------------------------------------------------- fused: base weights
    def _fused_terms(self, layers: Iterable[str]) -> dict[str, list[Term]]:
        """Per layer, the fused safety adapters' shares as they are recorded now, in loading order."""
        fused = [state for state in self._safety_states().values() if state.fused]
        return {
            layer: [(*state.layers[layer], state.scale) for state in fused if layer in state.layers]
            for layer in layers
        }

    def _fuse_state(self, state: SafetyAdapterState) -> None:
        """Record `state` as fused and add it to the base weights; on overflow nothing is written and `state` is
        recorded as it was."""
        states = self._safety_states()
        was_recorded, was_fused = state.name in states, state.fused
        before = self._fused_terms(state.layers)
        states[state.name], state.fused = state, True
        try:
            self._write_fused(state.layers, before, state)
        except ValueError:
            state.fused = was_fused
            if not was_recorded:
                del states[state.name]
            raise

    def _unfuse_state(self, state: SafetyAdapterState, remove: bool) -> None:
        """Take a fused adapter out of the base weights; `remove`: forget it too, else record it as unfused."""
        states = self._safety_states()
        before = self._fused_terms(state.layers)
        if remove:
            del states[state.name]
        state.fused = False
        try:
            self._write_fused(state.layers, before, state)
        except ValueError:  # only if the adapters left add up to more than the dtype holds
            states[state.name], state.fused = state, True
            raise

    def _write_fused(self, layers: Iterable[str], before: dict[str, list[Term]], changed: SafetyAdapterState) -> None:
        """Set each layer's weight to its base weight plus the fused adapters recorded now (`before`: those its
        weight holds). Every new weight is computed and checked against its dtype's range before any is written.

        A weight that still holds exactly what was last written is rebuilt from its base copy, so that removing the
        last adapter restores it bit for bit. One that changed since (a LoRA fused into it with `fuse_lora`) keeps
        that change: the old shares are subtracted and the new ones added.
        """
        bases = self._fused_bases()
        after = self._fused_terms(layers)
        writes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer in layers:
            weight = self._linear(layer).weight
            base = bases.get(layer)
            if base is None:
                base = weight.detach().to("cpu", copy=True)
            elif not torch.equal(weight, _with_terms(base.to(weight.device).float(), before[layer]).to(weight.dtype)):
                base = _with_terms(weight.float(), before[layer], sign=-1.0).to(weight.dtype).cpu()
            if not after[layer]:
                writes[layer] = (base, None)
                continue
            fused = _with_terms(base.to(weight.device).float(), after[layer])  # (out, in)
            largest = float(fused.abs().max())
            if weight.is_floating_point() and not largest <= torch.finfo(weight.dtype).max:  # NaN fails too
                raise ValueError(self._overflow_message(changed, layer, weight.dtype, largest, "fused weight"))
            writes[layer] = (fused.to(weight.dtype), base)
        with torch.no_grad():
            for layer, (new, base) in writes.items():
                weight = self._linear(layer).weight
                weight.copy_(new.to(weight.device))
                if base is None:
                    bases.pop(layer, None)
                else:
                    bases[layer] = base

    def _check_range(self, state: SafetyAdapterState, scale: float | None = None) -> None:
        """Raise if an unfused adapter's factors or delta weights at `scale` (default: its own) exceed the range of
        the layer's dtype, in which PEFT computes them.

        PEFT computes `lora_B(lora_A(x))` in that dtype before multiplying by the scale, so a scale below 1 does
        not make a too-large adapter safe: the factors and the delta are checked at `max(|scale|, 1)`. Cheap: the
        bound max|delta| <= max_i sum_k |up_ik| * max|down| costs one pass over the factors; the exact delta is
        computed only for a layer whose bound is out of range.
        """
        scale = state.scale if scale is None else scale
        magnitude = max(abs(scale), 1.0)
        for layer, (up, down) in state.layers.items():
            dtype = self._linear(layer).weight.dtype
            if not dtype.is_floating_point:
                continue
            limit = torch.finfo(dtype).max
            factors = max(float(up.abs().max()) * magnitude, float(down.abs().max()))
            if not factors <= limit:
                raise ValueError(self._overflow_message(state, layer, dtype, factors, "LoRA factor", scale))
            bound = float(up.abs().sum(dim=1).max()) * magnitude * float(down.abs().max())
            if not bound <= limit:
                largest = float((up @ down).abs().max()) * magnitude  # (out, in)
                if not largest <= limit:
                    raise ValueError(self._overflow_message(state, layer, dtype, largest, "delta weight", scale))

    @staticmethod
    def _overflow_message(
        state: SafetyAdapterState,
        layer: str,
        dtype: torch.dtype,
        largest: float,
        what: str,
        scale: float | None = None,
    ) -> str:
        return (
            f"The safety adapter {state.source!r} at scale {state.scale if scale is None else scale}: layer {layer!r} "
            f"has a {what} of magnitude {largest:.3g}, beyond {dtype}'s largest value {torch.finfo(dtype).max:.3g}; "
            "it would turn into inf and the images black. The adapter's weights are far too large (a diverged "
            "training run?); retrain it, lower the scale, or load the pipeline in a wider dtype (float32, bfloat16)."
        )

    def _peft_adapter_names(self) -> set[str]:
        listed = self.get_list_adapters() if hasattr(self, "get_list_adapters") else {}
        return {name for names in listed.values() for name in names}

    def _active_adapter_weights(self) -> dict[str, float]:
        """The active LoRA adapters and their weights (diffusers keeps them only as each layer's scaling)."""
        from peft.tuners.lora import LoraLayer

        active = self.get_active_adapters() if self._peft_adapter_names() else []
        weights: dict[str, float] = {}
        for name in active:
            weights[name] = 1.0
            for module in self.unet.modules():
                if isinstance(module, LoraLayer) and name in module.scaling and module.r.get(name):
                    weights[name] = module.scaling[name] * module.r[name] / module.lora_alpha[name]
                    break
        return weights


# -------------------------------------------------------------------------------------------------- helpers
def saved_class(cls: type) -> type:
    """The class a pipeline is saved as: the first one it extends that is not a safety_dpo class (the stock
    pipeline, or for a pipeline upgraded by `enable_safety_adapters`, its own class before the upgrade)."""
    from diffusers import DiffusionPipeline

    for candidate in cls.__mro__:
        if issubclass(candidate, DiffusionPipeline) and not issubclass(candidate, SafetyAdapterMixin):
            return candidate
    return cls


def _finite_scale(scale: Any) -> float:
    """`scale` as a float, refused unless it is a finite number (NaN or inf would turn every image black)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"scale={scale!r} is not a finite number; pass a real number such as 1.0 (the adapter as trained), 0.5 "
            "(half its effect) or 0.0 (no effect)."
        )
    return value


def _with_terms(weight: torch.Tensor, terms: list[Term], sign: float = 1.0) -> torch.Tensor:
    """`weight` (float32) plus (or minus) each `scale * up @ down`, in order."""
    for up, down, scale in terms:
        weight = weight + sign * scale * (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32))
    return weight


def _bound(method: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to one of diffusers' LoRA methods by name, defaults filled in (their defaults, such
    as `components`, differ between pipelines)."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    bound.apply_defaults()
    return {**bound.arguments.pop("kwargs", {}), **bound.arguments}
