"""Attention kernels: the one place negguide calls attention.

Every guidance method here is "attention of some queries over a few key blocks, then a
combination". This module offers the pieces:

* ``sdpa``: plain scaled dot-product attention (PyTorch SDPA, any device and dtype);
* ``partial``: attention over one key block that also returns the log-sum-exp of the logits
  (the CPU flash kernel; on CUDA the fastest of cuDNN, flash and efficient that SDPA allows and that
  accepts the tensors, chosen once per shape; else an exact math path in query chunks);
* ``merge``: the exact combination of partial softmaxes, with a logit bias and a value
  coefficient per block: ``softmax([s_1 + b_1; s_2 + b_2]) . [c_1 V_1; c_2 V_2]``, fused into
  one compiled kernel on CUDA (``fused``, switched by ``NEGGUIDE_FUSE``);
* ``attend_blocks``: that combination computed either with one dense SDPA call over the
  concatenated blocks and an additive mask (``"dense"``, the oracle) or mask-free from the
  partials (``"split"``);
* ``block_mask``: additive masks made of constant blocks, cached per shape, device and dtype.

Tensors are ``(batch, heads, tokens, head_dim)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Literal
from typing import ParamSpec
from typing import TypeVar

import torch
import torch.nn.functional as F

from negguide.method import NegativeTokens
from negguide.method import SegmentOutputs
from negguide.method import Segments

Path = Literal["dense", "split"]
P = ParamSpec("P")
R = TypeVar("R")


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain attention; ``mask`` is additive (in ``q``'s dtype) or boolean (``True`` = keep)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


@dataclasses.dataclass(frozen=True)
class Partial:
    """Attention of queries over one key block: output (query dtype) and log-sum-exp (float32)."""

    out: torch.Tensor
    lse: torch.Tensor  # (batch, heads, queries)


LseKernel = Literal["cudnn", "flash", "efficient", "cpu_flash", "math"]

#: device types whose log-sum-exp kernel is chosen among SDPA's fused kernels (cuDNN, flash, efficient)
_FUSED_KERNEL_DEVICES: tuple[str, ...] = ("cuda",)

#: SDPA's backend numbers (``torch.nn.attention.SDPBackend``) of the kernels that return a log-sum-exp
_BACKEND_KERNEL: dict[int, LseKernel] = {3: "cudnn", 1: "flash", 2: "efficient"}
#: the ``torch.backends.cuda`` switch that ``torch.nn.attention.sdpa_kernel`` toggles for each kernel
_KERNEL_SWITCH: dict[str, str] = {
    "cudnn": "cudnn_sdp_enabled",
    "flash": "flash_sdp_enabled",
    "efficient": "mem_efficient_sdp_enabled",
}


def _run_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]


def _run_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _run_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]


#: the fused kernels' calls, each returning ``(out, lse)`` with the kernel's own log-sum-exp layout
_FUSED_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "cudnn": _run_cudnn,
    "flash": _run_flash,
    "efficient": _run_efficient,
}


def lse_layout(lse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A kernel's log-sum-exp as ``(batch, heads, queries)`` float32, ``shape`` being ``(batch, heads, queries)``.

    Known layouts: ``(B, H, Q)`` (flash, CPU flash, cuDNN before torch 2.9), ``(B, H, Q, 1)`` (cuDNN from
    torch 2.9), ``(B, H, Q')`` with ``Q'`` the queries padded up to a multiple of 32 (efficient kernel on
    CUDA). Anything else raises ``ValueError``, so the kernel is not used.
    """
    batch, heads, queries = (int(s) for s in shape)
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if lse.dim() == 3 and lse.shape[0] == batch and lse.shape[1] == heads and lse.shape[2] >= queries:
        return lse[..., :queries].float()
    raise ValueError(
        f"expected a log-sum-exp of shape (batch, heads, >= queries) = ({batch}, {heads}, >= {queries}), optionally "
        f"with a trailing 1; got {tuple(lse.shape)}. The kernel is skipped; please report the torch version."
    )


def enabled_kernels() -> tuple[str, ...]:
    """The fused log-sum-exp kernels ``torch.nn.attention.sdpa_kernel`` (or ``torch.backends.cuda``) allows,
    in SDPA's priority order (``torch._C._get_sdp_priority_order``, which ``sdpa_kernel(..., set_priority=True)``
    sets)."""
    get_order = getattr(torch._C, "_get_sdp_priority_order", None)
    order = [int(b) for b in get_order()] if get_order is not None else [1, 2, 0, 3]
    names = [_BACKEND_KERNEL[b] for b in order if b in _BACKEND_KERNEL]
    names += [n for n in _BACKEND_KERNEL.values() if n not in names]
    return tuple(n for n in names if getattr(torch.backends.cuda, _KERNEL_SWITCH[n])())


def _sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The kernel SDPA itself would pick for these tensors (``torch._fused_sdp_choice``), or ``None``."""
    try:
        return _BACKEND_KERNEL.get(int(torch._fused_sdp_choice(q, k, v, None, 0.0, False)))
    except Exception:  # noqa: BLE001 - an older torch or an odd input: fall back to the priority order
        return None


def kernel_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, ...]:
    """The allowed fused kernels to try, fastest first: SDPA's own pick for these tensors (cuDNN where SDPA
    prefers it), then the rest of ``enabled_kernels()``."""
    enabled = enabled_kernels()
    first = _sdpa_choice(q, k, v)
    if first in enabled:
        return (first, *(n for n in enabled if n != first))  # type: ignore[arg-type]
    return enabled


#: decision per (query shape, key shape, value width, dtype, device, allowed kernels): the kernel name, and the
#: errors of the kernels tried before it
_kernel_cache: dict[tuple[object, ...], tuple[str, tuple[str, ...]]] = {}
#: (cache key, kernel) pairs that failed on real tensors after being chosen (never chosen again)
_kernel_refused: set[tuple[tuple[object, ...], str]] = set()
_math_warned: set[tuple[object, ...]] = set()


def _error_line(name: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{name}: {type(exc).__name__}: {first[:200]}"


def _kernel_key(
    q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[object, ...]:
    return (q_shape, k_shape, v_dim, dtype, str(device), enabled_kernels())


@torch._dynamo.assume_constant_result
def fused_kernel(
    q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_dim: int, dtype: torch.dtype, device: torch.device
) -> str:
    """The fused log-sum-exp kernel for these shapes, or ``"math"``: decided once per shape, dtype, device and
    ``sdpa_kernel`` restriction, then cached.

    The first decision probes the kernels of ``kernel_order`` on small tensors of the same sequence lengths, head
    sizes, dtype and device (batch and heads 1); the first that runs and returns a known log-sum-exp layout wins.
    Host-side: under ``torch.compile`` Dynamo calls it once while tracing and keeps the result as a constant, so
    no probing is traced (a later ``sdpa_kernel`` change does not recompile a compiled graph). When no kernel
    qualifies the math path runs, with one ``NegGuideWarning`` naming each kernel's error.
    """
    key = _kernel_key(q_shape, k_shape, v_dim, dtype, device)
    cached = _kernel_cache.get(key)
    if cached is not None:
        return cached[0]
    pq = torch.randn(1, 1, q_shape[2], q_shape[3], dtype=dtype, device=device)
    pk = torch.randn(1, 1, k_shape[2], k_shape[3], dtype=dtype, device=device)
    pv = torch.randn(1, 1, k_shape[2], v_dim, dtype=dtype, device=device)
    errors: list[str] = []
    chosen = "math"
    for name in kernel_order(pq, pk, pv):
        if (key, name) in _kernel_refused:
            errors.append(f"{name}: failed on this call's tensors before")
            continue
        try:
            out, lse = _FUSED_KERNELS[name](pq, pk, pv, None)
            lse_layout(lse, (1, 1, q_shape[2]))
        except Exception as exc:  # noqa: BLE001 - any refusal (head size, dtype, arch, layout) moves to the next
            errors.append(_error_line(name, exc))
            continue
        chosen = name
        break
    _kernel_cache[key] = (chosen, tuple(errors))
    if chosen == "math":
        _warn_math(key, tuple(errors))
    return chosen


def _warn_math(key: tuple[object, ...], errors: tuple[str, ...]) -> None:
    q_shape, k_shape, v_dim, dtype, device, enabled = key
    seen = (dtype, device, q_shape[3], v_dim, enabled)  # type: ignore[index]
    if seen in _math_warned:
        return
    _math_warned.add(seen)
    from negguide.errors import warn

    reasons = "; ".join(errors) if errors else "none is allowed by torch.nn.attention.sdpa_kernel"
    warn(
        f"negguide: expected a fused attention kernel with log-sum-exp (cuDNN, flash or efficient) for queries "
        f"{tuple(q_shape)} over keys {tuple(k_shape)} in {dtype} on {device}; got none ({reasons}). Running the "
        "exact math path instead: same result, much slower, memory bounded by query chunks "
        f"({MATH_CHUNK_ENV}). Next step: use a head size and dtype the kernels accept (float16/bfloat16, a head "
        "size that is a multiple of 8, up to 256) or allow more kernels in sdpa_kernel(...)."
    )


def _lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    if q.device.type in _FUSED_KERNEL_DEVICES:
        return fused_kernel(tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, q.device)
    if q.device.type == "cpu":
        return "cpu_flash"
    return "math"


def partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> Partial:
    """Attention of ``q`` over one key block with its log-sum-exp.

    ``key_mask`` is an optional ``(batch, keys)`` boolean tensor, ``False`` on keys to ignore. A
    query whose keys are all ignored (or an empty key block) gets ``lse = -inf`` and a zero
    output, so ``merge`` gives it no weight. Without a mask the block runs on a log-sum-exp kernel:
    the CPU flash kernel, or on CUDA the one ``fused_kernel`` chose; else (a mask, another device,
    no kernel accepting the tensors) on the exact math path, in query chunks of bounded memory.
    """
    if k.shape[2] == 0 or q.shape[2] == 0:
        # no kernel is ever called on an empty block (some crash the process on zero queries)
        shape = q.shape[:3]
        return Partial(q.new_zeros(*shape, v.shape[-1]), torch.full(shape, -math.inf, device=q.device))
    if key_mask is None:
        kernel = _lse_kernel(q, k, v)
        if kernel == "cpu_flash":
            try:
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
                return Partial(out, lse.float())
            except RuntimeError:  # unsupported head size / dtype on this kernel: exact math below
                pass
        elif kernel != "math":
            try:
                out, lse = _FUSED_KERNELS[kernel](q, k, v, scale)
                return Partial(out, lse_layout(lse, q.shape[:3]))
            except (RuntimeError, ValueError):
                # the probe passed but these tensors (strides, batch) are refused: decide again without it
                key = _kernel_key(tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, q.device)
                _kernel_refused.add((key, kernel))
                _kernel_cache.pop(key, None)
                return partial(q, k, v, key_mask, scale)
    return _partial_math(q, k, v, key_mask, scale)


MATH_CHUNK_ENV = "NEGGUIDE_MATH_CHUNK"
#: the float32 logits (bytes) the math path holds at once before it splits the queries into chunks
MATH_CHUNK_DEFAULT = 2**28


def math_chunk_bytes() -> int:
    """The math path's logits budget in bytes: ``NEGGUIDE_MATH_CHUNK`` or 256 MiB."""
    text = os.environ.get(MATH_CHUNK_ENV, "").strip()
    try:
        return max(1, int(float(text))) if text else MATH_CHUNK_DEFAULT
    except ValueError:
        return MATH_CHUNK_DEFAULT


def _partial_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float | None
) -> Partial:
    """Exact attention with log-sum-exp in float32, over query chunks whose logits fit ``math_chunk_bytes()``.

    Each chunk holds ``batch x heads x rows x keys`` float32 logits (and their exponentials), so memory stays
    linear in the sequence length; the chunks are independent rows, so the result equals the unchunked one.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    per_query = q.shape[0] * q.shape[1] * k.shape[2] * 4
    rows = max(1, math_chunk_bytes() // max(per_query, 1))
    if rows >= q.shape[2]:
        return _math_rows(q, k, v, key_mask, scale)
    parts = [_math_rows(q[:, :, i : i + rows], k, v, key_mask, scale) for i in range(0, q.shape[2], rows)]
    return Partial(torch.cat([p.out for p in parts], dim=2), torch.cat([p.lse for p in parts], dim=2))


def _math_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> Partial:
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].to(logits.device), -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe[..., None])
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return Partial(out, lse)


FUSE_ENV = "NEGGUIDE_FUSE"
_FUSE_BACKEND = "inductor"


def fuse_enabled(device: torch.device) -> bool:
    """Whether ``@fused`` glue runs compiled on ``device``: ``NEGGUIDE_FUSE`` = ``auto`` (default: CUDA only),
    ``1`` (every device) or ``0`` (never)."""
    mode = os.environ.get(FUSE_ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        return True
    return device.type == "cuda"


def _first_device(values: Sequence[object]) -> torch.device | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (list, tuple)):
            found = _first_device(v)
            if found is not None:
                return found
    return None


def fused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn``, pure element-wise/reduction tensor math, as compiled kernels where fusing is on.

    Glue such as the log-sum-exp merge is a dozen small element-wise ops with float32 temporaries
    when run eagerly; compiled (inductor: one Triton kernel per reduction on CUDA) it reads each
    input once and writes its output once. The compiled function is built on first use with
    ``dynamic=True`` (one graph for every token count and, from torch 2.6 on, every float
    parameter), runs eagerly inside a caller's own ``torch.compile`` region (which fuses it
    anyway), and falls back to eager ops with one warning if compiling fails. ``fn.eager`` is the
    plain function. See ``fuse_enabled`` for the switch.
    """
    compiled: list[Callable[..., R]] = []
    failed: list[str] = []

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        device = _first_device(args)
        if failed or device is None or not fuse_enabled(device) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, backend=_FUSE_BACKEND, dynamic=True, fullgraph=True))
        try:
            return compiled[0](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager ops are exact
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failed.append(first_line)
            warnings.warn(
                f"negguide: compiling {fn.__qualname__} on {device} failed ({type(exc).__name__}: {first_line}); "
                f"using eager ops from now on (same results, slower). Set {FUSE_ENV}=0 to skip compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper


def merge(parts: Sequence[Partial], biases: Sequence[float], coefs: Sequence[float]) -> torch.Tensor:
    """Combine partial softmaxes exactly: block ``i`` gets logit bias ``biases[i]`` and value factor ``coefs[i]``.

    Computes ``sum_i c_i e^{l_i + b_i - m} O_i / sum_i e^{l_i + b_i - m}`` in float32 with ``m`` the
    largest shifted log-sum-exp, and returns it in the first output's dtype. A query that sees no
    key in any block gets a zero output, as in SDPA with a fully masked row. Fused into one kernel
    where ``fuse_enabled`` (CUDA by default).
    """
    return merge_outputs([p.out for p in parts], [p.lse for p in parts], list(biases), list(coefs))


@fused
def merge_outputs(
    outs: list[torch.Tensor], lses: list[torch.Tensor], biases: list[float], coefs: list[float]
) -> torch.Tensor:
    """``merge`` on plain lists (outputs, float32 log-sum-exps, biases, value factors)."""
    shifted = [lse + b for lse, b in zip(lses, biases)]
    m = shifted[0]
    for lse in shifted[1:]:
        m = torch.maximum(m, lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    num = None
    den = None
    for out, lse, c in zip(outs, shifted, coefs):
        w = torch.exp(lse - m)
        term = out.float() * (w * c)[..., None]
        num = term if num is None else num + term
        den = w if den is None else den + w
    # den >= 1 wherever some block has a finite weight (the largest one is e^0); den == 0 only on
    # queries that see no key at all, which get 0 like SDPA's fully masked rows (not 0 / 0 = NaN)
    return (num / den.clamp_min(1.0)[..., None]).to(outs[0].dtype)


@dataclasses.dataclass(frozen=True)
class Block:
    """One key block of an ``attend_blocks`` call."""

    k: torch.Tensor
    v: torch.Tensor
    bias: float = 0.0  #: added to the logits of every key of the block (``-inf`` hides it)
    coef: float = 1.0  #: multiplies the block's values
    key_mask: torch.Tensor | None = None  #: ``(batch, keys)`` boolean, ``False`` = padding


def attend_blocks(
    q: torch.Tensor, blocks: Sequence[Block], path: Path = "dense", scale: float | None = None
) -> torch.Tensor:
    """``softmax([q.K_1 + b_1; ...]) . [c_1 V_1; ...]`` over the key blocks, dense or split.

    Empty blocks are skipped; a query that sees no key at all gets a zero output (as SDPA gives a
    fully masked row), and no kernel is called on zero queries or zero keys.
    """
    blocks = [b for b in blocks if b.k.shape[2] > 0]
    if not blocks or q.shape[2] == 0:
        width = blocks[0].v.shape[-1] if blocks else q.shape[-1]
        return q.new_zeros(*q.shape[:3], width)
    if path == "split":
        parts = [partial(q, b.k, b.v, b.key_mask, scale) for b in blocks]
        return merge(parts, [b.bias for b in blocks], [b.coef for b in blocks])
    values = [b.v if b.coef == 1.0 else b.v * b.coef for b in blocks]
    k = torch.cat([b.k for b in blocks], dim=2) if len(blocks) > 1 else blocks[0].k
    v = torch.cat(values, dim=2) if len(values) > 1 else values[0]
    mask = None
    if any(b.bias != 0.0 for b in blocks) or any(b.key_mask is not None for b in blocks):
        cols = tuple(b.k.shape[2] for b in blocks)
        mask = block_mask((q.shape[2],), cols, (tuple(b.bias for b in blocks),), q.device, q.dtype)
        pads = [b.key_mask for b in blocks]
        if any(p is not None for p in pads):
            mask = mask + key_padding_bias(pads, cols, q.shape[0], q.device, q.dtype)
    return sdpa(q, k, v, mask, scale)


def key_padding_bias(
    masks: Sequence[torch.Tensor | None], cols: Sequence[int], batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(batch, 1, 1, sum(cols))`` additive bias: ``-inf`` on padded keys, 0 elsewhere."""
    parts = []
    for m, n in zip(masks, cols):
        if m is None:
            parts.append(torch.zeros(batch, n, device=device, dtype=dtype))
        else:
            parts.append(torch.zeros(batch, n, device=device, dtype=dtype).masked_fill(~m.to(device), -math.inf))
    return torch.cat(parts, dim=1)[:, None, None, :]


@functools.lru_cache(maxsize=128)
def block_mask(
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    table: tuple[tuple[float, ...], ...],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A ``(1, 1, sum(rows), sum(cols))`` additive mask whose block ``(i, j)`` is the constant ``table[i][j]``.

    Built once per shape, values, device and dtype (cached) on the device and in the dtype of the
    tensors it meets; never rebuilt per layer.
    """
    row_vals = []
    for r, entries in zip(rows, table):
        row_vals.append(
            torch.cat([torch.full((r, c), float(e), dtype=torch.float32) for c, e in zip(cols, entries)], 1)
        )
    mask = torch.cat(row_vals, 0) if len(row_vals) > 1 else row_vals[0]
    return mask.to(device=device, dtype=dtype)[None, None]


def image_prompt_partial(q: torch.Tensor, seg: Segments) -> Partial:
    """Attention of ``q`` over the joint layout's ``[I, P]`` keys with its log-sum-exp.

    One kernel call over the concatenated keys when the prompt has no padding; else the image
    block on the kernel and the (short, masked) prompt block beside it, merged: never a mask as
    long as the image.
    """
    if seg.pos_mask is None:
        k = torch.cat([seg.k_img, seg.k_pos], dim=2)  # type: ignore[list-item]
        v = torch.cat([seg.v_img, seg.v_pos], dim=2)  # type: ignore[list-item]
        return partial(q, k, v, scale=seg.scale)
    p_img = partial(q, seg.k_img, seg.v_img, scale=seg.scale)  # type: ignore[arg-type]
    p_pos = partial(q, seg.k_pos, seg.v_pos, seg.pos_mask, seg.scale)
    out = merge([p_img, p_pos], [0.0, 0.0], [1.0, 1.0])
    return Partial(out, torch.logaddexp(p_img.lse, p_pos.lse))


def collector(seg: Segments, neg: NegativeTokens, path: Path) -> torch.Tensor:
    """Joint layout: a negative's own queries over ``[I, N_i]``, the isolated collector stream."""
    blocks = [Block(seg.k_img, seg.v_img), Block(neg.k, neg.v, key_mask=neg.mask)]  # type: ignore[arg-type]
    return attend_blocks(neg.q, blocks, path, seg.scale)  # type: ignore[arg-type]


def isolated(seg: Segments, path: Path = "dense") -> SegmentOutputs:
    """Unguided attention with the negative tokens kept apart.

    Joint layout: image and positive queries see ``[I, P]`` only (exactly the unguided call);
    each negative's queries see ``[I, N_i]`` (a collector stream that never reaches I or P).
    Cross layout: image queries see ``P`` only.
    """
    if seg.layout == "cross":
        if seg.pos_mask is None:
            return SegmentOutputs(sdpa(seg.q_img, seg.k_pos, seg.v_pos, scale=seg.scale))
        return SegmentOutputs(attend_blocks(seg.q_img, [Block(seg.k_pos, seg.v_pos, key_mask=seg.pos_mask)], path))
    n_img = seg.q_img.shape[2]
    q = torch.cat([seg.q_img, seg.q_pos], dim=2)  # type: ignore[list-item]
    if seg.pos_mask is None:
        k = torch.cat([seg.k_img, seg.k_pos], dim=2)  # type: ignore[list-item]
        v = torch.cat([seg.v_img, seg.v_pos], dim=2)  # type: ignore[list-item]
        out = sdpa(q, k, v, scale=seg.scale)
    else:
        blocks = [Block(seg.k_img, seg.v_img), Block(seg.k_pos, seg.v_pos, key_mask=seg.pos_mask)]  # type: ignore[arg-type]
        out = attend_blocks(q, blocks, path, seg.scale)
    negs = tuple(collector(seg, neg, path) for neg in seg.negatives)
    return SegmentOutputs(out[:, :, :n_img], out[:, :, n_img:], negs)


def resolve_path(path: str, device: torch.device) -> Path:
    """``"auto"`` -> ``"split"`` where a log-sum-exp kernel exists (CPU, CUDA), else ``"dense"``."""
    if path == "auto":
        return "split" if device.type in ("cpu", "cuda") else "dense"
    return path  # type: ignore[return-value]


DENSE_LIMIT_ENV = "NEGGUIDE_DENSE_LIMIT"
#: the largest additive mask (bytes) the dense path builds before it falls back to the split path
DENSE_LIMIT_DEFAULT = 2**30
_dense_warned: set[tuple[int, int]] = set()


def dense_limit() -> int:
    """The dense path's mask budget in bytes: ``NEGGUIDE_DENSE_LIMIT`` or 1 GiB."""
    text = os.environ.get(DENSE_LIMIT_ENV, "").strip()
    try:
        return int(float(text)) if text else DENSE_LIMIT_DEFAULT
    except ValueError:
        return DENSE_LIMIT_DEFAULT


def dense_mask_bytes(seg: Segments) -> int:
    """The bytes of the largest additive mask the dense path builds for ``seg``: every query against every key
    (joint layout, VSF's flipped copies included), or the image queries against the context (cross layout)."""
    n_neg = sum(n.num_tokens for n in seg.negatives)
    if seg.layout == "cross":
        rows, cols = seg.q_img.shape[2], seg.k_pos.shape[2] + n_neg
    else:
        rows = seg.q_img.shape[2] + seg.k_pos.shape[2] + n_neg
        cols = rows + n_neg
    return seg.q_img.shape[0] * rows * cols * seg.q_img.element_size()


def choose_path(path: str, seg: Segments) -> Path:
    """``resolve_path`` for one attention call: a ``"dense"`` call whose mask would exceed ``dense_limit()``
    (a long video or image sequence) runs on the split path instead, with a warning, so no ``L x L`` mask is
    ever built on a long sequence. Both paths give the same result."""
    resolved = resolve_path(path, seg.q_img.device)
    if resolved == "dense":
        size, limit = dense_mask_bytes(seg), dense_limit()
        if size > limit:
            key = (size, limit)
            if key not in _dense_warned:
                _dense_warned.add(key)
                from negguide.errors import warn

                warn(
                    f"negguide: attention='dense' would build a {size / 2**30:.1f} GiB mask for this call (limit "
                    f"{limit / 2**30:.1f} GiB, {DENSE_LIMIT_ENV}); running the split path instead, which gives the "
                    "same result in O(L) memory."
                )
            return "split"
    return resolved


def log_weight(weight: float) -> float:
    """``log(weight)``, with ``-inf`` for a weight of 0: a weight is a multiplicity of keys in a softmax."""
    return math.log(weight) if weight > 0 else -math.inf


@dataclasses.dataclass(frozen=True)
class Contrast:
    """Image attention with the positive and with each negative context, plus the text outputs."""

    z_pos: torch.Tensor  #: image queries over ``[I, P]`` (joint) or ``P`` (cross): the unguided output
    z_negs: tuple[torch.Tensor, ...]  #: per negative: image queries over ``[I, N_i]`` (joint) or ``N_i`` (cross)
    pos: torch.Tensor | None  #: positive-text queries over ``[I, P]`` (joint only)
    negs: tuple[torch.Tensor, ...]  #: per negative: its queries over ``[I, N_i]`` (joint only)

    @property
    def z_neg(self) -> torch.Tensor:
        """The only negative's ``Z-`` (one-negative methods)."""
        if len(self.z_negs) != 1:
            raise ValueError(f"expected one negative, got {len(self.z_negs)}; read `z_negs`.")
        return self.z_negs[0]


def contrast(seg: Segments, path: Path = "dense") -> Contrast:
    """``Z+`` and each ``Z-_i`` of NAG-style methods, sharing one image stream (joint layout).

    On the split path the expensive image block ``attn(Q_I, K_I)`` is computed once with its
    log-sum-exp (for the image and the positive queries together) and merged with the small
    prompt blocks, so ``Z+``, every ``Z-_i`` and the positive text outputs cost one pass over the
    image keys.
    """
    if seg.layout == "cross":
        pos_block = Block(seg.k_pos, seg.v_pos, key_mask=seg.pos_mask)
        if seg.pos_mask is None:
            z_pos = sdpa(seg.q_img, seg.k_pos, seg.v_pos, scale=seg.scale)
        else:
            z_pos = attend_blocks(seg.q_img, [pos_block], path, seg.scale)
        z_negs = tuple(
            attend_blocks(seg.q_img, [Block(n.k, n.v, key_mask=n.mask)], path, seg.scale) for n in seg.negatives
        )
        return Contrast(z_pos, z_negs, None, ())
    img_block = Block(seg.k_img, seg.v_img)  # type: ignore[arg-type]
    negs = tuple(collector(seg, n, path) for n in seg.negatives)
    if path == "split":
        # image and positive queries together: one pass over the image keys and one over the prompt's
        n_img = seg.q_img.shape[2]
        q_ip = torch.cat([seg.q_img, seg.q_pos], dim=2)  # type: ignore[list-item]
        p_img = partial(q_ip, seg.k_img, seg.v_img, scale=seg.scale)  # type: ignore[arg-type]
        p_pos = partial(q_ip, seg.k_pos, seg.v_pos, seg.pos_mask, seg.scale)
        ip = merge([p_img, p_pos], [0.0, 0.0], [1.0, 1.0])
        img_only = Partial(p_img.out[:, :, :n_img], p_img.lse[:, :, :n_img])
        z_negs = tuple(
            merge([img_only, partial(seg.q_img, n.k, n.v, n.mask, seg.scale)], [0.0, 0.0], [1.0, 1.0])
            for n in seg.negatives
        )
        return Contrast(ip[:, :, :n_img], z_negs, ip[:, :, n_img:], negs)
    pos_block = Block(seg.k_pos, seg.v_pos, key_mask=seg.pos_mask)
    z_pos = attend_blocks(seg.q_img, [img_block, pos_block], path, seg.scale)
    z_negs = tuple(
        attend_blocks(seg.q_img, [img_block, Block(n.k, n.v, key_mask=n.mask)], path, seg.scale) for n in seg.negatives
    )
    pos = attend_blocks(seg.q_pos, [img_block, pos_block], path, seg.scale)  # type: ignore[arg-type]
    return Contrast(z_pos, z_negs, pos, negs)
