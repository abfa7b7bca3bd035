"""``negguide eval``: settings x prompt-set items x seeds, each image judged; resumable, over several processes.

Checks every setting, the set and the judge before the model loads, then runs `negguide.evaluate.evaluate`,
which writes ``records.jsonl``, ``images/``, ``results.json``, ``results.md``, ``tradeoff.png`` and ``samples.png``
under ``--out``. Under ``accelerate launch`` / ``torchrun`` each rank takes its share and rank 0 merges.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from negguide.cli.compare import load_model
from negguide.cli.compare import model_options
from negguide.cli.compare import parse_size


def load_pipeline(model: str, device: str | None, dtype: str, offload: str | None = None) -> Any:
    """The pipeline as ``generate`` loads it (picklable through `functools.partial`, for worker processes)."""
    from negguide.cli.output import quiet_known_noise

    with quiet_known_noise():  # in a worker process too
        return load_model(model, device, dtype, offload)[0]


@click.command("eval")
@model_options
@click.option(
    "--set",
    "prompt_set",
    required=True,
    metavar="toyworld|FILE",
    help="The prompts: 'toyworld' (built in) or a JSON file in NegGenBench's format (prompt, missing_element, "
    "question_1, question_2); missing_element is each item's negative prompt.",
)
@click.option("--judge", required=True, help="The judge that scores each image (see `negguide judges`).")
@click.option(
    "--judge-param",
    "judge_params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A judge parameter, repeatable (see `negguide judges --json`).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("negguide-eval"),
    show_default=True,
    help="Run folder: records.jsonl, images/, results.json, results.md, tradeoff.png, samples.png. Rerun to resume.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine, each loading the model (one GPU each, round-robin, if there are GPUs); "
    "the work is split between them. Under accelerate launch / torchrun leave it at 1: the launcher's ranks split it.",
)
def evaluate(
    model: str,
    methods: tuple[str, ...],
    seeds: str,
    steps: int,
    guidance_scale: float | None,
    size: str | None,
    device: str | None,
    dtype: str,
    offload: str | None,
    prompt_set: str,
    judge: str,
    judge_params: tuple[str, ...],
    out: Path,
    processes: int,
) -> None:
    """Measure negative adherence: every setting on every item and seed of a prompt set, each image judged.

    Each image's record is appended to OUT/records.jsonl as soon as it is judged; rerunning the same
    command resumes. Scores per setting (positive rate, removed rate, mean quality, 95% bootstrap
    intervals) go to results.md and results.json, with a trade-off plot in tradeoff.png and a sample
    sheet in samples.png. Several GPUs or machines: `accelerate launch -m negguide eval ...` (each rank
    takes its share of the work, rank 0 merges; OUT must be a folder every rank sees).
    """
    from negguide.evaluate import evaluate as run_eval
    from negguide.evaluate import launch_from_env
    from negguide.params import parse_params

    height, width = parse_size(size)
    result = run_eval(
        model,
        prompt_set,
        list(methods),
        seeds,
        judge=judge,
        judge_params=parse_params(judge_params, "--judge-param"),
        out=out,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        processes=processes,
        load=functools.partial(load_pipeline, device=device, dtype=dtype, offload=offload),
    )
    images = sum(s["n"] for s in result.scores)
    if launch_from_env().rank == 0:
        click.echo(
            f"wrote {out}/results.md, results.json, tradeoff.png, samples.png and {images} judged images "
            "in records.jsonl"
        )
