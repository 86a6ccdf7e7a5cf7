"""`MergedAdapter`: the result of `co_merge`, saved as a diffusers-format LoRA with `safety_dpo.json` and a card.

```
ADAPTER_DIR/
  pytorch_lora_weights.safetensors   pipe.load_lora_weights(ADAPTER_DIR) in stock diffusers (scale folded in: alpha = r)
  safety_dpo.json                    kind "merged", base model and fingerprint, merged_from, merge_config, merge_report
  README.md                          the adapter card (hub_cards/adapter_card.md)
```
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safety_dpo.merging.config import CoMergeConfig
from safety_dpo.trainer.adapter_io import LORA_WEIGHT_NAME, write_metadata


@dataclass
class MergedAdapter:
    """A merged safety adapter: one LoRA `(up, down)` per layer whose product is the merged delta weight.

    Args:
        layers: UNet module name -> (up (out, r), down (r, in)); the LoRA scale is 1 (alpha = r).
        config: The merge configuration.
        merged_from: One entry per expert: its `name`, `categories` and `weight`.
        metadata: What the experts agree on: `base_model`, `unet_config_sha256`, `architecture`, `categories`,
            `concepts`, `dataset`, `target_modules`.
        report: The merge's diagnostics: each expert's share of the weights it won, and per layer the relative
            error of the SVD re-factorisation (when there was one).
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: CoMergeConfig
    merged_from: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def delta(self, layer: str) -> torch.Tensor:
        """The merged delta weight of one layer, (out, in)."""
        up, down = self.layers[layer]
        return up @ down

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers' format ("unet.<layer>.lora_A.weight" / "...lora_B.weight")."""
        state = {}
        for layer, (up, down) in self.layers.items():
            state[f"unet.{layer}.lora_A.weight"] = down.contiguous()
            state[f"unet.{layer}.lora_B.weight"] = up.contiguous()
        return state

    def adapter_metadata(self) -> dict[str, Any]:
        """What `safety_dpo.json` says of this adapter."""
        ranks = sorted({down.shape[0] for _, down in self.layers.values()})
        return {
            "kind": "merged",
            **self.metadata,
            "lora": {"rank": max(ranks), "ranks": ranks, "alpha": None, "scale": 1.0},  # alpha = r in every layer
            "merged_from": self.merged_from,
            "merge_config": self.config.to_dict(),
            "merge_report": self.report,
        }

    def check_finite(self) -> None:
        """Raise ValueError naming the first layer whose merged weights are NaN or infinite."""
        for layer, (up, down) in self.layers.items():
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise ValueError(
                    f"The merged weights of layer {layer!r} are not finite (NaN or inf); refusing to save. Check the "
                    f"experts {[entry['name'] for entry in self.merged_from]} for non-finite weights, or their weights."
                )

    def save_pretrained(self, save_directory: str | os.PathLike, repo_id: str | None = None) -> Path:
        """Write the LoRA weights, `safety_dpo.json` and the card into `save_directory`, each file atomically.

        Raises:
            ValueError: If a merged layer is not finite (nothing is written then).
        """
        from safetensors.torch import save_file

        self.check_finite()
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{LORA_WEIGHT_NAME}.tmp-{os.getpid()}"
        save_file(self.state_dict(), str(temporary), metadata={"format": "pt"})
        os.replace(temporary, directory / LORA_WEIGHT_NAME)
        metadata = self.adapter_metadata()
        write_metadata(directory, metadata)
        self._card(metadata, repo_id, save_directory).save(str(directory / "README.md"))
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload merged SafetyDPO adapter",
    ) -> str:
        """Save into a temporary folder and upload it to `repo_id` in one commit; returns the commit URL."""
        from safety_dpo.hub import push_folder

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    def _card(self, metadata: dict[str, Any], repo_id: str | None, directory: str | os.PathLike):
        from safety_dpo.hub import hub_id_or_none, markdown_code, render_model_card

        base_model = metadata.get("base_model")
        on_hub = hub_id_or_none(base_model) is not None
        sources = ", ".join(markdown_code(entry["name"]) for entry in self.merged_from)
        dataset = hub_id_or_none(metadata.get("dataset"))
        return render_model_card(
            repo_id=repo_id,
            base_model=base_model if on_hub else None,
            base_model_source=base_model,
            adapter_source=repo_id or str(directory),  # the Hub repo once pushed, else the folder it was saved to
            datasets=[dataset] if dataset else None,
            model_name="SafetyDPO merged safety adapter",
            description=f"Merged by {self.config.describe()} from {len(self.merged_from)} experts: {sources}."
            + ("" if on_hub else f" Base model: {markdown_code(base_model)}."),
            categories=metadata.get("categories"),
            concepts=metadata.get("concepts") or None,
            weight_name=LORA_WEIGHT_NAME,
            merge_config={key: value for key, value in self.config.to_dict().items() if value is not None},
        )
