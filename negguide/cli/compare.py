"""``negguide compare``: several settings side by side on the same seeds, as a labelled grid.

Loads the model as ``negguide generate`` does, renders each ``--method`` setting on each seed with
`negguide.sweep.compare`, and writes ``grid.png``, one PNG per image (with ``generate``'s metadata) and
``compare.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from negguide.cli.output import CLIError
from negguide.cli.output import file_stem
from negguide.cli.output import nonempty_negative
from negguide.cli.output import save_png
from negguide.cli.output import versions


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """``HxW`` (``"512x768"``: height 512, width 768) or ``N`` (square); None keeps the pipeline's."""
    if value is None:
        return None, None
    height, _, width = value.lower().partition("x")
    try:
        h, w = int(height), int(width or height)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise CLIError(f"expected --size HxW (height x width, e.g. 512x768) or N, got {value!r}")
    return h, w


def model_options(command: click.Command) -> click.Command:
    """The options ``compare`` and ``eval`` share: model, settings, seeds, steps, CFG, size, device, dtype, offload."""
    options = [
        click.option(
            "--model",
            required=True,
            help="A local folder saved with save_pretrained, a hub id, 'toyworld' (the ToyWorld model shipped "
            "with negguide; offline) or 'toyworld-turbo' (its distilled student: --steps 4 or fewer, no CFG).",
        ),
        click.option(
            "--method",
            "methods",
            multiple=True,
            required=True,
            metavar="'METHOD [KEY=VALUE ...]'",
            help="A setting, repeatable: a method (see `negguide methods`) or 'none' (unguided), then its "
            "parameters as in `generate --param`, e.g. --method none --method vsf --method 'nag scale=3'.",
        ),
        click.option(
            "--seeds", default="0-3", show_default=True, help="Seeds of the initial noise: '0-3', '0,2,7' or '5'."
        ),
        click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Denoising steps."),
        click.option(
            "--guidance-scale",
            type=float,
            default=None,
            help="The pipeline's own guidance_scale (default: the model's; ToyWorld: 0). Distilled models want 0.",
        ),
        click.option("--size", default=None, metavar="HxW", help="Image height x width (default: the model's)."),
        click.option("--device", default=None, help="torch device (default: cuda if available, else cpu)."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="Weights dtype; auto is bfloat16 on cuda, float32 elsewhere.",
        ),
        click.option(
            "--offload",
            type=click.Choice(["model", "sequential"]),
            default=None,
            help="diffusers' CPU offloading, onto --device: 'model' (enable_model_cpu_offload: one component on the "
            "device at a time) or 'sequential' (enable_sequential_cpu_offload: one layer at a time, slowest). "
            "Default: the whole pipeline on the device.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(model: str, device: str | None, dtype: str, offload: str | None = None) -> tuple[object, float]:
    """The pipeline as ``generate`` loads it (``toyworld``, a folder, a hub id), and the seconds it took.

    With ``offload`` (``"model"`` or ``"sequential"``) the pipeline stays on the CPU and diffusers' offloading
    moves its parts onto ``device`` when they run.
    """
    import torch

    from negguide.cli.generate import _check_model
    from negguide.cli.generate import _load_pipeline
    from negguide.cli.generate import _torch_dtype

    _check_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    if offload is None:
        pipe, _ = _load_pipeline(model, _torch_dtype(dtype, device), device)
    else:
        pipe, _ = _load_pipeline(model, _torch_dtype(dtype, device), "cpu")
        onto = torch.device(device)
        if onto.type == "cuda" and onto.index is None:
            onto = torch.device("cuda", torch.cuda.current_device())
        if offload == "model":
            pipe.enable_model_cpu_offload(device=onto)
        else:
            pipe.enable_sequential_cpu_offload(device=onto)
    return pipe, time.perf_counter() - started


@click.command()
@model_options
@click.option("--prompt", required=True, help="Positive prompt.")
@click.option("--negative", default=None, callback=nonempty_negative, help="Negative prompt.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("negguide-compare"),
    show_default=True,
    help="Folder for grid.png, one PNG per image and compare.json.",
)
@click.option(
    "--no-embed-metadata", is_flag=True, help="Write no parameters into the PNGs (compare.json still has them)."
)
def compare(
    model: str,
    methods: tuple[str, ...],
    seeds: str,
    steps: int,
    guidance_scale: float | None,
    size: str | None,
    device: str | None,
    dtype: str,
    offload: str | None,
    prompt: str,
    negative: str | None,
    out: Path,
    no_embed_metadata: bool,
) -> None:
    """Render several settings on the same seeds, side by side in a labelled grid.

    Rows are the settings, columns the seeds; the header names the model, the prompts and the steps.
    Each image is also saved as a PNG with the metadata `negguide generate` writes, and
    compare.json records the run.
    """
    from negguide.cli.generate import _a1111
    from negguide.sweep import compare as run_compare
    from negguide.sweep import parse_seeds
    from negguide.sweep import parse_settings

    settings = parse_settings(methods, negative)  # every setting is checked before the model loads
    seed_list = parse_seeds(seeds)
    height, width = parse_size(size)
    pipe, load_seconds = load_model(model, device, dtype, offload)
    started = time.perf_counter()
    result = run_compare(
        pipe,
        prompt,
        settings,
        seed_list,
        negative=negative,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        model=model,
    )
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    rows = {setting.label: i for i, setting in enumerate(settings)}
    for record, ((label, seed), picture) in zip(result.records, result.images.items()):
        name = f"{rows[label]:02d}-{file_stem(label.replace(' ', '_'))}-seed{seed}.png"
        record["image"] = name
        record["load_seconds"] = round(load_seconds, 4)
        text = {} if no_embed_metadata else {"parameters": _a1111(record), "negguide": json.dumps(record)}
        save_png(picture, out / name, text)
    result.grid.save(out / "grid.png")
    run = {
        "model": model,
        "prompt": prompt,
        "negative": negative or "",
        "settings": [s.label for s in settings],
        "seeds": seed_list,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "size": [height, width] if height else None,
        "offload": offload,
        "grid": "grid.png",
        "images": result.records,
        "versions": versions(),
        "seconds": round(seconds, 4),
        "load_seconds": round(load_seconds, 4),
    }
    (out / "compare.json").write_text(json.dumps(run, indent=2) + "\n")
    click.echo(f"wrote {out}/grid.png, {len(result.records)} PNGs and compare.json ({seconds:.2f} s)")
