"""HunyuanVideo 1.5 (text-to-video, image-to-video; dual-stream joint attention in every block).

Model facts owned here (those 1.5 shares with HunyuanVideo are stated once, in
``adapters/_hunyuan_video_family.py``), from diffusers 0.42.1
``models/transformers/transformer_hunyuan_video15.py`` and ``pipelines/hunyuan_video1_5/pipeline_*.py``:

* three token streams enter ``forward``: the Qwen2.5-VL text encoder's third-last hidden state of the
  chat-templated prompt (``encoder_hidden_states``, the system part's first 108 tokens dropped,
  right-padded to 1000 tokens, ``encoder_attention_mask``), the ByT5 encoding of the prompt's quoted
  text (``encoder_hidden_states_2``, 256 tokens, ``encoder_attention_mask_2``; all padding when the
  prompt quotes nothing) and SigLIP image tokens (``image_embeds``; zeros and masked for text-to-video).
  Qwen's tokens go through the token refiner (``context_embedder``), ByT5's and the image's through
  per-token projections; each gets a type embedding (``cond_type_embed`` 0, 1, 2). ``forward`` then
  reorders each row as [valid image, valid ByT5, valid Qwen, invalid image, invalid ByT5 (zeros),
  invalid Qwen (zeros)]: that is the prompt's text stream ``P``, its key mask the valid prefix. The
  timestep embedding sees no text;
* the negatives are carried by the Qwen stream only: each is encoded by the pipeline's own
  ``encode_prompt`` alone, cut to its real tokens, refined alone and typed as Qwen tokens, and appended
  after ``P``. A negative's quoted text is read by Qwen but not by ByT5 (the glyph stream stays the
  prompt's; a warning says so);
* every ``transformer_blocks[i].attn`` (``HunyuanVideo15AttnProcessor2_0``) attends over
  ``[image, text]``; the model masks text padding as keys and as queries (``mask_i & mask_j``): padding
  outputs are never read, so the guided call masks the same keys only;
* the pipelines' CFG is the ``guider`` component (any diffusers guider): each branch is a separate
  transformer call after ``guider.prepare_models`` and inside ``cache_context(<the branch's name>)``
  (``"pred_cond"``, ``"pred_uncond"``, and a guider's own, e.g. ``"pred_cond_skip"``; the guider runs one
  call when CFG is off: ``guidance_scale=1``, the step-distilled checkpoints' use, or outside its
  ``start``/``stop``). Every call but ``pred_uncond`` is guided (the core reads the context name). The
  pipelines' default negative is the empty prompt.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_embed_dim)`` of Qwen embeddings as
``encode_prompt`` returns its first output (attention-level methods use every given token: pass only the
real ones), or a dict ``{"prompt_embeds": ..., "prompt_embeds_mask": (rows, n) or None,
"prompt_embeds_2": ..., "prompt_embeds_mask_2": ...}`` (``encode_prompt``'s four outputs; CFG needs the ByT5 pair).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapters._hunyuan_video_family import HunyuanVideoFamilyAdapter
from negguide.adapters._hunyuan_video_family import refined_negatives
from negguide.adapters._hunyuan_video_family import run_blocks
from negguide.adapters._hunyuan_video_family import unpatchify
from negguide.errors import NegativePromptError
from negguide.errors import warn


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(HunyuanVideo15Adapter)


class HunyuanVideo15Adapter(HunyuanVideoFamilyAdapter):
    """Adapter for ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5 T2V and I2V, step-distilled included)."""

    family = "hunyuanvideo15"
    processor = "HunyuanVideo15AttnProcessor2_0"
    # the guider's branches are separate calls, the unconditional one inside cache_context("pred_uncond")
    pipeline_cfg = "separate"
    batched_inputs = ("hidden_states", "timestep", "timestep_r", "image_embeds")
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_attention_mask": "mask",
                           "encoder_hidden_states_2": "byt5", "encoder_attention_mask_2": "byt5_mask"}  # fmt: skip

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import HunyuanVideo15Transformer3DModel

        return isinstance(denoiser, HunyuanVideo15Transformer3DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        embeds, mask, embeds_2, mask_2 = call.encode(prompt=[text], device=call.device, dtype=call.dtype, batch_size=1,
                                                     num_videos_per_prompt=1)  # fmt: skip
        if padded:  # as the pipeline encodes its own negative, the ByT5 glyph stream included
            return Conditioning(embeds, mask.bool(), {"byt5": embeds_2, "byt5_mask": mask_2})
        if bool(mask_2.bool().any()):
            warn(
                f"negguide: the negative {text!r} quotes text, which HunyuanVideo 1.5 also spells out for its glyph "
                "(ByT5) stream; attention-level methods guide with its Qwen tokens only (its meaning, not the "
                "quoted glyphs). Use 'cfg' to guide with both streams."
            )
        # Qwen is causal: the real tokens of the prompt alone, its padding dropped
        return Conditioning(embeds[0][mask[0].bool()][None])

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        mask, extras = None, {}
        if isinstance(embeds, dict):
            mask = embeds.get("prompt_embeds_mask")
            if embeds.get("prompt_embeds_2") is not None and embeds.get("prompt_embeds_mask_2") is not None:
                extras = {"byt5": embeds["prompt_embeds_2"], "byt5_mask": embeds["prompt_embeds_mask_2"]}
            embeds = embeds.get("prompt_embeds")
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            got = (
                f"a tensor of shape {tuple(embeds.shape)}"
                if isinstance(embeds, torch.Tensor)
                else type(embeds).__name__
            )
            raise NegativePromptError(
                "hunyuanvideo15: expected `negative_prompt_embeds` as a (rows, tokens, text_embed_dim) tensor or a "
                "dict with `prompt_embeds`, `prompt_embeds_mask`, `prompt_embeds_2`, `prompt_embeds_mask_2`, "
                f"got {got}."
            )
        if padded and not extras:
            raise NegativePromptError(
                "hunyuanvideo15: CFG needs the negative's ByT5 embeddings too: pass negative_prompt_embeds={"
                "'prompt_embeds': ..., 'prompt_embeds_mask': ..., 'prompt_embeds_2': ..., 'prompt_embeds_mask_2': ...}."
            )
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise NegativePromptError(
                f"hunyuanvideo15: expected `prompt_embeds_mask` of shape {tuple(embeds.shape[:2])}, got "
                f"{tuple(mask.shape)}. Pass the mask `pipe.encode_prompt` returns with the embeddings."
            )
        return Conditioning(embeds, None if mask is None else mask.bool(), extras)

    # ------------------------------------------------------------------ the guided forward

    def positive_stream(self, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor | None]:
        mask, mask_2, image = (kwargs.get(k) for k in ("encoder_attention_mask", "encoder_attention_mask_2",
                                                        "image_embeds"))  # fmt: skip
        if mask_2 is None or image is None:
            raise NegativePromptError(
                "hunyuanvideo15: expected the transformer's inputs `encoder_attention_mask_2` and `image_embeds` (the "
                "pipelines pass them), got None. Call the transformer as HunyuanVideo15Pipeline does."
            )
        length = mask.shape[1] + mask_2.shape[1] + image.shape[1]
        valid = mask.bool().sum(1) + mask_2.bool().sum(1) + torch.where(torch.all(image == 0), 0, image.shape[1])
        return length, torch.arange(length, device=mask.device)[None] < valid[:, None]

    def guided_forward(
        self,
        model: torch.nn.Module,
        forward: Any,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        timestep_r: torch.Tensor | None = None,
        encoder_hidden_states_2: torch.Tensor | None = None,
        encoder_attention_mask_2: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Any:
        # HunyuanVideo15Transformer3DModel.forward, the negatives refined alone and appended after the prompt
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        def typed(x: torch.Tensor, kind: int) -> torch.Tensor:
            return x + model.cond_type_embed(torch.full(x.shape[:2], kind, dtype=torch.long, device=x.device))

        shape = hidden_states.shape
        rotary = model.rope(hidden_states)
        temb = model.time_embed(timestep, timestep_r=timestep_r)
        hidden = model.x_embedder(hidden_states)
        qwen = typed(model.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask), 0)
        byt5 = typed(model.context_embedder_2(encoder_hidden_states_2), 1)
        t2v = torch.all(image_embeds == 0)
        image = typed(torch.where(t2v, 0.0, 1.0) * model.image_embedder(image_embeds), 2)
        m1, m2 = encoder_attention_mask.bool(), encoder_attention_mask_2.bool()
        m3 = (~t2v).expand(image.shape[:2])
        # the model's order, as a stable sort: valid [image, ByT5, Qwen] tokens, then the invalid ones (ByT5's and
        # Qwen's zeroed)
        stream = torch.cat([image, byt5 * m2[..., None], qwen * m1[..., None]], dim=1)
        mask = torch.cat([m3, m2, m1], dim=1)
        order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
        stream = stream.gather(1, order[..., None].expand_as(stream))
        negatives = [typed(n, 0) for n in refined_negatives(model.context_embedder, forward, timestep)]
        masks = [mask.gather(1, order)]
        masks += [torch.ones(n.shape[:2], dtype=torch.bool, device=n.device) if m is None else m
                  for n, m in zip(negatives, forward.masks)]  # fmt: skip
        text = torch.cat([stream, *negatives], dim=1)
        hidden, _ = run_blocks(model, model.transformer_blocks, hidden, text, temb, torch.cat(masks, 1), rotary)
        out = unpatchify(model, hidden, temb, shape)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
