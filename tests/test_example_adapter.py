"""The example third-party adapter (examples/negguide-example, ``negguide_example_allegro``): Allegro.

Registered on a fresh plugin manager (no entry points), so it runs wherever the module imports;
``test_entry_point_registers_the_adapter`` checks the installed entry point. Skipped where the
example package is not installed (CI installs it: ``bash scripts/setup.sh``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import negguide
from negguide import registry
from negguide import testing
from negguide.adapter import TextLayout
from negguide.installation import Forward
from negguide.installation import Installation
from negguide.installation import guided_processor
from negguide.negatives import NegativeSpec

allegro = pytest.importorskip("negguide_example_allegro")

#: 2 latent frames of 16x16; 24 text tokens, so every prompt is padded (masked) in the cross-attention
CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 24, "output_type": "latent",
        "clean_caption": False, "guidance_scale": 1.0}  # fmt: skip
NEG = "snow"


def _pm():
    pm = registry.get_plugin_manager(entry_points=False)
    pm.register(allegro, name="negguide_example_allegro")
    return pm


PM = _pm()
CASE = testing.Case(
    build=allegro.tiny_pipeline,
    call=CALL,
    output="frames",
    pipeline_cfg={"guidance_scale": 3.0, "negative_prompt": "ugly"},
    pm=PM,
)


@pytest.fixture(scope="module")
def pipe():
    p = CASE.pipe
    yield p
    negguide.remove(p)


def run(pipe, prompt="a red cat on a mat", **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, **{**CALL, **kw}).frames


def context_lengths(pipe):
    """Records the text length every ``attn2`` of block 0 sees (Allegro passes it as a keyword)."""
    lengths: list[int] = []
    hook = pipe.transformer.transformer_blocks[0].attn2.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    return lengths, hook


# ---------------------------------------------------------------------------- the conformance kit


@pytest.mark.parametrize("check", sorted(testing.CHECKS))
def test_conformance(check):
    """The adapter passes every check of negguide.testing on the tiny Allegro pipeline."""
    testing.CHECKS[check](CASE)


# ---------------------------------------------------------------------------- family facts


def test_adapter_resolves(pipe):
    assert registry.adapter_for(pipe, PM) is allegro.AllegroAdapter
    assert allegro.AllegroAdapter.family == "allegro" and allegro.AllegroAdapter.layout == "cross"
    assert not allegro.AllegroAdapter.matches(torch.nn.Linear(2, 2))
    assert "allegro" not in negguide.list_adapters(pm=registry.get_plugin_manager(entry_points=False))


@pytest.mark.entry_points
def test_entry_point_registers_the_adapter(pipe, monkeypatch):
    """The adapter comes from the `example-allegro` entry point of the negguide-example distribution."""
    monkeypatch.delenv("NEGGUIDE_LOAD_PLUGINS", raising=False)
    pm = registry.get_plugin_manager()
    cls, info = registry.adapters(pm)["allegro"]
    assert cls is allegro.AllegroAdapter and (info.name, info.package) == ("example-allegro", "negguide-example")
    assert registry.adapter_for(pipe, pm) is allegro.AllegroAdapter


def test_negatives_are_encoded_without_padding(pipe):
    """Each negative reaches ``attn2`` with its real tokens only (T5 pieces and ``</s>``), after the padded prompt."""
    n = len(pipe.tokenizer(NEG).input_ids)
    lengths, hook = context_lengths(pipe)
    try:
        with negguide.apply(pipe, "vsf", negative_prompt=NEG, pm=PM) as handle:
            run(pipe)
            encoded = handle.installation.encoded[0]
    finally:
        hook.remove()
    assert (encoded.num_tokens, encoded.mask) == (n, None)
    assert lengths == [CALL["max_sequence_length"] + n] * 2
    with torch.no_grad():
        own = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=n)[0]
    torch.testing.assert_close(encoded.embeds, own, atol=1e-5, rtol=0)


def test_positive_padding_is_respected(pipe):
    """VSF with ``bias=inf`` is the unguided pipeline on a heavily padded prompt, and that padding matters."""
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, max_sequence_length=48)[:2]
    assert 0 < int(mask.sum()) < 12
    kw = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "max_sequence_length": 48}
    plain = run(pipe, None, **kw)
    with negguide.apply(pipe, "vsf", negative_prompt=NEG, bias=math.inf, pm=PM):
        torch.testing.assert_close(run(pipe, None, **kw), plain, atol=2e-5, rtol=0)
    unmasked = run(pipe, None, **{**kw, "prompt_attention_mask": torch.ones_like(mask)})
    assert (unmasked - plain).abs().max() > 1e-3


def test_negative_prompt_embeds_equal_text(pipe):
    """T5 embeddings of the real tokens act like the same negative given as text, also for CFG (zero-padded and
    masked to the prompt's length); a wrong width is refused."""
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=24)[:2]
    real = embeds[:, : int(mask.sum())]
    for method in ("vsf", "cfg"):
        with negguide.apply(pipe, method, negative_prompt=NEG, pm=PM):
            text = run(pipe)
        with negguide.apply(pipe, method, negative_prompt_embeds=real, pm=PM):
            torch.testing.assert_close(run(pipe), text, atol=2e-5, rtol=0)
    with negguide.apply(pipe, "vsf", negative_prompt_embeds=real[..., :8], pm=PM):
        with pytest.raises(
            negguide.NegGuideError, match=r"expected `negative_prompt_embeds` as a \(rows, tokens, 32\)"
        ):
            run(pipe)


@pytest.mark.parametrize("path", ["dense", "split"])
def test_guided_call_matches_float64_reference(pipe, path):
    """One guided ``attn2`` call equals VSF in float64: softmax over [P; N - beta] with P's and N's padding masked,
    values [V_P; -alpha V_N], then ``to_out`` (the bias the transformer passes is ignored: the masks say it)."""
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn2).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    batch, p, n, n_img, dim, alpha, beta = 2, 6, 4, 9, attn.query_dim, 2.5, 0.25
    img = torch.randn(batch, n_img, dim, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, p + n, dim, generator=gen, dtype=torch.float64)
    pos_mask = torch.tensor([[True] * p, [True] * 3 + [False] * (p - 3)])  # row 1: a padded prompt
    neg_mask = torch.tensor([[True] * n, [True] * (n - 1) + [False]])  # row 1: a shorter negative
    keep = torch.cat([pos_mask, neg_mask], dim=1)
    bias = ((~keep).double() * -10000.0)[:, None]  # what the transformer makes of encoder_attention_mask

    method = negguide.get_method("vsf")
    vsf = method(method.make_config({"scale": alpha, "bias": beta, "attention": path}))
    installation = Installation(pipe, allegro.AllegroAdapter(pipe), vsf, [NegativeSpec(NEG)])
    installation.forward = Forward(slice(0, batch), TextLayout(p, p + n), ((p, p + n),), (neg_mask,), (1.0,),
                                   pos_mask, None)  # fmt: skip
    proc = guided_processor(installation, attn.processor, 0, 2)
    with torch.no_grad():
        got = proc(attn, img, encoder_hidden_states=text, attention_mask=bias, image_rotary_emb=None)
        want = _vsf64(attn, img, text, keep, p, alpha, beta)
        blind = _vsf64(attn, img, text, torch.ones_like(keep), p, alpha, beta)
    tol = 1e-10 if path == "dense" else 1e-5  # the split path merges in float32
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert (blind - want).abs().max() > 1e-3  # the masks matter: a reference blind to them differs


def _vsf64(attn, img, text, keep, p, alpha, beta):
    def split(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k, v = split(attn.to_q(img)), split(attn.to_k(text)), split(attn.to_v(text))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits[..., p:] -= beta
    logits = logits.masked_fill(~keep[:, None, None, :], -math.inf)
    values = torch.cat([v[:, :, :p], -alpha * v[:, :, p:]], dim=2)
    return attn.to_out[0]((logits.softmax(-1) @ values).transpose(1, 2).flatten(2))


def test_cfg_equals_pipeline_cfg(pipe):
    """negguide's CFG (pipeline CFG off) runs the negative branch as Allegro's own CFG does: the same numbers."""
    own = run(pipe, guidance_scale=3.0, negative_prompt=NEG)
    with negguide.apply(pipe, "cfg", negative_prompt=NEG, scale=3.0, pm=PM):
        torch.testing.assert_close(run(pipe), own, atol=1e-6, rtol=0)
