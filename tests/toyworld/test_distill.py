"""ToyWorld-Turbo: the distillation's teacher sampler, the ``distill`` command, the shipped student and its effect.

The effect tests use fixed seeds, CPU, 8 images per (primary, companion) pair and 4 Euler steps with the pipeline's
CFG off; their thresholds sit well inside the gaps measured when the student was committed (docs/toyworld.md):
unguided positive 1.0 / removed 0.125 / clean 0.984, VSF alpha 10, beta 1.5: 1.0 / 0.917 / 0.981 (one image is
0.042 of a rate here).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler

from negguide.cli import main
from negguide.errors import NegGuideError
from negguide.toyworld import TURBO_DIR
from negguide.toyworld import WEIGHTS_DIR
from negguide.toyworld import load
from negguide.toyworld.bench import generate
from negguide.toyworld.distill import DistillConfig
from negguide.toyworld.distill import Pairs
from negguide.toyworld.distill import encode
from negguide.toyworld.distill import reflow_loss
from negguide.toyworld.distill import rollout_rows
from negguide.toyworld.distill import sampler_sigmas
from negguide.toyworld.distill import sampler_states
from negguide.toyworld.distill import schedule_levels
from negguide.toyworld.distill import student_scheduler
from negguide.toyworld.distill import teacher_sample
from negguide.toyworld.distill import training_levels
from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.pipeline import TerminalFlowMatchScheduler
from negguide.toyworld.world import PAIRS
from negguide.toyworld.world import score

N = 8
STEPS = 4


@pytest.fixture(scope="module")
def teacher() -> object:
    return load()


@pytest.fixture(scope="module")
def turbo() -> object:
    return load("turbo")


def test_teacher_sample_is_the_pipelines_guided_sample(teacher) -> None:
    """The pairs' images are what ``pipe(caption, guidance_scale=2)`` draws from the same noise (the reference is the
    unmodified pipeline, one image per call)."""
    captions = ["red circle", "", "green triangle and cyan triangle"]
    noise = torch.cat([torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7 + i)) for i in range(3)])
    embeds, pooled = encode(teacher, captions, torch.device("cpu"))
    for guidance_scale in (2.0, 0.0):
        ours = (teacher_sample(teacher, noise, embeds, pooled, guidance_scale, 4) / 2 + 0.5).clamp(0, 1)
        reference = torch.cat(
            [
                teacher(
                    caption,
                    **{**CALL_KWARGS, "num_inference_steps": 4, "guidance_scale": guidance_scale, "output_type": "pt"},
                    generator=torch.Generator().manual_seed(7 + i),
                ).images
                for i, caption in enumerate(captions)
            ]
        )
        torch.testing.assert_close(ours, reference, atol=2e-4, rtol=0)


def test_distill_command_records_the_recipe_and_moves_the_student_towards_the_target(tmp_path, teacher) -> None:
    out = tmp_path / "student"
    args = ["toyworld", "distill", "--pairs", "16", "--holdout", "8", "--teacher-steps", "2", "--steps", "8"]
    args += ["--batch", "8", "--lr", "1e-4", "--ema", "0", "--seed", "3", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 8 and record["pairs"] == 16 and record["teacher_steps"] == 2 and record["seed"] == 3
    assert record["guidance_scale"] == 2.0 and record["teacher_path"] == "shipped" and "reflow" in record["recipe"]
    assert record["teacher"] == json.loads((WEIGHTS_DIR / "training.json").read_text())
    assert record["seconds"] > 0 and "date" in record and "steps_done" not in record
    # the student moved towards the guided straight-path target, on pairs it never trained on
    assert record["holdout_loss_after"] < record["holdout_loss_before"], record
    student = load(path=out)
    changed = [
        k
        for k, v in student.transformer.state_dict().items()
        if not torch.equal(v, teacher.transformer.state_dict()[k])
    ]
    assert changed
    for name in ("text_encoder", "text_encoder_2"):  # only the transformer is trained: the rest is the teacher's
        theirs = getattr(teacher, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(student, name).state_dict().items())
    # a second stage continues from the first: its record keeps the first under "init"
    again = tmp_path / "again"
    args = ["toyworld", "distill", "--init", str(out), "--pairs", "8", "--holdout", "4", "--teacher-steps", "2"]
    args += ["--steps", "2", "--batch", "4", "--seed", "4", "--device", "cpu", "--out", str(again)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    second = json.loads((again / "training.json").read_text())
    assert second["init"] == record and second["seed"] == 4


def test_schedule_levels_are_the_samplers_sigmas_weighted_by_their_step(teacher) -> None:
    # the pipeline's FlowMatchEulerDiscreteScheduler (shift 1): N steps visit linspace(1, 1/1000, N), then 0
    levels, probs = schedule_levels(teacher, (4,))
    sigmas = np.linspace(1.0, 1e-3, 4)
    np.testing.assert_allclose(levels.numpy(), sigmas, atol=1e-6)
    np.testing.assert_allclose(probs.numpy(), -np.diff([*sigmas, 0.0]), atol=1e-6)
    # two counts: each count's steps averaged, a level visited by both (1, and 1/1000) summed
    levels, probs = schedule_levels(teacher, (2, 4))
    expected = {1.0: (0.999 + 1 / 3 * 0.999) / 2, 0.667: 0.333 / 2, 0.334: 0.333 / 2, 1e-3: (1e-3 + 1e-3) / 2}
    np.testing.assert_allclose(levels.numpy(), list(expected), atol=1e-6)
    np.testing.assert_allclose(probs.numpy(), np.array(list(expected.values())) / sum(expected.values()), atol=1e-6)


def _stretched(count: int, terminal: float) -> np.ndarray:
    """diffusers' FlowMatchEulerDiscreteScheduler sigmas for ``count`` steps with ``shift_terminal``, in float64:
    ``linspace(1, 1/1000, count)`` stretched so that the last level is ``terminal``, then 0."""
    sigmas = np.linspace(1.0, 1e-3, count)
    return np.array([*(1 - (1 - sigmas) * (1 - terminal) / (1 - sigmas[-1])), 0.0])


def test_student_scheduler_ends_its_steps_on_shift_terminal(teacher) -> None:
    """With ``shift_terminal`` 0.25 the 4-step sampler takes four equal steps (1, 0.75, 0.5, 0.25, 0) instead of
    three and one of 1/1000; the teacher's scheduler is left as it was."""
    sampler = SimpleNamespace(scheduler=student_scheduler(teacher.scheduler, 0.25))
    np.testing.assert_allclose(sampler_sigmas(sampler, 4).numpy(), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    for count in (2, 3, 8):
        np.testing.assert_allclose(sampler_sigmas(sampler, count).numpy(), _stretched(count, 0.25), atol=1e-6)
    # one step: one level, the noise, nothing to stretch (diffusers 0.42.1's own scheduler gives NaN here)
    np.testing.assert_array_equal(sampler_sigmas(sampler, 1).numpy(), [1.0, 0.0])
    assert torch.isnan(
        sampler_sigmas(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift_terminal=0.25)), 1)
    ).any()
    assert teacher.scheduler.config.shift_terminal is None
    np.testing.assert_allclose(sampler_sigmas(teacher, 4).numpy(), [*np.linspace(1, 1e-3, 4), 0.0], atol=1e-6)
    kept = student_scheduler(teacher.scheduler, None)
    assert kept is not teacher.scheduler and dict(kept.config) == dict(teacher.scheduler.config)


def test_distill_trains_and_saves_the_students_own_sampler(tmp_path, monkeypatch) -> None:
    """``--shift-terminal``: the rows are drawn at the student's sampler levels, the rollout reaches its last level,
    the student is saved with that scheduler, and a continuation (``--init``) keeps it."""
    import negguide.toyworld.distill as distill_module

    seen: list[torch.Tensor] = []
    original = distill_module.reflow_loss

    def spy(student, pairs, rows, t, *args):
        seen.append(t.clone())
        return original(student, pairs, rows, t, *args)

    monkeypatch.setattr(distill_module, "reflow_loss", spy)
    out = tmp_path / "student"
    args = ["toyworld", "distill", "--pairs", "8", "--holdout", "0", "--teacher-steps", "2", "--steps", "6"]
    args += ["--batch", "16", "--t-one", "0", "--schedule", "4", "--rollout", "0.5", "--shift-terminal", "0.25"]
    args += ["--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    levels = {round(v, 4) for t in seen for v in t.tolist()}
    assert levels == {1.0, 0.75, 0.5, 0.25}, levels
    assert json.loads((out / "training.json").read_text())["shift_terminal"] == 0.25
    student = load(path=out)
    assert type(student.scheduler) is TerminalFlowMatchScheduler and student.scheduler.config.shift_terminal == 0.25
    one_step = student("red circle", **{**CALL_KWARGS, "num_inference_steps": 1}).images
    assert np.isfinite(one_step).all()
    np.testing.assert_allclose(sampler_sigmas(student, 4).numpy(), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    again = tmp_path / "again"
    args = ["toyworld", "distill", "--init", str(out), "--pairs", "4", "--holdout", "0", "--teacher-steps", "1"]
    args += ["--steps", "1", "--batch", "2", "--device", "cpu", "--out", str(again)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load(path=again).scheduler.config.shift_terminal == 0.25
    assert json.loads((again / "training.json").read_text())["shift_terminal"] is None  # not given: kept from init


def test_distill_refuses_a_shift_terminal_outside_0_1() -> None:
    for value in ("0", "1", "-0.25", "1.5"):
        result = CliRunner().invoke(main, ["toyworld", "distill", "--shift-terminal", value, "--steps", "1"])
        assert result.exit_code != 0 and "--shift-terminal" in result.output, result.output
    for value in (0.0, 1.0, -0.25):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            DistillConfig(shift_terminal=value)


def test_training_levels_draw_only_the_schedules_levels_in_proportion() -> None:
    values = torch.tensor([1.0, 0.5, 0.25])
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    t = training_levels(20000, 0.1, torch.Generator().manual_seed(0), (values, probs))
    assert torch.all(t[:2000] == 1.0)
    rest = t[2000:]
    shares = [int((rest == v).sum()) / len(rest) for v in values]
    assert sum(int((rest == v).sum()) for v in values) == len(rest)  # nothing else drawn
    np.testing.assert_allclose(shares, probs.numpy(), atol=0.015)
    uniform = training_levels(1000, 0.0, torch.Generator().manual_seed(0))
    assert len(torch.unique(uniform)) == 1000 and 0 <= float(uniform.min()) and float(uniform.max()) < 1


def _pairs(pipe, captions: list[str]) -> Pairs:
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(len(captions), 3, 32, 32, generator=gen)
    images = torch.randn(len(captions), 3, 32, 32, generator=gen).clamp(-1, 1)
    embeds, pooled = encode(pipe, captions, torch.device("cpu"))
    return Pairs(noise, images, embeds, pooled, captions)


def test_sampler_states_are_the_pipelines_own_latents_after_its_first_steps(turbo) -> None:
    """A rolled-out row's input at the k-th level of the 4-step schedule is the latent the unmodified pipeline holds
    after k steps from the same noise; the other rows keep the straight-path point."""
    captions = ["red circle", "green triangle", "magenta circle", "blue square"]
    pairs = _pairs(turbo, captions)
    sigmas = sampler_sigmas(turbo, 4)
    rows = torch.arange(4)
    t = torch.stack([sigmas[1], sigmas[2], sigmas[2], sigmas[0]])
    chosen = torch.tensor([True, True, False, False])
    states = sampler_states(turbo.transformer, pairs, rows, t, sigmas, chosen)
    for row, steps in ((0, 1), (1, 2)):
        seen = {}

        def keep(pipe, i, timestep, kwargs, seen=seen):
            seen[i] = kwargs["latents"].clone()
            return kwargs

        kwargs = {**CALL_KWARGS, "num_inference_steps": 4, "guidance_scale": 0.0, "output_type": "latent"}
        turbo(captions[row], latents=pairs.noise[row : row + 1], callback_on_step_end=keep, **kwargs)
        torch.testing.assert_close(states[row : row + 1], seen[steps - 1], atol=1e-5, rtol=0)
    for row in (2, 3):
        straight = (1 - t[row].double()) * pairs.images[row].double() + t[row].double() * pairs.noise[row].double()
        torch.testing.assert_close(states[row].double(), straight, atol=1e-6, rtol=0)


def test_rollout_rows_are_a_share_of_the_rows_strictly_inside_the_schedule() -> None:
    """Never the noise (1) nor the teacher schedule's last level 1/1000 (its target would divide by 1/1000); the
    last level of a schedule ending higher (``shift_terminal`` 0.25) takes part."""
    cases = {
        (1.0, 0.667, 0.334, 0.001, 0.0): ((0, {0.667, 0.334}), (1, {0.667}), (2, {0.667, 0.334}), (9, {0.667, 0.334})),
        (1.0, 0.75, 0.5, 0.25, 0.0): ((0, {0.75, 0.5, 0.25}), (1, {0.75}), (2, {0.75, 0.5}), (3, {0.75, 0.5, 0.25})),
    }
    for schedule, expected in cases.items():
        sigmas = torch.tensor(schedule)
        t = sigmas[:4].repeat(5000)
        for steps, allowed in expected:
            chosen = rollout_rows(t, sigmas, 0.5, steps, torch.Generator().manual_seed(steps))
            assert {round(v, 3) for v in t[chosen].tolist()} == allowed
            for level in allowed:  # half of each allowed level's rows
                at = torch.isclose(t, torch.tensor(level))
                assert abs(float(chosen[at].float().mean()) - 0.5) < 0.03
        assert not rollout_rows(t, sigmas, 0.0, 0, torch.Generator()).any()


class _Zero(torch.nn.Module):
    """A "student" that predicts zero velocity: the loss is then the mean square of the targets."""

    def forward(self, hidden_states, **kwargs):
        return (torch.zeros_like(hidden_states),)


def test_reflow_loss_targets_the_straight_line_from_a_rolled_out_state_to_the_teachers_image(teacher) -> None:
    pairs = _pairs(teacher, ["red circle", "blue square", ""])
    rows = torch.tensor([0, 1, 2])
    t = torch.tensor([0.667, 0.334, 1.0])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    chosen = torch.tensor([True, False, False])
    x1, eps = pairs.images.double(), pairs.noise.double()
    targets = [(x[0].double() - x1[0]) / 0.667, eps[1] - x1[1], eps[2] - x1[2]]
    expected = float(torch.stack(targets).pow(2).mean())
    assert reflow_loss(_Zero(), pairs, rows, t, x, chosen).item() == pytest.approx(expected, rel=1e-5)
    plain = float(torch.stack([eps[i] - x1[i] for i in range(3)]).pow(2).mean())
    assert reflow_loss(_Zero(), pairs, rows, t).item() == pytest.approx(plain, rel=1e-5)
    # l1_below: the rows at or below that level count their absolute error, the others their squared error
    for l1_below, absolute_rows in ((0.334, {1}), (0.667, {0, 1}), (1.0, {0, 1, 2})):
        errors = [(tgt.abs() if i in absolute_rows else tgt.pow(2)).mean() for i, tgt in enumerate(targets)]
        expected = float(torch.stack(errors).mean())
        got = reflow_loss(_Zero(), pairs, rows, t, x, chosen, l1_below).item()
        assert got == pytest.approx(expected, rel=1e-5), l1_below


def test_distill_refuses_an_l1_level_outside_0_1() -> None:
    result = CliRunner().invoke(main, ["toyworld", "distill", "--l1-below", "1.5", "--steps", "1"])
    assert result.exit_code != 0 and "--l1-below" in result.output, result.output
    with pytest.raises(ValueError, match=r"expected an --l1-below level in \[0, 1\], got -0.5"):
        DistillConfig(l1_below=-0.5)


def test_distill_refuses_a_rollout_without_one_schedule() -> None:
    for extra in ([], ["--schedule", "2", "--schedule", "4"]):
        result = CliRunner().invoke(main, ["toyworld", "distill", "--rollout", "0.5", "--steps", "1", *extra])
        assert result.exit_code != 0 and "--schedule" in result.output, result.output
    # the config itself refuses it, before any teacher pair is drawn
    with pytest.raises(ValueError, match="one --schedule step count"):
        DistillConfig(rollout=0.5, schedule=(2, 4))
    # a rollout depth without a rollout would do nothing: refused too
    result = CliRunner().invoke(
        main, ["toyworld", "distill", "--rollout-steps", "1", "--schedule", "4", "--steps", "1"]
    )
    assert result.exit_code != 0 and "--rollout-steps only with a --rollout" in result.output, result.output
    with pytest.raises(ValueError, match="--rollout-steps only with a --rollout"):
        DistillConfig(rollout_steps=2, schedule=(4,))


def test_distill_reproduces_its_student_bit_for_bit(tmp_path) -> None:
    """The same command twice (same seed, one thread) writes the same weights: what makes the shipped student
    reproducible from its record."""
    args = ["toyworld", "distill", "--pairs", "8", "--holdout", "4", "--teacher-steps", "2", "--steps", "3"]
    args += ["--batch", "4", "--seed", "5", "--schedule", "4", "--t-one", "0", "--rollout", "0.5", "--threads", "1"]
    args += ["--rollout-steps", "1", "--shift-terminal", "0.25", "--l1-below", "0.25", "--device", "cpu"]
    states = []
    for name in ("a", "b"):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        states.append(load(path=tmp_path / name).transformer.state_dict())
        record = json.loads((tmp_path / name / "training.json").read_text())
        assert record["schedule"] == [4] and record["rollout"] == 0.5 and record["l1_below"] == 0.25
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert not all(torch.equal(v, load().transformer.state_dict()[k]) for k, v in states[0].items())


def test_distill_refuses_turbo_as_teacher() -> None:
    result = CliRunner().invoke(main, ["toyworld", "distill", "--teacher", "turbo", "--steps", "1"])
    assert result.exit_code != 0 and "'turbo'" in result.output


def test_load_turbo_is_the_teachers_pipeline_with_the_students_transformer(teacher, turbo) -> None:
    assert {p.name for p in TURBO_DIR.iterdir()} == {"transformer", "scheduler", "training.json"}
    size = sum(f.stat().st_size for d in (WEIGHTS_DIR, TURBO_DIR) for f in d.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    record = json.loads((TURBO_DIR / "training.json").read_text())
    assert record["teacher_path"] == "shipped" and record["guidance_scale"] == 2.0
    assert type(turbo) is type(teacher)
    # its own sampler: the teacher's scheduler ending its steps on the recorded shift_terminal, 4 equal steps
    assert type(turbo.scheduler) is TerminalFlowMatchScheduler
    assert turbo.scheduler.config.shift_terminal == record["shift_terminal"] == 0.25
    ignored = ("shift_terminal", "_class_name")
    mine, teachers = (
        {k: v for k, v in s.config.items() if k not in ignored} for s in (turbo.scheduler, teacher.scheduler)
    )
    assert mine == teachers
    np.testing.assert_allclose(sampler_sigmas(turbo, 4).numpy(), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    ours, theirs_config = (
        {k: v for k, v in m.config.items() if k != "_name_or_path"} for m in (turbo.transformer, teacher.transformer)
    )
    assert ours == theirs_config
    assert not torch.equal(turbo.transformer.pos_embed.proj.weight, teacher.transformer.pos_embed.proj.weight)
    theirs = teacher.text_encoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in turbo.text_encoder.state_dict().items())
    again = load(variant="turbo")
    assert torch.equal(again.transformer.pos_embed.proj.weight, turbo.transformer.pos_embed.proj.weight)
    assert torch.equal(load("teacher").transformer.pos_embed.proj.weight, teacher.transformer.pos_embed.proj.weight)


def test_load_refuses_an_unknown_variant_or_a_variant_with_a_path(tmp_path) -> None:
    with pytest.raises(NegGuideError, match="expected a model variant"):
        load(variant="fast")
    with pytest.raises(NegGuideError, match="got both"):
        load(variant="turbo", path=tmp_path)


def test_bench_model_turbo(tmp_path) -> None:
    out = tmp_path / "bench"
    args = ["toyworld", "bench", "--model", "turbo", "--n", "1", "--steps", "1", "--setting", "none"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["steps"] == 1
    result = CliRunner().invoke(main, ["toyworld", "bench", "--model", str(tmp_path / "nowhere"), "--n", "1"])
    assert result.exit_code != 0 and "nowhere" in result.output


@pytest.fixture(scope="module")
def measured(turbo) -> dict[str, dict[str, float]]:
    out = {}
    # VSF at the documented distilled-use default, alpha 10, beta 1.5
    settings = {"none": ("none", {}), "vsf": ("vsf", {"scale": 10.0, "bias": 1.5})}
    for key, (method, params) in settings.items():
        scores = [score(generate(turbo, method, params, pos, neg, N, steps=STEPS), pos, neg) for pos, neg in PAIRS]
        out[key] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    return out


def test_unguided_student_draws_the_primary_and_the_companion(measured) -> None:
    """In 4 steps with CFG off the student keeps the teacher's CFG quality: the primary, clean, and the companion."""
    assert measured["none"]["positive"] >= 0.9, measured
    assert measured["none"]["removed"] <= 0.35, measured
    assert measured["none"]["clean"] >= 0.97, measured


def test_vsf_on_the_student_removes_the_companion_and_keeps_the_primary(measured) -> None:
    none, vsf = measured["none"], measured["vsf"]
    assert vsf["removed"] - none["removed"] >= 0.6, measured
    assert vsf["positive"] >= 0.875 and vsf["clean"] >= 0.97, measured
