"""Words and looks of the synthetic shopping world: the category tree, colours, shapes, patterns,
styles, with the synonyms that titles and search queries draw from.
"""

from __future__ import annotations

#: Top categories, each with up to five leaves; every leaf lists its synonyms (first = main word).
TOP_CATEGORIES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    (
        "tops",
        (
            ("tee", "t-shirt", "top"),
            ("shirt", "button-up"),
            ("hoodie", "sweatshirt"),
            ("sweater", "jumper", "knit"),
            ("blouse", "tunic"),
        ),
    ),
    (
        "bottoms",
        (
            ("jeans", "denim"),
            ("skirt", "midi"),
            ("shorts", "bermudas"),
            ("trousers", "pants", "slacks"),
            ("leggings", "tights"),
        ),
    ),
    (
        "shoes",
        (
            ("sneakers", "trainers"),
            ("boots", "booties"),
            ("sandals", "slides"),
            ("loafers", "flats"),
            ("heels", "pumps"),
        ),
    ),
    (
        "bags",
        (
            ("backpack", "rucksack"),
            ("tote", "shopper"),
            ("clutch", "evening bag"),
            ("wallet", "purse"),
            ("satchel", "crossbody"),
        ),
    ),
    (
        "home",
        (
            ("lamp", "light"),
            ("vase", "planter"),
            ("cushion", "pillow"),
            ("rug", "carpet", "mat"),
            ("clock", "timepiece"),
        ),
    ),
    (
        "kitchen",
        (("mug", "cup"), ("plate", "dish"), ("bowl", "basin"), ("kettle", "boiler"), ("teapot", "tea pot")),
    ),
    (
        "toys",
        (
            ("plush", "stuffed toy", "soft toy"),
            ("puzzle", "jigsaw"),
            ("ball", "bouncy ball"),
            ("kite", "flyer"),
            ("robot", "bot"),
        ),
    ),
    (
        "beauty",
        (
            ("lipstick", "lip color"),
            ("perfume", "fragrance", "eau de toilette"),
            ("compact", "powder"),
            ("nail polish", "lacquer"),
            ("makeup brush", "brush set"),
        ),
    ),
    (
        "sports",
        (
            ("yoga mat", "exercise mat"),
            ("dumbbell", "hand weight"),
            ("racket", "racquet"),
            ("helmet", "headgear"),
            ("water bottle", "flask"),
        ),
    ),
    (
        "gadgets",
        (
            ("phone case", "cover"),
            ("charger", "power adapter"),
            ("earbuds", "earphones"),
            ("phone stand", "holder"),
            ("watch strap", "band"),
        ),
    ),
)

#: Colours: (synonyms, RGB). Titles often use a synonym, sometimes omit the colour.
COLOURS: tuple[tuple[tuple[str, ...], tuple[int, int, int]], ...] = (
    (("red", "crimson", "scarlet"), (200, 30, 35)),
    (("blue", "navy", "azure"), (35, 70, 190)),
    (("green", "emerald", "olive"), (40, 150, 60)),
    (("yellow", "lemon", "mustard"), (235, 205, 40)),
    (("black", "jet", "ebony"), (25, 25, 28)),
    (("white", "ivory", "snow"), (245, 245, 240)),
    (("pink", "rose", "blush"), (240, 130, 170)),
    (("purple", "violet", "lilac"), (130, 60, 170)),
    (("orange", "tangerine", "amber"), (240, 130, 30)),
    (("brown", "chocolate", "tan"), (120, 75, 40)),
    (("grey", "gray", "charcoal"), (128, 128, 132)),
    (("teal", "turquoise", "aqua"), (30, 160, 160)),
)

#: Shapes drawn in the image; titles rarely name them (the image shows what the title omits).
SHAPES: tuple[tuple[str, ...], ...] = (
    ("round", "circular"),
    ("square", "boxy"),
    ("triangular", "pointed"),
    ("diamond", "rhombus"),
    ("ring", "hoop"),
    ("cross", "plus"),
)
PATTERNS: tuple[tuple[str, ...], ...] = (
    ("plain", "solid"),
    ("striped", "stripes", "pinstripe"),
    ("polka dot", "dotted", "spotted"),
    ("checked", "plaid", "gingham"),
    ("gradient", "ombre", "two-tone"),
)
STYLES: tuple[tuple[str, ...], ...] = (
    ("classic", "timeless"),
    ("modern", "minimalist", "sleek"),
    ("vintage", "retro"),
    ("sporty", "athletic"),
    ("cute", "kawaii", "sweet"),
)
#: Filler words that carry no attribute (title noise).
FILLERS: tuple[str, ...] = (
    "new",
    "2026",
    "hot sale",
    "free shipping",
    "best seller",
    "premium",
    "limited",
    "gift",
    "official",
    "authentic",
    "discount",
    "trendy",
    "quality",
    "original",
    "deal",
)

#: How often a title names each attribute (shape is mostly only visible in the image).
P_TITLE_COLOUR = 0.7
P_TITLE_PATTERN = 0.45
P_TITLE_STYLE = 0.5
P_TITLE_SHAPE = 0.08


def category_label(category: int, leaves_per_top: int) -> str:
    """``top/leaf`` words of a simworld item category (the dataset's ``category`` = leaf + 1);
    the number as text when it is outside the tree."""
    if int(category) < 1:
        return str(category)
    top, sub = divmod(int(category) - 1, leaves_per_top)
    try:
        return f"{TOP_CATEGORIES[top][0]}/{TOP_CATEGORIES[top][1][sub][0]}"
    except IndexError:
        return str(category)


def interest_label(leaf: int, colour: int, leaves_per_top: int) -> str:
    """Words of an interest key (leaf category, colour), e.g. ``blue jeans``."""
    top, sub = divmod(int(leaf), leaves_per_top)
    try:
        return f"{COLOURS[int(colour)][0][0]} {TOP_CATEGORIES[top][1][sub][0]}"
    except IndexError:
        return f"leaf {leaf}, colour {colour}"
