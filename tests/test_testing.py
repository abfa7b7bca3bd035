"""The conformance kit catches broken adapters: each check below fails on an adapter built to break it."""

from __future__ import annotations

import pytest
import torch

from negguide import hookimpl
from negguide import testing
from negguide import tiny
from negguide.adapter import Joined
from negguide.adapters.sd3 import SD3Adapter
from negguide.registry import get_plugin_manager

CALL = {**tiny.CALL_KWARGS["sd3"], "guidance_scale": 0.0}
PIPELINE_CFG = {"guidance_scale": 4.0, "negative_prompt": "ugly"}


def case_with(adapter: type) -> testing.Case:
    """A case on the tiny SD3 pipeline whose registry picks ``adapter`` first (its family sorts first)."""
    pm = get_plugin_manager(entry_points=False)

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(adapter)

    pm.register(Plugin(), name=f"test_{adapter.family}")
    return testing.Case(build=tiny.sd3, call=CALL, pipeline_cfg=PIPELINE_CFG, pm=pm)


@pytest.fixture(scope="module")
def good() -> testing.Case:
    return testing.Case(build=tiny.sd3, call=CALL, pipeline_cfg=PIPELINE_CFG)


def test_wrong_pipeline_cfg_fact_guides_the_unconditional_rows_too():
    """SD3 batches its CFG as [uncond, cond]; an adapter that says "separate" guides both halves."""

    class WrongCFG(SD3Adapter):
        family = "a_wrong_cfg"
        pipeline_cfg = "separate"

    with pytest.raises(AssertionError, match="conditional half of the rows"):
        testing.check_pipeline_cfg_guides_conditional_rows(case_with(WrongCFG))


def test_an_adapter_that_never_guides_fails_the_effect_checks():
    class NeverGuides(SD3Adapter):
        family = "a_never_guides"

        def join(self, kwargs, negative, mask):
            return Joined(kwargs, kwargs["encoder_hidden_states"].shape[1])  # the negatives never reach the model

        def project(self, attn, text, *args, **kwargs):
            return None  # every call runs the original processor

    case = case_with(NeverGuides)
    with pytest.raises(AssertionError, match="expected the guidance to change the output"):
        testing.check_vsf_infinite_bias_is_unguided(case)
    with pytest.raises(AssertionError, match="two negatives vs one|expected the guidance to change"):
        testing.check_several_negatives(case)


def test_an_adapter_that_leaks_the_negative_into_the_positive_text_fails_isolation():
    """Reporting the negatives as positive tokens lets the image attend to them unflipped: bias=inf is no longer
    the unguided output."""

    class Leaky(SD3Adapter):
        family = "a_leaky"

        def join(self, kwargs, negative, mask):
            joined = super().join(kwargs, negative, mask)
            return type(joined)(joined.kwargs, joined.num_pos + negative.shape[1] - 1, joined.pos_mask)

    with pytest.raises(AssertionError, match="vsf bias=inf"):
        testing.check_vsf_infinite_bias_is_unguided(case_with(Leaky))


def test_restored_state_is_compared_in_full(good):
    pipe = good.pipe
    before = testing._snapshot(good, pipe)
    pipe.leftover = 1
    try:
        with pytest.raises(AssertionError, match="pipeline's attributes.*leftover"):
            testing._assert_restored(good, pipe, before, "x")
    finally:
        del pipe.__dict__["leftover"]
    block = pipe.transformer.transformer_blocks[0].attn
    original = block.processor
    block.set_processor(type(original)())
    try:
        with pytest.raises(AssertionError, match="original attention processors"):
            testing._assert_restored(good, pipe, before, "x")
    finally:
        block.set_processor(original)
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: None)
    try:
        with pytest.raises(AssertionError, match="forward hooks"):
            testing._assert_restored(good, pipe, before, "x")
    finally:
        hook.remove()
    testing._assert_restored(good, pipe, before, "x")  # and back to equal


def test_the_kit_lists_and_runs_every_check(good, monkeypatch):
    ran = []
    for name in testing.CHECKS:
        monkeypatch.setitem(testing.CHECKS, name, lambda case, name=name: ran.append(name))
    testing.run_all(good, skip=("compiles_without_recompiles",))
    assert sorted(ran) == sorted(set(testing.CHECKS) - {"compiles_without_recompiles"})


def test_case_runs_with_one_generator_per_image(good):
    both = good.run(prompt=list(good.prompts), seed=[0, 1])
    assert both.shape[0] == 2 and both.dtype.name == "float64"
    assert abs(both[:1] - good.run(prompt=good.prompts[0], seed=0)).max() < 1e-5
    assert not torch.equal(torch.from_numpy(both[0]), torch.from_numpy(both[1]))


def test_remove_check_passes_on_a_pipeline_never_called_before():
    """A fresh pipeline has none of the private attributes a call sets (``_guidance_scale``...): the check
    does not mistake them for something ``remove()`` left behind."""
    fresh = testing.Case(build=tiny.sd3, call=CALL, pipeline_cfg=PIPELINE_CFG)
    assert "_guidance_scale" not in fresh.pipe.__dict__
    testing.check_remove_is_bit_exact(fresh)
