"""The negatives of ``apply``: ``negative_prompt``, ``negative_prompt_embeds`` and weighted ``negatives``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import negguide
from negguide.errors import NegativePromptError
from negguide.negatives import NegativeSpec
from negguide.negatives import parse


def test_negative_prompt_keeps_its_diffusers_meaning():
    assert parse("vsf", negative_prompt="snow") == [NegativeSpec(text="snow")]
    assert parse("vsf", negative_prompt=["snow", ""]) == [NegativeSpec(text=("snow", ""))]
    assert parse("vsf") == []


def test_negatives_as_a_mapping_or_a_sequence():
    assert parse("vsf", negatives={"snow": 1, "people": 0.5}) == [
        NegativeSpec(text="snow", weight=1.0),
        NegativeSpec(text="people", weight=0.5),
    ]
    embeds = torch.zeros(1, 3, 8)
    specs = parse("vsf", negatives=["snow", ("people", 2), (embeds, 0.25), embeds])
    assert [s.text for s in specs] == ["snow", "people", None, None]
    assert [s.weight for s in specs] == [1.0, 2.0, 0.25, 1.0]
    assert specs[2].embeds is embeds and specs[3].embeds is embeds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negatives": {"snow": -1}}, r"weight of negative 'snow' to be a finite number >= 0, got -1"),
        ({"negatives": {"snow": math.nan}}, r"finite number >= 0, got nan"),
        ({"negatives": {"snow": math.inf}}, r"finite number >= 0, got inf"),
        ({"negatives": {"snow": True}}, r"finite number >= 0, got True"),
        ({"negatives": {"snow": "1"}}, r"finite number >= 0, got '1'"),
        ({"negatives": {}}, r"at least one negative in `negatives`, got an empty dict"),
        ({"negatives": []}, r"at least one negative in `negatives`, got an empty list"),
        ({"negatives": {3: 1.0}}, r"mapping of negative prompts \(strings\) to weights, got the key 3 \(int\)"),
        ({"negatives": "snow"}, r"expected `negatives` as a mapping .* got str. Use `negative_prompt`"),
        ({"negatives": [3]}, r"each entry of `negatives` to be a string, embeddings .* got int"),
        ({"negatives": {"a": 1}, "negative_prompt": "b"}, r"pass one of .* got `negative_prompt` and `negatives`"),
        ({"negative_prompt": "a", "negative_prompt_embeds": torch.zeros(1, 1, 2)}, r"`negative_prompt_embeds`"),
        ({"negative_prompt": []}, r"non-empty list of strings"),
        ({"negative_prompt": ["a", 3]}, r"a list holding 3 \(int\)"),
    ],
)
def test_bad_negatives_are_refused_with_what_to_pass(kwargs, message):
    with pytest.raises(NegativePromptError, match=message):
        parse("vsf", **kwargs)


def test_bad_negatives_leave_the_pipeline_untouched(sd3_pipe):
    procs = dict(sd3_pipe.transformer.attn_processors)
    keys = set(sd3_pipe.__dict__)
    for bad in ({"snow": -1.0}, {}, {3: 1.0}):
        with pytest.raises(NegativePromptError):
            negguide.apply(sd3_pipe, "vsf", negatives=bad)
        assert all(sd3_pipe.transformer.attn_processors[k] is v for k, v in procs.items())
        assert set(sd3_pipe.__dict__) == keys
    with pytest.raises(NegativePromptError, match="pass one of"):
        negguide.apply(sd3_pipe, "nag", negatives={"a": 1.0}, negative_prompt="b")
    assert negguide.runtime.applied(sd3_pipe) is None


def test_precomputed_negatives_equal_their_text(sd3_pipe):
    """Embeddings in `negatives` act like the same negative given as text (weights included)."""
    kw = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "np", "num_inference_steps": 2}

    def run():
        return sd3_pipe("a red cat", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kw).images

    with negguide.apply(sd3_pipe, "vsf", negatives={"snow": 1.0, "people": 0.5}) as handle:
        text = run()
        snow = handle.installation.encoded[0].embeds
    with negguide.apply(sd3_pipe, "vsf", negatives=[(snow, 1.0), ("people", 0.5)]):
        given = run()
    np.testing.assert_allclose(given, text, atol=1e-6)
