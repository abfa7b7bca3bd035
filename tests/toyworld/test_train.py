"""Training: the noising convention matches the inference scheduler; a short run saves a loadable pipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from negguide.toyworld import load
from negguide.toyworld.train import PRESETS
from negguide.toyworld.train import noisy
from negguide.toyworld.train import train
from negguide.toyworld.train import velocity


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
