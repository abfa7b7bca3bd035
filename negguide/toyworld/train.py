"""Train a ToyWorld pipeline from scratch: pixel-space rectified flow, text encoders trained jointly.

The noising convention is the one ``FlowMatchEulerDiscreteScheduler`` (shift 1) integrates at inference:
``x_t = (1 - t) x0 + t eps`` with ``sigma = t`` and ``timestep = 1000 t``, and the model predicts the
velocity ``eps - x0`` (the scheduler steps ``x + (sigma_next - sigma) * v`` towards ``sigma = 0``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import json
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from negguide.toyworld.pipeline import ToyWorldPipeline
from negguide.toyworld.pipeline import build
from negguide.toyworld.world import sample_batch
from negguide.toyworld.world import step_batch


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimisation and model size."""

    steps: int
    batch: int
    lr: float
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int
    seed: int = 0
    #: decay of an exponential moving average of the weights (0: off); the saved weights are the average
    ema: float = 0.0
    #: share of the steps spent warming the learning rate up (one-cycle schedule)
    warmup: float = 0.05
    #: location of the logit-normal noise levels, ``t = sigmoid(N(t_mean, 1))``; above 0 more steps are spent
    #: at high noise, where a scene's layout and colours are decided
    t_mean: float = 0.0
    #: processes drawing the scenes ahead of the optimiser (0: drawn in the training loop, one stream seeded by
    #: ``seed``, as the shipped stages were; >= 1: step ``k``'s scenes seeded by ``(seed, k)``, the same batches
    #: for any number of workers). Scene drawing is Python-bound: on a GPU it is the bottleneck without workers
    data_workers: int = 0


#: the default configuration per device type: "cpu" trains in about 40 minutes on the two threads of a 2-core
#: machine (the first stage of the shipped weights; docs/toyworld.md has the two continuations); "cuda" is the
#: proven recipe (about 8 minutes on one H100)
PRESETS: dict[str, TrainConfig] = {
    "cpu": TrainConfig(
        steps=5000, batch=64, lr=7e-4, num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=4
    ),
    "cuda": TrainConfig(
        steps=5000, batch=256, lr=4e-4, num_layers=6, num_attention_heads=4, attention_head_dim=32, patch_size=2
    ),
}


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The training input at noise level ``t`` (one per row): ``(1 - t) x0 + t eps``."""
    tt = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * eps


def noise_levels(batch: int, generator: torch.Generator, t_mean: float = 0.0) -> torch.Tensor:
    """``batch`` training noise levels, logit-normal: ``t = sigmoid(N(t_mean, 1))`` (SD3's ``m = t_mean, s = 1``)."""
    return torch.sigmoid(torch.randn(batch, generator=generator) + t_mean)


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target: ``d x_t / d t = eps - x0``."""
    return eps - x0


def update_average(averaged: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    """One step of the weights' moving average, in place: ``a <- d a + (1 - d) p``.

    The decay is warmed up, ``d = min(decay, (1 + step) / (10 + step))``, so the first weights do not linger.
    """
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - d)


def optimise_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: Any,
    params: list[torch.Tensor],
    averaged: list[torch.Tensor],
    ema: float,
    step: int,
) -> float:
    """One optimiser step on ``loss`` (gradients clipped to norm 1, the schedule stepped, the weight average
    updated when there is one); the loss as a float. Shared by ``train`` and ``distill``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if averaged:
        update_average(averaged, params, ema, step)
    return loss.item()


def report_loss(bar: Any, losses: list[float], step: int, total: int, every: int, progress: bool, start: float) -> None:
    """Every ``every`` steps (and at the last): the mean recent loss on the progress bar, or printed without one."""
    if step % every == 0 or step == total - 1:
        recent = float(np.mean(losses[-every:]))
        bar.set_postfix(loss=f"{recent:.4f}")
        if not progress:
            print(f"step {step} loss {recent:.4f} {time.time() - start:.0f}s", flush=True)


def batches(batch: int, seed: int, steps: int, workers: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The scenes of each training step, in order.

    ``workers == 0``: one stream seeded by ``seed``, drawn here (the shipped stages' data). Otherwise
    ``world.step_batch`` in ``workers`` processes, at most ``2 * workers`` steps ahead (bounded memory); the batches
    do not depend on the number of workers.
    """
    if workers == 0:
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            yield sample_batch(batch, rng)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        ahead: collections.deque[Any] = collections.deque()
        for step in range(steps):
            while len(ahead) < 2 * workers and step + len(ahead) < steps:
                ahead.append(pool.apply_async(step_batch, (batch, seed, step + len(ahead))))
            yield ahead.popleft().get()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_size(pipe: ToyWorldPipeline) -> dict[str, int]:
    cfg = pipe.transformer.config
    return {
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "patch_size": cfg.patch_size,
    }


def _save(pipe: ToyWorldPipeline, out: Path, record: dict[str, Any]) -> None:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # a pipeline loaded from a folder (--init) remembers that folder's path in its configs: not ours to ship
    for config in [out / "model_index.json", *out.glob("*/config.json")]:
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train(
    config: TrainConfig,
    device: torch.device,
    out: Path | None = None,
    progress: bool = True,
    log_every: int = 100,
    init: Path | None = None,
    checkpoint_every: int = 0,
) -> tuple[ToyWorldPipeline, dict[str, Any]]:
    """Train a pipeline; save it (``save_pretrained``) and ``training.json`` to ``out`` when given.

    Args:
        config: the run; its model-size fields are replaced by ``init``'s when ``init`` is given.
        device: where to train (bfloat16 autocast on CUDA).
        out: directory for the weights and the record.
        progress: show a tqdm bar (else print the loss every ``log_every`` steps).
        log_every: steps between loss reports.
        init: a saved ToyWorld pipeline to continue from instead of fresh weights; its ``training.json``
            is kept in the new record under ``"init"``, so the record tells the whole recipe.
        checkpoint_every: also save to ``out`` every this many steps (0: only at the end).

    Returns:
        The trained pipeline (eval mode) and the training record.
    """
    from tqdm.auto import tqdm

    previous: dict[str, Any] | None = None
    if init is not None:
        from negguide.toyworld import load

        pipe = load(path=init)
        config = replace(config, **_model_size(pipe))
        record_file = Path(init) / "training.json"
        previous = json.loads(record_file.read_text()) if record_file.is_file() else {"path": str(init)}
    else:
        pipe = build(
            seed=config.seed,
            num_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            patch_size=config.patch_size,
        )
    pipe.to(device)
    for m in _trained_modules(pipe):
        m.train()
    params = _trained_params(pipe)
    averaged = [p.detach().clone() for p in params] if config.ema > 0 else []
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=config.warmup)
    data = batches(config.batch, config.seed, config.steps, config.data_workers)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    autocast = device.type == "cuda"
    losses: list[float] = []
    start = time.time()
    bar = tqdm(range(config.steps), disable=not progress, desc="toyworld train")
    with contextlib.closing(data):
        for step in bar:
            images, captions = next(data)
            x0 = torch.from_numpy(images).to(device)
            t = noise_levels(config.batch, gen, config.t_mean).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            xt = noisy(x0, eps, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                embeds, _, pooled, _ = pipe.encode_prompt(
                    captions, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=0
                )
                v = pipe.transformer(
                    hidden_states=xt,
                    timestep=t * 1000,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
            loss = torch.nn.functional.mse_loss(v.float(), velocity(x0, eps))
            losses.append(optimise_step(loss, opt, sched, params, averaged, config.ema, step))
            report_loss(bar, losses, step, config.steps, log_every, progress, start)
            done = step + 1
            if out is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
                snapshot = _as_saved(copy.deepcopy(pipe), averaged)
                _save(snapshot, out, _record(config, device, start, losses, previous, done))
    _as_saved(pipe, averaged)
    record = _record(config, device, start, losses, previous, config.steps)
    if out is not None:
        _save(pipe, out, record)
    return pipe, record


def _record(
    config: TrainConfig,
    device: torch.device,
    start: float,
    losses: list[float],
    previous: dict[str, Any] | None,
    done: int,
) -> dict[str, Any]:
    record = {
        **asdict(config),
        "seconds": round(time.time() - start, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 5),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if done < config.steps:
        record["steps_done"] = done
    if previous is not None:
        record["init"] = previous
    return record


def _trained_modules(pipe: ToyWorldPipeline) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]


def _trained_params(pipe: ToyWorldPipeline) -> list[torch.nn.Parameter]:
    return [p for m in _trained_modules(pipe) for p in m.parameters()]


def _as_saved(pipe: ToyWorldPipeline, averaged: list[torch.Tensor]) -> ToyWorldPipeline:
    """``pipe`` as it is saved, in place: eval mode, the averaged weights when averaging, on the CPU."""
    for m in _trained_modules(pipe):
        m.eval()
    if averaged:
        with torch.no_grad():
            torch._foreach_copy_(_trained_params(pipe), averaged)
    return pipe.to("cpu")
