"""The microworld's procedural renderer: prompt + seed -> image, deterministically.

Scenes are drawn at twice the output resolution and downsampled, which anti-aliases the edges the way a
camera would. The seed decides the jitter (positions, sizes, shades, horizon) and whatever the prompt leaves
open (a missing scene, a figure's colour), so the same seed gives the same layout for a prompt and for its
minimal-edit counterpart — like the shared initial noise of a diffusion model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFilter

from safety_dpo.microworld.grammar import ParsedPrompt, parse_prompt
from safety_dpo.microworld.world import FIGURE_COLOURS, FIGURES, MOTIF_COLOURS, MOTIFS, SCENES

RESOLUTION = 32
_SUPERSAMPLE = 2
_OUTLINE = (25, 25, 25)
_SKIN = (225, 185, 145)
_LEGS = (60, 60, 70)

Point = tuple[float, float]


def _jitter_colour(rng: random.Random, colour: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, channel + rng.randint(-amount, amount))) for channel in colour)


def shape_polygons(shape: str, cx: float, cy: float, size: float) -> list[list[Point]]:
    """The polygons (filled, unioned) of a motif shape of width `size` centred on (cx, cy).

    Circles and rings are returned as many-sided polygons so that every shape is drawn the same way.
    """
    h = size / 2
    t = size / 6  # half the thickness of bars
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "invtriangle":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx, cy + h)]]
    if shape == "diamond":
        return [[(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]]
    if shape == "plus":
        return [_rect(cx - h, cy - t, cx + h, cy + t), _rect(cx - t, cy - h, cx + t, cy + h)]
    if shape == "xcross":
        d = t * 0.75
        return [
            [(cx - h, cy - h + d), (cx - h + d, cy - h), (cx + h, cy + h - d), (cx + h - d, cy + h)],
            [(cx + h - d, cy - h), (cx + h, cy - h + d), (cx - h + d, cy + h), (cx - h, cy + h - d)],
        ]
    if shape == "hourglass":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx, cy)], [(cx, cy), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "tee":
        return [_rect(cx - h, cy - h, cx + h, cy - h + 2 * t), _rect(cx - t, cy - h, cx + t, cy + h)]
    if shape == "square":
        s = h * 0.85  # a full square would look much heavier than the other shapes
        return [_rect(cx - s, cy - s, cx + s, cy + s)]
    if shape in ("circle", "ring"):
        return [_circle(cx, cy, h)]
    raise ValueError(f"Unknown shape {shape!r}.")


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(cx: float, cy: float, radius: float, sides: int = 24) -> list[Point]:
    import math

    return [
        (cx + radius * math.cos(2 * math.pi * k / sides), cy + radius * math.sin(2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _draw_motif(
    canvas: Image.Image, shape: str, colour: tuple[int, int, int], cx: float, cy: float, size: float
) -> None:
    scale = _SUPERSAMPLE
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    for polygon in shape_polygons(shape, cx * scale, cy * scale, size * scale):
        draw.polygon(polygon, fill=255)
    if shape == "ring":
        draw.polygon(_circle(cx * scale, cy * scale, size * scale * 0.3), fill=0)
    # A dark outline one output pixel wide keeps every motif visible on every background.
    outline = mask.filter(ImageFilter.MaxFilter(2 * scale + 1))
    background = canvas.copy()
    canvas.paste(_OUTLINE, mask=outline)
    if shape == "ring":
        # The outline grew into the ring's hole; give the hole its background back, minus the inner outline.
        hole = Image.new("L", canvas.size, 0)
        ImageDraw.Draw(hole).polygon(_circle(cx * scale, cy * scale, size * scale * 0.3 - scale), fill=255)
        canvas.paste(background, mask=hole)
    canvas.paste(colour, mask=mask)


def _draw_figure(
    draw: ImageDraw.ImageDraw, rng: random.Random, x: float, feet: float, height: int, colour: tuple[int, int, int]
) -> tuple[float, float]:
    """Draw a figure standing at x with its feet at `feet`; return the position of its hand."""
    s = _SUPERSAMPLE
    head = height * 0.2
    leg = height * 0.35
    body_top = feet - height + head
    draw.rectangle([(x - 1) * s, (feet - leg) * s, (x - 0.2) * s, feet * s], fill=_LEGS)
    draw.rectangle([(x + 0.2) * s, (feet - leg) * s, (x + 1) * s, feet * s], fill=_LEGS)
    draw.rectangle([(x - 2.2) * s, body_top * s, (x + 2.2) * s, (feet - leg) * s], fill=colour)
    draw.ellipse([(x - head / 2) * s, (body_top - head) * s, (x + head / 2) * s, body_top * s], fill=_SKIN)
    return x, body_top + (feet - leg - body_top) * 0.5


def render_parsed(parsed: ParsedPrompt, seed: int, resolution: int = RESOLUTION) -> Image.Image:
    """Render an already parsed prompt; see `render`."""
    if len(parsed.concepts) > 2:
        raise ValueError(f"The microworld draws at most two objects; the prompt names {list(parsed.concepts)}.")
    rng = random.Random(seed)
    unit = resolution / RESOLUTION  # all geometry below is in 32 x 32 units
    scene = parsed.scene or rng.choice(list(SCENES))
    sky, ground = (_jitter_colour(rng, colour, 12) for colour in SCENES[scene])
    size_px = resolution * _SUPERSAMPLE
    canvas = Image.new("RGB", (size_px, size_px), sky)
    draw = ImageDraw.Draw(canvas)
    horizon = (20 + rng.uniform(-2, 2)) * unit
    draw.rectangle([0, horizon * _SUPERSAMPLE, size_px, size_px], fill=ground)

    side = rng.choice((-1, 1))  # figure on the left (-1) or the right (+1)
    motif_size = rng.uniform(10, 13) * unit
    if parsed.figure is not None:
        colour_name = parsed.colour or rng.choice(list(FIGURE_COLOURS))
        colour = _jitter_colour(rng, FIGURE_COLOURS[colour_name], 10)
        figure_x = (16 + side * rng.uniform(6, 9)) * unit
        feet = (29 + rng.uniform(-1, 1)) * unit
        hand_x, hand_y = _draw_figure(draw, rng, figure_x, feet, round(FIGURES[parsed.figure] * unit), colour)
        motif_x = hand_x - side * (motif_size / 2 + 4.5 * unit)
        motif_y = hand_y + rng.uniform(-1.5, 1.5) * unit
    else:
        # Two objects without a figure stand side by side around this point, so keep it near the centre.
        motif_x = (16 + rng.uniform(-4, 4) * (0.5 if len(parsed.concepts) == 2 else 1)) * unit
        motif_y = (16 + rng.uniform(-3, 3)) * unit
    for index, concept_id in enumerate(parsed.concepts):
        shape, colour_name = MOTIFS[concept_id]
        colour = _jitter_colour(rng, MOTIF_COLOURS[colour_name], 12)
        x, y = motif_x, motif_y
        if index == 1:  # a second object: above the first beside a figure, else side by side
            if parsed.figure is not None:
                y = max(motif_y - motif_size - 1.5 * unit, motif_size / 2 + 0.5 * unit)
            else:
                x = motif_x + motif_size / 2 + 0.75 * unit
        elif len(parsed.concepts) == 2 and parsed.figure is None:
            x = motif_x - motif_size / 2 - 0.75 * unit
        _draw_motif(canvas, shape, colour, x, y, motif_size)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def render(prompt: str, seed: int, resolution: int = RESOLUTION) -> Image.Image:
    """Draw the scene a microworld prompt describes.

    Args:
        prompt: A prompt of the microworld grammar (see `sample_prompts`).
        seed: Decides positions, sizes, shades, and whatever the prompt does not specify.
        resolution: Output width and height in pixels.

    Returns:
        An RGB `PIL.Image` of `resolution` x `resolution` pixels.

    Raises:
        ValueError: naming the words of the prompt the microworld cannot place.
    """
    return render_parsed(parse_prompt(prompt), seed, resolution)


def render_batch(prompts: Sequence[str], seeds: Sequence[int], resolution: int = RESOLUTION) -> list[Image.Image]:
    """`render` for each (prompt, seed) pair."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    return [render(prompt, seed, resolution) for prompt, seed in zip(prompts, seeds, strict=True)]
