"""HunyuanVideo (text-to-video, image-to-video, SkyReels-V1 image-to-video; double- then single-stream blocks).

Model facts owned here (those HunyuanVideo shares with 1.5 are stated once, in
``adapters/_hunyuan_video_family.py``), from diffusers 0.42.1 ``models/transformers/transformer_hunyuan_video.py``
and ``pipelines/hunyuan_video/pipeline_hunyuan_*.py``:

* the text is the LLaVA-Llama text encoder's third-last hidden state of the templated prompt, its
  first ``prompt_template["crop_start"]`` tokens dropped (95 for text-to-video, 103 for image-to-video
  with Llama-3's tokenizer), right-padded to ``max_sequence_length`` with ``encoder_attention_mask``
  (rows, L); CLIP gives only the pooled vector ``pooled_projections``, which conditions the timestep
  embedding of every block and stays the positive one for attention-level methods;
* the token refiner (``context_embedder``) refines the text (see the family module); the blocks then
  attend over ``[image, text]`` with a key mask that keeps the first ``L_image + sum(mask)`` tokens:
  ``transformer_blocks[i].attn`` (dual-stream) and ``single_transformer_blocks[j].attn``
  (single-stream) are guided, as blocks ``0 .. D-1`` and ``D .. D+S-1`` of ``layers``;
* HunyuanVideo is guidance-distilled: ``guidance_scale`` feeds a guidance embedding, not CFG. The
  pipelines run real CFG with ``true_cfg_scale > 1`` and a negative prompt as a second transformer
  call (inside ``cache_context("uncond")`` in ``HunyuanVideoPipeline``, without a context in the
  image-to-video pipelines): only the conditional call is guided;
* ``HunyuanVideoImageToVideoPipeline`` encodes the prompt with the input image through LLaVA and puts
  the image's ``ceil(image_emb_len / image_embed_interleave)`` tokens ahead of the prompt's tokens in the
  text stream (they are part of ``P``). A negative is encoded the same way, with the call's image, and
  keeps only its real prompt tokens (its image tokens dropped: VSF would otherwise flip the image's
  values). The pipeline's own CFG negative uses a black image, and so does CFG's. The image latents
  enter through the channels (``latent_concat``) or replace the first frame (``token_replace``);
  neither changes the text path. (The pipeline encodes one image for all prompts: one prompt per call.)
* ``HunyuanVideoFramepackTransformer3DModel`` (Framepack) is refused: it puts CLIP-vision tokens and
  history latents into the sequence itself.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_embed_dim)`` of refined-input
embeddings as ``encode_prompt`` returns its first output (attention-level methods use every given token:
pass only the real ones; image-to-video: without the image tokens), or a dict ``{"prompt_embeds": ...,
"prompt_attention_mask": (rows, n) or None, "pooled_prompt_embeds": (rows, pooled_projection_dim)}``
(``encode_prompt``'s outputs; CFG needs the pooled vector).
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import embeds_and_mask
from negguide.adapters._hunyuan_video_family import HunyuanVideoFamilyAdapter
from negguide.adapters._hunyuan_video_family import refined_negatives
from negguide.adapters._hunyuan_video_family import run_blocks
from negguide.adapters._hunyuan_video_family import unpatchify
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(HunyuanVideoAdapter)


class HunyuanVideoAdapter(HunyuanVideoFamilyAdapter):
    """Adapter for ``HunyuanVideoTransformer3DModel`` (HunyuanVideo T2V, I2V, SkyReels-V1 I2V)."""

    family = "hunyuanvideo"
    processor = "HunyuanVideoAttnProcessor2_0"
    batched_inputs = ("hidden_states", "timestep", "guidance")
    conditioning_inputs = {"encoder_hidden_states": "embeds", "encoder_attention_mask": "mask",
                           "pooled_projections": "pooled"}  # fmt: skip

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import HunyuanVideoFramepackTransformer3DModel
        from diffusers import HunyuanVideoTransformer3DModel

        return isinstance(denoiser, (HunyuanVideoTransformer3DModel, HunyuanVideoFramepackTransformer3DModel))

    def find_denoisers(self) -> list[torch.nn.Module]:
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        if isinstance(getattr(self.pipe, "transformer", None), HunyuanVideoFramepackTransformer3DModel):
            raise NoAdapterError(
                "hunyuanvideo: expected HunyuanVideoTransformer3DModel, got HunyuanVideoFramepackTransformer3DModel "
                "(Framepack puts image and history tokens into the sequence itself; not supported). Use "
                "HunyuanVideoPipeline or HunyuanVideoImageToVideoPipeline."
            )
        return super().find_denoisers()

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        args = call.arguments
        kwargs = {"prompt": [text], "prompt_2": None, "prompt_template": args["prompt_template"], "device": call.device,
                  "num_videos_per_prompt": 1, "max_sequence_length": args["max_sequence_length"]}  # fmt: skip
        image_tokens = 0
        if "image" in args and padded:  # image-to-video CFG: the pipeline's own negative (a black image)
            kwargs["image"] = _black(args["image"])  # and, as the pipeline, the default `image_embed_interleave`
        elif "image" in args:  # image-to-video: LLaVA encodes the prompt with the call's image
            kwargs.update(image=args["image"], image_embed_interleave=args["image_embed_interleave"])
            image_tokens = _image_tokens(args)
        embeds, pooled, mask = call.encode(**kwargs)
        if padded:  # as the pipeline encodes its own negative
            return Conditioning(embeds, mask.bool(), {"pooled": pooled})
        # Llama is causal and the padding is on the right: the real tokens are those of the prompt alone
        return Conditioning(embeds[:, image_tokens : int(mask[0].bool().sum())])

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        pooled = embeds.get("pooled_prompt_embeds") if isinstance(embeds, dict) else None
        hint = "Pass what `pipe.encode_prompt` returns (with `pooled_prompt_embeds` in the dict for CFG)."
        text, mask = embeds_and_mask("hunyuanvideo", embeds, "text_embed_dim", hint)
        if padded and pooled is None:
            raise NegativePromptError(
                "hunyuanvideo: CFG needs the negative's pooled CLIP vector too: pass negative_prompt_embeds="
                "{'prompt_embeds': ..., 'prompt_attention_mask': ..., 'pooled_prompt_embeds': ...}."
            )
        return Conditioning(text, mask, {} if pooled is None else {"pooled": pooled})

    # ------------------------------------------------------------------ the guided forward

    def positive_stream(self, kwargs: dict[str, Any]) -> tuple[int, torch.Tensor | None]:
        text, mask = kwargs[self.text_input], kwargs[self.text_mask_input]
        # the model keeps the first sum(mask) text tokens as keys, whatever the mask's order
        kept = torch.arange(text.shape[1], device=text.device)[None] < mask.sum(1, dtype=torch.int)[:, None]
        return text.shape[1], kept

    def guided_forward(
        self,
        model: torch.nn.Module,
        forward: Any,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Any:
        # HunyuanVideoTransformer3DModel.forward, the negatives refined alone and appended after the prompt
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        shape = hidden_states.shape
        first_frame = (shape[3] // model.config.patch_size) * (shape[4] // model.config.patch_size)
        rotary = model.rope(hidden_states)
        temb, token_replace_emb = model.time_text_embed(timestep, pooled_projections, guidance)
        hidden = model.x_embedder(hidden_states)
        prompt = model.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
        text = torch.cat([prompt, *refined_negatives(model.context_embedder, forward, timestep)], dim=1)
        # the model's key mask over [image, P, N_1, ...] (the guided attention uses the core's, the same keys)
        keys = [torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device), forward.pos_mask]
        keys += [torch.ones(shape[0], b - a, dtype=torch.bool, device=hidden.device) if m is None else m
                 for (a, b), m in zip(forward.spans, forward.masks)]  # fmt: skip
        mask = torch.cat(keys, dim=1)[:, None, None, :]
        args = (temb, mask, rotary, token_replace_emb, first_frame)
        hidden, text = run_blocks(model, model.transformer_blocks, hidden, text, *args)
        hidden, text = run_blocks(model, model.single_transformer_blocks, hidden, text, *args)
        out = unpatchify(model, hidden, temb, shape)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _image_tokens(arguments: dict[str, Any]) -> int:
    """The image tokens ``HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds`` puts ahead of the prompt."""
    template = arguments["prompt_template"]
    count = template.get("image_emb_end", 581) - template.get("image_emb_start", 5)
    interleave = arguments.get("image_embed_interleave") or 1
    return -(-count // interleave) if 0 < interleave < 6 else count


def _black(image: Any) -> Any:
    """A black image like the one the image-to-video pipeline encodes its own negative prompt with."""
    from PIL import Image

    size = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    return Image.new("RGB", size, 0)
