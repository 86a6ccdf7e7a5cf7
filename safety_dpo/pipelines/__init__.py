"""Inference: SafetyAdapterMixin and the safe Stable Diffusion pipelines."""
