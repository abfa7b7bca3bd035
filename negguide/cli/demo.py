"""``negguide demo``: every installed method on a small offline pipeline, side by side in a grid."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from negguide.cli.output import CLIError
from negguide.cli.output import file_stem
from negguide.cli.output import format_table
from negguide.cli.output import jsonable
from negguide.cli.output import nonempty_negative
from negguide.cli.output import one_line
from negguide.cli.output import pictures
from negguide.cli.output import save_png
from negguide.cli.output import show
from negguide.cli.output import versions

#: printed by ``demo`` and written into its sidecar: the tiny pipelines are untrained
RANDOM_WEIGHTS_NOTE = "random weights: the pictures show that guidance runs and what it changes, not image quality"

#: printed for the default demo model, which is trained (negguide.toyworld)
TOYWORLD_NOTE = (
    "ToyWorld: a small model trained here on scenes of coloured shapes (weights ship with negguide); "
    "the prompt's object nearly always comes with the negative's object, which guidance should remove"
)

DEMO_MODELS = ("toyworld", "sd3", "flux", "wan")
DEFAULT_PROMPT = "a canadian winter landscape"
DEFAULT_NEGATIVE = "snow"
#: per demo model: (prompt, negative, steps) used when the options are not given
DEMO_DEFAULTS = {
    "toyworld": ("red circle", "blue square", 8),
    "sd3": (DEFAULT_PROMPT, DEFAULT_NEGATIVE, 4),
    "flux": (DEFAULT_PROMPT, DEFAULT_NEGATIVE, 4),
    "wan": (DEFAULT_PROMPT, DEFAULT_NEGATIVE, 4),
}
CELL = 128  # demo grid: the pictures are upscaled (nearest neighbour, no blur) to fit this square
MAX_SEEDS = 16

#: said on the grid, in the table and in demo.json when the model has no detector
NO_DETECTOR = (
    "no detector: removed/positive rates are measured on ToyWorld only (random-weight pictures show no objects)"
)


def demo_pipeline(model: str) -> tuple[Any, dict[str, Any]]:
    """The demo's pipeline and the call arguments under which only negguide guides.

    The one place that chooses the demo model: the trained ToyWorld pipeline shipped with
    negguide (the default), or the embedded tiny random-weight pipelines of ``negguide.tiny``. The
    pipeline's own guidance is off (``guidance_scale`` 0, or 1 for Wan, whose pipeline runs CFG
    above 1).
    """
    if model == "toyworld":
        from negguide import toyworld

        pipe, _prompt, _negative, kwargs = toyworld.demo_pipeline()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_inference_steps", "generator")}
        return pipe, {**kwargs, "guidance_scale": 0.0, "output_type": "np"}
    from negguide import tiny

    builders = {"sd3": tiny.sd3, "flux": tiny.flux, "wan": tiny.wan}
    pipe = builders[model]()
    kwargs = dict(tiny.CALL_KWARGS[model])
    kwargs["guidance_scale"] = 1.0 if model == "wan" else 0.0
    return pipe, kwargs


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("negguide-demo"),
    show_default=True,
    help="Folder for grid.png, one PNG per method (its seeds side by side) and demo.json.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="First seed of the initial noise (same for every method)."
)
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(1, MAX_SEEDS),
    default=4,
    show_default=True,
    help="How many seeds (seed, seed+1, ...): one row of the grid each.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Denoising steps [default: 8 for toyworld, else 4]."
)
@click.option(
    "--model",
    type=click.Choice(DEMO_MODELS),
    default="toyworld",
    show_default=True,
    help="The trained ToyWorld model, or a tiny random-weight model family.",
)
@click.option("--prompt", default=None, help="Positive prompt [default: 'red circle' for toyworld, else a landscape].")
@click.option(
    "--negative",
    default=None,
    callback=nonempty_negative,
    help="Negative prompt [default: 'blue square' for toyworld, else 'snow'].",
)
def demo(
    out_dir: Path, seed: int, n_seeds: int, steps: int | None, model: str, prompt: str | None, negative: str | None
) -> None:
    """Run every installed method on a small offline pipeline and compare them.

    Writes a labelled grid (grid.png: a column per method, a row per seed, and under each column
    on ToyWorld the share of seeds whose negative object was removed and whose prompted object is
    there, as the ToyWorld detector measures them), one PNG per method (its seeds side by side)
    and demo.json (per method: the validated parameters, seeds, steps, seconds, ratio to unguided,
    mean |difference| to the unguided pictures, the detector's rates; plus library versions).
    Nothing is downloaded. A method that fails is reported and the demo goes on; the exit status
    is 0 when the unguided run and every built-in method ran.
    """
    from negguide import registry

    default_prompt, default_negative, default_steps = DEMO_DEFAULTS[model]
    prompt = default_prompt if prompt is None else prompt
    negative = default_negative if negative is None else negative
    steps = default_steps if steps is None else steps
    seeds = list(range(seed, seed + n_seeds))
    note = TOYWORLD_NOTE if model == "toyworld" else RANDOM_WEIGHTS_NOTE
    if model == "toyworld":
        click.echo("negguide demo on the ToyWorld pipeline shipped with negguide (offline).")
    else:
        click.echo(f"negguide demo on a tiny {model} pipeline built offline.")
    click.echo(note)
    detector, detector_note = _detector(model, prompt, negative)
    pipe, call_kwargs = demo_pipeline(model)
    results = _run_every_method(pipe, prompt, negative, seeds, {"num_inference_steps": steps, **call_kwargs})
    for entry in results:
        if entry["status"] == "ok" and detector is not None:
            entry.update(detector(entry["pictures"]))

    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in results:
        if entry["status"] == "ok":
            meta = {**_public(entry), "prompt": prompt, "negative": negative}
            save_png(_strip(entry["pictures"]), out_dir / entry["image"], {"negguide": json.dumps(meta)})
    header = [
        f"negguide demo: {model}, {_seed_text(seeds)}, {steps} steps",
        f"prompt: {prompt!r}   negative: {negative!r}",
        "trained ToyWorld model" if model == "toyworld" else RANDOM_WEIGHTS_NOTE,
    ]
    grid, boxes = _grid(results, seeds, header, detector_note)
    grid.save(out_dir / "grid.png")
    for entry in results:
        if entry["name"] in boxes:
            entry["cells"] = boxes[entry["name"]]  # where its seeds are in grid.png: [left, top, right, bottom]
    record = {
        "model": model,
        "pipeline": type(pipe).__name__,
        "weights": "trained (negguide.toyworld)" if model == "toyworld" else "random",
        "note": note,
        "prompt": prompt,
        "negative": negative,
        "seed": seed,
        "seeds": seeds,
        "steps": steps,
        "guidance_scale": call_kwargs["guidance_scale"],
        "detector": "negguide.toyworld.world.detect" if detector is not None else None,
        "detector_note": detector_note,
        "versions": versions(),
        "grid": "grid.png",
        "methods": [_public(e) for e in results],
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")

    rated = detector is not None
    table = [["METHOD", "STATUS", "SECONDS", "VS NONE", *(["REMOVED", "POSITIVE"] if rated else ["MEAN |DIFF|"]), ""]]
    for e in results:
        ratio = f"{e['ratio']:.2f}x" if "ratio" in e else "-"
        if rated:
            story = [_count(e, "removed"), _count(e, "positive")]
        else:
            story = [f"{e['mean_abs_diff']:.4f}" if "mean_abs_diff" in e and e["name"] != "none" else "-"]
        table.append([e["name"], e["status"], f"{e['seconds']:.3f}", ratio, *story, e.get("error", "")])
    click.echo(format_table(table))
    click.echo(detector_note)
    click.echo(f"wrote {out_dir / 'grid.png'}, one PNG per method and {out_dir / 'demo.json'}")

    builtins = {name for name, (_cls, info) in registry.methods().items() if info.package == "negguide"}
    broken = [e["name"] for e in results if e["status"] == "failed" and e["name"] in {"none"} | builtins]
    if broken:
        raise CLIError(f"demo: {', '.join(broken)} failed on the {model} pipeline (reasons in the table above)")


def _seed_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]} (one row each)"


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "pictures"}


def _count(entry: dict[str, Any], rate: str) -> str:
    """``3/4``: how many of the method's seeds the rate counts (``-`` for a failed method)."""
    if rate not in entry:
        return "-"
    n = len(entry["seeds"])
    return f"{round(entry[rate] * n)}/{n}"


def _detector(model: str, prompt: str, negative: str) -> tuple[Any, str]:
    """The rates of a method's pictures (None where nothing can measure them), and what the numbers mean."""
    if model != "toyworld":
        return None, NO_DETECTOR
    import numpy as np

    from negguide.toyworld import world

    names = [world.object_name(i) for i in range(len(world.OBJECTS))]
    if prompt not in names or negative not in names:
        known = ", ".join(repr(n) for n in names)
        return None, (
            f"no rates: the ToyWorld detector knows the objects {known}; prompt {prompt!r} and negative "
            f"{negative!r} are not both among them"
        )

    def rates(found: list[Any]) -> dict[str, Any]:
        # the saved 8-bit pictures, in the detector's [-1, 1] channels-first range: the numbers are of what is shown
        images = np.stack([np.asarray(p.convert("RGB"), dtype=np.float64) / 255.0 * 2 - 1 for p in found])
        present = world.detect(images.transpose(0, 3, 1, 2))
        has_prompt, has_negative = present[:, names.index(prompt)], present[:, names.index(negative)]
        return {
            "removed": float(1 - has_negative.mean()),
            "positive": float(has_prompt.mean()),
            "detected": [{"prompt": bool(p), "negative": bool(n)} for p, n in zip(has_prompt, has_negative)],
        }

    note = (
        f"removed: share of seeds without the negative ({negative}); positive: share with the prompt ({prompt}); "
        "as the ToyWorld colour detector counts them"
    )
    return rates, note


def _run_every_method(
    pipe: Any, prompt: str, negative: str, seeds: list[int], call: dict[str, Any]
) -> list[dict[str, Any]]:
    """Unguided, then every installed method with its family defaults, each on every seed in one batch;
    a failure is recorded, not raised."""
    import torch

    def run(**override: Any) -> list[Any]:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pictures(pipe([prompt] * len(seeds), generator=generators, **{**call, **override}))

    threads = torch.get_num_threads()
    # every demo model is tiny (32x32): more threads cost more in synchronisation than they gain, and thrash
    # when the cores are busy (20x slower on a loaded 2-core machine)
    torch.set_num_threads(1)
    try:
        return _time_every_method(pipe, negative, seeds, call["num_inference_steps"], run)
    finally:
        torch.set_num_threads(threads)


#: timed rounds of the demo: every setting once per round, the order rotated each round
TIMED_ROUNDS = 3


def _time_every_method(
    pipe: Any,
    negative: str,
    seeds: list[int],
    steps: int,
    run: Callable[..., list[Any]],
    rounds: int = TIMED_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Time unguided and every installed method fairly: first one untimed one-step call of each (first-call
    costs land on no one's time), then ``rounds`` interleaved rounds, every setting once per round in an order
    rotated each round. ``seconds`` is a setting's median time; ``ratio`` the median of its per-round ratios to
    the unguided call of the same round, ``ratio_range`` their min and max."""
    from tqdm import tqdm

    import negguide
    from negguide import registry

    sources = registry.methods()
    names = ["none", *negguide.list_methods()]
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        entry: dict[str, Any] = {"name": name, "params": {}, "seed": seeds[0], "seeds": seeds, "steps": steps}
        if name in sources:
            entry["package"], entry["version"] = sources[name][1].package, sources[name][1].version
        entries[name] = entry
    times: dict[str, list[float]] = {name: [] for name in names}

    def once(name: str, **override: Any) -> None:
        entry = entries[name]
        start = clock()
        try:
            if name == "none":
                found = run(**override)
            else:
                with negguide.apply(pipe, name, negative_prompt=negative) as handle:
                    entry["params"] = jsonable(handle.method.config.model_dump())
                    found = run(**override)
        except Exception as exc:  # a method that cannot run on this model is reported, not fatal
            entry.update(status="failed", seconds=round(clock() - start, 4), error=one_line(exc))
            entry.pop("pictures", None)
            return
        if not override:
            times[name].append(clock() - start)
            entry.update(status="ok", image=f"{file_stem(name)}.png", pictures=found)

    with tqdm(total=len(names) * (rounds + 1), desc="methods (warm-up, then timed rounds)", unit="run") as bar:
        for name in names:  # warm-up: untimed, one step each
            once(name, num_inference_steps=1)
            bar.update()
        for round_index in range(rounds):
            live = [n for n in names if entries[n].get("status") != "failed"]
            shift = round_index % max(len(live), 1)
            for name in live[shift:] + live[:shift]:
                once(name)
                bar.update()

    results = [entries[name] for name in names]
    unguided = times["none"]
    for entry in results:
        if entry.get("status") != "ok":
            continue
        mine = times[entry["name"]]
        entry["seconds"] = round(statistics.median(mine), 4)
        if entries["none"].get("status") == "ok":
            per_round = [a / max(b, 1e-9) for a, b in zip(mine, unguided)]
            entry["ratio"] = round(statistics.median(per_round), 3)
            entry["ratio_range"] = [round(min(per_round), 3), round(max(per_round), 3)]
            entry["mean_abs_diff"] = _mean_abs_diff(entry["pictures"], entries["none"]["pictures"])
    return results


def _strip(found: list[Any]) -> Any:
    """The pictures side by side, at their own size (the PNG of one method: seed, seed+1, ...)."""
    from PIL import Image

    width, height = found[0].size
    strip = Image.new("RGB", (width * len(found), height), "white")
    for i, picture in enumerate(found):
        strip.paste(picture.convert("RGB"), (i * width, 0))
    return strip


def _grid(
    results: list[dict[str, Any]], seeds: list[int], header: list[str], detector_note: str
) -> tuple[Any, dict[str, list[list[int]]]]:
    """A column per method and a row per seed; under each column its rates (ToyWorld) or its mean difference to
    the unguided pictures (random weights, with a row of difference maps for the first seed), then its parameters.

    Returns:
        The picture, and per method the box ``[left, top, right, bottom]`` of each seed's cell in it.
    """
    from PIL import Image
    from PIL import ImageDraw
    from PIL import ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag|", font=font)[3] + 3
    pad = 8
    gutter = pad + int(max(probe.textlength(f"seed {s}", font=font) for s in [*seeds, "|diff|"])) + pad
    width = gutter + len(results) * (CELL + pad)
    reference = results[0].get("pictures")
    rated = any("removed" in e for e in results)
    diff_row = not rated and reference is not None

    labels = []
    for e in results:
        lines = [e["name"] if e["status"] == "ok" else f"{e['name']} (failed)"]
        if rated and "removed" in e:
            lines += [f"removed {_count(e, 'removed')}", f"positive {_count(e, 'positive')}"]
        elif e["name"] != "none" and "mean_abs_diff" in e:
            lines.append(f"mean |diff| {e['mean_abs_diff']:.4f}")
        lines += _wrap(probe, font, _key_params(e["params"]), CELL)
        labels.append(lines)
    label_h = max(len(lines) for lines in labels) * line_h + 4
    header_lines = [wrapped for text in header for wrapped in _wrap(probe, font, text, width - 2 * pad)]
    if diff_row:
        header_lines.append(
            f"bottom row: |picture - none| of seed {seeds[0]} per pixel, scaled to its own maximum (gain shown)"
        )
    footer = _wrap(probe, font, detector_note, width - 2 * pad)
    top = pad + len(header_lines) * line_h + pad
    rows = len(seeds) + (1 if diff_row else 0)
    body_h = line_h + rows * (CELL + 4) + label_h
    grid = Image.new("RGB", (width, top + body_h + len(footer) * line_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(header_lines):
        draw.text((pad, pad + i * line_h), text, fill="black", font=font)
    row_y = [top + line_h + r * (CELL + 4) for r in range(rows)]
    for r, y in enumerate(row_y):
        draw.text(
            (pad, y + CELL // 2 - line_h // 2),
            f"seed {seeds[r]}" if r < len(seeds) else "|diff|",
            fill="black",
            font=font,
        )
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for i, (e, lines) in enumerate(zip(results, labels)):
        x = gutter + i * (CELL + pad)
        draw.text((x, top), lines[0], fill="black", font=font)
        if e["status"] == "ok":
            boxes[e["name"]] = []
            for r, picture in enumerate(e["pictures"]):
                cell = _upscale(picture)
                grid.paste(cell, (x, row_y[r]))
                # a thin frame: the white ToyWorld backgrounds would otherwise merge with the grid's
                draw.rectangle((x - 1, row_y[r] - 1, x + cell.width, row_y[r] + cell.height), outline=(200, 200, 200))
                boxes[e["name"]].append([x, row_y[r], x + cell.width, row_y[r] + cell.height])
            if diff_row:
                y = row_y[-1]
                if e is results[0]:
                    draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=(240, 240, 240))
                    draw.text((x + 4, y + 4), "reference", fill=(120, 120, 120), font=font)
                else:
                    diff, gain = _diff_map(e["pictures"][0], reference[0])
                    grid.paste(_upscale(diff), (x, y))
                    draw.text((x + 3, y + 2), f"x{gain:.0f}" if gain else "no change", fill=(255, 200, 0), font=font)
        else:
            draw.rectangle((x, row_y[0], x + CELL - 1, row_y[-1] + CELL - 1), fill=(220, 220, 220))
            draw.text((x + 4, row_y[0] + 4), "failed", fill=(160, 0, 0), font=font)
        label_top = row_y[-1] + CELL + 4
        for j, text in enumerate(lines[1:]):
            colour = "black" if text.startswith(("removed", "positive")) else (80, 80, 80)
            draw.text((x, label_top + j * line_h), text, fill=colour, font=font)
    footer_top = top + body_h
    for i, text in enumerate(footer):
        draw.text((pad, footer_top + i * line_h), text, fill=(80, 80, 80), font=font)
    return grid, boxes


def _upscale(picture: Any) -> Any:
    """Enlarged by a whole factor with nearest neighbour: every pixel becomes a sharp square, nothing is blurred."""
    from PIL import Image

    factor = max(1, CELL // max(picture.size))
    return picture.convert("RGB").resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def _diff_map(picture: Any, reference: Any) -> tuple[Any, float]:
    import numpy as np
    from PIL import Image

    a = np.asarray(picture.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB").resize(picture.size), dtype=np.float32)
    diff = np.abs(a - b).mean(axis=-1)
    peak = float(diff.max())
    gain = 255.0 / peak if peak > 0 else 0.0
    return Image.fromarray((diff * gain).clip(0, 255).astype(np.uint8), mode="L"), gain


def _mean_abs_diff(a: list[Any], b: list[Any]) -> float:
    """Mean |a - b| over every seed's picture, in [0, 1] units."""
    import numpy as np

    diffs = [np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32)) / 255.0 for x, y in zip(a, b)]
    return round(float(np.mean(diffs)), 4)


def _key_params(params: dict[str, Any]) -> str:
    skip = {"enabled", "start", "stop", "layers", "attention"}
    return " ".join(f"{k}={show(v)}" for k, v in params.items() if k not in skip)


def _wrap(draw: Any, font: Any, text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
