"""`SafetyAdapterMixin`: `pipe.load_safety_adapter("org/adapter")` for any Stable Diffusion 1.x/2.x or SDXL pipeline.

A safety adapter is a UNet LoRA (a SafetyDPO expert or a Co-Merge adapter, or any diffusers-format UNet LoRA).
Unfused, it is loaded through diffusers' PEFT LoRA loading as a named adapter and composes with the user's other
LoRAs, each with its own weight. Fused (`fuse=True`), `scale * B @ A` is added to the base weights directly: no PEFT
wrapper stays in the UNet, so inference costs exactly what the base model costs; a CPU copy of the touched weights is
kept so that unloading restores them bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

Architecture = Literal["sd", "sdxl"]
_ARCHITECTURE_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL"}
_PIPELINES = {"sd": "StableDiffusionSafePipeline", "sdxl": "StableDiffusionXLSafePipeline"}


@dataclass
class SafetyAdapterState:
    """What the pipeline remembers of one loaded safety adapter."""

    name: str
    source: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (up with the scale folded in, down)
    metadata: dict[str, Any]
    scale: float
    fused: bool
    original_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # fused only: CPU copies
    # unfused only: diffusers' PEFT injection freezes every UNet parameter; unloading gives the flags back
    requires_grad: list[tuple[torch.nn.Parameter, bool]] = field(default_factory=list)


class SafetyAdapterMixin:
    """Adds `load_safety_adapter`, `unload_safety_adapter`, `set_safety_scale` and `safety_adapters` to a diffusers
    pipeline with a `unet` and diffusers' LoRA loading (`load_lora_weights`, `set_adapters`, `delete_adapters`).

    The mixin has no `__init__`; its state lives in `_safety_adapter_states`, created on first use.
    """

    # ---------------------------------------------------------------------------------------------- public API
    def load_safety_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        adapter_name: str = "safety",
        weight_name: str | None = None,
        scale: float = 1.0,
        fuse: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Load a safety adapter into the UNet.

        Args:
            pretrained_model_name_or_path_or_dict: A Hub id, a local folder, a `.safetensors` file, or a UNet LoRA
                state dict.
            adapter_name: The adapter's name, as in `set_adapters`; it must not be in use.
            weight_name: The weight file in a folder or repo; None: the one `safety_dpo.json` names, or
                `pytorch_lora_weights.safetensors`.
            scale: The adapter's weight, a finite number (1.0: as trained; 0.0: no effect).
            fuse: Add the adapter to the base weights: zero inference overhead, scale fixed until
                `set_safety_scale` re-fuses it.
            **hub_kwargs: `huggingface_hub` download arguments (`revision`, `token`, `cache_dir`, ...).

        Raises:
            ValueError: If the adapter is not a UNet LoRA, is a pickle file, holds NaN or infinite values or values
                too large for the UNet's dtype at this scale, was made for another architecture (SD 1.x/2.x vs SDXL)
                or other layer shapes, if its weight file lies outside its folder, if `scale` is not a finite
                number, or if `adapter_name` is taken.
            FileNotFoundError: If the source or `weight_name` cannot be found.

        A base-model fingerprint that differs from this pipeline's UNet (an adapter trained on another checkpoint of
        the same architecture) only warns.
        """
        from safety_dpo.merging.experts import load_expert

        scale = _finite_scale(scale)
        states = self._safety_states()
        if adapter_name in states or adapter_name in self._peft_adapter_names():
            raise ValueError(
                f"adapter_name={adapter_name!r} is already loaded; unload it first or choose another adapter_name."
            )
        source = pretrained_model_name_or_path_or_dict
        label = "a state dict" if isinstance(source, dict) else repr(str(source))
        try:
            adapter = load_expert(source, weight_name=weight_name, **hub_kwargs)
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
        )
        if fuse:
            self._fuse(state)  # checks each fused weight against the UNet's dtype
        else:
            self._check_range(state)
            weights = self._active_adapter_weights()
            state.requires_grad = [(parameter, parameter.requires_grad) for parameter in self.unet.parameters()]
            lora = {}
            for layer, (up, down) in adapter.layers.items():  # the scale is folded in: diffusers' alpha = r
                lora[f"unet.{layer}.lora_A.weight"] = down
                lora[f"unet.{layer}.lora_B.weight"] = up
            self.load_lora_weights(lora, adapter_name=adapter_name)
            weights[adapter_name] = scale
            self.set_adapters(list(weights), list(weights.values()))
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
            state = states.pop(name)
            if state.fused:
                self._restore(state)
                continue
            weights = self._active_adapter_weights()
            weights.pop(name, None)
            self.delete_adapters(name)
            if not self._peft_adapter_names():
                self.unload_lora_weights()  # no LoRA left: take the PEFT wrappers out as well
            elif weights:
                self.set_adapters(list(weights), list(weights.values()))
            for parameter, requires_grad in state.requires_grad:
                parameter.requires_grad_(requires_grad)

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
            previous, state.scale = state.scale, scale
            if state.fused:
                self._restore(state)
                try:
                    self._fuse(state)
                except ValueError:
                    state.scale = previous  # `_fuse` put the base weights back; fuse the old scale again
                    self._fuse(state)
                    raise
            else:
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

    # ---------------------------------------------------------------------------------------------- internals
    def _safety_states(self) -> dict[str, SafetyAdapterState]:
        if "_safety_adapter_states" not in self.__dict__:
            self.__dict__["_safety_adapter_states"] = {}
        return self.__dict__["_safety_adapter_states"]

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

    def _fuse(self, state: SafetyAdapterState) -> None:
        """Add `scale * up @ down` to each layer's weight; if a fused weight leaves the range of the weight's dtype
        (it would turn into inf, and the images black), put every weight back and raise."""
        try:
            for layer, (up, down) in state.layers.items():
                weight = self._linear(layer).weight
                state.original_weights.setdefault(layer, weight.detach().to("cpu", copy=True))
                with torch.no_grad():
                    delta = (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)) * state.scale
                    fused = weight.float() + delta  # (out, in)
                    largest = float(fused.abs().max())
                    if weight.is_floating_point() and not largest <= torch.finfo(weight.dtype).max:  # NaN fails too
                        raise ValueError(self._overflow_message(state, layer, weight.dtype, largest, "fused weight"))
                    weight.copy_(fused.to(weight.dtype))
        except ValueError:
            self._restore(state)
            raise

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

    def _restore(self, state: SafetyAdapterState) -> None:
        with torch.no_grad():
            for layer, original in state.original_weights.items():
                weight = self._linear(layer).weight
                weight.copy_(original.to(weight.device))
        state.original_weights.clear()

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
