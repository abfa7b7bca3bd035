"""``negguide eval``: every setting on every prompt-set item and seed, each image judged, scored per setting.

The work is the (setting, item, seed) triples in a fixed order. Each image is saved under the run folder
and its record (item id, seed, setting, parameters, the judge's answers, seconds) is appended to a JSONL
file and flushed as soon as it is judged, so a killed run loses at most the image in progress: running the
same command again skips every finished record (a truncated last line is dropped and rewritten). With
``processes=N`` the triples are dealt round-robin to N worker processes, each appending to its own file;
the records are merged, in the fixed order, into ``records.jsonl``. Under a launcher that starts one
process per GPU or machine (``accelerate launch``, ``torchrun``: ``RANK`` and ``WORLD_SIZE`` in the
environment) every rank takes the same round-robin share, waits for the others, and rank 0 merges. Scores
(positive rate, removed rate, mean quality, each with a seeded bootstrap 95% interval) go to
``results.json`` and ``results.md``, a trade-off plot to ``tradeoff.png`` and a sample sheet (a row per
setting, the first seed of up to `SHEET_ITEMS` items) to ``samples.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from negguide.errors import ConfigError
from negguide.sweep import Setting

__all__ = ["Evaluation", "evaluate", "read_records", "score_records"]

#: the record fields that identify one image of the work
KEY_FIELDS = ("setting", "item", "seed")
#: bootstrap resamples of each interval, and their seed
BOOTSTRAP, BOOTSTRAP_SEED = 1000, 0
#: the run facts that must match for a run folder to be resumed
RUN_FACTS = ("model", "set", "judge", "judge_params", "steps", "guidance_scale", "height", "width")
#: columns of the sample sheet: the first seed of this many items, spread over the set
SHEET_ITEMS = 8


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes a launcher started (``accelerate launch``, ``torchrun``)."""

    rank: int
    size: int
    #: the rank among the processes on this machine (picks the GPU)
    local_rank: int
    #: processes on this machine (shares the CPU threads)
    local_size: int


def launch_from_env(environ: dict[str, str] | None = None) -> Launch:
    """Where this process stands, from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by
    ``accelerate launch`` and ``torchrun``); one process when they are absent.

    Raises:
        ConfigError: the variables are not integers with ``0 <= RANK < WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    try:
        rank, size = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        got = {k: env[k] for k in names if k in env}
        raise ConfigError(
            f"expected integer {', '.join(names)} from the launcher, got {got}; start with `accelerate launch` or "
            "`torchrun`, or unset them for one process"
        ) from None
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < max(local_size, 1)):
        raise ConfigError(
            f"expected 0 <= RANK < WORLD_SIZE from the launcher, got RANK={rank}, WORLD_SIZE={size}, "
            f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size}; unset them for one process"
        )
    return Launch(rank, size, local_rank, max(local_size, 1))


def _place_worker(local_rank: int, local_size: int) -> None:
    """One GPU per process on this machine (``cuda`` means it from here on), and a fair share of CPU threads."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))


class _Group:
    """The launcher's processes, joined through ``torch.distributed`` (gloo: CPU tensors, any device) to wait
    for each other; a group made by the caller (``accelerate``'s) is used and left as it is."""

    #: how long a rank waits for the slowest one (a rank's share can take hours)
    TIMEOUT_HOURS = 72

    def __init__(self) -> None:
        import datetime

        import torch.distributed as dist

        self.dist = dist
        self.ours = not dist.is_initialized()
        if self.ours:
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=self.TIMEOUT_HOURS))
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def wait(self) -> None:
        self.dist.barrier(group=self.group)

    def close(self) -> None:
        if self.ours:
            self.dist.destroy_process_group()


@dataclass
class Evaluation:
    """What `evaluate` returns: every record in work order, the scores per setting and the run folder."""

    records: list[dict[str, Any]]
    #: one entry per setting, in the order given: ``{"setting", "method", "n", "positive": {...}, ...}``
    scores: list[dict[str, Any]]
    out: Path


def _key(record: dict[str, Any]) -> tuple[str, int, int]:
    return record["setting"], int(record["item"]), int(record["seed"])


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a JSONL file; an unreadable *last* line (a crash mid-write) is ignored, and with
    ``repair`` cut off the file so the next append starts on a fresh line.

    Raises:
        ConfigError: a line other than the last is not a JSON record.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for number, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(k not in record for k in KEY_FIELDS):
                raise ValueError("not a record")
        except ValueError:
            if any(rest.strip() for rest in lines[number + 1 :]):
                raise ConfigError(
                    f"{path}: line {number + 1}: expected a JSON record, got {line[:60]!r}; "
                    "only the last line may be cut short; delete the damaged line (or the folder) and rerun"
                ) from None
            break
        if number == len(lines) - 1:  # a complete object with no newline: keep it, add the newline
            good += len(line)
        else:
            good += len(line) + 1
        records.append(record)
    if repair:
        keep = data[:good]
        if keep and not keep.endswith(b"\n"):
            keep += b"\n"
        if keep != data:
            path.write_bytes(keep)
    return records


def _bootstrap(values: list[float]) -> dict[str, Any]:
    import numpy as np

    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = array[rng.integers(0, len(array), size=(BOOTSTRAP, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(array.mean()), "low": float(low), "high": float(high), "n": len(values)}


def score_records(records: list[dict[str, Any]], settings: list[str]) -> list[dict[str, Any]]:
    """Per setting (in the order given): positive rate, removed rate and mean quality over the answers the
    judge gave (malformed ones left out and counted), each with a seeded bootstrap 95% interval."""
    scores = []
    for label in settings:
        mine = [r for r in records if r["setting"] == label]
        entry: dict[str, Any] = {
            "setting": label,
            "method": mine[0]["method"] if mine else label.split()[0],
            "params": mine[0]["given"] if mine else {},
            "n": len(mine),
            "malformed": sum(bool(r["judge"]["malformed"]) for r in mine),
        }
        for name in ("positive", "removed", "quality"):
            values = [float(r["judge"][name]) for r in mine if r["judge"][name] is not None]
            entry[name] = _bootstrap(values)
        scores.append(entry)
    return scores


def _work(settings: list[Setting], items: int, seeds: list[int]) -> list[tuple[Setting, int, int]]:
    return [(setting, item, seed) for setting in settings for item in range(items) for seed in seeds]


def _image_path(label: str, item: int, seed: int) -> str:
    import re

    folder = re.sub(r"[^\w.=-]", "_", label)
    return f"images/{folder}/item{item:04d}-seed{seed}.png"


def _default_load(model: str) -> Any:
    if model in ("toyworld", "toyworld-turbo"):
        from negguide import toyworld

        return toyworld.load("turbo" if model == "toyworld-turbo" else None)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_share(job: dict[str, Any]) -> int:
    """Render and judge this process's share of the unfinished work, appending each record to its file."""
    from tqdm.auto import tqdm

    from negguide.prompts import PromptItem
    from negguide.registry import get_judge
    from negguide.sweep import render

    out = Path(job["out"])
    settings = [Setting(method, params) for method, params in job["settings"]]
    items = [PromptItem.model_validate(item) for item in job["items"]]
    work = _work(settings, len(items), job["seeds"])
    rank, size = job["rank"], job["size"]
    path = out / job["records"]
    done = {_key(r) for p in job["done_from"] for r in read_records(out / p, repair=(out / p) == path)}
    todo = [w for i, w in enumerate(work) if i % size == rank and (w[0].label, w[1], w[2]) not in done]
    if not todo:
        return 0
    if job.get("place"):
        _place_worker(job["local_rank"], job["local_size"])
    pipe = job["pipe"] if job.get("pipe") is not None else (job["load"] or _default_load)(job["model"])
    judge = job["judge"] if not isinstance(job["judge"], str) else get_judge(job["judge"])(**job["judge_params"])
    if size > 1:
        import threading

        tqdm.set_lock(threading.RLock())  # not the default multiprocessing lock, which leaks a semaphore
    bar = tqdm(total=len(todo), disable=not job["progress"], desc=f"negguide eval [{rank}]", leave=False)
    try:
        with path.open("a", encoding="utf-8") as f:
            for setting, index, seed in todo:
                item = items[index]
                picture, record = render(
                    pipe,
                    setting,
                    item.prompt,
                    item.missing_element,
                    seed,
                    steps=job["steps"],
                    guidance_scale=job["guidance_scale"],
                    height=job["height"],
                    width=job["width"],
                    model=job["model_name"],
                )
                started = time.perf_counter()
                verdict = judge.judge(picture, item.as_dict())
                image = _image_path(setting.label, index, seed)
                (out / image).parent.mkdir(parents=True, exist_ok=True)
                picture.save(out / image)
                record = {
                    "item": index,
                    "seed": seed,
                    "setting": setting.label,
                    "method": setting.method,
                    "params": record["params"],
                    "given": setting.params,
                    "prompt": item.prompt,
                    "negative": item.missing_element,
                    "judge": {
                        "name": judge.name,
                        "positive": verdict.positive,
                        "removed": verdict.removed,
                        "quality": verdict.quality,
                        "malformed": verdict.malformed,
                        "raw": verdict.raw,
                    },
                    "image": image,
                    "steps": record["steps"],
                    "guidance_scale": record["guidance_scale"],
                    "width": record["width"],
                    "height": record["height"],
                    "seconds": record["seconds"],
                    "judge_seconds": round(time.perf_counter() - started, 4),
                }
                f.write(json.dumps(record) + "\n")
                f.flush()
                bar.update()
    finally:
        bar.close()
    return len(todo)


def evaluate(
    model: Any,
    items: str | Path | list[Any],
    settings: list[str | Setting | tuple[str, dict[str, Any]]],
    seeds: str | int | list[int] = "0-3",
    *,
    judge: str | Any = "toyworld",
    judge_params: dict[str, Any] | None = None,
    out: str | Path = "negguide-eval",
    steps: int = 8,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    processes: int = 1,
    load: Callable[[str], Any] | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Render every setting on every item and seed, judge each image, and score each setting.

    Resumable: records already in ``out`` (from any number of processes) are skipped; the run's facts
    (model, set, judge, steps, size) must match those recorded in ``out/run.json``.

    Example:
        ```python
        from negguide.evaluate import evaluate

        result = evaluate("toyworld", "toyworld", ["none", "vsf"], "0-3", judge="toyworld", out="run")
        print(result.scores[1]["removed"])  # {"mean": ..., "low": ..., "high": ..., "n": ...}
        ```

    Args:
        model: a pipeline, or a name for ``load`` (default: ``"toyworld"`` or a diffusers folder / hub id).
        items: a prompt set: ``"toyworld"``, a NegGenBench JSON file, or a list of items.
        settings: ``"METHOD [KEY=VALUE ...]"`` texts (``"none"``: unguided), `Setting`s or ``(method, params)``.
        seeds: ``"0-3"``, ``"0,2,7"``, an int or a list; every item is rendered on every seed.
        judge: a judge's name (see ``negguide judges``) or a `negguide.Judge` instance.
        judge_params: the judge's parameters (with a name).
        out: the run folder: ``records.jsonl``, ``images/``, ``results.json``, ``results.md``, ``tradeoff.png``.
        steps: denoising steps.
        guidance_scale: the pipeline's own ``guidance_scale`` (default: the model's).
        height: image height (default: the model's).
        width: image width (default: the model's).
        processes: worker processes on this machine (each loads the model); needs ``model`` and ``judge`` as names.
        load: ``load(model) -> pipeline`` (picklable, for workers); default as described under ``model``.
        model_name: what to call the model in the records (default: ``model`` when it is a name).
        progress: show progress bars.

    Raises:
        PromptSetError, UnknownJudgeError, UnknownMethodError, ConfigError: checked before any image is made.
    """
    from negguide.prompts import load_prompt_set
    from negguide.registry import get_judge
    from negguide.sweep import parse_seeds
    from negguide.sweep import parse_setting

    parsed = [parse_setting(s) for s in settings]
    if not parsed:
        raise ConfigError("expected at least one setting, got none; e.g. settings=['none', 'vsf']")
    labels = [s.label for s in parsed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"expected each setting once, got {', '.join(map(repr, repeated))} twice; drop the repeat")
    seed_list = parse_seeds(seeds)
    prompt_set = load_prompt_set(items)
    params = dict(judge_params or {})
    if isinstance(judge, str):
        judge_name = judge
        get_judge(judge).make_config(params)  # unknown judge or bad parameters: before any work
    else:
        judge_name = judge.name
        params = judge.config.model_dump()
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"expected processes >= 1, got {processes!r}")
    launch = launch_from_env()
    if launch.size > 1 and processes > 1:
        raise ConfigError(
            f"expected either a launcher's {launch.size} processes or processes={processes}, got both; "
            "drop --processes under accelerate launch / torchrun"
        )
    if processes > 1 and not (isinstance(model, str) and isinstance(judge, str)):
        raise ConfigError(
            f"processes={processes}: expected the model and the judge by name (each worker loads its own), "
            f"got {type(model).__name__} and {type(judge).__name__}; pass names, or processes=1"
        )
    name = model_name if model_name is not None else (model if isinstance(model, str) else type(model).__name__)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = {
        "model": name,
        "set": str(items) if isinstance(items, (str, Path)) else "<list>",
        "judge": judge_name,
        "judge_params": params,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
    }
    run_path = out / "run.json"
    if run_path.is_file():
        before = json.loads(run_path.read_text())
        changed = [k for k in RUN_FACTS if before.get(k) != facts[k]]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"{out}: expected the same {k} as the run recorded there ({before.get(k)!r}) to resume it, "
                f"got {facts[k]!r}; use another --out for a different run"
            )
    group = _Group() if launch.size > 1 else None
    try:
        if group is not None:
            group.wait()  # every rank has read run.json before rank 0 rewrites it
        if launch.rank == 0:
            run_path.write_text(json.dumps(facts, indent=2) + "\n")
        size = max(processes, launch.size)
        shards = [f"records-{rank}-of-{size}.jsonl" for rank in range(size)] if size > 1 else []
        existing = sorted(p.name for p in out.glob("records*.jsonl"))
        job = {
            "out": str(out),
            "settings": [(s.method, s.params) for s in parsed],
            "items": [item.as_dict() for item in prompt_set],
            "seeds": seed_list,
            "model": model if isinstance(model, str) else None,
            "pipe": None if isinstance(model, str) else model,
            "load": load,
            "model_name": name,
            "judge": judge,
            "judge_params": params,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "progress": progress,
            "done_from": sorted({"records.jsonl", *existing, *shards}),
        }
        if launch.size > 1:
            _run_share(
                {
                    **job,
                    "rank": launch.rank,
                    "size": launch.size,
                    "records": shards[launch.rank],
                    "place": True,
                    "local_rank": launch.local_rank,
                    "local_size": launch.local_size,
                }
            )
            group.wait()  # type: ignore[union-attr]  # every share is written
        elif processes == 1:
            _run_share({**job, "rank": 0, "size": 1, "records": "records.jsonl"})
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            place = {"place": True, "local_size": processes}
            jobs = [
                {**job, **place, "rank": r, "size": processes, "records": shards[r], "local_rank": r}
                for r in range(processes)
            ]
            with context.Pool(processes) as pool:
                pool.map(_run_share, jobs)
        work = _work(parsed, len(prompt_set), seed_list)
        if launch.rank == 0:
            records = _merge(out, [(s.label, i, seed) for s, i, seed in work])
            scores = score_records(records, labels)
            write_results(out, facts, labels, seed_list, len(prompt_set), scores)
            sample_sheet(out, records, labels, facts)
        if group is not None:
            group.wait()  # rank 0 has merged
        if launch.rank != 0:
            by_key = {_key(r): r for r in read_records(out / "records.jsonl")}
            records = [by_key[(s.label, i, seed)] for s, i, seed in work]
            scores = score_records(records, labels)
    finally:
        if group is not None:
            group.close()
    return Evaluation(records, scores, out)


def _merge(out: Path, order: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Every records file of ``out`` merged into ``records.jsonl`` in work order, one record per (setting, item,
    seed), the workers' files removed; the records of ``order``.

    Raises:
        ConfigError: an image of ``order`` has no record.
    """
    merged: dict[tuple[str, int, int], dict[str, Any]] = {}
    for path in sorted(out.glob("records*.jsonl")):
        for record in read_records(path):
            merged.setdefault(_key(record), record)
    missing = [k for k in order if k not in merged]
    if missing:
        raise ConfigError(f"{out}: expected a record for every image, got {len(missing)} missing (first: {missing[0]})")
    records = [merged[k] for k in order]
    wanted = set(order)
    others = [r for k, r in merged.items() if k not in wanted]  # earlier runs' extra settings or seeds, kept
    temporary = out / "records.jsonl.tmp"
    temporary.write_text("".join(json.dumps(r) + "\n" for r in [*records, *others]))
    temporary.replace(out / "records.jsonl")
    for path in out.glob("records-*-of-*.jsonl"):
        path.unlink()
    return records


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def write_results(
    out: Path, facts: dict[str, Any], labels: list[str], seeds: list[int], items: int, scores: list[dict[str, Any]]
) -> None:
    """``results.json`` (the run and the scores), ``results.md`` (a table) and ``tradeoff.png``."""
    results = {**facts, "settings": labels, "seeds": seeds, "items": items, "scores": scores}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# negguide eval: {facts['model']}, set {facts['set']}, judge {facts['judge']}",
        "",
        f"{items} items x {len(seeds)} seeds per setting, {facts['steps']} steps; 95% bootstrap intervals.",
        "",
        "| setting | n | positive | removed (negative score) | quality | malformed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        cells = [s["setting"], str(s["n"]), _cell(s["positive"]), _cell(s["removed"]), _cell(s["quality"])]
        lines.append("| " + " | ".join([*cells, str(s["malformed"])]) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    tradeoff_plot(scores, out / "tradeoff.png", f"negguide eval: {facts['model']}")


def sample_sheet(out: Path, records: list[dict[str, Any]], labels: list[str], facts: dict[str, Any]) -> Path:
    """``samples.png``: a row per setting, a column per sampled item (its first seed, up to `SHEET_ITEMS` items
    spread over the set), each tile the image that setting made, titled with the item and its negative."""
    from PIL import Image

    from negguide.sweep import comparison_grid

    first_seed = records[0]["seed"]
    items = sorted({r["item"] for r in records})
    step = max(1, -(-len(items) // SHEET_ITEMS))
    columns = items[::step][:SHEET_ITEMS]
    by_key = {(r["setting"], r["item"]): r for r in records if r["seed"] == first_seed}
    images = {}
    for label in labels:
        for item in columns:
            with Image.open(out / by_key[(label, item)]["image"]) as picture:
                images[(label, item)] = picture.convert("RGB")
    negatives = {item: by_key[(labels[0], item)]["negative"] for item in columns}
    titles = [f"{item}: -{negatives[item][:14]}" for item in columns]
    header = [
        f"model: {facts['model']}, set: {facts['set']}, judge: {facts['judge']}",
        f"steps: {facts['steps']}, seed {first_seed}; columns: item: -negative",
    ]
    grid = comparison_grid(images, labels, columns, header, titles)
    grid.save(out / "samples.png")
    return out / "samples.png"


def tradeoff_plot(scores: list[dict[str, Any]], path: Path, title: str) -> Path:
    """``removed`` (y) against ``positive`` (x), one curve per method through its settings in the order given."""
    from negguide.toyworld.bench import _METHOD_COLOURS
    from negguide.toyworld.bench import _unit_axes

    img, d, xy = _unit_axes(560, 130, "removed (negative absent)", title, 150)
    lx = 560 - 130
    methods = list(dict.fromkeys(s["method"] for s in scores))
    for i, method in enumerate(methods):
        curve = [s for s in scores if s["method"] == method and s["positive"]["mean"] is not None]
        curve = [s for s in curve if s["removed"]["mean"] is not None]
        colour = _METHOD_COLOURS.get(method, (120, 120, 120))
        points = [xy(s["positive"]["mean"], s["removed"]["mean"]) for s in curve]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for (px, py), s in zip(points, curve):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline=colour)
            value = next(iter(s["params"].values()), None)
            if isinstance(value, (int, float)):
                d.text((px + 5, py - 12), f"{value:g}", fill=colour)
        ly = 40 + 18 * i
        d.rectangle([lx + 15, ly, lx + 27, ly + 12], fill=colour, outline=colour)
        d.text((lx + 33, ly), method, fill="black")
    img.save(path, optimize=True)
    return path
