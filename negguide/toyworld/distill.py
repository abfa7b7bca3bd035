"""Distil the ToyWorld model into ToyWorld-Turbo: a few-step student that needs no classifier-free guidance.

The recipe is *reflow on the teacher's guided pairs* (2-rectified flow, as in InstaFlow), one objective that
distils both the guidance and the steps:

1. draw captions from the world's own distribution (``world.sample_batch``) and noise ``eps``, and integrate the
   teacher from ``eps`` with its pipeline's Euler scheduler and its classifier-free guidance against the empty
   prompt (``v = v_u + w (v_c - v_u)``, ``teacher_steps`` steps): the pair ``(eps, x1)``, where ``x1`` is exactly the
   image ``pipe(caption, guidance_scale=w)`` draws from that noise;
2. initialise the student from the teacher's transformer and train it, conditioned on the caption alone (no
   unconditional pass), to predict the straight path between the two: ``x_t = (1 - t) x1 + t eps``, target
   ``eps - x1`` (``t`` uniform, plus a share of rows at ``t = 1``, the noise that a 1- or 2-step sampler starts from;
   or, with ``schedule``, ``t`` only at the levels a sampler of those step counts visits; with ``rollout``, some rows
   start from the student's own sampler state instead, with the straight line from there to ``x1`` as target).

Where the pairs' coupling is deterministic the straight path is the student's whole trajectory, so one Euler step
already lands near ``x1``; the guidance is in the targets, so the student runs with ``guidance_scale=0``. The text
encoders, tokenizers and "VAE" are the teacher's, unchanged (only the transformer is trained); the scheduler is the
teacher's too, or with ``shift_terminal`` the student's own sampler (``TerminalFlowMatchScheduler``). The student
ships as its transformer and, when it has its own sampler, that scheduler's config.
"""

from __future__ import annotations

import copy
import datetime
import json
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from negguide.toyworld.pipeline import TerminalFlowMatchScheduler
from negguide.toyworld.pipeline import ToyWorldPipeline
from negguide.toyworld.train import _save
from negguide.toyworld.train import noisy
from negguide.toyworld.train import optimise_step
from negguide.toyworld.train import report_loss
from negguide.toyworld.train import velocity
from negguide.toyworld.world import sample_batch

#: the lowest level a rollout row may sit at: its target divides by the level (the teacher's schedule ends at 1/1000)
MIN_ROLLOUT_LEVEL = 0.01
#: the recipe's name in the training record
RECIPE = "reflow on the teacher's CFG pairs (guidance + step distillation)"


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run: the teacher's pairs and the student's optimisation.

    The defaults are the first stage of the shipped student; the second continued from it (``init``) with
    ``seed=1, pairs=1024, steps=600, lr=1e-4``, the third from the second with ``seed=3, pairs=2048, steps=1000,
    lr=1e-4, t_one=0, schedule=(4,), rollout=0.5, rollout_steps=1, shift_terminal=0.25, l1_below=0.25``
    (docs/toyworld.md, ToyWorld-Turbo).
    """

    #: (noise, teacher image) pairs drawn for training
    pairs: int = 2048
    #: Euler steps of the teacher per pair (the bench's 8)
    teacher_steps: int = 8
    #: the teacher's classifier-free guidance scale against the empty prompt (docs/toyworld.md's 2)
    guidance_scale: float = 2.0
    #: optimiser steps of the student
    steps: int = 1000
    #: pairs per optimiser step
    batch: int = 64
    lr: float = 2e-4
    #: decay of the weights' moving average (0: off); the saved student is the average
    ema: float = 0.995
    #: share of the steps spent warming the learning rate up (one-cycle schedule)
    warmup: float = 0.05
    #: share of each batch trained at ``t = 1`` (pure noise: where 1- and 2-step sampling start); the rest uniform
    #: (or on ``schedule``'s levels)
    t_one: float = 0.25
    #: step counts whose sampling levels the rest of each batch is trained at: the sigmas of the pipeline's scheduler
    #: for those counts, each drawn in proportion to the Euler step it takes (``sigma_i - sigma_{i+1}``, averaged
    #: over the counts), so a level's share is its weight in the sampled image; empty: ``t`` uniform on ``[0, 1)``
    schedule: tuple[int, ...] = ()
    #: share of the rows at a level strictly inside the (single) ``schedule`` whose input is the student's own
    #: sampler state there (its Euler steps from the pair's noise, no gradient) instead of the straight-path point;
    #: their target is the straight line from that state to the teacher's image, ``(x - x1) / t``, so the student
    #: learns to correct its own earlier steps
    rollout: float = 0.0
    #: roll out at most this many sampler steps (``1``: only the rows at the schedule's second level); 0: all
    rollout_steps: int = 0
    #: the student's own sampler: its scheduler (the teacher's, or ``init``'s) with this ``shift_terminal``, so that
    #: ``N`` steps end on this level before their last step to 0. The teacher's schedule ends at 1/1000, so its
    #: 4-step sampler spends the 4th step on 1/1000 of the path; None: the scheduler unchanged
    shift_terminal: float | None = None
    #: rows at a level at or below this are trained on the absolute error of the velocity, the rest on its square
    #: (0: squared everywhere). The squared error is minimised by the mean of the possible targets, the absolute one
    #: by their median, per pixel: at low noise, where the layout is settled, the median picks one colour where the
    #: mean would blend two (cleaner edges); at high noise the mean keeps every likely object faintly, where the
    #: median would drop the ones under even odds
    l1_below: float = 0.0
    #: further pairs, never trained on, on which the student's loss is measured before and after
    holdout: int = 64
    seed: int = 0
    #: pairs per teacher forward batch while drawing them
    pair_batch: int = 256

    def __post_init__(self) -> None:
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"expected a --shift-terminal level strictly between 0 and 1, got {self.shift_terminal}")
        if not 0 <= self.l1_below <= 1:
            raise ValueError(f"expected an --l1-below level in [0, 1], got {self.l1_below}")
        if self.rollout_steps and not self.rollout:
            raise ValueError(
                f"expected --rollout-steps only with a --rollout share above 0, got --rollout-steps "
                f"{self.rollout_steps} with --rollout {self.rollout}; add --rollout R or drop --rollout-steps"
            )
        if self.rollout and len(self.schedule) != 1:
            raise ValueError(
                f"expected one --schedule step count to roll the student's sampler out on, got {list(self.schedule)}"
            )


@dataclass
class Pairs:
    """Teacher pairs and their frozen text conditioning."""

    noise: torch.Tensor
    images: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def encode(pipe: ToyWorldPipeline, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's prompt embeddings and pooled projections of ``captions`` (no gradient)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=0
        )
    return embeds, pooled


def teacher_sample(
    pipe: ToyWorldPipeline,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    guidance_scale: float,
    steps: int,
) -> torch.Tensor:
    """Integrate ``pipe``'s transformer from ``noise`` as ``pipe(..., guidance_scale, num_inference_steps=steps)`` does.

    The sigmas and timesteps are those of a copy of the pipeline's scheduler; above ``guidance_scale`` 1 each step
    takes ``v_u + w (v_c - v_u)`` with ``v_u`` conditioned on the empty prompt, as diffusers' CFG does.
    """
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps, device=noise.device)
    cfg = guidance_scale > 1
    if cfg:
        empty_embeds, empty_pooled = encode(pipe, [""], noise.device)
        embeds = torch.cat([empty_embeds.expand(len(noise), -1, -1), embeds])
        pooled = torch.cat([empty_pooled.expand(len(noise), -1), pooled])
    x = noise
    with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
            inputs = torch.cat([x, x]) if cfg else x
            v = pipe.transformer(
                hidden_states=inputs,
                timestep=timestep.expand(len(inputs)),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            if cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = x + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
    return x


def draw_pairs(
    pipe: ToyWorldPipeline,
    n: int,
    config: DistillConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    progress: bool = True,
    desc: str = "teacher pairs",
) -> Pairs:
    """``n`` teacher pairs: captions from the world's distribution, noise from ``gen``, the teacher's guided images."""
    from tqdm.auto import tqdm

    _, captions = sample_batch(n, rng)
    noise = torch.randn(n, 3, pipe.transformer.config.sample_size, pipe.transformer.config.sample_size, generator=gen)
    noise = noise.to(device)
    embeds, pooled = encode(pipe, captions, device)
    images = []
    for start in tqdm(range(0, n, config.pair_batch), disable=not progress, desc=desc):
        part = slice(start, start + config.pair_batch)
        images.append(
            teacher_sample(pipe, noise[part], embeds[part], pooled[part], config.guidance_scale, config.teacher_steps)
        )
    return Pairs(noise, torch.cat(images), embeds, pooled, captions)


def student_scheduler(base: Any, shift_terminal: float | None) -> Any:
    """The student's scheduler: a copy of ``base`` (the teacher's or ``init``'s); with ``shift_terminal``, a
    ``TerminalFlowMatchScheduler`` of ``base``'s config ending its steps on that level."""
    if shift_terminal is None:
        return copy.deepcopy(base)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    return TerminalFlowMatchScheduler.from_config({**config, "shift_terminal": shift_terminal})


def sampler_sigmas(pipe: ToyWorldPipeline, count: int) -> torch.Tensor:
    """The sigmas ``pipe``'s scheduler steps through with ``count`` Euler steps, ``1`` to ``0`` (``count + 1``)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(count, device="cpu")
    return scheduler.sigmas.float().clone()


def schedule_levels(pipe: ToyWorldPipeline, counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels ``pipe`` samples at with ``counts`` Euler steps, and each level's probability: the step it
    takes (``sigma_i - sigma_{i+1}``) averaged over the counts, a level shared by several counts summed."""
    weights: dict[float, float] = {}
    for count in counts:
        sigmas = sampler_sigmas(pipe, count).double()
        for i in range(count):
            level = float(sigmas[i])
            weights[level] = weights.get(level, 0.0) + float(sigmas[i] - sigmas[i + 1]) / len(counts)
    levels = sorted(weights, reverse=True)
    probs = torch.tensor([weights[level] for level in levels], dtype=torch.float64)
    return torch.tensor(levels, dtype=torch.float32), probs / probs.sum()


def training_levels(
    batch: int,
    t_one: float,
    gen: torch.Generator,
    levels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Noise levels of one batch: uniform on ``[0, 1)`` (or drawn from ``levels``, a ``schedule_levels`` answer),
    with the first ``round(t_one * batch)`` rows at 1."""
    if levels is None:
        t = torch.rand(batch, generator=gen)
    else:
        values, probs = levels
        t = values[torch.multinomial(probs, batch, replacement=True, generator=gen)]
    t[: round(t_one * batch)] = 1.0
    return t


def sampler_states(
    student: torch.nn.Module,
    pairs: Pairs,
    rows: torch.Tensor,
    t: torch.Tensor,
    sigmas: torch.Tensor,
    chosen: torch.Tensor,
) -> torch.Tensor:
    """The inputs at levels ``t``: the straight-path point ``(1 - t) x1 + t eps``, except for the ``chosen`` rows,
    whose input is the state the student's own Euler sampler reaches at ``t`` from ``eps`` on ``sigmas`` (``t`` must
    be one of them; no gradient)."""
    x1, eps = pairs.images[rows], pairs.noise[rows]
    x = noisy(x1, eps, t)
    if not bool(chosen.any()):
        return x
    levels = sigmas.to(t.device, t.dtype)
    depth = (levels[None, :] > t[:, None] + 1e-6).sum(1)  # Euler steps from 1 down to t
    state = eps.clone()
    with torch.no_grad():
        for j in range(int(depth[chosen].max())):
            active = chosen & (depth > j)
            index = active.nonzero().squeeze(1)
            v = student(
                hidden_states=state[index],
                timestep=levels[j].expand(len(index)) * 1000,
                encoder_hidden_states=pairs.embeds[rows[index]],
                pooled_projections=pairs.pooled[rows[index]],
                return_dict=False,
            )[0]
            state[index] = state[index] + (levels[j + 1] - levels[j]) * v.to(state.dtype)
    return torch.where(chosen.reshape(-1, *([1] * (x.ndim - 1))), state, x)


def rollout_rows(t: torch.Tensor, sigmas: torch.Tensor, share: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Which rows of a batch at levels ``t`` start from the student's own sampler state: a ``share`` of those at a
    level of ``sigmas`` below the noise (1) and above ``MIN_ROLLOUT_LEVEL`` (the default schedule's last level,
    1/1000, would divide the target by 1/1000), at most ``steps`` sampler steps from the noise (0: any)."""
    inside = (t < 1) & (t > MIN_ROLLOUT_LEVEL)
    if steps:
        inside &= t > sigmas[min(steps + 1, len(sigmas) - 1)].item() + 1e-6
    return inside & (torch.rand(len(t), generator=gen) < share).to(t.device)


def reflow_loss(
    student: torch.nn.Module,
    pairs: Pairs,
    rows: torch.Tensor,
    t: torch.Tensor,
    x: torch.Tensor | None = None,
    chosen: torch.Tensor | None = None,
    l1_below: float = 0.0,
) -> torch.Tensor:
    """Mean squared error between the student's velocity on the straight path of ``rows`` at ``t`` and
    ``eps - x1`` (absolute error for the rows at ``t <= l1_below``); with ``x`` and ``chosen``
    (``sampler_states``), the chosen rows' input is their ``x`` and their target the straight line from it to the
    teacher's image, ``(x - x1) / t``."""
    x1, eps = pairs.images[rows], pairs.noise[rows]
    target = velocity(x1, eps)
    if x is None:
        x = noisy(x1, eps, t)
    elif chosen is not None:
        shape = (-1, *([1] * (x.ndim - 1)))
        target = torch.where(chosen.reshape(shape), (x - x1) / t.reshape(shape), target)
    v = student(
        hidden_states=x,
        timestep=t * 1000,
        encoder_hidden_states=pairs.embeds[rows],
        pooled_projections=pairs.pooled[rows],
        return_dict=False,
    )[0]
    absolute = t <= l1_below + 1e-6  # the sampler's levels are float32
    if not bool(absolute.any()):
        return torch.nn.functional.mse_loss(v.float(), target)
    error = v.float() - target
    shape = (-1, *([1] * (error.ndim - 1)))
    return torch.where(absolute.reshape(shape), error.abs(), error.square()).mean()


def holdout_loss(student: torch.nn.Module, pairs: Pairs | None) -> float | None:
    """The reflow loss on held-out pairs at the fixed levels 1, 0.75, 0.5 and 0.25 (each pair at each level);
    ``None`` without held-out pairs."""
    if pairs is None or len(pairs) == 0:
        return None
    rows = torch.arange(len(pairs), device=pairs.noise.device)
    with torch.no_grad():
        losses = [
            reflow_loss(student, pairs, rows, torch.full((len(pairs),), level, device=pairs.noise.device)).item()
            for level in (1.0, 0.75, 0.5, 0.25)
        ]
    return round(float(np.mean(losses)), 5)


def distill(
    teacher: ToyWorldPipeline,
    config: DistillConfig,
    device: torch.device,
    out: Path | None = None,
    teacher_record: dict[str, Any] | None = None,
    teacher_name: str = "shipped",
    progress: bool = True,
    log_every: int = 100,
    checkpoint_every: int = 0,
    init: ToyWorldPipeline | None = None,
    init_record: dict[str, Any] | None = None,
) -> tuple[ToyWorldPipeline, dict[str, Any]]:
    """Distil ``teacher`` into a student pipeline; save it (``save_pretrained``) and ``training.json`` to ``out``.

    Args:
        teacher: the trained ToyWorld pipeline (left unchanged; the student gets copies of its components).
        config: the run.
        device: where to run.
        out: directory for the student pipeline and its record.
        teacher_record: the teacher's own ``training.json``, kept in the record under ``"teacher"``.
        teacher_name: how the record names the teacher (``"shipped"`` or its path).
        progress: show tqdm bars (else print the loss every ``log_every`` steps).
        log_every: steps between loss reports.
        checkpoint_every: also save to ``out`` every this many steps (0: only at the end).
        init: a student to continue from (its transformer) instead of the teacher's transformer; the pairs are
            drawn anew from ``config.seed``.
        init_record: ``init``'s own record, kept in the new one under ``"init"``.

    Returns:
        The student pipeline (eval mode, CPU) and the training record.
    """
    from tqdm.auto import tqdm

    start = time.time()
    teacher = copy.deepcopy(teacher).to(device)
    for module in (teacher.transformer, teacher.text_encoder, teacher.text_encoder_2):
        module.eval()
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    pairs = draw_pairs(teacher, config.pairs, config, rng, gen, device, progress)
    held = (
        draw_pairs(teacher, config.holdout, config, rng, gen, device, progress, desc="held-out pairs")
        if config.holdout
        else None
    )
    pair_seconds = time.time() - start
    # the pairs are drawn: from here on this copy of the teacher is the pipeline the student ships in, with the
    # student's sampler, whose levels it trains at
    teacher.scheduler = student_scheduler((init if init is not None else teacher).scheduler, config.shift_terminal)
    levels = schedule_levels(teacher, config.schedule) if config.schedule else None
    if config.rollout:  # DistillConfig holds one schedule count with a rollout
        rollout_sigmas = sampler_sigmas(teacher, config.schedule[0])

    student = copy.deepcopy((init if init is not None else teacher).transformer).to(device)
    before = holdout_loss(student, held)
    student.train()
    params = list(student.parameters())
    averaged = [p.detach().clone() for p in params] if config.ema > 0 else []
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=config.warmup)
    losses: list[float] = []
    bar = tqdm(range(config.steps), disable=not progress, desc="toyworld distill")

    def snapshot(done: int) -> tuple[ToyWorldPipeline, dict[str, Any]]:
        saved = copy.deepcopy(student).eval()
        if averaged:
            with torch.no_grad():
                torch._foreach_copy_(list(saved.parameters()), averaged)
        after = holdout_loss(saved, held)
        pipe = copy.deepcopy(teacher)
        pipe.transformer = saved
        pipe.to("cpu")
        record = {
            "recipe": RECIPE,
            **asdict(config),
            "pair_seconds": round(pair_seconds, 1),
            "seconds": round(time.time() - start, 1),
            "final_loss": round(float(np.mean(losses[-100:])), 5) if losses else None,
            "holdout_loss_before": before,
            "holdout_loss_after": after,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "teacher_path": teacher_name,
            "teacher": teacher_record,
        }
        if done < config.steps:
            record["steps_done"] = done
        if init is not None:
            record["init"] = init_record
        return pipe, record

    for step in bar:
        rows = torch.randint(len(pairs), (config.batch,), generator=gen).to(device)
        t = training_levels(config.batch, config.t_one, gen, levels).to(device)
        x = chosen = None
        if config.rollout:
            chosen = rollout_rows(t, rollout_sigmas, config.rollout, config.rollout_steps, gen)
            x = sampler_states(student, pairs, rows, t, rollout_sigmas, chosen)
        loss = reflow_loss(student, pairs, rows, t, x, chosen, config.l1_below)
        losses.append(optimise_step(loss, opt, sched, params, averaged, config.ema, step))
        report_loss(bar, losses, step, config.steps, log_every, progress, start)
        done = step + 1
        if out is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            checkpoint, checkpoint_record = snapshot(done)
            _save(checkpoint, Path(out), checkpoint_record)
    pipe, record = snapshot(config.steps)
    if out is not None:
        _save(pipe, Path(out), record)
    return pipe, record


def load_record(path: Path) -> dict[str, Any] | None:
    """A saved pipeline's ``training.json``, or ``None`` when it has none."""
    file = Path(path) / "training.json"
    return json.loads(file.read_text()) if file.is_file() else None
