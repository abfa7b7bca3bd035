"""Flux.2 (dev, Klein; MMDiT with double-stream, then parallel single-stream blocks, text first).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_flux2.py`` and
``pipelines/flux2/pipeline_flux2{,_klein,_klein_inpaint,_klein_kv}.py``):

* pipelines: ``Flux2Pipeline`` (dev: a Mistral-3 text encoder, guidance-distilled, the
  ``guidance`` embedding and no CFG), ``Flux2KleinPipeline``, ``Flux2KleinInpaintPipeline``
  and ``Flux2KleinKVPipeline`` (a Qwen3 text encoder); ``image=`` (edit) appends the
  reference images' tokens to the image tokens, so everything after the text is ``I``;
* text enters only as ``encoder_hidden_states`` ``(rows, L, joint_attention_dim)``: three hidden
  states of the text encoder stacked per token (``text_encoder_out_layers``), of the chat
  template's tokens padded to ``max_sequence_length``; no text mask reaches the transformer (the
  padding tokens are attended). The transformer treats the text per token (``context_embedder``,
  modulation, MLPs) and its time/guidance embedding sees no text, so the text reaches the image
  only through attention. The negatives are encoded without padding: causal encoders, so
  encoding at exactly the real token count (the chat template's tokens, system message included)
  is their encoding without padding;
* rotary embedding over ``[text, image]``: text ids ``txt_ids`` ``(rows, L, 4)`` are
  ``(t, h, w, l) = (0, 0, 0, j)`` for token ``j`` (``_prepare_text_ids``); the model uses row 0
  only. ``join`` gives the negative block's token ``j`` the positive's first id plus ``j`` on
  ``l``, so a negative is placed as a prompt of its own (its own CFG branch gets the same ids);
  with several negatives the guided call re-bases each one at ``l = 0`` (``TextLayout.spans``);
* double-stream blocks ``transformer_blocks[i].attn`` (``Flux2AttnProcessor``: q/k/v, RMS norms
  per head, text first, ``to_out`` on the image, ``to_add_out`` on the text); parallel
  single-stream blocks ``single_transformer_blocks[j].attn`` (``Flux2ParallelSelfAttnProcessor``):
  one ``to_qkv_mlp_proj`` gives q/k/v and the MLP input, the attention output and the SwiGLU MLP
  output are concatenated and projected by one ``to_out``; ``project`` carries the MLP input,
  ``finish`` does the rest exactly as the processor does. For ``layers`` the double blocks are
  ``0 .. D-1``, the single ``D .. D+S-1``;
* ``Flux2KleinKVPipeline``'s processors (``Flux2KVAttnProcessor``,
  ``Flux2KVParallelSelfAttnProcessor``): on the first step the reference tokens (first in the
  image tokens) attend to themselves only and their keys/values are cached; later steps insert
  the cached keys/values between text and image. The guided call reproduces both (the reference
  tokens' own attention is the unguided one; cached keys get placeholder queries whose outputs
  are dropped);
* Klein's own CFG (``guidance_scale > 1`` and not ``is_distilled``) runs the empty negative as a
  separate call in ``cache_context("uncond")``: only the conditional call is guided. Flux.2 dev
  has no CFG of its own; ``cfg`` runs true CFG on it (the guidance embedding stays on);
* refused: an ``attention_mask`` in ``attention_kwargs`` and context parallelism.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, joint_attention_dim)`` as
``encode_prompt`` returns first (attention-level methods use every given token, so pass only
real tokens); prediction-level methods need ``n`` equal to the call's ``max_sequence_length``.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import QKV
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapter import Joined
from negguide.adapter import JointAttentionAdapter
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapter import merge_heads
from negguide.attention import sdpa
from negguide.errors import ConfigError
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError

# the processors' parameters after ``attn``, in order (the KV processors add the last ones)
_DOUBLE = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb", "kv_cache", "kv_cache_mode",
           "num_ref_tokens")  # fmt: skip
_SINGLE = ("hidden_states", "attention_mask", "image_rotary_emb", "kv_cache", "kv_cache_mode", "num_txt_tokens",
           "num_ref_tokens")  # fmt: skip
_PROCESSORS = ("Flux2AttnProcessor", "Flux2KVAttnProcessor", "Flux2ParallelSelfAttnProcessor",
               "Flux2KVParallelSelfAttnProcessor")  # fmt: skip


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(Flux2Adapter)


class Flux2Adapter(JointAttentionAdapter):
    """Adapter for ``Flux2Transformer2DModel`` (Flux.2 dev, Klein, Klein inpaint, Klein KV)."""

    family = "flux2"
    batched_inputs = ("hidden_states", "timestep", "guidance")

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import Flux2Transformer2DModel

        return isinstance(denoiser, Flux2Transformer2DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        # padded: at the positive's length, as Klein encodes its own negative; else at exactly the real token count
        length = self.positive(call.output).shape[1] if padded else self.num_tokens(text, call)
        arguments = {**call.arguments, "prompt": [text], "prompt_embeds": None, "num_images_per_prompt": 1,
                     "device": call.device, "max_sequence_length": length}  # fmt: skip
        return Conditioning(call.encode(**arguments)[0])

    def num_tokens(self, text: str, call: EncodeCall) -> int:
        """The real tokens of ``text`` as the pipeline tokenizes a prompt (chat template included), truncated."""
        pipe, limit = self.pipe, int(call.arguments.get("max_sequence_length") or 512)
        if hasattr(pipe, "_get_mistral_3_small_prompt_embeds"):  # dev: system message + user message
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            ids = pipe.tokenizer.apply_chat_template(
                format_input([text], system_message=pipe.system_message), add_generation_prompt=False,
                tokenize=True, return_dict=True, truncation=True, max_length=limit,
            )["input_ids"]  # fmt: skip
            return len(ids[0])
        if hasattr(pipe, "_get_qwen3_prompt_embeds"):  # Klein: the user message and the generation prompt
            templated = pipe.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            return len(pipe.tokenizer(templated, truncation=True, max_length=limit).input_ids)
        raise NegativePromptError(
            f"flux2: expected a Flux.2 pipeline with a Mistral-3 or Qwen3 prompt encoder to encode the negative, got "
            f"{type(pipe).__name__}. Pass negative_prompt_embeds (encode_prompt's first output, real tokens only)."
        )

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            got = (
                f"a tensor of shape {tuple(embeds.shape)}"
                if isinstance(embeds, torch.Tensor)
                else type(embeds).__name__
            )
            raise NegativePromptError(
                f"flux2: expected `negative_prompt_embeds` as a (rows, tokens, joint_attention_dim) tensor, got {got}. "
                "Pass the first output of `pipe.encode_prompt`."
            )
        return Conditioning(embeds)

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        joined = super().join(kwargs, negative, mask)
        ids = kwargs.get("txt_ids")
        if ids is not None:  # negative token j: the prompt's first id plus j on the token axis l
            step = torch.zeros(negative.shape[1], ids.shape[-1], dtype=ids.dtype, device=ids.device)
            step[:, -1] = torch.arange(negative.shape[1], device=ids.device).to(ids.dtype)
            joined.kwargs["txt_ids"] = torch.cat([ids, ids[..., :1, :] + step], dim=-2)
        return joined

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        double = len(denoiser.transformer_blocks)
        modules = {f"transformer_blocks.{i}.attn.processor": i for i in range(double)}
        for j in range(len(denoiser.single_transformer_blocks)):
            modules[f"single_transformer_blocks.{j}.attn.processor"] = double + j
        processors = denoiser.attn_processors
        for name, index in modules.items():
            kind = type(processors[name]).__name__
            if kind.removeprefix("Guided") not in _PROCESSORS:  # negguide's own carry the original's name
                raise NoAdapterError(
                    f"flux2: expected one of {', '.join(_PROCESSORS)} in block {index}, got {kind}. Restore the "
                    "model's processors or use 'cfg'."
                )
            if getattr(processors[name], "_parallel_config", None) is not None:
                raise NoAdapterError(
                    "flux2: expected a transformer without context parallelism, got one whose processors split the "
                    "text stream across devices (through the appended negative tokens). Run without "
                    "`enable_parallelism`, or use 'cfg'."
                )
        return modules

    def project(self, attn: Any, text: TextLayout, *args: Any, **kwargs: Any) -> Projected | None:
        parallel = hasattr(attn, "to_qkv_mlp_proj")
        call = {**dict(zip(_SINGLE if parallel else _DOUBLE, args)), **kwargs}
        hidden, context = call["hidden_states"], call.get("encoder_hidden_states")
        if call.get("attention_mask") is not None:
            raise ConfigError(
                f"flux2: expected no attention mask in a guided Flux.2 attention, got one of shape "
                f"{tuple(call['attention_mask'].shape)}. Remove `attention_mask` from attention_kwargs."
            )
        if not parallel and context is None:
            return None
        mlp = None
        if parallel:  # one projection: q, k, v and the MLP input, split by their global ratio as the processor does
            proj = attn.to_qkv_mlp_proj(hidden)
            qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
            local = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp = torch.split(proj, [local, proj.shape[-1] - local], dim=-1)
            q, k, v = qkv.chunk(3, dim=-1)
        elif getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        if not parallel:  # double-stream: the text [P, N] first
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                tq, tk, tv = attn.to_added_qkv(context).chunk(3, dim=-1)
            else:
                tq, tk, tv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
            tq = attn.norm_added_q(tq.unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(tk.unflatten(-1, (-1, attn.head_dim)))
            tv = tv.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        rotary = call.get("image_rotary_emb")
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            rotary = _rebase_negatives(rotary, text)
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        q, k, v, ref = _reference_tokens(q, k, v, text.num_text, call)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        t = text.num_text
        image = QKV(q[:, :, t:], k[:, :, t:], v[:, :, t:])
        return Projected(image, QKV(q[:, :, :t], k[:, :, :t], v[:, :, :t]), carry=(parallel, mlp, ref))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        dtype = projected.image.q.dtype  # type: ignore[union-attr]
        parallel, mlp, ref = projected.carry
        if ref is not None:  # KV cache: the reference tokens' own attention, or no output for cached keys
            n, own = ref
            image = image[:, :, n:] if own is None else torch.cat([own, image[:, :, n:]], dim=2)
        if parallel:  # attention and MLP outputs side by side through one projection
            out = merge_heads(torch.cat([text, image], dim=2), dtype)  # type: ignore[list-item]
            return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
        img = attn.to_out[1](attn.to_out[0](merge_heads(image, dtype)))
        return img, attn.to_add_out(merge_heads(text, dtype))  # type: ignore[arg-type]


def _rebase_negatives(rotary: tuple[torch.Tensor, torch.Tensor], text: TextLayout) -> tuple[torch.Tensor, ...]:
    """The ``(cos, sin)`` table with each negative's token ``j`` at the table row of the negative block's token ``j``
    (so at ``l = j``, like a prompt's); one negative needs no change."""
    spans = text.spans
    if len(spans) < 2:
        return rotary
    p, t = text.num_pos, text.num_text

    def rebase(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[:p], *(table[p : p + b - a] for a, b in spans), table[t:]], dim=0)

    return tuple(rebase(x) for x in rotary)


def _reference_tokens(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int, call: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, torch.Tensor | None] | None]:
    """The KV processors' reference tokens, ``(B, L, H, D)`` after RoPE: on the extract step they are cached and
    attend to themselves only (their output is returned, the guided one is replaced); on cached steps their keys
    and values are inserted after the text with placeholder queries whose outputs are dropped."""
    mode, cache, n = call.get("kv_cache_mode"), call.get("kv_cache"), call.get("num_ref_tokens") or 0
    if mode == "extract" and n > 0:
        ref = slice(num_text, num_text + n)
        if cache is not None:
            cache.store(k[:, ref].clone(), v[:, ref].clone())
        own = sdpa(q[:, ref].transpose(1, 2), k[:, ref].transpose(1, 2), v[:, ref].transpose(1, 2))
        return q, k, v, (n, own)
    if mode == "cached" and cache is not None:
        k_ref, v_ref = cache.get()
        t = num_text

        def insert(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :t], r.to(x.dtype), x[:, t:]], dim=1)

        return insert(q, torch.zeros_like(k_ref)), insert(k, k_ref), insert(v, v_ref), (k_ref.shape[1], None)
    return q, k, v, None
