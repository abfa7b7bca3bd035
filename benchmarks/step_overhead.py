"""Cost of one guided denoising step relative to the unguided step, per method and attention path.

Builds SD3.5-Large-, Flux.1-dev- and Wan-2.1-sized transformers from their configs with random
weights directly on the device (nothing is downloaded), then times ONE transformer forward (one
denoising step) unguided and with each guidance method, all in one process:

    python benchmarks/step_overhead.py --device cuda                 # full size, bf16
    python benchmarks/step_overhead.py --device cuda --models sd3 --rounds 20
    python benchmarks/step_overhead.py --device cuda --models wan --wan 14b
    python benchmarks/step_overhead.py --small                       # CPU smoke run, < 1 minute

Guidance runs through negguide itself, without a real pipeline: a minimal stand-in holds the
transformer, a ``FlowMatchEulerDiscreteScheduler`` and an ``encode_prompt`` with the family's
signature that returns random embeddings of the right shapes. ``negguide.apply(stand_in, method,
negative_prompt_embeds=...)`` installs the adapter exactly as on a pipeline, one call of
``encode_prompt`` lets it record the call (batch, dtype, device) and the negative, and every
timed ``transformer(**inputs)`` then goes through the adapter's forward hooks (negative tokens
appended to the text stream) and guided attention processors.

Interleaved rounds: an untimed warm-up round runs every setting (unguided and each row) once, records
the attention kernel its split blocks use and checks the guidance engages; then each of ``--rounds``
rounds runs every setting once, in an order rotated by one each round, timing ``--repeats`` forwards
after ``--warmup`` untimed ones (CUDA events on CUDA, ``time.perf_counter`` elsewhere). Each row
reports the median of its per-round ratios to the unguided step of the same round, their
interquartile range and min-max, the kernel, and the peak memory (``torch.cuda.max_memory_allocated``;
not measured on the CPU). A drifting machine slows a whole round alike, so it cannot make a guided
row look faster than unguided. The last lines printed are the ratios, which is what to compare
across machines (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

import negguide
from negguide.attention import FUSE_ENV
from negguide.attention import fuse_enabled

#: (label, method, params, negative tokens; None = as many as the positive prompt, for CFG).
#: Rows whose label ends in "eager glue" run with NEGGUIDE_FUSE=0 (the merge and NAG's combination as
#: separate eager ops) to show what fusing saves; they are skipped where fusing is off anyway (the CPU).
ROWS: list[tuple[str, str, dict[str, Any], int | None]] = [
    ("cfg (batch 2)", "cfg", {}, None),
    ("vsf dense", "vsf", {"attention": "dense"}, 8),
    ("vsf dense", "vsf", {"attention": "dense"}, 77),
    ("vsf split", "vsf", {"attention": "split"}, 8),
    ("vsf split", "vsf", {"attention": "split"}, 77),
    ("vsf split eager glue", "vsf", {"attention": "split"}, 8),
    ("nag split", "nag", {"attention": "split"}, 8),
    ("nag split", "nag", {"attention": "split"}, 77),
    ("nag split eager glue", "nag", {"attention": "split"}, 8),
    ("nasa split", "nasa", {"attention": "split"}, 8),
    ("nasa split", "nasa", {"attention": "split"}, 77),
]

#: PERFORMANCE.md's goals on a GPU, × unguided
TARGETS = {"vsf": 1.05, "nag": 1.10, "nasa": 1.10}


# ---------------------------------------------------------------------- model shapes


@dataclasses.dataclass
class Model:
    """A transformer, its inputs for one step, and a stand-in pipeline for negguide."""

    name: str
    transformer: torch.nn.Module
    inputs: dict[str, Any]
    pipe: Any
    text_width: int  #: channels of one text token as the transformer takes it
    num_text: int  #: positive text tokens
    pooled: torch.Tensor | None  #: a pooled vector for CFG's negative branch (SD3, Flux)


class StandIn:
    """The parts of a diffusers pipeline an adapter touches: ``transformer``, ``scheduler``, ``encode_prompt``."""

    def __init__(self, transformer: torch.nn.Module, encode_prompt: Callable[..., Any], steps: int = 28) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler.set_timesteps(steps)  # step_index None: the first step, inside every window
        self.encode_prompt = encode_prompt


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _construct(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, allocated on ``device`` in ``dtype``; the class's fp32 modules kept in float32.

    The modules listed in ``_keep_in_fp32_modules`` stay in float32, as ``from_pretrained(torch_dtype=...)``
    leaves them.
    """
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = cls(**config)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.float()
    return model.eval().requires_grad_(False)


def _randn(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def build_sd3(small: bool, device: torch.device, dtype: torch.dtype) -> Model:
    """SD3.5-Large (38 layers, 38 heads x 64) at 1024x1024: 4096 image tokens, 333 text tokens."""
    from diffusers import SD3Transformer2DModel

    if small:
        config = dict(
            sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=8,
            joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
            pos_embed_max_size=32, qk_norm="rms_norm",
        )  # fmt: skip
        latent, num_text = 32, 77
    else:
        config = dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
        )  # fmt: skip
        latent, num_text = 128, 333  # 1024 / 8; 77 CLIP + 256 T5 tokens
    transformer = _construct(SD3Transformer2DModel, config, device, dtype)
    width, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
    embeds = _randn(1, num_text, width, device=device, dtype=dtype)
    pooled = _randn(1, pooled_dim, device=device, dtype=dtype)

    def encode_prompt(prompt: Any, num_images_per_prompt: int = 1, max_sequence_length: int = 256) -> Any:
        return embeds, None, pooled, None

    inputs = {
        "hidden_states": _randn(1, 16, latent, latent, device=device, dtype=dtype),
        "timestep": torch.full((1,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "return_dict": False,
    }
    return Model("sd3", transformer, inputs, StandIn(transformer, encode_prompt), width, num_text, pooled)


def build_flux(small: bool, device: torch.device, dtype: torch.dtype) -> Model:
    """Flux.1-dev (19 double + 38 single blocks, 24 heads x 128) at 1024x1024: 4096 image, 512 text tokens."""
    from diffusers import FluxTransformer2DModel

    if small:
        config = dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
            axes_dims_rope=[8, 12, 12],
        )  # fmt: skip
        side, num_text = 16, 77
    else:
        config = dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56],
        )  # fmt: skip
        side, num_text = 64, 512  # 1024 / 8 / 2 (2x2 latent packing)
    transformer = _construct(FluxTransformer2DModel, config, device, dtype)
    width, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
    embeds = _randn(1, num_text, width, device=device, dtype=dtype)
    pooled = _randn(1, pooled_dim, device=device, dtype=dtype)
    txt_ids = torch.zeros(num_text, 3, device=device, dtype=dtype)
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)

    def encode_prompt(
        prompt: Any, prompt_2: Any = None, device: Any = None, num_images_per_prompt: int = 1,
        max_sequence_length: int = 512, lora_scale: Any = None,
    ) -> Any:  # fmt: skip
        return embeds, pooled, txt_ids

    inputs = {
        "hidden_states": _randn(1, side * side, config["in_channels"], device=device, dtype=dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "txt_ids": txt_ids,
        "img_ids": img_ids,
        "return_dict": False,
    }
    return Model("flux", transformer, inputs, StandIn(transformer, encode_prompt), width, num_text, pooled)


def build_wan(small: bool, device: torch.device, dtype: torch.dtype, size: str = "1.3b") -> Model:
    """Wan 2.1 T2V (1.3B: 30 layers, 12 heads x 128; 14B: 40 layers, 40 heads x 128), 832x480, 81 frames.

    Latent ``16 x 21 x 60 x 104`` (VAE stride 4 x 8 x 8), patch ``1 x 2 x 2``: 32,760 video tokens; 512 text tokens.
    """
    from diffusers import WanTransformer3DModel

    common = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6)  # fmt: skip
    if small:
        config = dict(common, num_attention_heads=8, attention_head_dim=32, text_dim=256, ffn_dim=512, num_layers=2,
                      rope_max_seq_len=64)  # fmt: skip
        latent, num_text = (4, 16, 16), 77
    else:
        heads, ffn, layers = {"1.3b": (12, 8960, 30), "14b": (40, 13824, 40)}[size]
        config = dict(common, num_attention_heads=heads, attention_head_dim=128, text_dim=4096, ffn_dim=ffn,
                      num_layers=layers, rope_max_seq_len=1024)  # fmt: skip
        latent, num_text = (21, 60, 104), 512
    transformer = _construct(WanTransformer3DModel, config, device, dtype)
    width = config["text_dim"]
    embeds = _randn(1, num_text, width, device=device, dtype=dtype)

    def encode_prompt(
        prompt: Any, negative_prompt: Any = None, do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1, prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
        max_sequence_length: int = 512, device: Any = None, dtype: Any = None,
    ) -> Any:  # fmt: skip
        return embeds, None

    inputs = {
        "hidden_states": _randn(1, 16, *latent, device=device, dtype=dtype),
        "timestep": torch.full((1,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": embeds,
        "return_dict": False,
    }
    return Model(f"wan-{size}", transformer, inputs, StandIn(transformer, encode_prompt), width, num_text, None)


# ---------------------------------------------------------------------- timing


@dataclasses.dataclass
class Setting:
    """One row: unguided (``method`` None) or a method with its parameters, and what its rounds measured."""

    label: str
    method: str | None
    params: dict[str, Any]
    num_neg: int | None  #: negative tokens shown in the table
    negative: Any = None  #: the negative conditioning passed to ``negguide.apply``
    eager_glue: bool = False
    kernel: str = "sdpa"  #: the attention kernel(s) its split blocks ran on (recorded in the warm-up round)
    ms: list[float] = dataclasses.field(default_factory=list)  #: per timed round
    peak_bytes: int | None = None


def rotated(items: list[Any], round_index: int) -> list[Any]:
    """``items`` starting at ``round_index`` mod their number: every item leads once per ``len(items)`` rounds."""
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """Median, first and third quartile, minimum and maximum of ``values``."""
    if len(values) == 1:
        return (values[0],) * 5  # type: ignore[return-value]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3, min(values), max(values)


def ratios(setting: Setting, base: Setting) -> list[float]:
    """Per timed round: the setting's time over the unguided time of the same round."""
    return [a / b for a, b in zip(setting.ms, base.ms, strict=True)]


def time_steps(step: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, int | None]:
    """Median milliseconds of ``repeats`` calls of ``step()`` (CUDA events on CUDA) and their peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) if cuda else None


@contextlib.contextmanager
def recording_kernels(into: set[str]) -> Iterator[None]:
    """Record which log-sum-exp kernel each ``negguide.attention.partial`` call runs on (``math``: exact path)."""
    from negguide import attention

    choose, math_path = attention._lse_kernel, attention._partial_math

    def lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        name = choose(q, k, v)
        into.add(name)
        return name

    def partial_math(*args: Any) -> Any:
        into.add("math")
        return math_path(*args)

    with (
        mock.patch.object(attention, "_lse_kernel", lse_kernel),
        mock.patch.object(attention, "_partial_math", partial_math),
    ):
        yield


def negative_embeds(model: Model, method: str, num_neg: int | None) -> Any:
    """Random negative conditioning: ``num_neg`` text tokens, or the full prompt length and a pooled vector for CFG."""
    first = model.inputs["encoder_hidden_states"]
    n = model.num_text if num_neg is None else num_neg
    embeds = torch.randn(1, n, model.text_width, device=first.device, dtype=first.dtype)
    if method == "cfg" and model.pooled is not None:
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": torch.randn_like(model.pooled)}
    return embeds


def settings_for(model: Model, device: torch.device) -> list[Setting]:
    """The unguided row, then ``ROWS`` (eager-glue rows only where fusing is on)."""
    out = [Setting("unguided", None, {}, None)]
    for label, method, params, num_neg in ROWS:
        eager_glue = label.endswith("eager glue")
        if eager_glue and not fuse_enabled(device):
            continue
        shown = num_neg if num_neg is not None else model.num_text
        out.append(Setting(label, method, params, shown, negative_embeds(model, method, num_neg), eager_glue))
    return out


@contextlib.contextmanager
def installed(model: Model, setting: Setting, compile_backend: str | None) -> Iterator[None]:
    """The transformer as ``setting`` wants it (guidance applied, blocks compiled), restored afterwards."""
    env = {FUSE_ENV: "0"} if setting.eager_glue else {}
    with mock.patch.dict(os.environ, env):
        handle = None
        if setting.method is not None:
            handle = negguide.apply(
                model.pipe, setting.method, negative_prompt_embeds=setting.negative, **setting.params
            )
            model.pipe.encode_prompt("a prompt")  # the adapter records the call and takes the negative
        try:
            if compile_backend:
                torch._dynamo.reset()
                _compile_blocks(model.transformer, compile_backend)
            yield
        finally:
            if handle is not None:
                handle.remove()
            _uncompile_blocks(model.transformer)


def run_model(
    model: Model, device: torch.device, rounds: int, repeats: int, warmup: int, compile_backend: str | None
) -> list[Setting]:
    """Interleaved rounds: every setting once per round, the order rotated each round.

    Round 0 warms every setting up (first calls, kernel choice, compilation), records its kernels and checks that
    the guidance engages; it is not timed. In each later round a setting is installed, runs ``warmup`` untimed
    forwards, then ``repeats`` timed ones (their median is the round's time). A machine whose speed drifts moves
    every setting of a round alike, so the per-round ratio to the unguided step stays fair.
    """
    transformer = model.transformer
    settings = settings_for(model, device)

    def step() -> Any:
        return transformer(**model.inputs)[0]

    with torch.inference_mode():
        reference = step()
        for round_index in range(rounds + 1):
            for setting in rotated(settings, round_index):
                with installed(model, setting, compile_backend):
                    if round_index == 0:
                        used: set[str] = set()
                        with recording_kernels(used):
                            out = step()
                        if setting.method is not None and (out.shape != reference.shape or torch.equal(out, reference)):
                            raise SystemExit(
                                f"{model.name} {setting.label}: the guidance did not engage (output equals the "
                                "unguided one)"
                            )
                        split = "+".join(sorted(used))
                        dense = "dense" in setting.label
                        setting.kernel = "sdpa" if not split else (f"sdpa+{split}" if dense else split)
                        for _ in range(max(warmup - 1, 0)):
                            step()
                        continue
                    for _ in range(warmup):
                        step()
                    ms, peak = time_steps(step, device, repeats)
                    setting.ms.append(ms)
                    if peak is not None:
                        setting.peak_bytes = max(peak, setting.peak_bytes or 0)
    for setting in settings:
        _print_row(model.name, setting, settings[0])
    return settings


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        found.extend(getattr(transformer, name, None) or [])
    return found


def _compile_blocks(transformer: torch.nn.Module, backend: str) -> None:
    """Regional compilation: each repeated block compiled in place (the guided processors run inside it)."""
    for block in _blocks(transformer):
        block.compile(backend=backend)


def _uncompile_blocks(transformer: torch.nn.Module) -> None:
    for block in _blocks(transformer):
        block._compiled_call_impl = None


# ---------------------------------------------------------------------- output


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_ratio(values: list[float]) -> str:
    """``median [q1-q3]`` of the per-round ratios."""
    med, q1, q3, _, _ = spread(values)
    return f"{med:.2f} [{q1:.2f}-{q3:.2f}]"


def _print_row(model: str, setting: Setting, base: Setting) -> None:
    neg = "-" if setting.num_neg is None else str(setting.num_neg)
    med_ms = statistics.median(setting.ms)
    _, _, _, lo, hi = spread(ratios(setting, base))
    print(
        f"{model:<9} {setting.label:<20} {neg:>5} {setting.kernel:<16} {med_ms:>10.2f} "
        f"{_fmt_ratio(ratios(setting, base)):>18} {f'{lo:.2f}-{hi:.2f}':>11} {_fmt_bytes(setting.peak_bytes):>11}"
    )
    sys.stdout.flush()


def _print_ratios(model: str, settings: list[Setting], judge: bool) -> None:
    base = settings[0]
    by_label: dict[str, list[str]] = {}
    verdicts = []
    worst: dict[str, float] = {}
    for s in settings[1:]:
        r = ratios(s, base)
        by_label.setdefault(s.label, []).append(_fmt_ratio(r))
        worst[s.label] = max(worst.get(s.label, 0.0), statistics.median(r))
    for label, methods in by_label.items():
        target = TARGETS.get(label.split()[0]) if judge and label.endswith("split") else None
        verdicts.append(
            f"{label} {' / '.join(methods)}"
            + (f" (GPU target <= {target:.2f}: {'met' if worst[label] <= target else 'not met'})" if target else "")
        )
    print(
        f"{model} ratios (x unguided, median [IQR] of {len(base.ms)} rounds; negative tokens 8 / 77): "
        + "; ".join(verdicts)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--models", default="sd3,flux,wan", help="comma-separated: sd3, flux, wan")
    parser.add_argument("--wan", choices=["1.3b", "14b"], default="1.3b", help="Wan 2.1 size")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; --small: 5)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed forwards per setting and round, median kept (default 3; --small: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed forwards after each install, per round (default 1; --small: 0)",
    )
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (2-layer models, 256 image tokens)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --small: 1)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile each transformer block in place (regional compilation; backend default inductor)",
    )
    args = parser.parse_args(argv)

    rounds = args.rounds if args.rounds is not None else (5 if args.small else 10)
    repeats = args.repeats if args.repeats is not None else (1 if args.small else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.small else 1)
    if rounds < 1 or repeats < 1 or warmup < 0:
        parser.error(f"expected --rounds >= 1, --repeats >= 1, --warmup >= 0; got {rounds}, {repeats}, {warmup}")
    threads = args.threads or (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    builders = {
        "sd3": lambda: build_sd3(args.small, device, dtype),
        "flux": lambda: build_flux(args.small, device, dtype),
        "wan": lambda: build_wan(args.small, device, dtype, args.wan),
    }
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in builders]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected some of {sorted(builders)}")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    compiled = f", blocks compiled ({args.compile})" if args.compile else ""
    shapes = "small" if args.small else "full-size"
    print(f"# {where}, {dtype}, torch {torch.__version__}, {shapes} shapes, {rounds} interleaved rounds (order "
          f"rotated) of {repeats} timed + {warmup} untimed forwards per setting, "
          f"after a warm-up round{compiled}")  # fmt: skip
    print(f"{'model':<9} {'path':<20} {'neg':>5} {'kernel':<16} {'ms (med)':>10} {'x unguided [IQR]':>18} "
          f"{'min-max':>11} {'peak mem':>11}")  # fmt: skip
    all_results = {}
    for name in names:
        model = builders[name]()
        all_results[model.name] = run_model(model, device, rounds, repeats, warmup, args.compile)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for name, results in all_results.items():
        _print_ratios(name, results, judge=device.type == "cuda" and not args.small)


if __name__ == "__main__":
    main()
