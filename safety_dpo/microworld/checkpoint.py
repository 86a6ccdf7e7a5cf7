"""The microworld's tiny Stable Diffusion checkpoint: its vocabulary, its architecture, and where it ships.

The checkpoint is a stock diffusers `StableDiffusionPipeline` folder (safetensors), trained from scratch on
rendered scenes by `examples/microworld/train_microworld.py` and shipped inside the package, so
`StableDiffusionPipeline.from_pretrained(checkpoint_path())` works offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from safety_dpo.microworld.grammar import (
    FIGURE_PHRASES,
    FILLER_WORDS,
    TEMPLATES_WITH_FIGURE,
    TEMPLATES_WITHOUT_FIGURE,
)
from safety_dpo.microworld.world import FIGURE_COLOURS, FIGURES, SCENE_PHRASES, taxonomy

MAX_PROMPT_TOKENS = 24  # the longest grammar prompt is 16 tokens with its start and end tokens
LATENT_CHANNELS = 4
VAE_BLOCK_CHANNELS = (32, 64, 64)  # three blocks: 32 x 32 pixels -> 8 x 8 latents
TEXT_HIDDEN_SIZE = 128


def checkpoint_path() -> Path:
    """The folder of the shipped checkpoint, loadable with `StableDiffusionPipeline.from_pretrained`.

    Raises:
        FileNotFoundError: If the package was installed without it; the message says how to train one.
    """
    return _asset(
        "checkpoint",
        "model_index.json",
        "The microworld checkpoint",
        "train it with `python examples/microworld/train_microworld.py --output-dir <dir>` and load it from that folder",
    )


def microworld_vocabulary() -> list[str]:
    """Every word the prompt grammar can produce, concept names (trained and held out) included."""
    words: set[str] = set(FILLER_WORDS) | set(FIGURE_COLOURS) | set(FIGURES)
    for text in (*TEMPLATES_WITH_FIGURE, *TEMPLATES_WITHOUT_FIGURE, *FIGURE_PHRASES):
        words.update(word for word in _words(text) if not word.startswith("{"))
    for phrases in SCENE_PHRASES.values():
        for phrase in phrases:
            words.update(_words(phrase))
    for concept in taxonomy().concepts:
        words.update(concept.all_names)
    return sorted(words)


def _words(text: str) -> list[str]:
    return text.replace(",", " ").split()


def load_pipeline(path: str | os.PathLike | None = None, **kwargs):
    """Load the microworld checkpoint (the shipped one by default) as a stock `StableDiffusionPipeline`."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path or checkpoint_path(), **kwargs)


def reference_adapter_path() -> Path:
    """The folder of the microworld's reference safety adapter: the merged adapter that `safety-dpo align` (no
    arguments) writes, shipped so that `pipe.load_safety_adapter(reference_adapter_path())` works at once.

    Raises:
        FileNotFoundError: If the package was installed without it; the message says how to make it.
    """
    return _asset(
        "reference_adapter",
        "pytorch_lora_weights.safetensors",
        "The microworld's reference adapter",
        "make it with `safety-dpo align` and load OUTPUT_DIR/safety-adapter",
    )


def _asset(folder: str, marker: str, what: str, how_to_make: str) -> Path:
    """A folder shipped under assets/, checked by a file it must hold."""
    path = Path(__file__).parent / "assets" / folder
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{what} is missing from {str(path)!r}. Reinstall safety_dpo, or {how_to_make}.")
    return path
