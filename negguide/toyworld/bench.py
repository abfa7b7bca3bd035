"""The ToyWorld bench: generate each (primary, companion) pair under each guidance setting and score it.

Every setting uses the same seeds (image ``i`` of every pair and method starts from the noise of seed
``seed + i``) and 8 Euler steps; the negative prompt is the companion. A setting runs with the
pipeline's own classifier-free guidance off (``guidance_scale=0``) unless it names a ``guidance_scale``:
then the pipeline runs its usual CFG against the empty prompt, and the method guides the conditional
branch only, as it does for any user who keeps CFG on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import NamedTuple

import numpy as np
import torch

from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import score


class Setting(NamedTuple):
    """One bench setting: a method (``"none"`` for the unguided model), its parameters, and the
    pipeline's own ``guidance_scale`` (up to 1: the pipeline's CFG off, as in diffusers; above 1: CFG against
    the empty prompt)."""

    method: str
    params: dict[str, Any]
    guidance_scale: float = 0.0


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


@dataclass(frozen=True)
class Row:
    """One setting's scores, averaged over the pairs."""

    method: str
    params: dict[str, Any]
    positive: float
    removed: float
    clean: float
    guidance_scale: float = 0.0

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
    def cfg_on(self) -> bool:
        """Whether the pipeline's own CFG ran: diffusers runs it only for ``guidance_scale > 1``."""
        return self.guidance_scale > 1


def generate(
    pipe: Any,
    method: str,
    params: dict[str, Any],
    prompt: str,
    negative: str,
    n: int,
    seed: int = 0,
    guidance_scale: float = 0.0,
) -> np.ndarray:
    """``n`` images ``(n, 3, 32, 32)`` in ``[-1, 1]`` for ``prompt`` guided away from ``negative``.

    ``guidance_scale`` is the pipeline's own: above 1 it runs CFG against the empty prompt beside the method.
    """
    import negguide

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    kwargs = {**CALL_KWARGS, "num_images_per_prompt": n, "generator": generators, "guidance_scale": guidance_scale}
    if method == "none":
        out = pipe(prompt, **kwargs).images
    else:
        with negguide.apply(pipe, method, negative_prompt=negative, **params):
            out = pipe(prompt, **kwargs).images
    return np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2) * 2 - 1


def run(
    pipe: Any,
    n: int = 64,
    seed: int = 0,
    sweep: tuple[Setting | tuple[str, dict[str, Any]], ...] = SWEEP,
    pairs: tuple[tuple[str, str], ...] = PAIRS,
    progress: bool = True,
) -> tuple[list[Row], dict[tuple[str, str], np.ndarray]]:
    """Score every setting of ``sweep`` on every pair.

    ``sweep`` holds ``Setting`` entries or plain ``(method, params)`` pairs (the pipeline's CFG off).

    Returns:
        The rows (scores averaged over pairs) and, per ``(name, label)`` of a row, the images of the first pair.
    """
    from tqdm.auto import tqdm

    rows: list[Row] = []
    samples: dict[tuple[str, str], np.ndarray] = {}
    bar = tqdm(total=len(sweep) * len(pairs), disable=not progress, desc="toyworld bench")
    for method, params, guidance_scale in (Setting(*entry) for entry in sweep):
        scores = []
        for j, (prompt, negative) in enumerate(pairs):
            images = generate(pipe, method, params, prompt, negative, n, seed, guidance_scale)
            scores.append(score(images, prompt, negative))
            if j == 0:
                first = images
            bar.update()
        mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        row = Row(method, dict(params), mean["positive"], mean["removed"], mean["clean"], float(guidance_scale))
        rows.append(row)
        samples[(row.name, row.label)] = first
    bar.close()
    return rows, samples


def format_table(rows: list[Row]) -> str:
    """A Markdown table: method, params, the pipeline's guidance_scale, positive, removed, clean."""
    lines = ["| method | params | guidance_scale | positive | removed | clean |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = (r.method, r.label, f"{r.guidance_scale:g}", f"{r.positive:.3f}", f"{r.removed:.3f}", f"{r.clean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_METHOD_COLOURS = {
    "none": (0, 0, 0),
    "cfg": (31, 119, 180),
    "nag": (44, 160, 44),
    "nasa": (214, 39, 40),
    "vsf": (255, 127, 14),
}


def tradeoff_plot(rows: list[Row], path: str | Path, title: str = "ToyWorld: negative adherence") -> Path:
    """Scatter/line plot (PIL) of ``removed`` (y) against ``positive`` (x), one polyline per method."""
    from PIL import Image
    from PIL import ImageDraw

    w, h, left, right, top, bottom = 560, 420, 60, 130, 30, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom

    def xy(pos: float, rem: float) -> tuple[float, float]:
        return left + pos * pw, top + (1 - rem) * ph

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
    d.text((5, 8), "removed (companion absent)", fill="black")
    d.text((left + 150, 8), title, fill="black")
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
        ly = top + 10 + 18 * i
        d.rectangle([left + pw + 15, ly, left + pw + 27, ly + 12], fill=fill, outline=colour, width=2)
        d.text((left + pw + 33, ly), name, fill="black")
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
