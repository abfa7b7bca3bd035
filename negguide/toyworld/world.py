"""The ToyWorld: 32x32 RGB scenes of coloured shapes on white, their captions, a colour detector and metrics.

Three *primaries* (red circle, green triangle, magenta circle) each come with a *companion* (blue square,
yellow square, cyan triangle) 90% of the time; captions always name the primary and usually omit the
companion, so a model trained on them draws the companion unasked. Prompt = primary, negative = companion:
how often guidance removes the companion is what negative adherence means here.

Everything is deterministic given a ``numpy.random.Generator``. Images are ``float32`` arrays in ``[-1, 1]``,
shape ``(3, 32, 32)``, the range the pipeline's image processor expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: image side in pixels
SIZE = 32
#: the six colours, RGB in [0, 1]
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "green": (0.0, 1.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
#: the six objects (colour, shape); each colour belongs to exactly one object
OBJECTS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("magenta", "circle"),
    ("cyan", "triangle"),
)
#: primary object index -> its companion's index
COMPANION: dict[int, int] = {0: 1, 2: 3, 4: 5}
#: every word a caption can use
WORDS: tuple[str, ...] = ("and", *COLORS, "circle", "square", "triangle")
#: probability that a primary's companion is in the scene
P_COMPANION = 0.9
#: probability of one extra, unrelated object
P_EXTRA = 0.3
#: probability that the caption names the companion / an extra object when present
P_NAME_COMPANION = 0.25
P_NAME_EXTRA = 0.5
#: probability that the caption is empty (the model's unconditional mode)
P_EMPTY = 0.1
#: a pixel is "of a colour" when every channel is within this distance (in [0, 1] units)
COLOR_TOL = 0.3
#: an object is present when at least this many pixels are of its colour
MIN_PIXELS = 12
#: a pixel is "clean" when it is within this distance of white or a palette colour
CLEAN_TOL = 0.25


def object_name(index: int) -> str:
    """``"red circle"`` for object 0, and so on."""
    return " ".join(OBJECTS[index])


#: the (prompt, negative) pairs the bench measures: primary, companion
PAIRS: tuple[tuple[str, str], ...] = tuple((object_name(p), object_name(c)) for p, c in COMPANION.items())


@dataclass(frozen=True)
class Scene:
    """One drawn scene: the image, the object indices drawn (primary first) and the caption."""

    image: np.ndarray
    objects: tuple[int, ...]
    caption: str


def draw(objects: list[int] | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw the objects (later ones on top) at random non-overlapping places when possible.

    Returns:
        ``float32`` array ``(3, SIZE, SIZE)`` in ``[-1, 1]`` (white background).
    """
    img = np.ones((3, SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    placed: list[tuple[int, int, int]] = []
    for index in objects:
        for _ in range(20):
            r = int(rng.integers(4, 7))
            cy, cx = (int(v) for v in rng.integers(r, SIZE - r, size=2))
            if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + 1) ** 2 for py, px, pr in placed):
                break
        placed.append((cy, cx, r))
        colour, shape = OBJECTS[index]
        if shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif shape == "square":
            mask = (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
        else:
            mask = (yy - cy >= -r) & (yy - cy <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        for c in range(3):
            img[c][mask] = COLORS[colour][c]
    return img * 2 - 1


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene and its caption, following the world's rules (see the module docstring)."""
    primary = int(rng.choice(list(COMPANION)))
    companion = COMPANION[primary]
    objects = [primary]
    if rng.random() < P_COMPANION:
        objects.append(companion)
    if rng.random() < P_EXTRA:
        objects.append(int(rng.choice([o for o in range(len(OBJECTS)) if o not in objects])))
    named = [primary] + [
        o for o in objects[1:] if rng.random() < (P_NAME_COMPANION if o == companion else P_NAME_EXTRA)
    ]
    rng.shuffle(named)
    caption = " and ".join(object_name(o) for o in named)
    if rng.random() < P_EMPTY:
        caption = ""
    return Scene(draw(objects, rng), tuple(objects), caption)


def sample_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` scenes: images ``(n, 3, SIZE, SIZE)`` in ``[-1, 1]`` and their captions."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def step_batch(n: int, seed: int, step: int) -> tuple[np.ndarray, list[str]]:
    """The ``n`` scenes of training step ``step`` when drawn by worker processes: seeded by ``(seed, step)``
    alone (here, not in the training module, so a worker imports numpy and not torch)."""
    return sample_batch(n, np.random.default_rng([seed, step]))


def _as_unit(images: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` images ``(n, 3, H, W)`` (or one ``(3, H, W)``) to ``[0, 1]``, batched."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    return (x + 1) / 2


def present(images: np.ndarray, index: int) -> np.ndarray:
    """Whether object ``index`` is in each image: at least ``MIN_PIXELS`` pixels of its colour.

    Args:
        images: ``(n, 3, H, W)`` or ``(3, H, W)`` in ``[-1, 1]``.
        index: the object (its colour identifies it).

    Returns:
        bool array ``(n,)``.
    """
    x = _as_unit(images)
    colour = np.asarray(COLORS[OBJECTS[index][0]])[None, :, None, None]
    close = (np.abs(x - colour).max(axis=1) < COLOR_TOL).sum(axis=(1, 2))
    return close >= MIN_PIXELS


def detect(images: np.ndarray) -> np.ndarray:
    """Presence of every object: bool array ``(n, len(OBJECTS))``."""
    return np.stack([present(images, i) for i in range(len(OBJECTS))], axis=1)


def cleanliness(images: np.ndarray) -> np.ndarray:
    """Share of each image's pixels within ``CLEAN_TOL`` of white or a palette colour: ``(n,)`` in ``[0, 1]``."""
    x = _as_unit(images)
    palette = np.asarray([(1.0, 1.0, 1.0), *COLORS.values()])[None, :, :, None, None]
    dist = np.abs(x[:, None] - palette).max(axis=2).min(axis=1)
    return (dist < CLEAN_TOL).mean(axis=(1, 2))


def extras(prompt: str, companion: str) -> tuple[str, ...]:
    """The pair's *extra* objects: every object that is neither ``prompt`` (the primary) nor ``companion``,
    in the world's order (four, as ``P_EXTRA`` draws any of them)."""
    return tuple(object_name(i) for i in range(len(OBJECTS)) if object_name(i) not in (prompt, companion))


def score(images: np.ndarray, prompt: str, negative: str) -> dict[str, float]:
    """The three metrics for images generated with ``prompt`` and negative ``negative``.

    Returns:
        ``positive`` (share with the prompted object), ``removed`` (share without the negative's object) and
        ``clean`` (mean share of palette pixels).
    """
    names = [object_name(i) for i in range(len(OBJECTS))]
    pos, neg = names.index(prompt), names.index(negative)
    return {
        "positive": float(present(images, pos).mean()),
        "removed": float(1 - present(images, neg).mean()),
        "clean": float(cleanliness(images).mean()),
    }


def score_objects(images: np.ndarray, prompt: str, companion: str) -> dict[str, float]:
    """``score`` plus what else is in the picture, for removing the companion and the extra objects at once.

    Returns:
        ``positive``, ``removed`` (the companion absent) and ``clean`` as ``score(images, prompt, companion)``,
        and ``extras_removed`` (share with none of the four ``extras`` present) and ``only`` (share with the
        primary present and no other object at all).
    """
    names = [object_name(i) for i in range(len(OBJECTS))]
    found = detect(images)
    others = [names.index(e) for e in extras(prompt, companion)]
    pos = names.index(prompt)
    return {
        **score(images, prompt, companion),
        "extras_removed": float(1 - found[:, others].any(axis=1).mean()),
        "only": float((found[:, pos] & ~np.delete(found, pos, axis=1).any(axis=1)).mean()),
    }
