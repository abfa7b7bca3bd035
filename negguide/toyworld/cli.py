"""``negguide toyworld``: train the ToyWorld model and run its negative-adherence bench."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import click

if TYPE_CHECKING:
    from negguide.toyworld.bench import Setting


@click.group(name="toyworld")
def toyworld() -> None:
    """A small text-to-image world where negative-prompt adherence is measured offline."""


@toyworld.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--steps", type=int, default=None, help="Optimiser steps [default: 5000].")
@click.option("--batch", type=int, default=None, help="Scenes per step [default: 64 on CPU, 256 on CUDA].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: the preset's].")
@click.option(
    "--ema", type=click.FloatRange(0, 1, max_open=True), default=None, help="Weight-average decay [default: 0, off]."
)
@click.option(
    "--t-mean",
    type=click.FloatRange(-3, 3),
    default=0.0,
    show_default=True,
    help="Location of the logit-normal noise levels, t = sigmoid(N(T_MEAN, 1)); above 0 trains more at high noise.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option(
    "--data-workers",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Processes drawing scenes ahead of the optimiser (0: in the loop, the shipped stages' data stream; "
    "N >= 1: step k's scenes seeded by (SEED, k), the same for any N). Use several on a GPU.",
)
@click.option(
    "--init",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Continue from this saved ToyWorld pipeline instead of fresh weights (its size wins over the preset's).",
)
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Also save to --out every N steps.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("toyworld-model"),
    show_default=True,
    help="Directory for save_pretrained and training.json.",
)
def train(
    device: str,
    steps: int | None,
    batch: int | None,
    lr: float | None,
    ema: float | None,
    t_mean: float,
    seed: int,
    threads: int,
    data_workers: int,
    init: Path | None,
    checkpoint_every: int,
    out: Path,
) -> None:
    """Train a ToyWorld pipeline (from scratch, or on from --init; the model size follows the device's preset)."""
    import torch

    from negguide.toyworld.train import PRESETS
    from negguide.toyworld.train import resolve_device
    from negguide.toyworld.train import train as run_train

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    config = PRESETS["cuda" if dev.type == "cuda" else "cpu"]
    config = replace(
        config,
        steps=steps or config.steps,
        batch=batch or config.batch,
        lr=lr or config.lr,
        ema=config.ema if ema is None else ema,
        t_mean=t_mean,
        seed=seed,
        data_workers=data_workers,
    )
    _, record = run_train(config, dev, out=out, init=init, checkpoint_every=checkpoint_every)
    click.echo(json.dumps(record, indent=2))
    click.echo(f"saved to {out}")


@toyworld.command()
@click.option("--n", type=int, default=64, show_default=True, help="Images per (prompt, negative) pair and setting.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses noise seed SEED + i.")
@click.option(
    "--model",
    default=None,
    help="'teacher' (the shipped weights, default), 'turbo' (the distilled student: use --steps 1-4; the "
    "settings' guidance_scale stays 0) or a saved ToyWorld pipeline's directory.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option(
    "--setting",
    "settings",
    multiple=True,
    metavar="'METHOD [KEY=VALUE ...]'",
    help="Measure these settings instead of a sweep (repeatable), e.g. "
    "--setting none --setting 'vsf scale=5 bias=0.1 layers=[0,1]'. guidance_scale=W turns the pipeline's "
    "own CFG on for that setting (against the empty prompt), e.g. --setting 'vsf scale=12 bias=1.5 guidance_scale=2'. "
    "negatives=... replaces the companion by several weighted negatives, written by role: "
    "'vsf negatives=companion:1,extras:0.5' (separate), 'vsf negatives=companion+extras' (one joined prompt).",
)
@click.option(
    "--sweep",
    "sweep_name",
    type=click.Choice(["default", "several"]),
    default=None,
    help="A named sweep [default: default]: 'several' removes the companion and the extra objects at once "
    "(the companion alone, one joined prompt, separate weighted negatives).",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Euler steps per image [default: 8, the bench's].")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("toyworld-bench"),
    show_default=True,
    help="Directory for results.json, results.md, tradeoff.png and samples.png.",
)
def bench(
    n: int,
    seed: int,
    model: str | None,
    device: str,
    threads: int,
    settings: tuple[str, ...],
    sweep_name: str | None,
    steps: int | None,
    out: Path,
) -> None:
    """Measure none / CFG / NAG / NASA / VSF on the three (primary, companion) pairs."""
    import dataclasses
    import time

    import torch

    from negguide.toyworld.bench import SWEEPS
    from negguide.toyworld.bench import format_several_table
    from negguide.toyworld.bench import format_table
    from negguide.toyworld.bench import resolve_negatives
    from negguide.toyworld.bench import run
    from negguide.toyworld.bench import sample_grid
    from negguide.toyworld.bench import several_plot
    from negguide.toyworld.bench import tradeoff_plot
    from negguide.toyworld.world import PAIRS
    from negguide.toyworld.world import extras

    if settings and sweep_name:
        raise click.UsageError(
            "pass --sweep or --setting, not both: --setting measures its settings instead of a sweep"
        )
    sweep = tuple(parse_setting(text) for text in settings) or SWEEPS[sweep_name or "default"]
    several = sweep_name == "several" or any(s.negatives for s in sweep)
    torch.set_num_threads(threads)
    pipe = load_model(model, device)
    started = time.perf_counter()
    rows, samples = run(pipe, n=n, seed=seed, sweep=sweep, steps=steps)
    seconds = time.perf_counter() - started
    table = format_several_table(rows) if several else format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    record = {"n": n, "seed": seed, "rows": [dataclasses.asdict(r) for r in rows]}
    if several:
        record["pairs"] = [{"prompt": p, "companion": c, "extras": list(extras(p, c))} for p, c in PAIRS]
        for r in record["rows"]:
            r["resolved"] = (
                None if r["method"] == "none" else [resolve_negatives(r["negatives"], p, c) for p, c in PAIRS]
            )
    record |= {"steps": steps or 8, "threads": threads, "seconds": round(seconds, 1)}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    title = f"ToyWorld, {n} images x 3 pairs"
    (several_plot if several else tradeoff_plot)(rows, out / "tradeoff.png", title=title)
    sample_grid(samples, out / "samples.png")
    click.echo(table)
    click.echo(f"wrote {out}/results.json, results.md, tradeoff.png, samples.png ({seconds:.0f} s)")


def load_model(model: str | None, device: str) -> Any:
    """The pipeline named by ``--model``: a shipped variant (``teacher``, ``turbo``) or a saved pipeline's directory.

    Raises:
        click.BadParameter: neither a variant nor an existing directory.
    """
    from negguide.toyworld import VARIANTS
    from negguide.toyworld import load

    if model is None or model in VARIANTS:
        return load(device, variant=model)
    if not Path(model).is_dir():
        raise click.BadParameter(
            f"expected {' or '.join(map(repr, VARIANTS))} or a saved ToyWorld pipeline's directory, got {model!r}",
            param_hint="'--model'",
        )
    return load(device, path=model)


@toyworld.command()
@click.option(
    "--teacher", default="teacher", show_default=True, help="'teacher' (shipped) or a saved pipeline's directory."
)
@click.option("--pairs", type=click.IntRange(1), default=None, help="Teacher (noise, image) pairs [default: 2048].")
@click.option(
    "--teacher-steps", type=click.IntRange(1), default=None, help="Teacher Euler steps per pair [default: 8]."
)
@click.option(
    "--guidance-scale",
    type=click.FloatRange(0),
    default=None,
    help="The teacher's CFG scale against the empty prompt [default: 2, docs/toyworld.md's].",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Student optimiser steps [default: 1000].")
@click.option("--batch", type=click.IntRange(1), default=None, help="Pairs per step [default: 64].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 2e-4].")
@click.option(
    "--ema", type=click.FloatRange(0, 1, max_open=True), default=None, help="Weight-average decay [default: 0.995]."
)
@click.option(
    "--t-one", type=click.FloatRange(0, 1), default=None, help="Share of each batch at t = 1 [default: 0.25]."
)
@click.option(
    "--schedule",
    type=click.IntRange(1),
    multiple=True,
    help="Train the rows not at t = 1 only at the noise levels the pipeline's sampler visits with this many "
    "steps (repeatable; each level in proportion to its Euler step) [default: t uniform].",
)
@click.option(
    "--rollout",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of the rows inside the --schedule (one count) trained on the student's own sampler state, with "
    "the straight line from it to the teacher's image as target [default: 0].",
)
@click.option(
    "--rollout-steps",
    type=click.IntRange(0),
    default=None,
    help="Roll the sampler out at most this many steps (1: only at the schedule's second level) [default: 0, all].",
)
@click.option(
    "--l1-below",
    type=click.FloatRange(0, 1),
    default=None,
    help="Train the rows at a noise level at or below this on the absolute error (per pixel the targets' median: "
    "sharper edges), the rest on the squared error (their mean) [default: 0, squared everywhere].",
)
@click.option(
    "--shift-terminal",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="The student's sampler ends its N steps on this noise level before the last step to 0 (its scheduler's "
    "shift_terminal, saved with it) [default: the teacher's scheduler, or --init's].",
)
@click.option(
    "--holdout", type=click.IntRange(0), default=None, help="Held-out pairs for the record's loss [default: 64]."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Also save to --out every N steps.")
@click.option(
    "--init",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Continue from this saved student (a distill --out) instead of the teacher's transformer; new pairs "
    "are drawn from --seed, and its record is kept under 'init'.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("toyworld-turbo"),
    show_default=True,
    help="Directory for the student (save_pretrained) and training.json.",
)
def distill(
    teacher: str,
    pairs: int | None,
    teacher_steps: int | None,
    guidance_scale: float | None,
    steps: int | None,
    batch: int | None,
    lr: float | None,
    ema: float | None,
    t_one: float | None,
    schedule: tuple[int, ...],
    rollout: float | None,
    rollout_steps: int | None,
    l1_below: float | None,
    shift_terminal: float | None,
    holdout: int | None,
    seed: int,
    device: str,
    threads: int,
    checkpoint_every: int,
    init: Path | None,
    out: Path,
) -> None:
    """Distil the teacher into a few-step student that needs no CFG (ToyWorld-Turbo; see docs/toyworld.md)."""
    import torch

    from negguide.toyworld import VARIANTS
    from negguide.toyworld import WEIGHTS_DIR
    from negguide.toyworld.distill import DistillConfig
    from negguide.toyworld.distill import distill as run_distill
    from negguide.toyworld.distill import load_record
    from negguide.toyworld.train import resolve_device

    torch.set_num_threads(threads)
    given = {
        "pairs": pairs,
        "teacher_steps": teacher_steps,
        "guidance_scale": guidance_scale,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "ema": ema,
        "t_one": t_one,
        "schedule": tuple(sorted(set(schedule))) or None,
        "rollout": rollout,
        "rollout_steps": rollout_steps,
        "l1_below": l1_below,
        "shift_terminal": shift_terminal,
        "holdout": holdout,
    }
    try:
        config = replace(DistillConfig(seed=seed), **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--rollout'") from None
    shipped = teacher in VARIANTS
    if shipped and teacher != "teacher":
        raise click.BadParameter(
            f"expected 'teacher' (the shipped model) or a saved pipeline's directory, got {teacher!r}: "
            "the student is distilled from a teacher run with CFG",
            param_hint="'--teacher'",
        )
    model = load_model(teacher, "cpu")
    record_dir = WEIGHTS_DIR if shipped else Path(teacher)
    _, record = run_distill(
        model,
        config,
        resolve_device(device),
        out=out,
        teacher_record=load_record(record_dir),
        teacher_name="shipped" if shipped else str(teacher),
        checkpoint_every=checkpoint_every,
        init=load_model(str(init), "cpu") if init is not None else None,
        init_record=load_record(init) if init is not None else None,
    )
    shown = {k: v for k, v in record.items() if k not in ("teacher", "init")}
    click.echo(json.dumps(shown, indent=2))
    click.echo(f"saved to {out}")


def parse_setting(text: str) -> Setting:
    """One bench setting, ``"vsf scale=3.5 bias=0.1 layers=[0,1]"``: a method (or ``none``), then parameters.

    Values are read like ``negguide generate --param``; the parameters are validated by the method's own
    config here, so a typo fails before any image is generated. ``guidance_scale`` is not a method
    parameter but the pipeline's own CFG scale for this setting (default 0: off), and ``negatives`` the
    setting's negatives by role (``companion:1,extras:0.5``, see ``bench.parse_negatives``; default: the
    companion).
    """
    from negguide.params import parse_param
    from negguide.registry import get_method
    from negguide.toyworld.bench import Setting
    from negguide.toyworld.bench import format_negatives
    from negguide.toyworld.bench import parse_negatives

    words = text.split()
    if not words:
        raise click.BadParameter("expected 'METHOD [KEY=VALUE ...]', got an empty setting", param_hint="'--setting'")
    method, params = words[0].lower(), dict(parse_param(word, "--setting") for word in words[1:])
    guidance_scale = params.pop("guidance_scale", 0.0)
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not 0 <= guidance_scale < math.inf
    ):
        raise click.BadParameter(
            f"expected guidance_scale to be a finite number >= 0 (the pipeline's own CFG, which runs above 1), "
            f"got {guidance_scale!r} in {text!r}",
            param_hint="'--setting'",
        )
    given = "negatives" in params
    negatives = params.pop("negatives", None)
    if given:
        if method == "none":
            raise click.BadParameter(
                f"'none' is the unguided model and takes no negatives, got {text!r}", param_hint="'--setting'"
            )
        try:
            negatives = format_negatives(parse_negatives(negatives if isinstance(negatives, str) else repr(negatives)))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--setting'") from None
    if method == "none":
        if params:
            raise click.BadParameter(
                f"'none' takes no parameters besides guidance_scale, got {text!r}", param_hint="'--setting'"
            )
    else:
        get_method(method).make_config(params)
    return Setting(method, params, float(guidance_scale), negatives or "")
