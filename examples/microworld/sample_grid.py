"""A picture of what a microworld checkpoint draws: for each prompt, the render (ground truth) and samples.

    python examples/microworld/sample_grid.py --checkpoint DIR --output docs/figures/microworld_samples.png

Each row is one test-split prompt: the first column is the renderer's image (seed 0), the next columns what
the checkpoint draws with the protocol's seeds. Images are enlarged 4x with nearest-neighbour sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline
from PIL import Image

from safety_dpo.microworld import load_protocol, render, sample_prompts
from safety_dpo.microworld.evaluate import generate_images

SCALE = 4
GAP = 4


def sample_grid(pipe, prompts: list[str], seeds: tuple[int, ...], protocol) -> Image.Image:
    size = protocol.resolution * SCALE
    grid = Image.new("RGB", ((len(seeds) + 1) * (size + GAP), len(prompts) * (size + GAP)), "white")
    generated = generate_images(pipe, prompts, seeds, protocol, batch_size=16, progress=False)
    for row, prompt in enumerate(prompts):
        tiles = [render(prompt, seeds[0], protocol.resolution)] + generated[row * len(seeds) : (row + 1) * len(seeds)]
        for column, tile in enumerate(tiles):
            grid.paste(
                tile.resize((size, size), Image.Resampling.NEAREST), (column * (size + GAP), row * (size + GAP))
            )
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--output", default="docs/figures/microworld_samples.png")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    from safety_dpo.microworld.checkpoint import checkpoint_path

    checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoint_path()
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    protocol = load_protocol(checkpoint)
    half = args.rows // 2
    items = sample_prompts("unsafe", "test", half, seed=3) + sample_prompts(
        "neutral", "test", args.rows - half, seed=3
    )
    prompts = [item.prompt for item in items]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, prompts, protocol.seeds, protocol).save(args.output)
    for row, prompt in enumerate(prompts):
        print(f"row {row + 1}: {prompt}")


if __name__ == "__main__":
    main()
