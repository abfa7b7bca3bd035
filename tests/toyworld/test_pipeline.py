"""The ToyWorld pipeline: components, save/load round trip, and guidance through the ordinary SD3 adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import negguide
from negguide.toyworld import load
from negguide.toyworld.pipeline import CALL_KWARGS
from negguide.toyworld.pipeline import IdentityAutoencoder
from negguide.toyworld.pipeline import ToyWorldPipeline

KWARGS = {**CALL_KWARGS, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe() -> ToyWorldPipeline:
    return load()


def _run(pipe: ToyWorldPipeline, prompt: str = "red circle", n: int = 2) -> np.ndarray:
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    return pipe(prompt, num_images_per_prompt=n, generator=generators, **KWARGS).images


def test_components(pipe: ToyWorldPipeline) -> None:
    assert isinstance(pipe, negguide.toyworld.pipeline.StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae_scale_factor == 1 and pipe.tokenizer_max_length == 12
    tok = pipe.tokenizer
    ids = tok("Red circle and BLUE square").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["red", "circle", "and", "blue", "square", "<eos>"]
    assert tok.convert_ids_to_tokens(tok("purple circle").input_ids)[0] == "<unk>"
    t5 = pipe._get_t5_prompt_embeds(["a", "b"], num_images_per_prompt=3, device=torch.device("cpu"))
    assert t5.shape == (6, 0, pipe.transformer.config.joint_attention_dim)
    embeds, _, pooled, _ = pipe.encode_prompt("red circle", None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 12, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)


def test_identity_autoencoder() -> None:
    vae = IdentityAutoencoder()
    x = torch.randn(2, 3, 32, 32)
    assert vae.encode(x).latent_dist.sample() is x and vae.encode(x).latent_dist.mode() is x
    assert vae.decode(x, return_dict=False)[0] is x and vae.decode(x).sample is x


def test_output_is_a_picture(pipe: ToyWorldPipeline) -> None:
    images = _run(pipe)
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1


def test_save_load_round_trip(pipe: ToyWorldPipeline, tmp_path) -> None:  # noqa: ANN001
    pipe.save_pretrained(tmp_path)
    again = load(path=tmp_path)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert isinstance(again.vae, IdentityAutoencoder)
    np.testing.assert_allclose(_run(again), _run(pipe), atol=1e-5)


def test_missing_weights_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(negguide.NegGuideError, match="toyworld train"):
        load(path=tmp_path)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa", "cfg"])
def test_guided_through_the_sd3_adapter(pipe: ToyWorldPipeline, method: str) -> None:
    assert negguide.get_adapter(pipe.transformer).family == "sd3"
    plain = _run(pipe)
    with negguide.apply(pipe, method, negative_prompt="blue square"):
        guided = _run(pipe)
    after = _run(pipe)
    assert np.abs(guided - plain).max() > 1e-3  # the negative changes the picture
    np.testing.assert_array_equal(after, plain)  # and removal restores the pipeline exactly


def test_demo_pipeline() -> None:
    demo, prompt, negative, kwargs = negguide.toyworld.demo_pipeline()
    assert isinstance(demo, ToyWorldPipeline)
    assert (prompt, negative) == ("red circle", "blue square")
    assert kwargs["guidance_scale"] == 0.0 and kwargs["height"] == kwargs["width"] == 32
