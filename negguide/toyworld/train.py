"""Train a ToyWorld pipeline from scratch: pixel-space rectified flow, text encoders trained jointly.

The noising convention is the one ``FlowMatchEulerDiscreteScheduler`` (shift 1) integrates at inference:
``x_t = (1 - t) x0 + t eps`` with ``sigma = t`` and ``timestep = 1000 t``, and the model predicts the
velocity ``eps - x0`` (the scheduler steps ``x + (sigma_next - sigma) * v`` towards ``sigma = 0``).
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from negguide.toyworld.pipeline import ToyWorldPipeline
from negguide.toyworld.pipeline import build
from negguide.toyworld.world import sample_batch


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


#: the default configuration per device type: "cpu" trains in about 25 minutes on one thread of a shared
#: 2-core machine; "cuda" is the proven recipe (about 8 minutes on one H100)
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


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target: ``d x_t / d t = eps - x0``."""
    return eps - x0


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(
    config: TrainConfig,
    device: torch.device,
    out: Path | None = None,
    progress: bool = True,
    log_every: int = 100,
) -> tuple[ToyWorldPipeline, dict[str, Any]]:
    """Train a fresh pipeline; save it (``save_pretrained``) and ``training.json`` to ``out`` when given.

    Returns:
        The trained pipeline (eval mode) and the training record.
    """
    from tqdm.auto import tqdm

    pipe = build(
        seed=config.seed,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        patch_size=config.patch_size,
    )
    pipe.to(device)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.05)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    autocast = device.type == "cuda"
    losses: list[float] = []
    start = time.time()
    bar = tqdm(range(config.steps), disable=not progress, desc="toyworld train")
    for step in bar:
        images, captions = sample_batch(config.batch, rng)
        x0 = torch.from_numpy(images).to(device)
        t = torch.sigmoid(torch.randn(config.batch, generator=gen)).to(device)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == config.steps - 1:
            recent = float(np.mean(losses[-log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            if not progress:
                print(f"step {step} loss {recent:.4f} {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    for m in modules:
        m.eval()
    pipe.to("cpu")
    record = {
        **asdict(config),
        "seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 5),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if out is not None:
        out = Path(out)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return pipe, record
