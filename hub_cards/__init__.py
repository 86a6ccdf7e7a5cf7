"""Jinja templates for the model and dataset cards that `safety_dpo.hub` renders (installed as `safety_dpo.hub_cards`).

- `adapter_card.md`: the model card of a SafetyDPO safety LoRA.
- `coprov2_card.md`: the dataset card of a CoProV2-style preference dataset.

Templates follow `huggingface_hub`'s card templates: they start with the YAML block `---\\n{{ card_data }}\\n---`
and every other variable is optional.
"""
