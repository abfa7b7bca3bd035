"""Kandinsky 5 (video and image DiT: visual self-attention, text cross-attention, a text encoder stack inside).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_kandinsky.py`` and
``pipelines/kandinsky5/pipeline_kandinsky{,_i2v,_t2i,_i2i}.py``):

* ``Kandinsky5Transformer3DModel.forward(hidden_states, encoder_hidden_states, timestep,
  pooled_projections, visual_rope_pos, text_rope_pos, ...)``: ``encoder_hidden_states`` is the
  Qwen2.5-VL encoder's last hidden state of the chat-templated prompt with the template's first
  ``prompt_template_encode_start_idx`` tokens dropped, ``(rows, P, 3584)``; several prompts are
  right-padded to the longest and the model attends the padding (it has no text mask; the
  pipelines' ``cu_seqlens`` only set ``text_rope_pos = arange(P)``). ``pooled_projections`` is
  CLIP's pooled vector and is added to the timestep embedding, which modulates every block;
* the text is refined inside the denoiser before the image sees it: ``text_embeddings`` (per
  token: Linear, LayerNorm), then ``text_transformer_blocks`` (``Kandinsky5TransformerEncoderBlock``:
  self-attention across the text tokens with the 1-D rotary embedding of ``text_rope_pos``, a
  feed-forward, both modulated by the time+pooled embedding);
* the image tokens meet the text only in ``visual_transformer_blocks[i].cross_attention``
  (``Kandinsky5AttnProcessor``, ``__call__(attn, hidden_states, encoder_hidden_states=None,
  rotary_emb=None, sparse_params=None)``: ``to_query``/``to_key``/``to_value``, per-head RMS norms
  ``query_norm``/``key_norm`` in float32, no rotary embedding, no mask, the default scale,
  ``out_layer``); the visual self-attention (optionally NABLA-sparse) never sees the text;
* the pipelines' own CFG (``guidance_scale > 1``, on by default at 5.0) runs the negative prompt as a
  second, separate forward of the step with its own text, pooled vector and ``text_rope_pos``: it is
  left unguided. Distilled and no-CFG checkpoints are the same classes run with ``guidance_scale=1``;
* ``Kandinsky5T2VPipeline`` does not pass ``num_videos_per_prompt`` to ``encode_prompt``: its text
  has one row per prompt, broadcast over the videos (the guided forward repeats it per video);
  ``Kandinsky5I2IPipeline`` puts its input image into the Qwen prompt as vision tokens, so a
  negative is encoded with the call's image (one image per call).

Attention-level methods (cross layout, ``[P ; N_1 ; ...]``): each negative is encoded alone by the
pipeline's own ``encode_prompt`` (one prompt is never padded: its real tokens only, the pooled
CLIP vector beside them) and appended to ``encoder_hidden_states``; ``text_rope_pos`` is extended
with ``0..n_i-1`` per negative. The text blocks would mix the negatives into the prompt, so each
``text_transformer_blocks[j].forward`` is patched: it refines the prompt's tokens exactly as
unpatched and each negative alone, at text positions ``0..n_i-1``, under its own time+pooled
embedding (the positive's when the user gave no pooled vector), each row's real tokens only.
Nothing of a negative reaches the positive path outside the guided cross-attention.

Prediction-level methods (CFG) run the negative batched beside the prompt: the model attends every
text token, so a negative shorter than the prompt is zero-padded to its length (then not the
pipeline's own CFG, which runs it unpadded) and a longer one is refused; with T2V's several videos
per prompt the prompt's text rows are fewer than the batch, which the batched branch cannot join.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, 3584)`` of Qwen embeddings as
``encode_prompt`` returns them first (every given token is used), or a dict ``{"prompt_embeds_qwen":
..., "prompt_embeds_clip": (rows, 768)}``; CFG needs the CLIP vector.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import merge_heads
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(Kandinsky5Adapter)


class Kandinsky5Adapter(CrossAttentionAdapter):
    """Adapter for ``Kandinsky5Transformer3DModel`` (Kandinsky 5 T2V, I2V, T2I, I2I pipelines)."""

    family = "kandinsky5"
    num_per_prompt_arg = "num_videos_per_prompt"
    pad_text_with_zeros = True
    conditioning_inputs = {"encoder_hidden_states": "embeds", "pooled_projections": "pooled"}

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        params = inspect.signature(pipe.encode_prompt).parameters if hasattr(pipe, "encode_prompt") else {}
        if "num_images_per_prompt" in params:  # the image pipelines
            self.num_per_prompt_arg = "num_images_per_prompt"
        denoiser = getattr(pipe, "transformer", None)
        blocks = len(getattr(denoiser, "text_transformer_blocks", ()))
        #: every text encoder block: each refines the prompt and each negative apart
        self.patched_methods = tuple(f"text_transformer_blocks.{j}.forward" for j in range(blocks))

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import Kandinsky5Transformer3DModel

        return isinstance(denoiser, Kandinsky5Transformer3DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        arguments = {k: v for k, v in call.arguments.items() if k in ("max_sequence_length", "image")}
        if "image" in arguments and isinstance(arguments["image"], (list, tuple)) and len(arguments["image"]) > 1:
            raise NegativePromptError(
                f"{self.family}: the image-to-image pipeline encodes its input image with the prompt, so a negative "
                f"depends on the image; expected one input image, got {len(arguments['image'])}. Call the pipeline "
                "once per image."
            )
        # one prompt is never padded: these are the negative's real tokens, as the pipeline's own CFG encodes it
        qwen, clip, _ = call.encode(prompt=[text], **arguments, device=call.device, dtype=call.dtype)
        if padded and qwen.shape[1] > self.positive(call.output).shape[1]:
            raise NegativePromptError(
                f"{self.family}: Kandinsky 5 attends every text token (it has no text mask), so CFG runs the negative "
                f"batched at the prompt's length: expected at most {self.positive(call.output).shape[1]} negative "
                f"tokens, got {qwen.shape[1]} for {text!r}. Use the pipeline's own CFG (negative_prompt=..., "
                "guidance_scale > 1) or an attention-level method."
            )
        return Conditioning(qwen[:1], extras={"pooled": clip[:1]})

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        pooled = None
        if isinstance(embeds, dict):
            pooled = embeds.get("prompt_embeds_clip")
            embeds = embeds.get("prompt_embeds_qwen")
        width = self.pipe.transformer.config.in_text_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"{self.family}: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor of Qwen "
                f"embeddings or a dict with `prompt_embeds_qwen` and `prompt_embeds_clip`, got {got}. Encode it "
                "with `pipe.encode_prompt`."
            )
        return Conditioning(embeds, extras={} if pooled is None else {"pooled": pooled})

    # ------------------------------------------------------------------ joining the negatives

    def join_negatives(self, kwargs: dict[str, Any], negatives: list[Conditioning]) -> Joined:
        text, batch = kwargs[self.text_input], negatives[0].embeds.shape[0]
        if text.shape[0] != batch and batch % text.shape[0] == 0:
            # Kandinsky5T2VPipeline with num_videos_per_prompt > 1 passes one text row per prompt (broadcast)
            kwargs = {**kwargs, self.text_input: text.repeat_interleave(batch // text.shape[0], dim=0)}
        joined = super().join_negatives(kwargs, negatives)
        positions = kwargs["text_rope_pos"]
        if positions.shape[0] != kwargs[self.text_input].shape[1]:
            raise NegGuideError(
                f"{self.family}: expected `text_rope_pos` with one position per prompt token "
                f"({kwargs[self.text_input].shape[1]}), got {positions.shape[0]}."
            )
        out = dict(joined.kwargs)
        # each negative at text positions 0..n_i-1, like a prompt of its own
        out["text_rope_pos"] = torch.cat(
            [positions, *(torch.arange(c.num_tokens, dtype=positions.dtype, device=positions.device)
                          for c in negatives)])  # fmt: skip
        # each negative's time embedding, computed as forward does with its own pooled CLIP vector
        model = self.pipe.transformer
        time = model.time_embeddings(kwargs["timestep"])
        embeds = tuple(
            None if "pooled" not in c.extras else time + model.pooled_text_embeddings(c.extras["pooled"])
            for c in negatives
        )
        return dataclasses.replace(joined, kwargs=out, carry=embeds)

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        x, time_embed, rope = inspect.signature(original).bind(*args, **kwargs).args
        p = forward.text.num_pos
        parts = [original(x[:, :p], time_embed, rope[:, :p])]
        for (a, b), mask, own in zip(forward.spans, forward.masks, forward.carry):
            embed = time_embed if own is None else own
            if mask is None:
                parts.append(original(x[:, a:b], embed, rope[:, a:b]))
                continue
            out = x[:, a:b].clone()
            for row in range(x.shape[0]):  # a padded negative: each row's real tokens alone
                real = mask[row].nonzero().flatten()
                if real.numel():
                    got = original(x[row : row + 1, a + real], embed[row : row + 1], rope[:, a : a + real.numel()])
                    out[row, real] = got[0]
            parts.append(out)
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

        modules = {}
        for i, block in enumerate(denoiser.visual_transformer_blocks):
            processor = block.cross_attention.processor
            if type(processor) is not Kandinsky5AttnProcessor:
                raise NoAdapterError(
                    f"{self.family}: expected Kandinsky5AttnProcessor in visual block {i}'s cross-attention, got "
                    f"{type(processor).__name__}. Restore it with `block.cross_attention.set_processor("
                    "Kandinsky5AttnProcessor())` or use 'cfg'."
                )
            modules[f"visual_transformer_blocks.{i}.cross_attention.processor"] = i
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        rotary_emb: Any = None,
        sparse_params: Any = None,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None  # a self-attention call: not ours
        if rotary_emb is not None or sparse_params is not None:
            raise NegGuideError(
                f"{self.family}: expected the text cross-attention without a rotary embedding or sparse "
                "parameters (Kandinsky 5 never passes them there), got some."
            )
        q = attn.to_query(hidden_states).unflatten(-1, (attn.num_heads, -1))
        k = attn.to_key(encoder_hidden_states).unflatten(-1, (attn.num_heads, -1))
        v = attn.to_value(encoder_hidden_states).unflatten(-1, (attn.num_heads, -1))
        q = attn.query_norm(q.float()).type_as(q)
        k = attn.key_norm(k.float()).type_as(k)
        return Projected(QKV(q.transpose(1, 2), None, None), QKV(None, k.transpose(1, 2), v.transpose(1, 2)))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        return attn.out_layer(merge_heads(image, projected.image.q.dtype))  # type: ignore[union-attr]
