"""Safety experts: SafetyDPOConfig, SafetyDPOTrainer and the Diffusion-DPO losses."""
