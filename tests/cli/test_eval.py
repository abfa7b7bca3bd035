"""``negguide eval`` and its prompt sets, offline on the shipped ToyWorld model (2 steps, few seeds)."""

from __future__ import annotations

import json
import shutil

import pytest

import negguide
from negguide.errors import PromptSetError
from negguide.prompts import load_prompt_set
from negguide.prompts import toyworld_set
from tests.cli.helpers import _invoke

ITEM = {"prompt": "red circle", "missing_element": "blue square", "question_1": "q1?", "question_2": "q2?"}


def test_toyworld_set_is_the_bench_pairs_in_neggenbench_format():
    from negguide.toyworld.world import PAIRS

    items = toyworld_set()
    assert [(i.prompt, i.missing_element) for i in items] == list(PAIRS)
    assert all(i.question_1.startswith("Is the image showing") and i.question_2.endswith("missing?") for i in items)
    assert load_prompt_set("toyworld") == items


def test_a_neggenbench_file_loads_with_its_extra_fields(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{**ITEM, "category": "shapes", "id": 7}]))
    (item,) = load_prompt_set(path)
    assert item.prompt == "red circle" and item.as_dict()["category"] == "shapes" and item.as_dict()["id"] == 7


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "x"}, "expected a non-empty JSON list of objects"),
        ([], "expected a non-empty JSON list"),
        ([ITEM, "text"], "item 1: expected an object"),
        ([ITEM, {k: v for k, v in ITEM.items() if k != "question_2"}], "item 1: missing field `question_2`"),
        ([{**ITEM, "missing_element": 3}], "item 0: `missing_element`: expected a non-empty string, got 3"),
        ([{**ITEM, "prompt": ""}], "item 0: `prompt`: expected a non-empty string"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_item_and_field(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PromptSetError, match=message) as excinfo:
        load_prompt_set(path)
    assert "\n" not in str(excinfo.value) and isinstance(excinfo.value, negguide.NegGuideError)


def test_a_missing_or_unreadable_file_is_a_prompt_set_error(tmp_path):
    with pytest.raises(PromptSetError, match="expected a built-in prompt set .*'toyworld'.* or a JSON file"):
        load_prompt_set(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(PromptSetError, match="expected JSON"):
        load_prompt_set(tmp_path / "broken.json")


# ``negguide eval`` end to end: 3 items x 2 seeds x 2 settings, 2 steps

SETTINGS = ("none", "vsf scale=3")
TIMING = ("seconds", "judge_seconds")


def _eval_args(out, *settings, extra=()):
    args = ["eval", "--model", "toyworld", "--set", "toyworld", "--judge", "toyworld", "--seeds", "0-1"]
    args += ["--steps", "2", "--out", out, *extra]
    for setting in settings:
        args += ["--method", setting]
    return args


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    result = _invoke(_eval_args(out, *SETTINGS))
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return out


def test_eval_records_every_image_once_in_work_order_with_its_answers(evaluated):
    records = _records(evaluated)
    expected = [(s, item, seed) for s in SETTINGS for item in range(3) for seed in (0, 1)]
    assert [(r["setting"], r["item"], r["seed"]) for r in records] == expected
    for r in records:
        assert (evaluated / r["image"]).is_file()
        assert set(r["judge"]) == {"name", "positive", "removed", "quality", "malformed", "raw"}
        assert r["judge"]["name"] == "toyworld" and r["steps"] == 2 and r["seconds"] >= 0
    vsf = next(r for r in records if r["method"] == "vsf")
    assert vsf["params"]["scale"] == 3.0 and vsf["given"] == {"scale": 3}
    assert (evaluated / "results.md").read_text().count("\n| ") == 3  # header, then a row per setting
    assert (evaluated / "tradeoff.png").is_file()


def test_eval_scores_equal_the_bench_detector_on_the_same_seeds(evaluated):
    """Each image's answers are what the ToyWorld bench's detector says of its own image for that seed."""
    import numpy as np

    from negguide import toyworld
    from negguide.sweep import parse_setting
    from negguide.toyworld import world
    from negguide.toyworld.bench import generate

    pipe = toyworld.load()
    records = _records(evaluated)
    for r in records:
        setting = parse_setting(r["setting"])
        image = generate(pipe, setting.method, setting.params, r["prompt"], r["negative"], n=1, seed=r["seed"], steps=2)
        primary, companion = world.PAIRS[r["item"]]
        assert (primary, companion) == (r["prompt"], r["negative"])
        names = [world.object_name(i) for i in range(len(world.OBJECTS))]
        assert r["judge"]["positive"] == bool(world.present(image, names.index(primary))[0])
        assert r["judge"]["removed"] == (not world.present(image, names.index(companion))[0])
        assert abs(r["judge"]["quality"] - float(world.cleanliness(image)[0])) < 0.01
    results = json.loads((evaluated / "results.json").read_text())
    for score in results["scores"]:
        mine = [r for r in records if r["setting"] == score["setting"]]
        assert score["n"] == 6 and score["removed"]["mean"] == np.mean([r["judge"]["removed"] for r in mine])
        assert score["removed"]["low"] <= score["removed"]["mean"] <= score["removed"]["high"]


def test_eval_resumes_after_a_kill_to_the_same_results(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    lines = (run / "records.jsonl").read_text().splitlines(keepends=True)
    # a kill: the last three records never written, the one before cut mid-line
    (run / "records.jsonl").write_text("".join(lines[:8]) + lines[8][:40])
    result = _invoke(_eval_args(run, *SETTINGS))
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    assert _untimed(_records(run)) == _untimed(_records(evaluated))  # none missing, none twice, same answers
    assert _records(run)[:8] == _records(evaluated)[:8]  # the finished ones were not redone
    assert json.loads((run / "results.json").read_text()) == json.loads((evaluated / "results.json").read_text())
    # once more: nothing left to do, nothing changes
    assert _invoke(_eval_args(run, *SETTINGS)).exit_code == 0
    assert _records(run)[:8] == _records(evaluated)[:8] and len(_records(run)) == 12


def test_two_processes_equal_one(evaluated, tmp_path):
    result = _invoke(_eval_args(tmp_path / "two", "none", extra=["--processes", "2"]))
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    assert not list((tmp_path / "two").glob("records-*"))  # the workers' files merged and removed
    one = [r for r in _records(evaluated) if r["setting"] == "none"]
    assert _untimed(_records(tmp_path / "two")) == _untimed(one)
    scores = json.loads((tmp_path / "two" / "results.json").read_text())["scores"]
    assert scores == json.loads((evaluated / "results.json").read_text())["scores"][:1]


def test_eval_python_function_resumes_a_finished_run(evaluated, tmp_path):
    from negguide.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    result = evaluate("toyworld", "toyworld", list(SETTINGS), "0-1", judge="toyworld", out=run, steps=2, progress=False)
    assert _untimed(result.records) == _untimed(_records(evaluated))
    assert result.scores == json.loads((evaluated / "results.json").read_text())["scores"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nope.json"], "expected a built-in prompt set ('toyworld') or a JSON file, got 'nope.json'"),
        (["--judge", "vqx"], "no judge 'vqx'; installed:"),
        (["--method", "nga"], "no guidance method 'nga'"),
        (["--method", "vsf scael=2"], "unknown parameter `scael`"),
        (["--judge-param", "min_pxels=3"], "judge toyworld: unknown parameter `min_pxels`"),
        (["--seeds", "3-1"], "FIRST <= LAST"),
        (["--method", "none", "--method", "none"], "expected each setting once"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    out = tmp_path / "out"
    base = {"--set": "toyworld", "--judge": "toyworld"}
    for option, value in zip(args[::2], args[1::2]):
        base[option] = value
    command = ["eval", "--model", "toyworld", "--out", out]
    for option in ("--set", "--judge", "--judge-param", "--seeds"):
        if option in base:
            command += [option, base[option]]
    methods = [v for o, v in zip(args[::2], args[1::2]) if o == "--method"] or ["none"]
    for method in methods:
        command += ["--method", method]
    result = _invoke(command)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not out.exists()


def test_a_bad_set_file_on_the_command_line_names_the_item(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([ITEM, {"prompt": "x"}]))
    result = _invoke(["eval", "--model", "toyworld", "--set", path, "--judge", "toyworld", "--method", "none"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: item 1: missing field `missing_element` (has: 'prompt'); "
        "every item needs prompt, missing_element, question_1, question_2"
    ]


def test_resuming_with_other_run_facts_is_refused(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    result = _invoke(_eval_args(run, *SETTINGS, extra=["--judge-param", "min_pixels=5"]))
    assert result.exit_code != 0
    assert "expected the same judge_params as the run recorded there" in result.stderr
    assert "use another --out" in result.stderr


# many processes: a launcher's ranks (torchrun / accelerate launch), worker placement, the sample sheet, offload


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(out, launcher, *settings, timeout=600):
    import os
    import subprocess

    args = [str(a) for a in _eval_args(out, *settings)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, "-m", "negguide", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_torchrun_ranks_equal_one_process(evaluated, tmp_path):
    """Two ranks started by torchrun (what accelerate launch runs) on the CPU: each takes its share, rank 0
    merges, and the records and scores are exactly those of the one-process run."""
    import sys

    out = tmp_path / "ranks"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    done = _launched(out, launcher, *SETTINGS)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    assert not list(out.glob("records-*"))
    assert _untimed(_records(out)) == _untimed(_records(evaluated))
    assert json.loads((out / "results.json").read_text()) == json.loads((evaluated / "results.json").read_text())
    assert (out / "samples.png").is_file() and (out / "tradeoff.png").is_file()


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
    reason="accelerate launch --multi_gpu needs two GPUs",
)
def test_accelerate_launch_on_two_gpus_equals_one_process(evaluated, tmp_path):  # pragma: no cover - GPU only
    import shutil as sh

    accelerate = sh.which("accelerate")
    assert accelerate is not None
    out = tmp_path / "gpus"
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port())]
    done = _launched(out, launcher, *SETTINGS)
    assert done.returncode == 0, done.stderr[-4000:]
    records = _records(out)
    assert [(r["setting"], r["item"], r["seed"]) for r in records] == [
        (r["setting"], r["item"], r["seed"]) for r in _records(evaluated)
    ]
    assert {r["device"] for r in records} <= {"cuda:0", "cuda:1"}


def test_launch_from_env_reads_the_launchers_variables():
    from negguide.errors import ConfigError
    from negguide.evaluate import Launch
    from negguide.evaluate import launch_from_env

    assert launch_from_env({}) == Launch(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_from_env(env) == Launch(3, 4, 1, 2)
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 1, 2)
    with pytest.raises(ConfigError, match="expected integer RANK"):
        launch_from_env({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="expected 0 <= RANK < WORLD_SIZE.*RANK=2, WORLD_SIZE=2"):
        launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_processes_under_a_launcher_is_refused(tmp_path, monkeypatch):
    from negguide.errors import ConfigError
    from negguide.evaluate import evaluate

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="either a launcher's 2 processes or processes=2, got both"):
        evaluate("toyworld", "toyworld", ["none"], "0", out=tmp_path / "x", processes=2, progress=False)
    assert not (tmp_path / "x").exists()


def test_workers_share_the_cpu_threads(monkeypatch):
    import torch

    from negguide.evaluate import _place_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        _place_worker(1, 4)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or torchrun's) choice wins
        torch.set_num_threads(5)
        _place_worker(0, 4)
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def test_sample_sheet_shows_each_settings_image_per_item(evaluated):
    """samples.png: a row per setting, a column per item (seed 0); each tile is that record's image enlarged."""
    import numpy as np
    from PIL import Image

    sheet = np.asarray(Image.open(evaluated / "samples.png").convert("RGB"))
    records = {(r["setting"], r["item"]): r for r in _records(evaluated) if r["seed"] == 0}
    tiles = {}
    for (setting, item), r in records.items():
        picture = np.asarray(Image.open(evaluated / r["image"]).convert("RGB"))
        zoom = 128 // picture.shape[0]
        tiles[(setting, item)] = picture.repeat(zoom, 0).repeat(zoom, 1)
    tile = next(iter(tiles.values()))
    found = {}
    for key, want in tiles.items():  # each tile appears once, in a grid of len(SETTINGS) rows x 3 columns
        h, w = want.shape[:2]
        hits = [
            (y, x)
            for y in range(sheet.shape[0] - h + 1)
            for x in range(sheet.shape[1] - w + 1)
            if (sheet[y, x] == want[0, 0]).all() and (sheet[y : y + h, x : x + w] == want).all()
        ]
        assert len(hits) >= 1, key
        found[key] = hits[0]
    rows = sorted({y for y, _ in found.values()})
    columns = sorted({x for _, x in found.values()})
    assert len(rows) == len(SETTINGS) and len(columns) == 3 and tile.shape[0] == 128
    for (setting, item), (y, x) in found.items():
        assert rows.index(y) == SETTINGS.index(setting) and columns.index(x) == item


def test_offload_model_passes_through_and_changes_nothing(evaluated, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    calls = []
    original = DiffusionPipeline.enable_model_cpu_offload

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("device"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload", spy)
    result = _invoke(_eval_args(tmp_path / "off", "vsf scale=3", extra=["--offload", "model"]))
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    assert calls and str(calls[0]) == "cpu"  # turned on at load, onto --device (a call re-makes the hooks)
    want = [r for r in _records(evaluated) if r["setting"] == "vsf scale=3"]
    assert [r["judge"] for r in _records(tmp_path / "off")] == [r["judge"] for r in want]
