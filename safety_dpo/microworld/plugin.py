"""The microworld as a plug-in world: the pieces `safety_dpo.worlds` hands to the library when no model is named.

`safety_dpo.worlds` registers `MICROWORLD` by its import path ("safety_dpo.microworld.plugin:MICROWORLD") as the
built-in default; nothing below the top of the library imports this package.
"""

from safety_dpo.microworld.checkpoint import load_pipeline
from safety_dpo.microworld.evaluate import prompt_fidelity, protocol_prompts
from safety_dpo.microworld.grammar import compose_pair, parse_prompt, to_safe_prompt
from safety_dpo.microworld.judge import JUDGE_WEIGHTS_NAME, Judge, default_judge_path, load_judge
from safety_dpo.microworld.metrics import agreement_with_reference
from safety_dpo.microworld.protocol import load_protocol
from safety_dpo.microworld.renderer import RESOLUTION, render
from safety_dpo.microworld.world import taxonomy
from safety_dpo.worlds import MICROWORLD_NAME, World

MICROWORLD = World(
    name=MICROWORLD_NAME,
    load_pipeline=load_pipeline,
    taxonomy=taxonomy,
    load_protocol=load_protocol,
    protocol_prompts=protocol_prompts,
    to_safe_prompt=to_safe_prompt,
    parse_prompt=parse_prompt,
    compose_pair=compose_pair,
    judge_class=Judge,
    load_judge=load_judge,
    default_judge_path=default_judge_path,
    judge_weights_name=JUDGE_WEIGHTS_NAME,
    resolution=RESOLUTION,
    render=render,
    prompt_fidelity=prompt_fidelity,
    agreement_with_reference=agreement_with_reference,
)
