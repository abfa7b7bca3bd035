"""A guided transformer compiles once: no graph breaks, no recompiles across steps and calls.

Usage under test: apply negguide first, then compile the transformer in place
(``pipe.transformer.compile()``). negguide's forward hooks (the host-side step window, the
negative tokens' batching) are excluded from compilation (``torch.compiler.disable``), so the
compiled region is the transformer's forward with the guided attention processors inside it.

``fullgraph=True`` makes any graph break in that region an error (it covers
``negguide/attention.py`` and the method plugins); ``error_on_recompile`` makes any recompile
an error. The backend is ``aot_eager``: graph capture, guards and recompiles are Dynamo's and do
not depend on the backend, while inductor's C++ code generation takes minutes on a 2-core CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import negguide
from negguide import tiny

pytestmark = pytest.mark.slow

STEPS = 4
BACKEND = "aot_eager"


def _run(pipe: Any, calls: int = 1) -> list[np.ndarray]:
    kwargs = dict(tiny.CALL_KWARGS["sd3"])
    return [
        pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs).images
        for _ in range(calls)
    ]


@pytest.fixture
def fresh_dynamo() -> Any:
    """Dynamo's caches and counters empty before and after the test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def pipe_and_unguided() -> tuple[Any, np.ndarray]:
    pipe = tiny.sd3()
    return pipe, _run(pipe)[0]


@pytest.fixture
def pipe(pipe_and_unguided: tuple[Any, np.ndarray], fresh_dynamo: None) -> Any:
    """The module's tiny SD3 pipeline, its transformer uncompiled again after the test."""
    pipe = pipe_and_unguided[0]
    yield pipe
    pipe.transformer._compiled_call_impl = None  # undo nn.Module.compile


@pytest.mark.parametrize(
    ("method", "params"),
    [("vsf", {"attention": "split"}), ("nag", {"attention": "split"}), ("cfg", {})],
    ids=["vsf-split", "nag-split", "cfg"],
)
def test_compiled_guided_pipeline_has_one_graph(
    pipe: Any, pipe_and_unguided: tuple[Any, np.ndarray], method: str, params: dict[str, Any]
) -> None:
    """A compiled guided transformer is captured as one graph, never recompiles, and equals eager.

    Four steps, two pipeline calls; the pipeline's own CFG batch ``[uncond, cond]`` is on, so the
    graph also holds the row split (only the conditional row guided).
    """
    unguided = pipe_and_unguided[1]
    with negguide.apply(pipe, method, negative_prompt="blurry", **params):
        eager = _run(pipe)[0]
        pipe.transformer.compile(backend=BACKEND, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            first, second = _run(pipe, calls=2)
    assert counters["stats"]["unique_graphs"] == 1
    assert np.abs(eager - unguided).max() > 1e-3  # the guidance is on...
    np.testing.assert_allclose(first, eager, atol=1e-4)  # ...and the compiled graph computes it
    np.testing.assert_allclose(second, eager, atol=1e-4)


@pytest.mark.parametrize(("family", "graphs"), [("flux", 1), ("wan", 2)])
def test_compiled_flux_and_wan_settle_after_the_first_step(fresh_dynamo: None, family: str, graphs: int) -> None:
    """Flux and Wan: after the first call no forward recompiles; Wan's pipeline CFG adds its own unguided graph.

    Wan runs its unconditional branch as a separate forward that negguide leaves unguided (shorter
    text, no negative tokens): that is a second graph, compiled in the first denoising step.
    """
    pipe = tiny.BUILDERS[family]()
    kwargs = dict(tiny.CALL_KWARGS[family])
    with negguide.apply(pipe, "vsf", negative_prompt="blurry", attention="split"):
        pipe.transformer.compile(backend=BACKEND, fullgraph=True)
        for call in range(2):
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    ("family", "layers", "graphs"),
    [("flux", None, 2), ("wan", None, 2), ("wan", [0, 2], 3)],
    ids=["flux", "wan", "wan-some-layers"],
)
def test_regional_compile_shares_one_graph_per_block_type(
    fresh_dynamo: None, family: str, layers: list[int] | None, graphs: int
) -> None:
    """diffusers' ``compile_repeated_blocks``: the blocks of a type share their graphs, whatever their index.

    Each block has its own guided processor; whether the method guides it is decided host-side when
    the processor is made, so Dynamo never specialises a graph on the block index (that would be
    one graph per block, and beyond Dynamo's cache limit of 8 the rest of a 38-block model would run
    eagerly). Flux: one graph per block type (double, single). Wan (4 blocks): one for the guided
    blocks, one for the pipeline's own unguided unconditional forward, and one more for blocks
    outside ``layers``. Then a second call recompiles nothing, and the result equals eager.
    """
    pipe = tiny.flux() if family == "flux" else tiny.wan(num_layers=4)
    kwargs = dict(tiny.CALL_KWARGS[family])
    params = {"attention": "split"} if layers is None else {"attention": "split", "layers": layers}

    def call() -> np.ndarray:
        out = pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs)
        return np.asarray(out.frames if family == "wan" else out.images)

    with negguide.apply(pipe, "vsf", negative_prompt="blurry", **params):
        eager = call()
        pipe.transformer.compile_repeated_blocks(backend=BACKEND, fullgraph=True)
        first = call()
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = call()
    assert counters["stats"]["unique_graphs"] == graphs
    np.testing.assert_allclose(first, eager, atol=1e-4)
    np.testing.assert_allclose(second, eager, atol=1e-4)
