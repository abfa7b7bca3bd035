"""``negguide demo``: every installed method on a small offline pipeline, side by side in a grid."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click

from negguide.cli.output import CLIError
from negguide.cli.output import file_stem
from negguide.cli.output import first_picture
from negguide.cli.output import format_table
from negguide.cli.output import jsonable
from negguide.cli.output import nonempty_negative
from negguide.cli.output import one_line
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
CELL = 128  # demo grid: the 32x32 images are upscaled (nearest neighbour) to this size


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
    help="Folder for grid.png, one PNG per method and demo.json.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the initial noise (same for every method)."
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
def demo(out_dir: Path, seed: int, steps: int | None, model: str, prompt: str | None, negative: str | None) -> None:
    """Run every installed method on a tiny offline pipeline and compare them.

    Writes a labelled grid (grid.png), one PNG per method, and demo.json (per method: the
    validated parameters, seed, steps, seconds, ratio to unguided, mean |difference| to the
    unguided picture; plus library versions). The tiny pipeline has random weights and needs no
    download. A method that fails is reported and the demo goes on; the exit status is 0 when
    the unguided run and every built-in method ran.
    """
    from negguide import registry

    default_prompt, default_negative, default_steps = DEMO_DEFAULTS[model]
    prompt = default_prompt if prompt is None else prompt
    negative = default_negative if negative is None else negative
    steps = default_steps if steps is None else steps
    note = TOYWORLD_NOTE if model == "toyworld" else RANDOM_WEIGHTS_NOTE
    if model == "toyworld":
        click.echo("negguide demo on the ToyWorld pipeline shipped with negguide (offline).")
    else:
        click.echo(f"negguide demo on a tiny {model} pipeline built offline.")
    click.echo(note)
    pipe, call_kwargs = demo_pipeline(model)
    results = _run_every_method(pipe, prompt, negative, seed, {"num_inference_steps": steps, **call_kwargs})

    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in results:
        if entry["status"] == "ok":
            meta = {**{k: v for k, v in entry.items() if k != "picture"}, "prompt": prompt, "negative": negative}
            save_png(entry["picture"], out_dir / entry["image"], {"negguide": json.dumps(meta)})
    header = [
        f"negguide demo: {model}, seed {seed}, {steps} steps",
        f"prompt: {prompt!r}   negative: {negative!r}",
        "trained ToyWorld model" if model == "toyworld" else RANDOM_WEIGHTS_NOTE,
    ]
    _grid(results, header).save(out_dir / "grid.png")
    record = {
        "model": model,
        "pipeline": type(pipe).__name__,
        "weights": "trained (negguide.toyworld)" if model == "toyworld" else "random",
        "note": note,
        "prompt": prompt,
        "negative": negative,
        "seed": seed,
        "steps": steps,
        "guidance_scale": call_kwargs["guidance_scale"],
        "versions": versions(),
        "grid": "grid.png",
        "methods": [{k: v for k, v in e.items() if k != "picture"} for e in results],
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")

    table = [["METHOD", "STATUS", "SECONDS", "VS NONE", ""]]
    for e in results:
        ratio = f"{e['ratio']:.2f}x" if "ratio" in e else "-"
        table.append([e["name"], e["status"], f"{e['seconds']:.3f}", ratio, e.get("error", "")])
    click.echo(format_table(table))
    click.echo(f"wrote {out_dir / 'grid.png'}, one PNG per method and {out_dir / 'demo.json'}")

    builtins = {name for name, (_cls, info) in registry.methods().items() if info.package == "negguide"}
    broken = [e["name"] for e in results if e["status"] == "failed" and e["name"] in {"none"} | builtins]
    if broken:
        raise CLIError(f"demo: {', '.join(broken)} failed on the tiny {model} pipeline (reasons in the table above)")


def _run_every_method(pipe: Any, prompt: str, negative: str, seed: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """Unguided, then every installed method with its family defaults; a failure is recorded, not raised."""
    import torch
    from tqdm import tqdm

    import negguide
    from negguide import registry

    def run() -> Any:
        return first_picture(pipe(prompt, generator=torch.Generator().manual_seed(seed), **call))

    run()  # untimed: one-time set-up costs must not land on the first method's time
    sources = registry.methods()
    results: list[dict[str, Any]] = []
    for name in tqdm(["none", *negguide.list_methods()], desc="methods", unit="method"):
        entry: dict[str, Any] = {"name": name, "params": {}, "seed": seed, "steps": call["num_inference_steps"]}
        if name in sources:
            entry["package"], entry["version"] = sources[name][1].package, sources[name][1].version
        start = time.perf_counter()
        try:
            if name == "none":
                picture = run()
            else:
                with negguide.apply(pipe, name, negative_prompt=negative) as handle:
                    entry["params"] = jsonable(handle.method.config.model_dump())
                    picture = run()
        except Exception as exc:  # a method that cannot run on this model is reported, not fatal
            entry.update(status="failed", seconds=round(time.perf_counter() - start, 4), error=one_line(exc))
        else:
            entry.update(status="ok", seconds=round(time.perf_counter() - start, 4), image=f"{file_stem(name)}.png")
            entry["picture"] = picture
        results.append(entry)

    unguided = results[0]
    for entry in results:
        if entry["status"] == "ok" and unguided["status"] == "ok":
            entry["ratio"] = round(entry["seconds"] / max(unguided["seconds"], 1e-9), 3)
            entry["mean_abs_diff"] = _mean_abs_diff(entry["picture"], unguided["picture"])
    return results


def _grid(results: list[dict[str, Any]], header: list[str]) -> Any:
    """Each method's picture, under it its difference to the unguided one (amplified), then its label."""
    from PIL import Image
    from PIL import ImageDraw
    from PIL import ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag|", font=font)[3] + 3
    pad, cols = 8, min(len(results), 6)
    rows = math.ceil(len(results) / cols)
    width = pad + cols * (CELL + pad)
    reference = results[0].get("picture")

    labels = []
    for e in results:
        lines = [e["name"] if e["status"] == "ok" else f"{e['name']} (failed)"]
        lines += _wrap(probe, font, _key_params(e["params"]), CELL)
        if e["name"] != "none" and "mean_abs_diff" in e:
            lines.append(f"mean |diff| {e['mean_abs_diff']:.4f}")
        labels.append(lines)
    label_h = max(len(lines) for lines in labels) * line_h + 4
    header_lines = [wrapped for text in header for wrapped in _wrap(probe, font, text, width - 2 * pad)]
    header_lines.append("top: the picture; below: |picture - none| per pixel, scaled to its own maximum (gain shown)")
    top = pad + len(header_lines) * line_h + pad
    cell_h = 2 * CELL + 2 + label_h + pad
    grid = Image.new("RGB", (width, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(header_lines):
        draw.text((pad, pad + i * line_h), text, fill="black", font=font)
    for i, (e, lines) in enumerate(zip(results, labels)):
        x = pad + (i % cols) * (CELL + pad)
        y = top + (i // cols) * cell_h
        if e["status"] == "ok":
            grid.paste(_upscale(e["picture"]), (x, y))
            if reference is not None and e is not results[0]:
                diff, gain = _diff_map(e["picture"], reference)
                grid.paste(_upscale(diff), (x, y + CELL + 2))
                draw.text((x + 3, y + CELL + 4), f"x{gain:.0f}" if gain else "no change", fill=(255, 200, 0), font=font)
            else:
                draw.rectangle((x, y + CELL + 2, x + CELL - 1, y + 2 * CELL + 1), fill=(240, 240, 240))
                draw.text((x + 4, y + CELL + 6), "reference", fill=(120, 120, 120), font=font)
        else:
            draw.rectangle((x, y, x + CELL - 1, y + 2 * CELL + 1), fill=(220, 220, 220))
            draw.text((x + 4, y + 4), "failed", fill=(160, 0, 0), font=font)
        for j, text in enumerate(lines):
            draw.text((x, y + 2 * CELL + 4 + j * line_h), text, fill="black" if j == 0 else (80, 80, 80), font=font)
    return grid


def _upscale(picture: Any) -> Any:
    from PIL import Image

    return picture.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def _diff_map(picture: Any, reference: Any) -> tuple[Any, float]:
    import numpy as np
    from PIL import Image

    a = np.asarray(picture.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB").resize(picture.size), dtype=np.float32)
    diff = np.abs(a - b).mean(axis=-1)
    peak = float(diff.max())
    gain = 255.0 / peak if peak > 0 else 0.0
    return Image.fromarray((diff * gain).clip(0, 255).astype(np.uint8), mode="L"), gain


def _mean_abs_diff(a: Any, b: Any) -> float:
    import numpy as np

    diff = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) / 255.0
    return round(float(diff.mean()), 4)


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
