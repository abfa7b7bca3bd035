"""Fused glue: ``@fused`` functions (the log-sum-exp merge, NAG's combination) compiled into kernels.

On CUDA they compile by default; here ``NEGGUIDE_FUSE=1`` forces them on the CPU. Dynamo's
behaviour (one graph for every shape and parameter, no nested compile inside a caller's
``torch.compile``, fallback on failure) is checked with a counting backend; the numerics of the
generated kernels with the real inductor backend against a float64 reference (slow: inductor
writes and compiles C++ on the CPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

import negguide
import negguide.attention as attention
from negguide import tiny
from negguide.attention import FUSE_ENV
from negguide.attention import Block
from negguide.attention import fuse_enabled
from negguide.attention import fused
from negguide.attention import merge
from negguide.attention import merge_outputs
from negguide.attention import partial
from negguide.plugins.nag import nag_combine
from tests.plugins.test_nag import reference as nag_reference
from tests.test_attention_paths import reference

F64REF = {"rtol": 1e-5, "atol": 1e-4}


class CountingBackend:
    """A Dynamo backend that runs the captured graph as is and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch, fresh_dynamo: None) -> CountingBackend:
    """Fusing forced on, compiled with a counting backend."""
    backend = CountingBackend()
    monkeypatch.setenv(FUSE_ENV, "1")
    monkeypatch.setattr(attention, "_FUSE_BACKEND", backend)
    return backend


def blocks(
    seed: int,
    bias: float = -0.1,
    coef: float = -2.0,
    batch: int = 2,
    heads: int = 3,
    n_q: int = 7,
    cols: tuple[int, int] = (9, 4),
    dim: int = 8,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Block]]:
    """Queries, a plain first key block and a second one with ``bias``, ``coef`` and key ``mask`` (VSF's shape)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen)
    kv = [
        (torch.randn(batch, heads, n, dim, generator=gen), torch.randn(batch, heads, n, dim, generator=gen))
        for n in cols
    ]
    return q, [Block(*kv[0]), Block(*kv[1], bias, coef, mask)]


def merged(f: Any, q: torch.Tensor, bs: list[Block]) -> torch.Tensor:
    """``f`` (a ``merge_outputs``) over the partial attentions of ``q`` on the blocks."""
    parts = [partial(q, b.k, b.v, b.key_mask) for b in bs]
    return f([p.out for p in parts], [p.lse for p in parts], [b.bias for b in bs], [b.coef for b in bs])


# ---------------------------------------------------------------------- the switch


@pytest.mark.parametrize(
    ("value", "cpu", "cuda"),
    [(None, False, True), ("auto", False, True), ("1", True, True), ("on", True, True), ("0", False, False)],
)
def test_fuse_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, cpu: bool, cuda: bool) -> None:
    if value is None:
        monkeypatch.delenv(FUSE_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSE_ENV, value)
    assert fuse_enabled(torch.device("cpu")) is cpu
    assert fuse_enabled(torch.device("cuda")) is cuda


def test_off_on_the_cpu_by_default_nothing_compiles(monkeypatch: pytest.MonkeyPatch, fresh_dynamo: None) -> None:
    monkeypatch.delenv(FUSE_ENV, raising=False)
    backend = CountingBackend()
    monkeypatch.setattr(attention, "_FUSE_BACKEND", backend)
    merged(fused(merge_outputs.eager), *blocks(0))
    assert backend.graphs == 0


# ---------------------------------------------------------------------- Dynamo behaviour


def test_one_graph_for_every_shape_and_parameter(counting: CountingBackend) -> None:
    """After the first call, new token counts, heads, alpha and beta (inf included) reuse the graph."""
    f = fused(merge_outputs.eager)
    cases = [
        (2, 3, 7, (9, 4), -0.1, -3.5),
        (2, 3, 11, (20, 6), -0.5, -1.0),
        (3, 2, 5, (3, 2), -math.inf, -5.0),
        (2, 4, 33, (17, 12), 0.0, 0.0),
    ]
    for seed, (batch, heads, n_q, cols, bias, coef) in enumerate(cases):
        q, bs = blocks(seed, bias, coef, batch, heads, n_q, cols)
        torch.testing.assert_close(merged(f, q, bs).double(), reference(q, bs, None), **F64REF)
    assert counting.graphs == 1


def test_inside_a_compiled_region_it_is_inlined_not_compiled_again(counting: CountingBackend) -> None:
    outer = CountingBackend()
    q, bs = blocks(1)

    def step(q: torch.Tensor) -> torch.Tensor:
        parts = [partial(q, b.k, b.v) for b in bs]
        return merge(parts, [b.bias for b in bs], [b.coef for b in bs]) * 2

    got = torch.compile(step, backend=outer, fullgraph=True)(q)
    assert outer.graphs == 1 and counting.graphs == 0  # one graph, the merge inside it
    torch.testing.assert_close(got.double(), 2 * reference(q, bs, None), **F64REF)


def test_a_failing_compiler_warns_once_and_the_eager_ops_answer(
    monkeypatch: pytest.MonkeyPatch, fresh_dynamo: None
) -> None:
    calls = []

    def broken(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setenv(FUSE_ENV, "1")
    monkeypatch.setattr(attention, "_FUSE_BACKEND", broken)
    f = fused(merge_outputs.eager)
    q, bs = blocks(2)
    with pytest.warns(RuntimeWarning, match=f"merge_outputs.*{FUSE_ENV}=0"):
        first = merged(f, q, bs)
    second = merged(f, q, bs)  # no second attempt, no second warning
    assert len(calls) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first.double(), reference(q, bs, None), **F64REF)


@pytest.mark.parametrize(("method", "params"), [("vsf", {"scale": 3.0}), ("nag", {}), ("nasa", {})])
def test_pipeline_with_fused_glue_equals_eager(
    monkeypatch: pytest.MonkeyPatch, fresh_dynamo: None, sd3_pipe: Any, method: str, params: dict
) -> None:
    """End to end on tiny SD3 (split path): fused glue on (counting backend) = off, and it did compile."""
    kwargs = dict(tiny.CALL_KWARGS["sd3"], num_inference_steps=3)

    def run() -> Any:
        with negguide.apply(sd3_pipe, method, negative_prompt="a dog", attention="split", **params):
            return sd3_pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images

    monkeypatch.setenv(FUSE_ENV, "0")
    eager = run()
    backend = CountingBackend()
    monkeypatch.setenv(FUSE_ENV, "1")
    monkeypatch.setattr(attention, "_FUSE_BACKEND", backend)
    # fresh wrappers, so this test's backend is the one that compiles
    monkeypatch.setattr(attention, "merge_outputs", fused(merge_outputs.eager))
    import negguide.plugins.nag as nag_module

    monkeypatch.setattr(nag_module, "nag_combine", fused(nag_combine.eager))
    got = run()
    assert backend.graphs >= 1
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(eager), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- inductor's kernels


@pytest.mark.slow
def test_inductor_kernels_match_the_float64_formulas(monkeypatch: pytest.MonkeyPatch, fresh_dynamo: None) -> None:
    """The generated merge and NAG kernels (inductor, C++ on the CPU) against float64 references:
    float32 and bfloat16, padded negatives (one row's negative block all padding), beta = inf."""
    monkeypatch.setenv(FUSE_ENV, "1")
    monkeypatch.setattr(attention, "_FUSE_BACKEND", "inductor")
    f = fused(merge_outputs.eager)
    for seed, (dtype, bias, coef, padded) in enumerate(
        [
            (torch.float32, -0.1, -3.5, False),
            (torch.float32, -math.inf, -2.0, True),
            (torch.float32, 0.0, 1.0, True),
            (torch.bfloat16, -0.1, -3.5, True),
        ]
    ):
        mask = torch.tensor([[True] * 3 + [False] * 2, [False] * 5]) if padded else None
        q, bs = blocks(seed, bias, coef, cols=(6, 5), mask=mask)
        q = q.to(dtype)
        bs = [dataclasses.replace(b, k=b.k.to(dtype), v=b.v.to(dtype)) for b in bs]
        got = merged(f, q, bs)
        assert got.dtype == dtype
        expected = reference(q, bs, None)
        tol = F64REF if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
        torch.testing.assert_close(got.double(), expected, **tol)
    g = fused(nag_combine.eager)
    gen = torch.Generator().manual_seed(7)
    z_pos, z_neg = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)
    for s, tau, alpha in [(5.0, 2.5, 0.25), (4.0, 1.0, 1.0), (1.0, 2.5, 0.5)]:
        got = g(z_pos, z_neg, s, tau, alpha)
        expected = nag_reference(z_pos.double(), z_neg.double(), s, tau, alpha)
        torch.testing.assert_close(got.double(), expected, **F64REF)
