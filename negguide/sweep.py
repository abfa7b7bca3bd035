"""Guidance settings over seeds: ``negguide.compare`` (a labelled grid) and the images ``negguide eval`` judges.

A *setting* is a method and its parameters, written as on the command line: ``"none"``, ``"vsf"``,
``"nag scale=3 tau=2.5"``. `render` makes one image of one setting and seed, with the record
``negguide generate`` writes; `compare` renders every setting on every seed and lays them out.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError

__all__ = [
    "Comparison",
    "Setting",
    "compare",
    "comparison_grid",
    "parse_seeds",
    "parse_setting",
    "parse_settings",
    "render",
]

#: most seeds one ``--seeds`` range may name (a typo like ``0-100000`` fails instead of running for days)
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class Setting:
    """One guidance setting: a method (``"none"``: the pipeline unguided) and the parameters given to it."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The setting as written: ``"nag scale=3 tau=2.5"``."""
        from negguide.records import show

        return " ".join([self.method, *(f"{k}={show(v)}" for k, v in self.params.items())])


def parse_setting(text: str | Setting | tuple[str, dict[str, Any]], option: str = "--method") -> Setting:
    """Read ``"METHOD [KEY=VALUE ...]"`` (or take a `Setting`, or ``(method, params)``) and validate it.

    Values are read like ``negguide generate --param``; the method's own config checks them, so a typo
    fails before any model is loaded.

    Raises:
        ConfigError: empty text, or ``none`` with parameters; the method's config rejects a value.
        UnknownMethodError: no method of that name is installed.
    """
    from negguide.params import parse_param
    from negguide.registry import get_method

    if isinstance(text, Setting):
        setting = text
    elif isinstance(text, tuple):
        setting = Setting(str(text[0]).lower(), dict(text[1]))
    else:
        words = str(text).split()
        if not words:
            raise ConfigError(
                f"expected a setting 'METHOD [KEY=VALUE ...]' for {option}, got {text!r}; e.g. {option} 'nag scale=3'"
            )
        setting = Setting(words[0].lower(), dict(parse_param(word, option) for word in words[1:]))
    if setting.method == "none":
        if setting.params:
            raise ConfigError(
                f"'none' runs the pipeline unguided and takes no parameters, got {setting.label!r}; "
                f"drop the parameters or name a method (see `negguide methods`)"
            )
        return setting
    get_method(setting.method).make_config(setting.params)
    return setting


def parse_settings(
    settings: list[str | Setting | tuple[str, dict[str, Any]]] | tuple[Any, ...], negative: str | None
) -> list[Setting]:
    """Every setting read and validated (`parse_setting`), none repeated, and a negative where a method needs one.

    Raises:
        ConfigError, UnknownMethodError, NegativePromptError: the first problem found.
    """
    parsed = [parse_setting(s) for s in settings]
    if not parsed:
        raise ConfigError("expected at least one setting, got none; e.g. settings=['none', 'vsf']")
    labels = [s.label for s in parsed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"expected each setting once, got {', '.join(map(repr, repeated))} twice; drop the repeat")
    for setting in parsed:
        check_negative(setting, negative)
    return parsed


def parse_seeds(text: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """Seeds from ``"0-3"`` (inclusive), ``"0,2,7"``, ``"5"`` or a list of ints; order kept, repeats dropped.

    Raises:
        ConfigError: not of those forms, a range that runs backwards, or more than `MAX_SEEDS` seeds.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return [text]
    if isinstance(text, list | tuple):
        seeds = list(text)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
            raise ConfigError(f"expected a non-empty list of integer seeds, got {text!r}")
        return list(dict.fromkeys(seeds))
    seeds = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ConfigError(f"expected seeds like '0-3', '0,2,7' or '5', got {text!r}; write non-negative integers")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ConfigError(f"expected a seed range FIRST-LAST with FIRST <= LAST, got {part.strip()!r}; e.g. 0-3")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise ConfigError(f"expected at most {MAX_SEEDS} seeds, got {text!r}; pass a shorter range")
        seeds.extend(range(first, last + 1))
    return list(dict.fromkeys(seeds))


def pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """The call arguments a pipeline's model wants unless told otherwise (ToyWorld: 32x32, its CFG off)."""
    if type(pipe).__name__ != "ToyWorldPipeline":
        return {}
    from negguide.toyworld.pipeline import CALL_KWARGS

    skip = ("num_inference_steps", "generator", "output_type")
    return {k: v for k, v in CALL_KWARGS.items() if k not in skip}


def check_negative(setting: Setting, negative: str | None) -> None:
    """An attention method needs a negative prompt; say so before anything runs."""
    if setting.method == "none" or negative is not None:
        return
    from negguide.registry import get_method

    if get_method(setting.method).level == "attention":
        raise NegativePromptError(
            f"{setting.method}: expected a negative prompt, got none. Pass --negative TEXT (negative= in Python)."
        )


def render(
    pipe: Any,
    setting: Setting,
    prompt: str,
    negative: str | None,
    seed: int,
    *,
    steps: int = 8,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    model: str = "",
) -> tuple[Any, dict[str, Any]]:
    """One image of ``setting`` from the noise of ``seed``, and its record (the fields ``negguide generate`` writes).

    ``none`` gives the negative to the pipeline's own ``negative_prompt`` (used by its own CFG, if on).

    Returns:
        The PIL image (a video's middle frame) and the record (no ``image`` field: the caller names the file).
    """
    import torch

    from negguide.config import GuidanceSpec
    from negguide.records import first_picture
    from negguide.records import jsonable
    from negguide.records import one_line
    from negguide.records import versions
    from negguide.runtime import apply

    accepted = inspect.signature(pipe.__call__).parameters
    call: dict[str, Any] = {
        **pipeline_defaults(pipe),
        "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(seed),
    }
    for key, value in {"guidance_scale": guidance_scale, "height": height, "width": width}.items():
        if value is not None:
            call[key] = value
    if "output_type" in accepted:
        call["output_type"] = "np"
    if setting.method == "none" and negative is not None and "negative_prompt" in accepted:
        call["negative_prompt"] = negative
    validated: dict[str, Any] = {}
    family = ""
    started = time.perf_counter()
    try:
        if setting.method == "none":
            result = pipe(prompt, **call)
        else:
            spec = GuidanceSpec(method=setting.method, negative_prompt=negative, params=setting.params)
            with apply(pipe, spec) as handle:
                validated = jsonable(handle.method.config.model_dump())
                family = handle.adapter.family
                result = pipe(prompt, **call)
    except ValueError as exc:
        if isinstance(exc, NegGuideError):
            raise
        raise ConfigError(f"the pipeline rejected the call: {one_line(exc)}") from None
    seconds = time.perf_counter() - started
    picture, frame = first_picture(result, with_frame=True)
    parameter = accepted.get("guidance_scale")
    default_scale = "" if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    device = getattr(pipe, "device", "cpu")
    dtype = getattr(pipe, "dtype", "")
    record: dict[str, Any] = {
        "setting": setting.label,
        "method": setting.method,
        "params": validated,
        "negative": negative if negative is not None else "",
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": jsonable(call.get("guidance_scale", default_scale)),
        "width": picture.width,
        "height": picture.height,
        "model": model,
        "pipeline": type(pipe).__name__,
        "family": family,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "seconds": round(seconds, 4),
    }
    if frame is not None:
        record["frame"] = frame
    return picture, record


@dataclass
class Comparison:
    """What `compare` returns: every image by ``(setting label, seed)``, their records, and the labelled grid."""

    #: ``(setting label, seed) -> PIL image``, in grid order
    images: dict[tuple[str, int], Any]
    #: one record per image, in grid order (what ``negguide generate`` writes, plus the setting)
    records: list[dict[str, Any]]
    #: the labelled grid (PIL): a row per setting, a column per seed
    grid: Any
    settings: list[Setting]
    seeds: list[int]


def compare(
    pipe: Any,
    prompt: str,
    settings: list[str | Setting | tuple[str, dict[str, Any]]],
    seeds: str | int | list[int] = "0-3",
    *,
    negative: str | None = None,
    steps: int = 8,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    model: str = "",
    progress: bool = True,
) -> Comparison:
    """Render every setting on every seed (the same noise per seed) and lay them out in a labelled grid.

    Example:
        ```python
        pipe = negguide.toyworld.load()
        result = negguide.compare(pipe, "red circle", ["none", "vsf", "nag scale=3"], "0-3", negative="blue square")
        result.grid.save("grid.png")
        ```

    Args:
        pipe: a diffusers pipeline (any negguide knows), e.g. ``negguide.toyworld.load()``.
        prompt: the positive prompt.
        settings: ``"METHOD [KEY=VALUE ...]"`` texts (``"none"``: unguided), `Setting`s or ``(method, params)``.
        seeds: ``"0-3"``, ``"0,2,7"``, an int or a list; one grid column each.
        negative: the negative prompt (``none`` passes it to the pipeline's own ``negative_prompt``).
        steps: denoising steps.
        guidance_scale: the pipeline's own ``guidance_scale`` (default: the model's; ToyWorld: 0).
        height: image height (default: the model's).
        width: image width (default: the model's).
        model: what to call the model in the header and the records.
        progress: show a progress bar over the whole grid.

    Raises:
        ConfigError, UnknownMethodError, NegativePromptError: a setting or the seeds are invalid (checked first).
    """
    from tqdm.auto import tqdm

    parsed = parse_settings(settings, negative)
    labels = [s.label for s in parsed]
    seed_list = parse_seeds(seeds)
    images: dict[tuple[str, int], Any] = {}
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(parsed) * len(seed_list), disable=not progress, desc="negguide compare", leave=False)
    try:
        for setting in parsed:
            for seed in seed_list:
                picture, record = render(
                    pipe,
                    setting,
                    prompt,
                    negative,
                    seed,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    model=model,
                )
                images[(setting.label, seed)] = picture
                records.append(record)
                bar.update()
    finally:
        bar.close()
    header = [f"model: {model or type(pipe).__name__}", f"prompt: {prompt}", f"negative: {negative or '-'}"]
    header.append(f"steps: {steps}" + (f", guidance_scale: {guidance_scale:g}" if guidance_scale is not None else ""))
    grid = comparison_grid(images, labels, seed_list, header)
    return Comparison(images, records, grid, parsed, seed_list)


def comparison_grid(
    images: dict[tuple[str, Any], Any],
    labels: list[str],
    seeds: list[Any],
    header: list[str],
    titles: list[str] | None = None,
) -> Any:
    """A PIL grid: header lines on top, a column per seed (titled), a row per setting (its label on the left).

    ``images`` is keyed by ``(label, seed)``; any hashable column key works with ``titles`` (one per column,
    default ``"seed N"``). Small pictures are enlarged by a whole factor with nearest neighbour, to at least
    128 pixels a side.
    """
    from PIL import Image
    from PIL import ImageDraw

    first = next(iter(images.values()))
    zoom = max(1, -(-128 // max(1, min(first.size))))
    tile_w, tile_h = first.width * zoom, first.height * zoom
    gap, line = 4, 14
    label_w = max(90, 7 * max(len(label) for label in labels) + 12)
    top = line * len(header) + 8 + line
    width = max(label_w + len(seeds) * (tile_w + gap), 7 * max(len(h) for h in header) + 12)
    canvas = Image.new("RGB", (width, top + len(labels) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        draw.text((6, 4 + i * line), text, fill="black")
    for c, seed in enumerate(seeds):
        title = titles[c] if titles is not None else f"seed {seed}"
        draw.text((label_w + c * (tile_w + gap) + 4, top - line), title, fill="black")
    for r, label in enumerate(labels):
        y = top + r * (tile_h + gap)
        draw.text((6, y + tile_h // 2 - 6), label, fill="black")
        for c, seed in enumerate(seeds):
            picture = images[(label, seed)].convert("RGB")
            if picture.size != (tile_w, tile_h):
                picture = picture.resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(picture, (label_w + c * (tile_w + gap), y))
    return canvas
