"""The methods SafetyDPO is compared with, run through the same data, pipelines and evaluation.

- `esd`: ESD-u (Gandikota et al., ICCV 2023), fine-tuning the UNet's non-cross-attention layers towards the frozen
  model's negatively guided prediction; saved as a diffusers-format LoRA.
- `uce`: UCE (Gandikota et al., WACV 2024), a closed-form edit of the cross-attention key/value projections; saved as
  a diffusers-format LoRA that reproduces the edit exactly.
- `sld`: Safe Latent Diffusion (Schramowski et al., CVPR 2023), safety guidance at inference time with the paper's
  presets; a sampling method, not an adapter.

ESD-u and UCE write an adapter folder that `pipe.load_safety_adapter(folder)`, `run_evaluation(safety_adapter=...)`
and stock diffusers' `pipe.load_lora_weights(folder)` read like any SafetyDPO adapter (`saving.py`).
"""
