"""Training: the noising convention matches the inference scheduler; a short run saves a loadable pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from negguide.toyworld import load
from negguide.toyworld.train import PRESETS
from negguide.toyworld.train import batches
from negguide.toyworld.train import noise_levels
from negguide.toyworld.train import noisy
from negguide.toyworld.train import train
from negguide.toyworld.train import update_average
from negguide.toyworld.train import velocity
from negguide.toyworld.world import sample_batch


def test_training_target_is_what_the_scheduler_integrates() -> None:
    """With the exact velocity, every Euler step of the pipeline's scheduler lands on the next training point."""
    torch.manual_seed(0)
    x0, eps = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(8)
    sigmas = sched.sigmas.double()
    torch.testing.assert_close(sched.timesteps.double(), sigmas[:-1] * 1000, rtol=1e-5, atol=1e-3)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    x = eps.clone()  # sigma 1 is pure noise
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x0, eps), t, x, return_dict=False)[0].double()
        torch.testing.assert_close(x, noisy(x0, eps, sigmas[i + 1].expand(2)), rtol=0, atol=1e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_noise_levels_at_location_zero_are_the_shipped_stages_draws() -> None:
    """t_mean 0 (the default, and every shipped stage) draws t = sigmoid(randn) from the same generator."""
    expected = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(noise_levels(64, torch.Generator().manual_seed(3)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("t_mean", [-1.0, 0.0, 0.7, 1.5])
def test_noise_levels_are_logit_normal_around_t_mean(t_mean: float) -> None:
    """P(t > 1/2) = P(N(t_mean, 1) > 0) = Phi(t_mean); 40000 draws put the share within 0.01 of it."""
    t = noise_levels(40000, torch.Generator().manual_seed(0), t_mean)
    assert ((t > 0) & (t < 1)).all()
    phi = 0.5 * (1 + math.erf(t_mean / math.sqrt(2)))
    assert abs((t > 0.5).double().mean().item() - phi) < 0.01


def test_a_run_draws_its_noise_levels_at_its_t_mean(monkeypatch) -> None:  # noqa: ANN001
    import negguide.toyworld.train as train_module

    seen: list[float] = []

    def spy(batch, generator, t_mean=0.0):  # noqa: ANN001, ANN202
        seen.append(t_mean)
        return noise_levels(batch, generator, t_mean)

    monkeypatch.setattr(train_module, "noise_levels", spy)
    _, record = train(
        replace(PRESETS["cpu"], steps=2, batch=2, num_layers=1, t_mean=0.7), torch.device("cpu"), progress=False
    )
    assert seen == [0.7, 0.7] and record["t_mean"] == 0.7


def test_short_run_saves_a_loadable_pipeline(tmp_path) -> None:  # noqa: ANN001
    config = replace(PRESETS["cpu"], steps=3, batch=4, num_layers=1)
    pipe, record = train(config, torch.device("cpu"), out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved == record and saved["steps"] == 3 and saved["device"] == "cpu"
    assert torch.isfinite(torch.tensor(saved["final_loss"]))
    again = load(path=tmp_path)
    state = pipe.transformer.state_dict()
    assert all(torch.equal(v, again.transformer.state_dict()[k]) for k, v in state.items())
    assert not pipe.transformer.training


def test_the_moving_average_follows_its_formula() -> None:
    """a_t = d_t a_(t-1) + (1 - d_t) p_t with d_t = min(decay, (1 + t) / (10 + t)), against a float64 loop."""
    torch.manual_seed(0)
    trajectory = [torch.randn(5, dtype=torch.float64) for _ in range(30)]
    averaged = [trajectory[0].clone()]
    expected = trajectory[0].clone()
    for step, p in enumerate(trajectory[1:]):
        update_average(averaged, [p], 0.9, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * p
    torch.testing.assert_close(averaged[0], expected, rtol=1e-12, atol=1e-12)


def test_averaged_run_saves_other_weights_than_the_plain_run(tmp_path) -> None:  # noqa: ANN001
    config = replace(PRESETS["cpu"], steps=4, batch=4, num_layers=1)
    plain, _ = train(config, torch.device("cpu"), progress=False)
    averaged, record = train(replace(config, ema=0.5), torch.device("cpu"), out=tmp_path, progress=False)
    assert record["ema"] == 0.5
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(plain.transformer.state_dict()[key], averaged.transformer.state_dict()[key])
    saved = load(path=tmp_path).transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in averaged.transformer.state_dict().items())


def test_a_run_continues_from_a_saved_pipeline_and_records_the_recipe(tmp_path) -> None:  # noqa: ANN001
    first, second = tmp_path / "first", tmp_path / "second"
    _, before = train(
        replace(PRESETS["cpu"], steps=2, batch=4, num_layers=1), torch.device("cpu"), out=first, progress=False
    )
    start = load(path=first).transformer.state_dict()
    pipe, record = train(
        replace(PRESETS["cpu"], steps=2, batch=4), torch.device("cpu"), out=second, progress=False, init=first
    )
    assert pipe.transformer.config.num_layers == 1 and record["num_layers"] == 1  # the size of init, not the preset's
    assert record["init"] == before
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(start[key], pipe.transformer.state_dict()[key])  # it trained on
    assert json.loads((second / "training.json").read_text()) == record
    configs = [second / "model_index.json", *second.glob("*/config.json")]
    assert len(configs) >= 4 and not any("_name_or_path" in json.loads(c.read_text()) for c in configs)


def test_checkpoints_are_saved_during_the_run(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import negguide.toyworld.train as train_module

    saved: list[dict] = []
    real_save = train_module._save

    def spy(pipe, out, record):  # noqa: ANN001, ANN202
        real_save(pipe, out, record)
        saved.append(json.loads((out / "training.json").read_text()))
        load(path=out)  # every checkpoint is a loadable pipeline

    monkeypatch.setattr(train_module, "_save", spy)
    config = replace(PRESETS["cpu"], steps=4, batch=4, num_layers=1, ema=0.5)
    train(config, torch.device("cpu"), out=tmp_path, progress=False, checkpoint_every=2)
    assert [r.get("steps_done") for r in saved] == [2, None]


def test_without_workers_the_scenes_are_the_shipped_stages_single_stream() -> None:
    rng = np.random.default_rng(7)
    expected = [sample_batch(3, rng) for _ in range(4)]
    got = list(batches(3, seed=7, steps=4, workers=0))
    assert [c for _, c in got] == [c for _, c in expected]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, expected))


def test_worker_batches_depend_on_seed_and_step_only() -> None:
    one = list(batches(2, seed=3, steps=5, workers=1))
    three = list(batches(2, seed=3, steps=5, workers=3))
    assert len(one) == len(three) == 5
    assert [c for _, c in one] == [c for _, c in three]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(one, three))
    # step k is seeded by (seed, k): not the single stream, and different steps differ
    first = sample_batch(2, np.random.default_rng([3, 0]))
    assert np.array_equal(one[0][0], first[0]) and one[0][1] == first[1]
    assert not np.array_equal(one[0][0], one[1][0])


def test_a_run_with_data_workers_trains_and_records_them(tmp_path) -> None:  # noqa: ANN001
    config = replace(PRESETS["cpu"], steps=2, batch=2, num_layers=1, data_workers=2)
    _, record = train(config, torch.device("cpu"), out=tmp_path, progress=False)
    assert record["data_workers"] == 2 and record["steps"] == 2
    assert json.loads((tmp_path / "training.json").read_text())["data_workers"] == 2
