"""The split path's log-sum-exp kernel choice on CUDA, and the math path, tested on CPU with fake kernels.

Each fake returns what the real kernel returns (exact attention, the kernel's own log-sum-exp layout and
padding) or raises what a refusing kernel raises. ``attention._FUSED_KERNEL_DEVICES`` is pointed at the CPU,
so ``partial`` chooses among the fakes exactly as it chooses among cuDNN, flash and efficient on CUDA.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel

from negguide import attention
from negguide.attention import lse_layout
from negguide.attention import partial
from negguide.errors import NegGuideWarning

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp in float64 (a fully masked row: zero output, ``-inf``)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.nan_to_num(torch.exp(logits - lse[..., None]), nan=0.0)
    return probs @ v.double(), lse


def fake(layout: str, calls: list[str], name: str) -> Kernel:
    """A kernel returning exact attention with the log-sum-exp in ``layout``; records ``name`` per call."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, ...]:
        if not torch.compiler.is_compiling():  # a list append while tracing would be a guard
            calls.append(name)
        out, lse = reference(q, k, v, scale=scale)
        lse = lse.float()
        if layout == "bhq1":  # cuDNN, torch >= 2.9
            lse = lse[..., None]
        elif layout == "padded":  # efficient on CUDA: queries padded to a multiple of 32, garbage beyond
            pad = -q.shape[2] % 32 or 32
            lse = torch.cat([lse, torch.full((*lse.shape[:2], pad), math.nan)], dim=2)
        elif layout == "bqh":  # a layout the normalisation does not know
            lse = lse.transpose(1, 2)
        return out.to(q.dtype), lse

    return run


def refusing(calls: list[str], name: str, message: str = "No available kernel. Aborting execution.") -> Kernel:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, ...]:
        calls.append(name)
        raise RuntimeError(message)

    return run


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fresh decision caches, the CPU treated like CUDA, and SDPA's own pick ``None`` unless a test sets it."""
    monkeypatch.setattr(attention, "_FUSED_KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "_kernel_cache", {})
    monkeypatch.setattr(attention, "_kernel_refused", set())
    monkeypatch.setattr(attention, "_math_warned", set())
    monkeypatch.setattr(attention, "_sdpa_choice", lambda q, k, v: None)
    return []


def use(monkeypatch: pytest.MonkeyPatch, sdpa_pick: str | None = None, **kernels: Kernel) -> None:
    for name, run in kernels.items():
        monkeypatch.setitem(attention._FUSED_KERNELS, name, run)
    monkeypatch.setattr(attention, "_sdpa_choice", lambda q, k, v: sdpa_pick)


def qkv(batch: int = 2, heads: int = 3, queries: int = 37, keys: int = 21, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, queries, dim, generator=g),
        torch.randn(batch, heads, keys, dim, generator=g),
        torch.randn(batch, heads, keys, dim, generator=g),
    )


def assert_exact(part: attention.Partial, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> None:
    out, lse = reference(q, k, v, **kw)  # type: ignore[arg-type]
    assert part.lse.shape == q.shape[:3] and part.lse.dtype == torch.float32
    torch.testing.assert_close(part.out.double(), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.lse.double(), lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- choice order


@pytest.mark.parametrize(
    ("sdpa_pick", "tried"),
    [("cudnn", ["cudnn"]), ("flash", ["flash"]), ("efficient", ["efficient"]), (None, ["flash"])],
)
def test_sdpa_pick_is_tried_first(
    monkeypatch: pytest.MonkeyPatch, calls: list[str], sdpa_pick: str | None, tried: list[str]
) -> None:
    """The kernel SDPA itself would use for these tensors runs (cuDNN where SDPA prefers it); without a pick,
    SDPA's priority order (flash, efficient, ..., cuDNN)."""
    use(monkeypatch, sdpa_pick, **{n: fake("bhq", calls, n) for n in ("cudnn", "flash", "efficient")})
    q, k, v = qkv()
    part = partial(q, k, v)
    assert calls == [*tried, tried[0]]  # the one-off probe, then the call
    assert_exact(part, q, k, v)


def test_refusing_kernels_fall_through_in_order(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """cuDNN and flash refuse (head size, dtype): the efficient kernel is used, with no warning."""
    use(
        monkeypatch,
        "cudnn",
        cudnn=refusing(calls, "cudnn"),
        flash=refusing(calls, "flash"),
        efficient=fake("padded", calls, "efficient"),
    )
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        part = partial(q, k, v)
    assert calls == ["cudnn", "flash", "efficient", "efficient"]
    assert_exact(part, q, k, v)


def test_sdpa_kernel_restriction_is_honoured(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Inside ``sdpa_kernel([EFFICIENT_ATTENTION])`` only the efficient kernel runs, whatever SDPA's pick."""
    use(monkeypatch, "cudnn", **{n: fake("bhq", calls, n) for n in ("cudnn", "flash", "efficient")})
    q, k, v = qkv()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        assert attention.enabled_kernels() == ("efficient",)
        partial(q, k, v)
    assert calls == ["efficient", "efficient"]
    partial(q, k, v)  # outside: a new restriction, a new decision
    assert calls[2:] == ["cudnn", "cudnn"]


def test_sdpa_kernel_priority_is_honoured(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """``sdpa_kernel([CUDNN, FLASH], set_priority=True)``: cuDNN first, then flash; efficient is not allowed."""
    use(monkeypatch, None, cudnn=refusing(calls, "cudnn"), **{n: fake("bhq", calls, n) for n in ("flash", "efficient")})
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        assert attention.enabled_kernels() == ("cudnn", "flash")
        partial(*qkv())
    assert calls == ["cudnn", "flash", "flash"]


def test_math_only_restriction_warns_and_is_exact(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """``sdpa_kernel(MATH)`` allows no log-sum-exp kernel: the math path, with a warning that says why."""
    use(monkeypatch, None, **{n: fake("bhq", calls, n) for n in ("cudnn", "flash", "efficient")})
    q, k, v = qkv()
    with sdpa_kernel(SDPBackend.MATH), pytest.warns(NegGuideWarning, match="none is allowed by"):
        part = partial(q, k, v)
    assert calls == []
    assert_exact(part, q, k, v)


# ---------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("layout", "name"), [("bhq", "flash"), ("bhq1", "cudnn"), ("padded", "efficient")])
@pytest.mark.parametrize("queries", [1, 31, 32, 33, 70])
def test_each_layout_is_normalised(
    monkeypatch: pytest.MonkeyPatch, calls: list[str], layout: str, name: str, queries: int
) -> None:
    """Each kernel's log-sum-exp layout (trailing 1, padding to 32 queries) becomes ``(B, H, Q)`` float32."""
    use(monkeypatch, name, **{name: fake(layout, calls, name)})
    q, k, v = qkv(queries=queries)
    assert_exact(partial(q, k, v, scale=0.3), q, k, v, scale=0.3)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [((2, 3, 5), True), ((2, 3, 5, 1), True), ((2, 3, 32), True), ((2, 5, 3), False), ((2, 3, 4), False)],
)
def test_lse_layout_accepts_known_layouts_only(shape: tuple[int, ...], ok: bool) -> None:
    lse = torch.zeros(shape, dtype=torch.float16)
    if ok:
        got = lse_layout(lse, (2, 3, 5))
        assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    else:
        with pytest.raises(ValueError, match=r"expected a log-sum-exp of shape \(batch, heads, >= queries\)"):
            lse_layout(lse, (2, 3, 5))


def test_unknown_layout_skips_the_kernel(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """A kernel whose log-sum-exp layout is unknown is never used: the next one is."""
    use(monkeypatch, "cudnn", cudnn=fake("bqh", calls, "cudnn"), flash=fake("bhq", calls, "flash"))
    q, k, v = qkv(queries=7, heads=5)
    assert_exact(partial(q, k, v), q, k, v)
    assert calls == ["cudnn", "flash", "flash"]


# ---------------------------------------------------------------------- caching, warning, refusal


def test_decision_is_cached_per_shape(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """One probe per shape, dtype and device; the layers after it call the chosen kernel directly."""
    use(monkeypatch, "cudnn", cudnn=refusing(calls, "cudnn"), flash=fake("bhq", calls, "flash"))
    q, k, v = qkv()
    for _ in range(5):
        partial(q, k, v)
    assert calls == ["cudnn", "flash"] + ["flash"] * 5
    partial(*qkv(queries=40))  # a new shape: one new probe
    assert calls[7:] == ["cudnn", "flash", "flash"]


def test_no_kernel_warns_once_naming_each_error(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Every kernel refuses: one ``NegGuideWarning`` naming each kernel's error, then silence; results exact."""
    use(
        monkeypatch,
        "cudnn",
        cudnn=refusing(calls, "cudnn", "cuDNN: head dim 72 unsupported"),
        flash=refusing(calls, "flash", "FlashAttention only supports fp16 and bf16"),
        efficient=fake("bqh", calls, "efficient"),
    )
    q, k, v = qkv(dim=72)
    with pytest.warns(NegGuideWarning) as record:
        part = partial(q, k, v)
    (message,) = [str(w.message) for w in record]
    for piece in (
        "cudnn: RuntimeError: cuDNN: head dim 72",
        "flash: RuntimeError: FlashAttention",
        "efficient: ValueError",
    ):
        assert piece in message
    assert "expected a fused attention kernel" in message and "Next step" in message
    assert_exact(part, q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partial(q, k, v)  # cached: no probe, no second warning
        partial(*qkv(dim=72, queries=50))  # a new shape, the same errors: no second warning
    assert calls == ["cudnn", "flash", "efficient"] * 2


def test_kernel_refusing_real_tensors_is_replaced(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """A kernel that passed the probe (batch 1) but refuses the real batch is dropped for that shape."""

    def batch_one_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple:
        if q.shape[0] > 1:
            calls.append("cudnn")
            raise RuntimeError("cuDNN: batch too large")
        return fake("bhq1", calls, "cudnn")(q, k, v, scale)

    use(monkeypatch, "cudnn", cudnn=batch_one_only, flash=fake("bhq", calls, "flash"))
    q, k, v = qkv()
    assert_exact(partial(q, k, v), q, k, v)
    assert_exact(partial(q, k, v), q, k, v)
    assert calls == ["cudnn", "cudnn", "flash", "flash", "flash"]


def test_cpu_never_probes(calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the CPU flash kernel runs; the CUDA choice is not consulted."""
    monkeypatch.setattr(attention, "_FUSED_KERNEL_DEVICES", ("cuda",))
    use(monkeypatch, "cudnn", cudnn=fake("bhq", calls, "cudnn"))
    q, k, v = qkv()
    assert_exact(partial(q, k, v), q, k, v)
    assert calls == [] and attention._kernel_cache == {}


@pytest.mark.slow
def test_compiled_partial_decides_host_side(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Under ``torch.compile(fullgraph=True)`` the decision is a traced-in constant: one probe, one graph, no
    recompile on the next call, and the compiled result is exact."""
    use(monkeypatch, "cudnn", cudnn=refusing(calls, "cudnn"), flash=fake("padded", calls, "flash"))
    q, k, v = qkv()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, k, v: partial(q, k, v).lse, backend="aot_eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            first = compiled(q, k, v)
            second = compiled(q, k, v)
    finally:
        torch._dynamo.reset()
    assert calls.count("cudnn") == 1  # probed once, host-side, never traced
    ref = reference(q, k, v)[1]
    torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the chunked math path


@pytest.mark.parametrize("budget", [1, 4 * 2 * 3 * 21 * 5, 4 * 2 * 3 * 21 * 16, 10**9])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_math_equals_unchunked_and_float64(monkeypatch: pytest.MonkeyPatch, budget: int, masked: bool) -> None:
    """The math path in query chunks of at most ``NEGGUIDE_MATH_CHUNK`` bytes of logits equals the unchunked
    one (up to the float32 rounding of the matmul blocking) and a float64 reference, fully masked rows included."""
    q, k, v = qkv()
    key_mask = None
    if masked:
        key_mask = torch.rand(2, 21, generator=torch.Generator().manual_seed(1)) > 0.4
        key_mask[1] = False  # a batch row that sees no key at all
    rows: list[int] = []
    real = attention._math_rows

    def spy(q: torch.Tensor, *args: object) -> attention.Partial:
        rows.append(q.shape[2])
        return real(q, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "_math_rows", spy)
    monkeypatch.setenv(attention.MATH_CHUNK_ENV, str(10**12))
    whole = attention._partial_math(q, k, v, key_mask, None)
    assert rows == [37]
    monkeypatch.setenv(attention.MATH_CHUNK_ENV, str(budget))
    rows.clear()
    chunked = attention._partial_math(q, k, v, key_mask, None)
    per_row = 4 * 2 * 3 * 21  # float32 logits of one query row: batch x heads x keys
    assert sum(rows) == 37 and max(rows) == max(1, min(37, budget // per_row))
    torch.testing.assert_close(chunked.out, whole.out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.lse, whole.lse, rtol=1e-6, atol=1e-6)
    out, lse = reference(q, k, v, key_mask)
    torch.testing.assert_close(chunked.out.double(), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.lse.double(), lse, rtol=1e-5, atol=1e-5)


def test_math_chunk_budget_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attention.MATH_CHUNK_ENV, raising=False)
    assert attention.math_chunk_bytes() == attention.MATH_CHUNK_DEFAULT
    monkeypatch.setenv(attention.MATH_CHUNK_ENV, "1e6")
    assert attention.math_chunk_bytes() == 10**6
    monkeypatch.setenv(attention.MATH_CHUNK_ENV, "lots")
    assert attention.math_chunk_bytes() == attention.MATH_CHUNK_DEFAULT
