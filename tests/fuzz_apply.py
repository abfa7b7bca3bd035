"""Fuzzing ``apply`` + one call on a tiny pipeline; run by tests/test_fuzz.py in a subprocess.

``python -m tests.fuzz_apply FAMILY EXAMPLES`` throws random methods, parameter types and values,
negatives (text, lists, mappings, embeddings of random shapes, dtypes and values) at ``apply`` and one
pipeline call, and holds for each example: the outcome is a finite output or a ``NegGuideError``
(never another exception), and afterwards the pipeline is exactly as before (processors, hooks,
attributes, and a bit-identical output). Prints a JSON summary; a dying interpreter shows as a
non-zero exit code to the test.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections import Counter
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import negguide
from negguide import testing
from negguide import tiny
from negguide.errors import NegGuideError

WIDTH = 32  #: the text width of every tiny family
CALLS = {"sd3": {"guidance_scale": 0.0}, "flux": {}, "wan": {"guidance_scale": 1.0}}

numbers = st.one_of(
    st.floats(-2, 20, allow_nan=False),
    st.sampled_from([0, 1, 3, -1, 0.0, 1.0, math.inf, -math.inf, math.nan, 1e30, True, False]),
)
values = st.one_of(numbers, st.sampled_from(["3", "inf", "yes", "", None, [0], [1.0], ["0"], [99], [-99], [], {}]))
params = st.dictionaries(
    st.sampled_from(["scale", "bias", "tau", "alpha", "start", "stop", "enabled", "layers", "attention", "bogus"]),
    st.one_of(values, st.sampled_from(["auto", "dense", "split", "sparse"])),
    max_size=3,
)
texts = st.one_of(
    st.sampled_from(["snow", "", "   ", "a dark blurry photo", "é漢字🙂", "\x00", "x" * 300]), st.text(max_size=12)
)


@st.composite
def embeddings(draw: Any) -> torch.Tensor:
    rows = draw(st.sampled_from([0, 1, 1, 2, 3]))
    tokens = draw(st.sampled_from([0, 1, 3, 5]))
    width = draw(st.sampled_from([WIDTH, WIDTH, WIDTH - 1, 0]))
    shape = draw(st.sampled_from([(rows, tokens, width), (tokens, width), (rows, 1, tokens, width)]))
    dtype = draw(
        st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])
    )
    fill = draw(st.sampled_from(["normal", "zeros", "nan", "inf", "huge"]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    t = {"normal": t, "zeros": t * 0, "nan": t * math.nan, "inf": t * math.inf, "huge": t * 1e30}[fill]
    return t.to(dtype)


negatives = st.one_of(
    st.fixed_dictionaries({"negative_prompt": st.one_of(texts, st.lists(texts, max_size=3), st.integers(), st.none())}),
    st.fixed_dictionaries({"negative_prompt_embeds": st.one_of(embeddings(), st.fixed_dictionaries({
        "prompt_embeds": embeddings(), "pooled_prompt_embeds": st.one_of(embeddings(), st.just("pooled"))}))}),
    st.fixed_dictionaries({"negatives": st.one_of(
        st.dictionaries(st.one_of(texts, st.integers()), numbers, max_size=3),
        st.lists(st.one_of(texts, st.tuples(texts, numbers), st.tuples(embeddings(), numbers)), max_size=3),
        st.sampled_from(["snow", 3, None]))}),
)  # fmt: skip


def main(family: str, examples: int) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    case = testing.Case(build=tiny.BUILDERS[family], call={**tiny.CALL_KWARGS[family], **CALLS[family]},
                        output="frames" if family == "wan" else "images")  # fmt: skip
    base = case.run()
    case.run(prompt=list(case.prompts), seed=[0, 1])  # the pipeline's own per-call attributes exist
    before = testing._snapshot(case, case.pipe)
    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(
        method=st.sampled_from(["vsf", "nag", "nasa", "cfg"]),
        p=st.one_of(st.just({}), params),  # valid parameters half of the time: the call itself is fuzzed too
        neg=negatives,
        two=st.booleans(),
    )
    def fuzz(method: str, p: dict[str, Any], neg: dict[str, Any], two: bool) -> None:
        prompt = list(case.prompts) if two else case.prompts[0]
        try:
            with negguide.apply(case.pipe, method, **neg, **p):
                out = case.run(prompt=prompt, seed=[0, 1] if two else 0)
            assert np.isfinite(out).all(), f"non-finite output for {method} {p} {neg}"
            outcomes["output"] += 1
        except NegGuideError as exc:
            outcomes[type(exc).__name__] += 1
        testing._assert_restored(case, case.pipe, before, f"after {method} {p} {list(neg)}")
        assert np.array_equal(case.run(), base), f"the pipeline is not bit-identical after {method} {p} {neg}"

    fuzz()
    print(json.dumps({"family": family, "outcomes": dict(outcomes)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
