"""The ToyWorld bench: generate each (primary, companion) pair under each guidance setting and score it.

Every setting uses the same seeds (image ``i`` of every pair and method starts from the noise of seed
``seed + i``) and 8 Euler steps; the negative prompt is the companion, unless the setting names its
``negatives`` (several weighted negatives, written by role, see `parse_negatives`). A setting runs with the
pipeline's own classifier-free guidance off (``guidance_scale=0``) unless it names a ``guidance_scale``:
then the pipeline runs its usual CFG against the empty prompt, and the method guides the conditional
branch only, as it does for any user who keeps CFG on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import NamedTuple

import numpy as np
import torch

from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import extras
from negguide.toyworld.world import score_objects

#: the roles a setting's ``negatives`` name, relative to each pair: its companion, and its four extra objects
ROLES: tuple[str, ...] = ("companion", "extras")


class Setting(NamedTuple):
    """One bench setting: a method (``"none"`` for the unguided model), its parameters, the
    pipeline's own ``guidance_scale`` (up to 1: the pipeline's CFG off, as in diffusers; above 1: CFG against
    the empty prompt), and the negatives by role (``""``: the companion, as ``negative_prompt``; else
    e.g. ``"companion:1,extras:0.5"``, see `parse_negatives`)."""

    method: str
    params: dict[str, Any]
    guidance_scale: float = 0.0
    negatives: str = ""


def parse_negatives(text: str) -> tuple[tuple[tuple[str, ...], float], ...]:
    """Read a setting's negatives, written by role: ``"companion:1,extras:0.5"``, ``"companion+extras"``.

    Items separated by ``,`` are separate weighted negatives (``negguide.apply(..., negatives=...)``); an
    item is one role or several joined by ``+``, and an optional ``:WEIGHT`` (default 1, finite, >= 0).
    ``companion`` is the pair's companion; ``extras`` is its four other non-primary objects, each a
    negative of its own when the item is ``extras`` alone. Roles joined by ``+`` make *one* negative prompt,
    their objects joined by ``" and "`` as in the world's captions.

    Returns:
        ``((roles, weight), ...)`` in the order written.

    Raises:
        ValueError: an empty item, an unknown or repeated role, or a weight that is not a finite number >= 0.
    """
    hint = f"write e.g. 'companion:1,extras:0.5' or 'companion+extras' (roles: {', '.join(map(repr, ROLES))})"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected negatives by role, got {text!r}; {hint}")
    items: list[tuple[tuple[str, ...], float]] = []
    seen: set[str] = set()
    for item in text.split(","):
        group, sep, raw = item.strip().partition(":")
        roles = tuple(r.strip().lower() for r in group.split("+"))
        if not group.strip() or not all(roles):
            raise ValueError(f"expected a role in every item of negatives {text!r}, got an empty one; {hint}")
        for role in roles:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} in negatives {text!r}; {hint}")
            if role in seen:
                raise ValueError(f"role {role!r} given twice in negatives {text!r}; name each role once")
            seen.add(role)
        weight = 1.0
        if sep:
            try:
                weight = float(raw)
            except ValueError:
                weight = math.nan
            if not 0 <= weight < math.inf:
                raise ValueError(
                    f"expected the weight of {group.strip()!r} to be a finite number >= 0, got {raw.strip()!r} "
                    f"in negatives {text!r}"
                )
        items.append((roles, weight))
    return tuple(items)


def format_negatives(items: tuple[tuple[tuple[str, ...], float], ...]) -> str:
    """The canonical text of parsed negatives: ``"companion:1,extras:0.5"``."""
    return ",".join(f"{'+'.join(roles)}:{weight:g}" for roles, weight in items)


def resolve_negatives(text: str, prompt: str, companion: str) -> str | dict[str, float]:
    """A setting's negatives for one pair: a string for ``negative_prompt`` (``""``, or one negative of
    weight 1, is exactly the companion rows' call), else the mapping for ``negatives``."""
    if not text:
        return companion
    objects = {"companion": (companion,), "extras": extras(prompt, companion)}
    entries: dict[str, float] = {}
    for roles, weight in parse_negatives(text):
        if roles == ("extras",):
            entries |= {name: weight for name in objects["extras"]}
        else:
            entries[" and ".join(name for role in roles for name in objects[role])] = weight
    if len(entries) == 1 and next(iter(entries.values())) == 1.0:
        return next(iter(entries))
    return entries


#: the default settings, in plotting order per (method, guidance_scale); "none" is the unguided model
SWEEP: tuple[Setting, ...] = (
    Setting("none", {}),
    Setting("cfg", {"scale": 2.0}),
    Setting("cfg", {"scale": 4.0}),
    Setting("nag", {"scale": 3.0, "tau": 2.5, "alpha": 0.25}),
    Setting("nag", {"scale": 5.0, "tau": 2.5, "alpha": 0.25}),
    Setting("nasa", {"scale": 0.25}),
    Setting("nasa", {"scale": 0.5}),
    Setting("vsf", {"scale": 1.0, "bias": 0.1}),
    Setting("vsf", {"scale": 2.0, "bias": 0.1}),
    Setting("vsf", {"scale": 3.5, "bias": 0.1}),
    Setting("vsf", {"scale": 5.0, "bias": 0.1}),
    Setting("vsf", {"scale": 12.0, "bias": 1.5}),
    # the same model with the pipeline's own CFG on (empty-prompt unconditional branch, scale 2)
    Setting("none", {}, 2.0),
    Setting("nag", {"scale": 5.0, "tau": 2.5, "alpha": 0.25}, 2.0),
    Setting("nasa", {"scale": 0.5}, 2.0),
    Setting("vsf", {"scale": 3.5, "bias": 0.1}, 2.0),
    Setting("vsf", {"scale": 12.0, "bias": 1.5}, 2.0),
)

#: the negatives of each method in the ``several`` sweep: the companion alone, separate weighted negatives (the
#: extras' weight rising), one joined prompt
SEVERAL_NEGATIVES: tuple[str, ...] = (
    "",
    "companion:1,extras:0.25",
    "companion:1,extras:0.5",
    "companion:1,extras:1",
    "companion+extras",
)

#: removing the companion and the extra objects at once (``negguide toyworld bench --sweep several``)
SEVERAL: tuple[Setting, ...] = (
    Setting("none", {}),
    Setting("none", {}, 2.0),
    *(
        Setting(method, params, guidance_scale, negatives)
        for method, params, guidance_scale in (
            ("vsf", {"scale": 3.5, "bias": 0.1}, 0.0),
            ("vsf", {"scale": 12.0, "bias": 1.5}, 0.0),
            ("nag", {"scale": 5.0, "tau": 2.5, "alpha": 0.25}, 0.0),
            ("nasa", {"scale": 0.5}, 0.0),
            ("cfg", {"scale": 4.0}, 0.0),
            ("vsf", {"scale": 12.0, "bias": 1.5}, 2.0),
        )
        for negatives in SEVERAL_NEGATIVES
    ),
)

#: the named sweeps of ``negguide toyworld bench --sweep``
SWEEPS: dict[str, tuple[Setting, ...]] = {"default": SWEEP, "several": SEVERAL}


@dataclass(frozen=True)
class Row:
    """One setting's scores, averaged over the pairs."""

    method: str
    params: dict[str, Any]
    positive: float
    removed: float
    clean: float
    guidance_scale: float = 0.0
    #: the setting's negatives by role (``""``: the companion, as ``negative_prompt``)
    negatives: str = ""
    #: share of images with none of the pair's extra objects
    extras_removed: float | None = None
    #: share of images with the primary and no other object
    only: float | None = None

    @property
    def label(self) -> str:
        return (
            ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in self.params.items())
            or "-"
        )

    @property
    def name(self) -> str:
        """The method, with the pipeline's CFG scale when that CFG ran: ``"vsf"``, ``"vsf, CFG 2"``."""
        return f"{self.method}, CFG {self.guidance_scale:g}" if self.cfg_on else self.method

    @property
    def negatives_label(self) -> str:
        """The negatives column: ``"-"`` for the unguided model, ``"companion"`` for the companion rows."""
        return "-" if self.method == "none" else self.negatives or "companion"

    @property
    def cfg_on(self) -> bool:
        """Whether the pipeline's own CFG ran: diffusers runs it only for ``guidance_scale > 1``."""
        return self.guidance_scale > 1


def generate(
    pipe: Any,
    method: str,
    params: dict[str, Any],
    prompt: str,
    negative: str | Mapping[str, float],
    n: int,
    seed: int = 0,
    guidance_scale: float = 0.0,
    steps: int | None = None,
) -> np.ndarray:
    """``n`` images ``(n, 3, 32, 32)`` in ``[-1, 1]`` for ``prompt`` guided away from ``negative``.

    ``negative`` is a ``negative_prompt``, or a mapping of weighted ``negatives``. ``guidance_scale`` is the
    pipeline's own: above 1 it runs CFG against the empty prompt beside the method. ``steps`` overrides the
    8 Euler steps (tests).
    """
    import negguide

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    kwargs = {**CALL_KWARGS, "num_images_per_prompt": n, "generator": generators, "guidance_scale": guidance_scale}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if method == "none":
        out = pipe(prompt, **kwargs).images
    else:
        given = {"negative_prompt": negative} if isinstance(negative, str) else {"negatives": dict(negative)}
        with negguide.apply(pipe, method, **given, **params):
            out = pipe(prompt, **kwargs).images
    return np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2) * 2 - 1


def run(
    pipe: Any,
    n: int = 64,
    seed: int = 0,
    sweep: tuple[Setting | tuple[str, dict[str, Any]], ...] = SWEEP,
    pairs: tuple[tuple[str, str], ...] = PAIRS,
    progress: bool = True,
    steps: int | None = None,
) -> tuple[list[Row], dict[tuple[str, str], np.ndarray]]:
    """Score every setting of ``sweep`` on every pair.

    ``sweep`` holds ``Setting`` entries or plain ``(method, params)`` pairs (the pipeline's CFG off). Every
    setting's negatives are checked before any image is generated.

    Returns:
        The rows (scores averaged over pairs) and, per ``(name, label)`` of a row, the images of the first pair
        (the name carries the negatives in brackets where a setting names them).

    Raises:
        ValueError: a setting's negatives do not parse, or the unguided model (``none``) is given negatives.
    """
    from tqdm.auto import tqdm

    settings = [Setting(*entry) for entry in sweep]
    for setting in settings:
        if setting.negatives and setting.method == "none":
            raise ValueError(f"'none' is the unguided model and takes no negatives, got {setting.negatives!r}")
        if setting.negatives:
            parse_negatives(setting.negatives)
    rows: list[Row] = []
    samples: dict[tuple[str, str], np.ndarray] = {}
    bar = tqdm(total=len(settings) * len(pairs), disable=not progress, desc="toyworld bench")
    for method, params, guidance_scale, negatives in settings:
        scores = []
        for j, (prompt, companion) in enumerate(pairs):
            negative = resolve_negatives(negatives, prompt, companion)
            images = generate(pipe, method, params, prompt, negative, n, seed, guidance_scale, steps)
            scores.append(score_objects(images, prompt, companion))
            if j == 0:
                first = images
            bar.update()
        mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        row = Row(
            method,
            dict(params),
            mean["positive"],
            mean["removed"],
            mean["clean"],
            float(guidance_scale),
            format_negatives(parse_negatives(negatives)) if negatives else "",
            mean["extras_removed"],
            mean["only"],
        )
        rows.append(row)
        samples[(f"{row.name} [{row.negatives}]" if row.negatives else row.name, row.label)] = first
    bar.close()
    return rows, samples


def format_table(rows: list[Row]) -> str:
    """A Markdown table: method, params, the pipeline's guidance_scale, positive, removed, clean."""
    lines = ["| method | params | guidance_scale | positive | removed | clean |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = (r.method, r.label, f"{r.guidance_scale:g}", f"{r.positive:.3f}", f"{r.removed:.3f}", f"{r.clean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_several_table(rows: list[Row]) -> str:
    """The Markdown table of the ``several`` sweep: ``format_table``'s columns plus the negatives, the share
    without any extra object and the share with the primary alone."""
    lines = [
        "| method | params | guidance_scale | negatives | positive | removed | extras removed | only primary | clean |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = (
            r.method,
            r.label,
            f"{r.guidance_scale:g}",
            r.negatives_label,
            *(f"{v:.3f}" if v is not None else "-" for v in (r.positive, r.removed, r.extras_removed, r.only, r.clean)),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_METHOD_COLOURS = {
    "none": (0, 0, 0),
    "cfg": (31, 119, 180),
    "nag": (44, 160, 44),
    "nasa": (214, 39, 40),
    "vsf": (255, 127, 14),
}


def _unit_axes(width: int, right: int, y_label: str, title: str, title_x: int) -> tuple[Any, Any, Any]:
    """A white PIL canvas ``width`` x 420 with a [0, 1] x [0, 1] grid (x: positive), its labels and title, a legend
    margin of ``right`` pixels; returns the image, its ``ImageDraw`` and ``xy(x, y)`` -> pixel coordinates."""
    from PIL import Image
    from PIL import ImageDraw

    w, h, left, top, bottom = width, 420, 60, 30, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1 - y) * ph

    for k in range(11):
        v = k / 10
        gx, gy = xy(v, v)
        d.line([(gx, top), (gx, top + ph)], fill=(235, 235, 235))
        d.line([(left, gy), (left + pw, gy)], fill=(235, 235, 235))
        if k % 2 == 0:
            d.text((gx - 8, top + ph + 5), f"{v:.1f}", fill="black")
            d.text((left - 28, gy - 6), f"{v:.1f}", fill="black")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw / 2 - 70, h - 20), "positive (primary drawn)", fill="black")
    d.text((5, 8), y_label, fill="black")
    d.text((left + title_x, 8), title, fill="black")
    return img, d, xy


def tradeoff_plot(rows: list[Row], path: str | Path, title: str = "ToyWorld: negative adherence") -> Path:
    """Scatter/line plot (PIL) of ``removed`` (y) against ``positive`` (x), one polyline per method."""
    img, d, xy = _unit_axes(560, 130, "removed (companion absent)", title, 150)
    lx = 560 - 130  # the legend margin's left edge
    # one curve per method and pipeline CFG scale; hollow markers where the pipeline's CFG is on
    names = list(dict.fromkeys(r.name for r in rows))
    for i, name in enumerate(names):
        curve = [r for r in rows if r.name == name]
        colour = _METHOD_COLOURS.get(curve[0].method, (120, 120, 120))
        fill = "white" if curve[0].cfg_on else colour
        pts = [(xy(r.positive, r.removed), r) for r in curve]
        if len(pts) > 1:
            d.line([p for p, _ in pts], fill=colour, width=1 if curve[0].cfg_on else 2)
        for (px, py), r in pts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=fill, outline=colour, width=2)
            value = next(iter(r.params.values()), None)
            if isinstance(value, (int, float)):
                # labels of CFG-on points sit below them, the others above, so near curves stay legible
                d.text((px + 5, py + 3 if r.cfg_on else py - 12), f"{value:g}", fill=colour)
        ly = 40 + 18 * i
        d.rectangle([lx + 15, ly, lx + 27, ly + 12], fill=fill, outline=colour, width=2)
        d.text((lx + 33, ly), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


#: one colour per (method, parameters, CFG) curve of ``several_plot``, in order of appearance
_GROUP_COLOURS = (
    (255, 127, 14),
    (140, 86, 75),
    (44, 160, 44),
    (214, 39, 40),
    (31, 119, 180),
    (148, 103, 189),
    (23, 190, 207),
    (127, 127, 127),
)


def _negatives_mark(row: Row) -> str:
    """The point label of ``several_plot``: ``c`` (the companion), ``j`` (one joined prompt) or the extras' weight."""
    if not row.negatives or row.negatives == "companion:1":
        return "c"
    items = parse_negatives(row.negatives)
    if len(items) == 1 and len(items[0][0]) > 1:
        return "j"
    weights = [w for roles, w in items if roles == ("extras",)]
    return f"{weights[0]:g}" if weights else row.negatives


def several_plot(rows: list[Row], path: str | Path, title: str = "ToyWorld: several negatives") -> Path:
    """Plot (PIL) of ``only`` (y: the primary and nothing else) against ``positive`` (x), one curve per method,
    parameters and pipeline CFG through its negatives; points labelled ``c`` (the companion alone), ``j`` (one
    joined prompt, a square) or the extras' weight; the unguided model as black crosses."""
    img, d, xy = _unit_axes(640, 210, "only the primary", title, 120)
    lx = 640 - 210  # the legend margin's left edge
    groups = list(dict.fromkeys((r.name, r.label) for r in rows if r.method != "none"))
    for r in rows:
        if r.method == "none":
            px, py = xy(r.positive, r.only or 0.0)
            d.line([(px - 4, py - 4), (px + 4, py + 4)], fill="black", width=2)
            d.line([(px - 4, py + 4), (px + 4, py - 4)], fill="black", width=2)
            label, below = ("none" + (f", CFG {r.guidance_scale:g}" if r.cfg_on else "")), r.cfg_on
            d.text((px + 5, py + 3 if below else py - 12), label, fill="black")
    for i, group in enumerate(groups):
        curve = [r for r in rows if (r.name, r.label) == group]
        colour = _GROUP_COLOURS[i % len(_GROUP_COLOURS)]
        fill = "white" if curve[0].cfg_on else colour
        line = [xy(r.positive, r.only or 0.0) for r in curve if _negatives_mark(r) != "j"]
        if len(line) > 1:
            d.line(line, fill=colour, width=1 if curve[0].cfg_on else 2)
        for r in curve:
            px, py = xy(r.positive, r.only or 0.0)
            mark = _negatives_mark(r)
            box = [px - 4, py - 4, px + 4, py + 4]
            (d.rectangle if mark == "j" else d.ellipse)(box, fill=fill, outline=colour, width=2)
            d.text((px + 5, py - 12), mark, fill=colour)
        ly = 40 + 18 * i
        d.rectangle([lx + 15, ly, lx + 27, ly + 12], fill=fill, outline=colour, width=2)
        d.text((lx + 33, ly), f"{group[0]} {group[1]}", fill="black")
    ly = 40 + 18 * len(groups) + 8
    for k, text in enumerate(("c: the companion alone", "j: one joined prompt", "0.25-1: separate, extras' weight")):
        d.text((lx + 15, ly + 14 * k), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


def sample_grid(samples: dict[tuple[str, str], np.ndarray], path: str | Path, columns: int = 8, zoom: int = 2) -> Path:
    """One row per setting (its name over its parameters on the left), the first ``columns`` images, upscaled
    ``zoom`` times; ``samples`` maps a row's ``(name, label)`` to its images, as ``run`` returns them."""
    from PIL import Image
    from PIL import ImageDraw

    size = 32 * zoom
    label_w = 170
    img = Image.new("RGB", (label_w + columns * (size + 2), len(samples) * (size + 2)), "white")
    d = ImageDraw.Draw(img)
    for r, ((name, label), images) in enumerate(samples.items()):
        y = r * (size + 2)
        d.text((4, y + size // 2 - 13), name, fill="black")
        d.text((4, y + size // 2 + 1), label, fill="black")
        for c, im in enumerate(images[:columns]):
            pixels = ((np.clip(im, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            img.paste(tile, (label_w + c * (size + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path
