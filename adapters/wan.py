"""Wan 2.1 / 2.2 (video DiT, text through cross-attention).

Model facts owned here:

* text enters every block through the cross-attention ``blocks[i].attn2`` only (self-attention
  ``attn1`` never sees it); ``encoder_hidden_states`` is the raw UMT5 output ``(B, P, text_dim)``,
  zero-padded to ``max_sequence_length``, and the transformer's text embedder is per token, so the
  negative's raw UMT5 tokens, encoded without padding, are appended after it: ``[P, N]``;
* image-to-video (Wan 2.1 I2V/FLF2V, ``image_dim`` set): the transformer embeds
  ``encoder_hidden_states_image`` and puts it *ahead* of the text, so ``attn2`` sees
  ``[image_ctx, P, N]``. ``WanAttnProcessor`` hard-codes ``image_context_length = total - 512``;
  the guided processor uses ``total - P - N`` and computes the image-context attention exactly
  like the original (``add_k_proj``/``add_v_proj``, ``norm_added_k``, unguided), added to the
  guided text attention;
* VACE (``WanVACETransformer3DModel``): the control blocks ``vace_blocks[j].attn2`` see the same
  context; they are patched too, as block ``vace_layers[j]`` (the block their hint is added to);
* Wan 2.2 A14B has a second expert ``pipe.transformer_2`` (low noise): both are patched and
  restored; TI2V-5B (``expand_timesteps``) passes a ``(B, seq)`` timestep;
* the pipeline's own CFG runs a separate forward inside ``cache_context("uncond")``: that
  forward is left unguided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_dim)`` of raw UMT5
embeddings as ``encode_prompt`` returns them. Attention-level methods use every given token
(trim the zero padding yourself if you do not want the model to see it); prediction-level
methods (CFG) zero-pad a shorter tensor to the positive's length, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import GuidedProcessor
from negguide.adapter import Negative
from negguide.adapter import rows_for_call
from negguide.adapter import stack_negatives
from negguide.attention import sdpa
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.method import Segments

#: per-row inputs of the transformer beside ``hidden_states`` (a row may own several entries:
#: FLF2V passes two images per row)
_ROW_INPUTS = ("encoder_hidden_states_image", "control_hidden_states")


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(WanAdapter)


class WanAdapter(CrossAttentionAdapter):
    """Adapter for ``WanTransformer3DModel`` (Wan 2.1/2.2 T2V, I2V, FLF2V, TI2V) and ``WanVACETransformer3DModel``."""

    family = "wan"
    num_per_prompt_arg = "num_videos_per_prompt"

    @classmethod
    def matches(cls, transformer: Any) -> bool:
        from diffusers import WanTransformer3DModel
        from diffusers import WanVACETransformer3DModel

        return isinstance(transformer, (WanTransformer3DModel, WanVACETransformer3DModel))

    def transformers(self) -> list[torch.nn.Module]:
        found: list[torch.nn.Module] = []
        for name in ("transformer", "transformer_2"):
            module = getattr(self.pipe, name, None)
            if module is not None and all(module is not f for f in found):
                found.append(module)
        return found

    def _text_dim(self) -> int:
        return self.transformers()[0].config.text_dim

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, prompts: list[str], call: EncodeCall, encode: Callable[..., Any]) -> Negative:
        msl = int(call.arguments.get("max_sequence_length") or 512)
        if self.method.level == "prediction":
            embeds, _ = encode(
                prompt=prompts,
                negative_prompt=None,
                do_classifier_free_guidance=False,
                num_videos_per_prompt=call.num_per_prompt,
                max_sequence_length=msl,
                device=call.device,
                dtype=call.dtype,
            )
            return Negative(embeds.to(device=call.device, dtype=call.dtype))
        rows = [self._encode_unpadded(p, msl, call) for p in prompts]
        return stack_negatives(rows, call)

    def _encode_unpadded(self, prompt: str, msl: int, call: EncodeCall) -> torch.Tensor:
        if not prompt.strip():
            return torch.zeros(1, 0, self._text_dim(), device=call.device, dtype=call.dtype)
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        pipe = self.pipe
        # count the real tokens exactly as `_get_t5_prompt_embeds` tokenizes (cleaned text, eos included)
        n = len(pipe.tokenizer(prompt_clean(prompt), truncation=True, max_length=msl).input_ids)
        return pipe._get_t5_prompt_embeds(
            prompt=[prompt], num_videos_per_prompt=1, max_sequence_length=n, device=call.device, dtype=call.dtype
        )

    def negative_from_embeds(self, embeds: Any, call: EncodeCall) -> Negative:
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != self._text_dim():
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"wan: expected `negative_prompt_embeds` as a (rows, tokens, {self._text_dim()}) tensor of UMT5 "
                f"embeddings, got {got}. Encode it with `pipe.encode_prompt(..., do_classifier_free_guidance=False)`."
            )
        return Negative(rows_for_call(embeds, call).to(device=call.device, dtype=call.dtype))

    # ------------------------------------------------------------------ prediction level

    def negative_inputs(self, kwargs: dict[str, Any], rows: slice, neg: Negative) -> dict[str, Any]:
        hidden = kwargs["hidden_states"]
        text = kwargs["encoder_hidden_states"]
        batch, n = hidden.shape[0], rows.stop - rows.start
        embeds = self.repeat_rows(neg.embeds, n).to(device=text.device, dtype=text.dtype)
        if embeds.shape[1] > text.shape[1]:
            raise NegativePromptError(
                f"wan: the negative embeddings have {embeds.shape[1]} tokens, the positive ones {text.shape[1]}. "
                "Pass `negative_prompt_embeds` no longer than the call's `max_sequence_length`."
            )
        if embeds.shape[1] < text.shape[1]:  # Wan pads its text with zeros: do the same
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, text.shape[1] - embeds.shape[1]))
        out = {"hidden_states": hidden[rows], "encoder_hidden_states": embeds}
        timestep = kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim >= 1 and timestep.shape[0] == batch:
            out["timestep"] = timestep[rows]  # (B,) or (B, seq) for Wan 2.2 TI2V
        for key in _ROW_INPUTS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] % batch == 0:
                per_row = value.shape[0] // batch
                out[key] = value[rows.start * per_row : rows.stop * per_row]
        return out

    # ------------------------------------------------------------------ attention level

    def attention_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        layers = {f"blocks.{i}.attn2.processor": i for i in range(len(transformer.blocks))}
        vace_layers = getattr(transformer.config, "vace_layers", None) or ()
        for j, _ in enumerate(getattr(transformer, "vace_blocks", ())):
            layers[f"vace_blocks.{j}.attn2.processor"] = int(vace_layers[j])
        return layers

    def num_layers(self, transformer: torch.nn.Module) -> int:
        return len(transformer.blocks)

    def make_processor(self, original: Any, index: int, num_layers: int) -> Any:
        return WanGuidedProcessor(self, original, index, num_layers)

    def extend_inputs(self, kwargs: dict[str, Any], neg: Negative) -> dict[str, Any]:
        text = kwargs["encoder_hidden_states"]
        full, mask = self.negative_rows(neg, text.shape[0], text.dtype, text.device)
        self.state.num_pos = text.shape[1]
        self.state.neg_mask = mask
        return {**kwargs, "encoder_hidden_states": torch.cat([text, full], dim=1)}


class WanGuidedProcessor(GuidedProcessor):
    """Cross-attention of one Wan block with the negative context split out for the method.

    Keeps ``WanAttnProcessor``'s calling convention; delegates to the original processor
    whenever no negative is in the context (unguided forwards are bit-identical).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        state = self.adapter.state
        if not state.active or encoder_hidden_states is None or rotary_emb is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise NegGuideError(
                "wan: the guided cross-attention got an `attention_mask`, which Wan blocks never pass; "
                "expected None. Remove the guidance (negguide.remove(pipe)) to use a custom mask."
            )
        context = encoder_hidden_states
        image_context = None
        if attn.add_k_proj is not None:
            # the image context is ahead of the text: [image_ctx, P, N] (not `total - 512` any more)
            n_image = context.shape[1] - state.num_pos - state.num_neg
            image_context, context = context[:, :n_image], context[:, n_image:]

        q, k, v = _qkv(attn, hidden_states, context)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        p = state.num_pos
        seg = Segments(
            "cross",
            q_img=q, k_img=None, v_img=None,
            q_pos=None, k_pos=k[:, :, :p], v_pos=v[:, :, :p],
            q_neg=None, k_neg=k[:, :, p:], v_neg=v[:, :, p:],
            neg_mask=state.neg_mask,
        )  # fmt: skip
        out = self.adapter.run_method(seg, self.index, self.num_layers, self.layer_guided).img
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        if image_context is not None:
            out = out + _image_attention(attn, q, image_context)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _qkv(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``_get_qkv_projections`` of diffusers' Wan for a cross-attention (fused K/V included)."""
    query = attn.to_q(hidden_states)
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    return query, key, value


def _image_attention(attn: Any, q: torch.Tensor, image_context: torch.Tensor) -> torch.Tensor:
    """The unguided attention of the video queries ``q`` (B, H, L, D) over the image context, ``(B, L, H * D)``."""
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_added_kv(image_context).chunk(2, dim=-1)
    else:
        key, value = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
    key = attn.norm_added_k(key)
    k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (key, value))
    return sdpa(q, k, v).transpose(1, 2).flatten(2, 3).type_as(q)
