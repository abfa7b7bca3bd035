"""``negguide generate``: one image with a guidance method, saved with its parameters.

Loads the pipeline with ``DiffusionPipeline.from_pretrained`` (``toyworld``, or a folder holding a
ToyWorld pipeline, with ``negguide.toyworld.load``); the PNG carries the parameters (an A1111-style
``parameters`` chunk and a ``negguide`` JSON chunk) and a sidecar JSON the same record.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import click

from negguide.cli.output import CLIError
from negguide.cli.output import file_stem
from negguide.cli.output import first_picture
from negguide.cli.output import jsonable
from negguide.cli.output import nonempty_negative
from negguide.cli.output import one_line
from negguide.cli.output import save_png
from negguide.cli.output import show
from negguide.cli.output import versions
from negguide.params import parse_params

#: ``--model`` value of the ToyWorld model shipped with negguide (a local folder of that name: ``./toyworld``)
TOYWORLD = "toyworld"
#: the distilled few-step student of the shipped ToyWorld model (4 steps or fewer, no CFG)
TOYWORLD_TURBO = "toyworld-turbo"


@click.command()
@click.option(
    "--model",
    required=True,
    help="A local folder saved with save_pretrained, a hub id, 'toyworld' (the ToyWorld model shipped with "
    "negguide; offline) or 'toyworld-turbo' (its distilled student: --steps 4 or fewer, no CFG).",
)
@click.option("--prompt", required=True, help="Positive prompt.")
@click.option("--negative", default=None, callback=nonempty_negative, help="Negative prompt (overrides the config's).")
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

    name, guided, negative_prompt = _guidance(method, config_path, negative, parse_params(params))
    _check_model(model)
    out = out if out is not None else Path(f"negguide-{file_stem(name)}-{seed}.png")

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    started = time.perf_counter()
    pipe, model_call = _load_pipeline(model, torch_dtype, device)
    load_seconds = time.perf_counter() - started

    accepted = inspect.signature(pipe.__call__).parameters
    call: dict[str, Any] = {
        **model_call,
        "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(seed),
    }
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
                validated = jsonable(handle.method.config.model_dump())
                family = handle.adapter.family
                result = pipe(prompt, **call)
    except ValueError as exc:
        if isinstance(exc, negguide.NegGuideError):
            raise
        raise CLIError(f"the pipeline rejected the call: {one_line(exc)}") from None
    seconds = time.perf_counter() - started

    picture, frame = first_picture(result, with_frame=True)
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
        "versions": versions(),
        "seconds": round(seconds, 4),
        "load_seconds": round(load_seconds, 4),
    }
    if frame is not None:
        record["frame"] = frame
    text = {} if no_embed_metadata else {"parameters": _a1111(record), "negguide": json.dumps(record)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(picture, out, text)
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


def _looks_local(model: str) -> bool:
    """A hub id is ``org/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x``) is a path."""
    if model.startswith((".", "/", "~")) or "\\" in model or re.match(r"^[A-Za-z]:", model):
        return True
    return model.count("/") != 1


def _check_model(model: str) -> None:
    if model in (TOYWORLD, TOYWORLD_TURBO):
        return
    if _looks_local(model) and not os.path.exists(os.path.expanduser(model)):
        raise CLIError(
            f"model path not found: {model!r}; pass a local folder saved with save_pretrained, a hub id, "
            f"or {TOYWORLD!r} / {TOYWORLD_TURBO!r} (the models shipped with negguide)"
        )


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def _load_pipeline(model: str, torch_dtype: Any, device: str) -> tuple[Any, dict[str, Any]]:
    """The pipeline on ``device``, and the call arguments its model wants by default (ToyWorld: 32x32, no CFG)."""
    import torch

    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"expected a torch device like 'cpu' or 'cuda:0', got {device!r} ({one_line(exc)})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r} asked for, but CUDA is not available here; pass --device cpu")
    path = _toyworld_path(model)
    if path is not None:
        from negguide import toyworld
        from negguide.toyworld.pipeline import CALL_KWARGS

        skip = ("num_inference_steps", "generator", "output_type")
        pipe = toyworld.load("turbo") if model == TOYWORLD_TURBO else toyworld.load(path=path)
        return pipe.to(target, torch_dtype), {k: v for k, v in CALL_KWARGS.items() if k not in skip}
    return _from_pretrained(model, torch_dtype).to(target), {}


def _toyworld_path(model: str) -> Path | None:
    """Where a ToyWorld pipeline is: ``toyworld`` and ``toyworld-turbo`` (the shipped weights; the student's
    transformer replaces the teacher's) or a folder whose model_index.json
    names ``ToyWorldPipeline``; None for anything else. A class diffusers does not know is an error here."""
    from negguide import toyworld

    if model in (TOYWORLD, TOYWORLD_TURBO):
        return toyworld.WEIGHTS_DIR
    index = Path(os.path.expanduser(model)) / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # diffusers reports an unreadable index in its own words
    if class_name == "ToyWorldPipeline":
        return index.parent
    if isinstance(class_name, str) and not _diffusers_knows(class_name):
        raise _unknown_pipeline(class_name, index)
    return None


def _diffusers_knows(class_name: str) -> bool:
    import diffusers

    return hasattr(diffusers, class_name)


def _unknown_pipeline(class_name: str, where: Any) -> CLIError:
    from importlib.metadata import version

    return CLIError(
        f"expected a pipeline class that diffusers {version('diffusers')} knows in {where}, got {class_name!r}; "
        "load it in Python with its own class and guide it with negguide.apply(pipe, ...), or upgrade diffusers "
        f"if it is newer (built in: {TOYWORLD!r})"
    )


def _from_pretrained(model: str, torch_dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            # `torch_dtype` is renamed `dtype` in newer diffusers; older ones take only `torch_dtype`
            warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(os.path.expanduser(model), torch_dtype=torch_dtype)
    except OSError as exc:
        raise CLIError(
            f"could not load the model {model!r}: {one_line(exc)}; pass a local folder saved with "
            "save_pretrained or a hub id"
        ) from None
    except AttributeError as exc:
        # a hub model whose model_index.json names a class diffusers lacks (local folders are checked before)
        found = re.search(r"module '?diffusers'? has no attribute '?(\w+)", str(exc))
        if found is None:
            raise
        raise _unknown_pipeline(found.group(1), f"{model}'s model_index.json") from None


def _default(parameters: Any, name: str) -> Any:
    param = parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return ""
    return jsonable(param.default)


def _a1111(record: dict[str, Any]) -> str:
    fields = {
        "Steps": record["steps"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
        "Guidance scale": record["guidance_scale"],
        "NegGuide method": record["method"],
        "NegGuide params": " ".join(f"{k}={show(v)}" for k, v in record["params"].items()),
        "Version": f"negguide {record['versions']['negguide']}",
    }
    settings = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v != "")
    negative = record["negative"]
    return f"{record['prompt']}\n" + (f"Negative prompt: {negative}\n" if negative else "") + settings


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text
