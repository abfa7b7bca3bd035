"""Flux.1 (dev, schnell, Kontext; MMDiT with double- and single-stream blocks, text first).

Model facts owned here:

* text enters as ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)`` = the T5 tokens
  (CLIP only gives the pooled vector ``pooled_projections``); the text position ids ``txt_ids``
  ``(L, 3)`` are zeros, so the rotary embedding treats every text token alike;
* attention-level methods: the forward pre-hook appends the negative tokens to the text stream
  (``[P, N]``, encoded without padding: T5 at exactly the real token count) and as many zero rows
  to ``txt_ids`` (also the deprecated ``(rows, L, 3)`` form); the pooled vector stays the positive
  one. Every attention then runs over ``[P, N, I]``, text first;
* double-stream blocks ``transformer_blocks[i].attn`` project text and image separately
  (``to_out`` on the image, ``to_add_out`` on the text); single-stream blocks
  ``single_transformer_blocks[j].attn`` get the whole ``[text, image]`` sequence and return its
  attention output without projection. Both kinds are guided; for ``layers`` the double blocks
  are ``0 .. D-1`` and the single blocks ``D .. D+S-1``;
* Flux Kontext appends the conditioning image's tokens to the image tokens: everything after
  the text is ``I``;
* the pipeline's own true CFG (``true_cfg_scale > 1`` with a negative prompt) runs the
  unconditional branch as a separate transformer call, inside ``cache_context("uncond")`` in
  ``FluxPipeline`` and without a context in Kontext, img2img, inpaint and ControlNet: a second
  call in the same denoising step with a different text tensor is that branch. Only the
  conditional call is guided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns its first output (attention-level methods use every given token, so
pass only real tokens), or a dict ``{"prompt_embeds": ..., "pooled_prompt_embeds": (1 or prompts
or rows, pooled_projection_dim)}``. Prediction-level methods (CFG) need the pooled vector and run
the negative branch batched beside the positive one, so its ``n`` must equal the positive token
count (the call's ``max_sequence_length``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import EncodeCall
from negguide.adapter import GuidedProcessor
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Negative
from negguide.adapter import rows_for_call
from negguide.adapter import stack_negatives
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError
from negguide.method import GuidanceMethod
from negguide.method import Segments


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(FluxAdapter)


class FluxAdapter(JointAttentionAdapter):
    """Adapter for ``FluxTransformer2DModel`` (Flux.1 dev/schnell, Kontext, img2img, inpaint, ControlNet)."""

    family = "flux"

    def __init__(
        self,
        pipe: Any,
        method: GuidanceMethod,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: Any = None,
    ) -> None:
        super().__init__(pipe, method, negative_prompt, negative_prompt_embeds)
        self._last_forward: tuple[Any, weakref.ref[torch.Tensor] | None] | None = None
        self._second_branch = False

    @classmethod
    def matches(cls, transformer: Any) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(transformer, FluxTransformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, prompts: list[str], call: EncodeCall, encode: Callable[..., Any]) -> Negative:
        args = call.arguments
        if self.method.level == "prediction":
            # as the pipeline encodes its own negative, at the positive's length (batched beside it)
            embeds, pooled, _ = encode(
                prompt=prompts,
                prompt_2=None,
                device=call.device,
                num_images_per_prompt=call.num_per_prompt,
                max_sequence_length=call.output[0].shape[1],
                lora_scale=args.get("lora_scale"),
            )
            return Negative(embeds.to(call.dtype), extras={"pooled": pooled})
        msl = int(args.get("max_sequence_length") or 512)
        rows = [self._encode_unpadded(p, msl, call) for p in prompts]
        return stack_negatives(rows, call)

    def _encode_unpadded(self, prompt: str, msl: int, call: EncodeCall) -> torch.Tensor:
        pipe = self.pipe
        width = pipe.transformer.config.joint_attention_dim
        if not prompt.strip():
            return torch.zeros(1, 0, width, device=call.device, dtype=call.dtype)
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            raise NegativePromptError(
                "flux: expected the pipeline's T5 encoder (`text_encoder_2`) to encode the negative prompt, got None. "
                "Pass negative_prompt_embeds instead."
            )
        text = prompt
        convert = getattr(pipe, "maybe_convert_prompt", None)
        if convert is not None:  # textual inversion tokens, as _get_t5_prompt_embeds does
            text = convert([prompt], pipe.tokenizer_2)[0]
        n_t5 = len(pipe.tokenizer_2(text, truncation=True, max_length=msl).input_ids)
        # T5 attends to every token: encoding at exactly the real length means no padding at all
        embeds = pipe._get_t5_prompt_embeds(
            prompt=[prompt], num_images_per_prompt=1, max_sequence_length=n_t5, device=call.device
        )
        return embeds.to(call.dtype)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall) -> Negative:
        embeds, pooled = self.split_negative_embeds(embeds)
        if self.method.level == "prediction":
            length = call.output[0].shape[1]
            if embeds.shape[1] != length:
                raise NegativePromptError(
                    f"flux: CFG runs the negative branch batched beside the positive one, so it expected "
                    f"{length} negative tokens (the positive's), got {embeds.shape[1]}. Encode the negative with "
                    "the same `max_sequence_length`."
                )
        embeds = rows_for_call(embeds, call).to(device=call.device, dtype=call.dtype)
        extras = {} if pooled is None else {"pooled": rows_for_call(pooled, call).to(device=call.device)}
        return Negative(embeds, extras=extras)

    # ------------------------------------------------------------------ which branch is this forward

    def _on_encode(self, arguments: dict[str, Any], output: Any, original: Callable[..., Any]) -> None:
        self._last_forward = None  # a pipeline call starts by encoding its prompt
        super()._on_encode(arguments, output, original)

    def _before_forward(self, kwargs: dict[str, Any], context: str | None) -> dict[str, Any]:
        text = kwargs.get("encoder_hidden_states")
        step = getattr(self.pipe.scheduler, "step_index", None)
        last = self._last_forward
        previous_text = None if last is None or last[1] is None else last[1]()
        self._second_branch = last is not None and last[0] == step and text is not None and previous_text is not text
        self._last_forward = (step, None if text is None else weakref.ref(text))
        return super()._before_forward(kwargs, context)

    def uncond_rows(self, kwargs: dict[str, Any], context: str | None) -> slice | None:
        if context is None and self._second_branch:
            return slice(None)  # true CFG without cache_context: the second call of a step is the negative
        return super().uncond_rows(kwargs, context)

    def remove(self) -> None:
        super().remove()
        self._last_forward = None
        self._second_branch = False

    # ------------------------------------------------------------------ prediction level

    def negative_inputs(self, kwargs: dict[str, Any], rows: slice, neg: Negative) -> dict[str, Any]:
        n = rows.stop - rows.start
        text = kwargs["encoder_hidden_states"]
        embeds = self.repeat_rows(neg.embeds, n).to(device=text.device, dtype=text.dtype)
        if embeds.shape[1] != text.shape[1]:
            raise NegativePromptError(
                f"flux: CFG expected {text.shape[1]} negative tokens (as many as the positive ones, they share "
                f"`txt_ids`), got {embeds.shape[1]}. Use the same `max_sequence_length` for both."
            )
        pooled = kwargs["pooled_projections"]
        out = {
            "hidden_states": kwargs["hidden_states"][rows],
            "timestep": kwargs["timestep"][rows],
            "encoder_hidden_states": embeds,
            "pooled_projections": self.repeat_rows(neg.extras["pooled"], n).to(
                device=pooled.device, dtype=pooled.dtype
            ),
        }
        if kwargs.get("guidance") is not None:
            out["guidance"] = kwargs["guidance"][rows]
        return out

    # ------------------------------------------------------------------ attention level

    def attention_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        double = len(transformer.transformer_blocks)
        layers = {f"transformer_blocks.{i}.attn.processor": i for i in range(double)}
        for j in range(len(transformer.single_transformer_blocks)):
            layers[f"single_transformer_blocks.{j}.attn.processor"] = double + j
        return layers

    def make_processor(self, original: Any, index: int, num_layers: int) -> Any:
        if "IPAdapter" in type(original).__name__:
            raise NoAdapterError(
                f"flux: expected FluxAttnProcessor in block {index}, got {type(original).__name__}. Attention-level "
                "methods cannot guide IP-Adapter layers: unload the IP-Adapter (pipe.unload_ip_adapter()) or use 'cfg'."
            )
        return FluxGuidedProcessor(self, original, index, num_layers)

    def extend_inputs(self, kwargs: dict[str, Any], neg: Negative) -> dict[str, Any]:
        text = kwargs["encoder_hidden_states"]
        batch = text.shape[0]
        full, mask = self.negative_rows(neg, batch, text.dtype, text.device)
        self.state.num_pos = text.shape[1]
        self.state.neg_mask = mask
        out = {**kwargs, "encoder_hidden_states": torch.cat([text, full], dim=1)}
        ids = kwargs.get("txt_ids")
        if ids is not None:
            n = full.shape[1]
            if ids.ndim == 3:  # deprecated (rows, L, 3)
                out["txt_ids"] = torch.cat([ids, ids.new_zeros(ids.shape[0], n, ids.shape[2])], dim=1)
            else:
                out["txt_ids"] = torch.cat([ids, ids.new_zeros(n, ids.shape[-1])], dim=0)
        return out


class FluxGuidedProcessor(GuidedProcessor):
    """Attention of one Flux block (double- or single-stream) with the negative tokens split out for the method.

    Computes queries, keys and values exactly as ``FluxAttnProcessor`` (projections, RMS norms,
    rotary embedding over the whole ``[P, N, I]`` sequence), hands them to the method and puts
    the outputs back in the model's order. Outside a guided forward it calls the original
    processor unchanged.
    """

    # FluxAttention.forward passes only the keywords this signature names: keep it FluxAttnProcessor's
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        state = self.adapter.state
        if not state.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ConfigError(
                f"{self.adapter.method.name}: expected no attention mask in a guided Flux attention, got one of shape "
                f"{tuple(attention_mask.shape)}. Remove `attention_mask` from joint_attention_kwargs."
            )
        from diffusers.models.embeddings import apply_rotary_emb

        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:  # double-stream: text [P, N] beside the image
            if fused and hasattr(attn, "to_added_qkv"):
                tq, tk, tv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                tq = attn.add_q_proj(encoder_hidden_states)
                tk = attn.add_k_proj(encoder_hidden_states)
                tv = attn.add_v_proj(encoder_hidden_states)
            tq = attn.norm_added_q(tq.unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(tk.unflatten(-1, (-1, attn.head_dim)))
            tv = tv.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:  # single-stream: hidden_states is already [P, N, I]
            n_text = state.num_pos + state.num_neg
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        p = state.num_pos
        seg = Segments(
            "joint",
            q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:],
            q[:, :, :p], k[:, :, :p], v[:, :, :p],
            q[:, :, p:n_text], k[:, :, p:n_text], v[:, :, p:n_text],
            neg_mask=state.neg_mask,
        )  # fmt: skip
        out = self.adapter.run_method(seg, self.index, self.num_layers, self.layer_guided)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).flatten(2, 3).to(q.dtype)

        text = torch.cat([out.pos, out.neg], dim=2)
        if encoder_hidden_states is None:
            return merge(torch.cat([text, out.img], dim=2))
        img = attn.to_out[1](attn.to_out[0](merge(out.img)))
        return img, attn.to_add_out(merge(text))
