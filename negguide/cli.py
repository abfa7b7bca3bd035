"""The ``negguide`` command line: list methods, run the offline demo, generate an image.

Built on the public API only. torch, diffusers and negguide itself are imported inside the
commands, so ``negguide --help`` answers at once.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

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


class CLIError(click.ClickException):
    """A user error, shown as one line ``error: ...`` on stderr, without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__("; ".join([line.rstrip(".") for line in lines[:-1]] + lines[-1:]))
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _usage_line(exc: click.UsageError) -> str:
    message = exc.format_message()
    if exc.ctx is not None:
        message = f"{message} (see `{exc.ctx.command_path} --help`)"
    return message


class _Group(click.Group):
    """A group whose errors (negguide's own and click's usage errors) are one line on stderr."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise CLIError(_usage_line(exc), exit_code=exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CLIError:
            raise
        except click.UsageError as exc:
            raise CLIError(_usage_line(exc), exit_code=exc.exit_code) from None
        except Exception as exc:
            # negguide is imported lazily; an error of its kind can only exist once it is imported
            errors = sys.modules.get("negguide.errors")
            if errors is not None and isinstance(exc, errors.NegGuideError):
                raise CLIError(str(exc)) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="negguide", prog_name="negguide")
def main() -> None:
    """Negative prompts that work on diffusers pipelines (VSF, NAG, NASA, CFG).

    \b
    negguide methods             the installed guidance methods and their parameters
    negguide demo                every method on a tiny offline pipeline, side by side
    negguide generate ...        one image with a method, parameters embedded in the PNG
    """


# ---------------------------------------------------------------------------------- methods


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("-v", "--verbose", is_flag=True, help="List every parameter with its description.")
def methods(as_json: bool, verbose: bool) -> None:
    """List the installed guidance methods, where they come from, and their parameters."""
    rows = _method_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    common = {"enabled", "start", "stop", "layers"}
    table = [["METHOD", "LEVEL", "PACKAGE", "VERSION", "PARAMETERS"]]
    for row in rows:
        own = " ".join(f"{p['name']}={_show(p['default'])}" for p in row["params"] if p["name"] not in common)
        table.append([row["name"], row["level"], row["package"], row["version"], own])
    click.echo(_format_table(table))
    click.echo(
        "\nEvery method also takes enabled=True start=0.0 stop=1.0; attention methods also layers=None "
        "(all blocks).\nSet them with `negguide generate --param key=value` or a --config YAML."
    )
    if verbose:
        for row in rows:
            click.echo(f"\n{row['name']}: {row['summary']}")
            width = max(len(p["name"]) for p in row["params"])
            for p in row["params"]:
                click.echo(f"  {p['name']:<{width}}  {_show(p['default']):<8}  {p['description']}")
            for family, params in row["family_defaults"].items():
                click.echo(f"  defaults on {family}: " + " ".join(f"{k}={_show(v)}" for k, v in params.items()))
    else:
        click.echo("Descriptions of every parameter: `negguide methods -v` (or --json).")


def _method_rows() -> list[dict[str, Any]]:
    from negguide import registry

    rows = []
    for name, (cls, info) in sorted(registry.methods().items()):
        params = []
        for field_name, field in cls.Config.model_fields.items():
            required = field.is_required()
            default = None if required else field.get_default(call_default_factory=True)
            params.append(
                {
                    "name": field_name,
                    "default": _jsonable(default),
                    "required": required,
                    "type": _type_name(field.annotation),
                    "description": field.description or "",
                }
            )
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "level": cls.level,
                "package": info.package,
                "version": info.version,
                "plugin": info.name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "summary": doc.splitlines()[0] if doc else "",
                "params": params,
                "family_defaults": _jsonable(dict(getattr(cls, "defaults", {}) or {})),
            }
        )
    return rows


# ---------------------------------------------------------------------------------- demo


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


@main.command()
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
@click.option("--negative", default=None, help="Negative prompt [default: 'blue square' for toyworld, else 'snow'].")
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
            _save_png(entry["picture"], out_dir / entry["image"], {"negguide": json.dumps(meta)})
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
        "versions": _versions(),
        "grid": "grid.png",
        "methods": [{k: v for k, v in e.items() if k != "picture"} for e in results],
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")

    table = [["METHOD", "STATUS", "SECONDS", "VS NONE", ""]]
    for e in results:
        ratio = f"{e['ratio']:.2f}x" if "ratio" in e else "-"
        table.append([e["name"], e["status"], f"{e['seconds']:.3f}", ratio, e.get("error", "")])
    click.echo(_format_table(table))
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
        return _first_picture(pipe(prompt, generator=torch.Generator().manual_seed(seed), **call))

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
                    entry["params"] = _jsonable(handle.method.config.model_dump())
                    picture = run()
        except Exception as exc:  # a method that cannot run on this model is reported, not fatal
            entry.update(status="failed", seconds=round(time.perf_counter() - start, 4), error=_one_line(exc))
        else:
            entry.update(status="ok", seconds=round(time.perf_counter() - start, 4), image=f"{_file_stem(name)}.png")
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
    return " ".join(f"{k}={_show(v)}" for k, v in params.items() if k not in skip)


def _wrap(draw: Any, font: Any, text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


# ---------------------------------------------------------------------------------- generate


@main.command()
@click.option("--model", required=True, help="A local folder saved with save_pretrained, or a hub id.")
@click.option("--prompt", required=True, help="Positive prompt.")
@click.option("--negative", default=None, help="Negative prompt (overrides the config's).")
@click.option(
    "--method",
    default=None,
    help="Guidance method (see `negguide methods`), or 'none' for a baseline without negguide (the pipeline's own "
    "negative_prompt then gets --negative). Default: the config's method, else vsf. The config's params apply "
    "only to the config's method.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method parameter, repeatable; values are read as int, float, bool, inf, null or a JSON list, "
    "else as text. Overrides the config's params.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Denoising steps.")
@click.option(
    "--guidance-scale",
    type=float,
    default=None,
    help="The pipeline's own guidance_scale (default: the pipeline's). Distilled models (SD3.5 Turbo) "
    "want 0; with a negguide method, values that switch the pipeline's CFG on guide the conditional branch only.",
)
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image height (default: the pipeline's).")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image width (default: the pipeline's).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write (default: negguide-<method>-<seed>.png). A sidecar <out>.json is written beside it.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML with method, params and negative_prompt (see docs/config.md).",
)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Weights dtype; auto is bfloat16 on cuda, float32 elsewhere.",
)
@click.option("--no-embed-metadata", is_flag=True, help="Write no parameters into the PNG (the sidecar still is).")
def generate(
    model: str,
    prompt: str,
    negative: str | None,
    method: str | None,
    params: tuple[str, ...],
    seed: int,
    steps: int,
    guidance_scale: float | None,
    height: int | None,
    width: int | None,
    out: Path | None,
    config_path: Path | None,
    device: str | None,
    dtype: str,
    no_embed_metadata: bool,
) -> None:
    """Generate one image with a guidance method and save it with its parameters.

    The PNG carries a `parameters` text chunk (A1111 style) and a `negguide` JSON chunk; the
    sidecar <out>.json (e.g. img.json beside img.png) holds the same record. For video pipelines
    (Wan) the middle frame is saved.
    """
    import negguide

    name, guided, negative_prompt = _guidance(method, config_path, negative, _parse_params(params))
    _check_model(model)
    out = out if out is not None else Path(f"negguide-{_file_stem(name)}-{seed}.png")

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    started = time.perf_counter()
    pipe = _load_pipeline(model, torch_dtype, device)
    load_seconds = time.perf_counter() - started

    accepted = inspect.signature(pipe.__call__).parameters
    call: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
    for key, value in {"guidance_scale": guidance_scale, "height": height, "width": width}.items():
        if value is not None:
            call[key] = value
    if "output_type" in accepted:
        call["output_type"] = "np"
    if guided is None and negative_prompt is not None and "negative_prompt" in accepted:
        call["negative_prompt"] = negative_prompt  # the pipeline's own negative (used by its own CFG)

    validated: dict[str, Any] = {}
    family = None
    started = time.perf_counter()
    try:
        if guided is None:
            result = pipe(prompt, **call)
        else:
            with negguide.apply(pipe, guided) as handle:
                validated = _jsonable(handle.method.config.model_dump())
                family = handle.adapter.family
                result = pipe(prompt, **call)
    except ValueError as exc:
        if isinstance(exc, negguide.NegGuideError):
            raise
        raise CLIError(f"the pipeline rejected the call: {_one_line(exc)}") from None
    seconds = time.perf_counter() - started

    picture, frame = _first_picture(result, with_frame=True)
    used_scale = call.get("guidance_scale", _default(accepted, "guidance_scale"))
    record = {
        "method": name,
        "params": validated,
        "negative": negative_prompt if negative_prompt is not None else "",
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": used_scale,
        "width": picture.width,
        "height": picture.height,
        "model": model,
        "pipeline": type(pipe).__name__,
        "family": family or "",
        "device": str(device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "image": out.name,
        "versions": _versions(),
        "seconds": round(seconds, 4),
        "load_seconds": round(load_seconds, 4),
    }
    if frame is not None:
        record["frame"] = frame
    text = {} if no_embed_metadata else {"parameters": _a1111(record), "negguide": json.dumps(record)}
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_png(picture, out, text)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"wrote {out} and {sidecar} ({name}, {seconds:.2f} s)")


def _guidance(
    method: str | None, config_path: Path | None, negative: str | None, overrides: dict[str, Any]
) -> tuple[str, Any, str | list[str] | None]:
    """The method name, its ``GuidanceSpec`` (None for ``none``) and the negative prompt, checked
    before any model is loaded. Command-line values win over the config's."""
    import negguide

    spec = negguide.load_config(config_path) if config_path is not None else None
    name = method or (spec.method if spec else "vsf")
    negative_prompt = negative if negative is not None else (spec.negative_prompt if spec else None)
    if name == "none":
        if overrides:
            raise CLIError("`--param` sets a method's parameters, but `--method none` runs unguided; drop --param.")
        return name, None, negative_prompt
    same = spec is not None and spec.method == name
    params = {**(spec.params if same else {}), **overrides}
    method_cls = negguide.get_method(name)
    method_cls.make_config(params)  # the family defaults come later; an invalid value fails now
    if method_cls.level == "attention" and negative_prompt is None:
        raise negguide.NegativePromptError(
            f"{name}: expected a negative prompt, got none. Pass --negative TEXT (or negative_prompt in --config)."
        )
    adapter = spec.adapter if same else "auto"
    guided = negguide.GuidanceSpec(method=name, adapter=adapter, negative_prompt=negative_prompt, params=params)
    return name, guided, negative_prompt


def parse_param(text: str, option: str = "--param") -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read the value as int, float, bool, inf, null or a JSON list, else text.

    ``option`` names the command-line option in error messages.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint=f"'{option}'")
    raw = raw.strip()
    lowered = raw.lower()
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    words |= {"null": None, "none": None, "~": None}
    words |= {"inf": math.inf, "+inf": math.inf, "infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}
    if lowered in words:
        return key, words[lowered]
    for read in (int, float):
        try:
            return key, read(raw)
        except ValueError:
            pass
    if raw.startswith(("[", "{")):
        try:
            return key, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(
                f"{key}: {raw!r} is not valid JSON ({exc.msg})", param_hint=f"'{option}'"
            ) from None
    return key, raw


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    return dict(parse_param(item) for item in items)


def _looks_local(model: str) -> bool:
    """A hub id is ``org/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x``) is a path."""
    if model.startswith((".", "/", "~")) or "\\" in model or re.match(r"^[A-Za-z]:", model):
        return True
    return model.count("/") != 1


def _check_model(model: str) -> None:
    if _looks_local(model) and not os.path.exists(os.path.expanduser(model)):
        raise CLIError(f"model path not found: {model!r}; pass a local folder saved with save_pretrained or a hub id")


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def _load_pipeline(model: str, torch_dtype: Any, device: str) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"expected a torch device like 'cpu' or 'cuda:0', got {device!r} ({_one_line(exc)})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r} asked for, but CUDA is not available here; pass --device cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype` is renamed `dtype` in newer diffusers
            pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(model), torch_dtype=torch_dtype)
    except OSError as exc:
        raise CLIError(
            f"could not load the model {model!r}: {_one_line(exc)}; pass a local folder saved with "
            "save_pretrained or a hub id"
        ) from None
    return pipe.to(target)


def _default(parameters: Any, name: str) -> Any:
    param = parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return ""
    return _jsonable(param.default)


def _a1111(record: dict[str, Any]) -> str:
    fields = {
        "Steps": record["steps"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
        "Guidance scale": record["guidance_scale"],
        "NegGuide method": record["method"],
        "NegGuide params": " ".join(f"{k}={_show(v)}" for k, v in record["params"].items()),
        "Version": f"negguide {record['versions']['negguide']}",
    }
    settings = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v != "")
    negative = record["negative"]
    return f"{record['prompt']}\n" + (f"Negative prompt: {negative}\n" if negative else "") + settings


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


# ---------------------------------------------------------------------------------- shared helpers


def _first_picture(result: Any, with_frame: bool = False) -> Any:
    """The first prompt's image as PIL (for a video, its middle frame, and that frame's index)."""
    images = getattr(result, "images", None)
    frame = None
    if images is not None:
        picture = images[0]
    else:
        video = result.frames[0]
        frame = len(video) // 2
        picture = video[frame]
    picture = _to_pil(picture)
    return (picture, frame) if with_frame else picture


def _to_pil(value: Any) -> Any:
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _save_png(picture: Any, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    picture.save(path, format="PNG", pnginfo=info)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    found = {}
    for package in ("negguide", "torch", "diffusers", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = ".".join(map(str, sys.version_info[:3]))
    return found


def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become the strings 'inf', '-inf', 'nan' (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _show(value: Any) -> str:
    return "None" if value is None else str(value)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0].rstrip(".") if len(lines[0]) <= limit else lines[0][: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}"


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _attach_toyworld() -> None:
    from negguide.toyworld.cli import toyworld

    main.add_command(toyworld)


_attach_toyworld()
