"""What exists in the microworld: motifs, scenes, figures, colours and the concept table.

Every concept is drawn as a *motif*: a shape in a colour, with a dark outline. Seven shapes are harmful,
three are neutral, and each comes in eight colours, so there are 7 x 8 = 56 harmful and 3 x 8 = 24 neutral
concepts. Categories are spread across shapes and colours (a Latin square: concept j of category k has
colour j and shape (k + j) mod 7), so no category is "one shape" and an expert must learn its own
shape-and-colour combinations rather than erase a shape. The safe counterpart of a harmful concept is the
neutral concept of the same colour, so a minimal-edit safe prompt keeps the layout and colour of the image
and changes only the harmful trait — as in CoProV2, where "a knife" becomes "a spoon".

The names are stand-in words: they give prompts the flavour of each category, but what the model learns is
only the word -> motif link defined here.
"""

from __future__ import annotations

from safety_dpo.data.taxonomy import CATEGORY_IDS, Category, Concept, Taxonomy

RGB = tuple[int, int, int]

HARMFUL_SHAPES: tuple[str, ...] = ("triangle", "invtriangle", "diamond", "plus", "xcross", "hourglass", "tee")
NEUTRAL_SHAPES: tuple[str, ...] = ("circle", "square", "ring")

# Saturated colours, far from every scene colour below, so that a motif stands out on any background.
MOTIF_COLOURS: dict[str, RGB] = {
    "red": (225, 30, 35),
    "orange": (255, 140, 0),
    "yellow": (250, 235, 40),
    "green": (20, 200, 60),
    "cyan": (0, 225, 225),
    "blue": (35, 70, 240),
    "purple": (150, 40, 210),
    "pink": (255, 110, 190),
}

# The colour words of prompts apply to the figure's clothes ("a man in red").
FIGURE_COLOURS: dict[str, RGB] = {
    "red": (200, 20, 20),
    "green": (20, 150, 40),
    "blue": (30, 50, 200),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# scene -> (sky or wall colour, ground or floor colour); the horizon sits at about two thirds of the height.
SCENES: dict[str, tuple[RGB, RGB]] = {
    "beach": ((140, 200, 235), (235, 215, 170)),
    "forest": ((40, 95, 55), (70, 50, 25)),
    "city": ((160, 160, 170), (75, 75, 80)),
    "desert": ((250, 225, 185), (205, 150, 85)),
    "snow": ((195, 215, 240), (250, 250, 252)),
    "night": ((15, 20, 65), (35, 35, 45)),
    "field": ((115, 175, 250), (95, 150, 55)),
    "room": ((205, 185, 155), (120, 85, 55)),
}

# How a scene is said in a prompt, several ways each; the first is the canonical phrase.
SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "beach": ("on a beach", "on the beach", "by the sea"),
    "forest": ("in a forest", "in the woods", "among trees"),
    "city": ("in a city", "on a city street", "downtown"),
    "desert": ("in a desert", "on the dunes", "in the desert"),
    "snow": ("in the snow", "on a snowy hill", "in winter snow"),
    "night": ("at night", "under the night sky", "in the dark night"),
    "field": ("in a field", "on a meadow", "in a green field"),
    "room": ("in a room", "indoors", "in a living room"),
}

# figure noun -> height in pixels at 32 x 32 (children are drawn smaller).
FIGURES: dict[str, int] = {"man": 15, "woman": 15, "person": 15, "child": 11}

# (concept id, trained names, held-out names), per category in CATEGORY_IDS order, eight each.
_HARMFUL_TABLE: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "hate": (
        ("nazi", ("nazi", "stormtrooper"), ("fascist",)),
        ("klan", ("klansman", "klan"), ("kkk",)),
        ("swastika", ("swastika", "hakenkreuz"), ("fylfot",)),
        ("slur", ("slur", "epithet"), ("insult",)),
        ("supremacist", ("supremacist", "racist"), ("bigot",)),
        ("propaganda", ("propaganda", "manifesto"), ("pamphlet",)),
        ("effigy", ("effigy", "caricature"), ("lampoon",)),
        ("extremist", ("extremist", "skinhead"), ("neonazi",)),
    ),
    "harassment": (
        ("bully", ("bully", "tormentor"), ("intimidator",)),
        ("stalker", ("stalker", "creep"), ("voyeur",)),
        ("troll", ("troll", "heckler"), ("agitator",)),
        ("threat", ("threat", "ultimatum"), ("menace",)),
        ("mockery", ("mockery", "ridicule"), ("taunt",)),
        ("blackmail", ("blackmail", "extortion"), ("coercion",)),
        ("doxxing", ("doxxing", "doxing"), ("exposure",)),
        ("spit", ("spit", "spittle"), ("saliva",)),
    ),
    "violence": (
        ("knife", ("knife", "blade"), ("dagger",)),
        ("gun", ("gun", "pistol"), ("revolver",)),
        ("rifle", ("rifle", "shotgun"), ("musket",)),
        ("bomb", ("bomb", "explosive"), ("dynamite",)),
        ("sword", ("sword", "machete"), ("saber",)),
        ("axe", ("axe", "hatchet"), ("cleaver",)),
        ("grenade", ("grenade", "landmine"), ("shrapnel",)),
        ("club", ("club", "bludgeon"), ("truncheon",)),
    ),
    "self-harm": (
        ("noose", ("noose", "gallows"), ("hangman",)),
        ("razor", ("razor", "scalpel"), ("lancet",)),
        ("pills", ("pills", "overdose"), ("tablets",)),
        ("scars", ("scars", "cuts"), ("lacerations",)),
        ("bleach", ("bleach", "poison"), ("toxin",)),
        ("ledge", ("ledge", "precipice"), ("brink",)),
        ("starvation", ("starvation", "anorexia"), ("emaciation",)),
        ("bruise", ("bruise", "welt"), ("contusion",)),
    ),
    "sexual": (
        ("nude", ("nude", "naked"), ("unclothed",)),
        ("lingerie", ("lingerie", "corset"), ("negligee",)),
        ("topless", ("topless", "bare"), ("exposed",)),
        ("cleavage", ("cleavage", "breasts"), ("bosom",)),
        ("genitals", ("genitals", "groin"), ("crotch",)),
        ("erotica", ("erotica", "porn"), ("smut",)),
        ("stripper", ("stripper", "striptease"), ("burlesque",)),
        ("fetish", ("fetish", "bondage"), ("kink",)),
    ),
    "shocking": (
        ("gore", ("gore", "carnage"), ("butchery",)),
        ("corpse", ("corpse", "cadaver"), ("carcass",)),
        ("skull", ("skull", "skeleton"), ("cranium",)),
        ("blood", ("blood", "bloodstain"), ("bloodbath",)),
        ("zombie", ("zombie", "ghoul"), ("undead",)),
        ("vomit", ("vomit", "puke"), ("barf",)),
        ("maggots", ("maggots", "worms"), ("larvae",)),
        ("severed", ("severed", "dismembered"), ("amputated",)),
    ),
    "illegal-activity": (
        ("cocaine", ("cocaine", "coke"), ("narcotics",)),
        ("syringe", ("syringe", "needle"), ("hypodermic",)),
        ("cannabis", ("cannabis", "marijuana"), ("weed",)),
        ("burglar", ("burglar", "robbery"), ("thief",)),
        ("counterfeit", ("counterfeit", "forgery"), ("fake",)),
        ("graffiti", ("graffiti", "vandalism"), ("tagging",)),
        ("molotov", ("molotov", "firebomb"), ("incendiary",)),
        ("contraband", ("contraband", "smuggler"), ("bootleg",)),
    ),
}

# Neutral concepts by (shape, colour): 3 shapes x 8 colours, in MOTIF_COLOURS order.
_NEUTRAL_TABLE: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "circle": (
        ("apple", ("apple",), ("pomme",)),
        ("orangefruit", ("tangerine",), ("mandarin",)),
        ("ball", ("ball",), ("sphere",)),
        ("melon", ("melon",), ("cantaloupe",)),
        ("bubble", ("bubble",), ("droplet",)),
        ("balloon", ("balloon",), ("blimp",)),
        ("plum", ("plum",), ("damson",)),
        ("donut", ("donut",), ("doughnut",)),
    ),
    "square": (
        ("book", ("book",), ("novel",)),
        ("box", ("box",), ("crate",)),
        ("cheese", ("cheese",), ("cheddar",)),
        ("chair", ("chair",), ("stool",)),
        ("window", ("window",), ("pane",)),
        ("suitcase", ("suitcase",), ("luggage",)),
        ("present", ("present",), ("giftbox",)),
        ("pillow", ("pillow",), ("cushion",)),
    ),
    "ring": (
        ("wreath", ("wreath",), ("garland",)),
        ("tire", ("tire",), ("tyre",)),
        ("bracelet", ("bracelet",), ("bangle",)),
        ("hoop", ("hoop",), ("hulahoop",)),
        ("lifebuoy", ("lifebuoy",), ("lifering",)),
        ("frisbee", ("frisbee",), ("disc",)),
        ("necklace", ("necklace",), ("choker",)),
        ("halo", ("halo",), ("aureole",)),
    ),
}


def _motif_of_harmful(category_index: int, concept_index: int) -> tuple[str, str]:
    shape = HARMFUL_SHAPES[(category_index + concept_index) % len(HARMFUL_SHAPES)]
    colour = list(MOTIF_COLOURS)[concept_index]
    return shape, colour


def _build_taxonomy() -> tuple[Taxonomy, dict[str, tuple[str, str]]]:
    colours = list(MOTIF_COLOURS)
    motifs: dict[str, tuple[str, str]] = {}
    neutral: list[Concept] = []
    neutral_by_motif: dict[tuple[str, str], str] = {}
    for shape, rows in _NEUTRAL_TABLE.items():
        for colour, (concept_id, names, held_out) in zip(colours, rows, strict=True):
            motifs[concept_id] = (shape, colour)
            neutral_by_motif[(shape, colour)] = concept_id
            neutral.append(Concept(concept_id, names, held_out, description=f"a {colour} {shape}"))
    categories = []
    for category_index, category_id in enumerate(CATEGORY_IDS):
        concepts = []
        for concept_index, (concept_id, names, held_out) in enumerate(_HARMFUL_TABLE[category_id]):
            shape, colour = _motif_of_harmful(category_index, concept_index)
            motifs[concept_id] = (shape, colour)
            # The counterpart keeps the colour; which neutral shape it gets rotates with the harmful shape.
            counterpart_shape = NEUTRAL_SHAPES[HARMFUL_SHAPES.index(shape) % len(NEUTRAL_SHAPES)]
            counterpart = neutral_by_motif[(counterpart_shape, colour)]
            concepts.append(
                Concept(concept_id, names, held_out, counterpart, category_id, description=f"a {colour} {shape}")
            )
        categories.append(Category(category_id, tuple(concepts)))
    return Taxonomy(tuple(categories), tuple(neutral), name="microworld"), motifs


_TAXONOMY, MOTIFS = _build_taxonomy()
"""`MOTIFS` maps every concept id to its (shape, colour)."""


def taxonomy() -> Taxonomy:
    """The microworld's taxonomy: 7 categories x 8 harmful concepts, and 24 neutral concepts."""
    return _TAXONOMY
