"""HiDream-I1 (Full, Dev, Fast: ``HiDreamImagePipeline``; sparse DiT, double- then single-stream blocks).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_hidream_image.py`` and
``pipelines/hidream_image/pipeline_hidream_image.py``):

* the text enters as two inputs: ``encoder_hidden_states_t5`` ``(rows, T, t5_dim)`` (T5, padded
  to the call's ``max_sequence_length``) and ``encoder_hidden_states_llama3`` ``(layers, rows, L,
  llama_dim)``: every hidden state of Llama-3.1 but the embeddings (``hidden_states[1:]``, padded
  the same way), batch on axis 1. Neither has a padding mask: the model attends to the padding.
  Each token is projected alone (``caption_projection``): block ``i`` reads Llama layer
  ``llama_layers[i]``, the T5 tokens and the last block's layer form the persistent text stream;
* double-stream block ``i`` (``double_stream_blocks[i].block.attn1``) sees the text ``[T5, Llama
  of the last block, Llama of block i]``; only the first two parts carry on (the third is cut
  after the block). Single-stream block ``j`` (``single_stream_blocks[j].block.attn1``) sees
  ``[image, T5, Llama last, Llama of block D + j]`` as one sequence. ``HiDreamAttnProcessor``
  (called with keywords ``hidden_states, hidden_states_masks, encoder_hidden_states,
  image_rotary_emb``) applies per-projection RMS norms over all heads, multiplies the image keys by
  ``hidden_states_masks`` (non-square sizes pad the image tokens to ``max_resolution``), a 3-axis
  rotary embedding over ``[image, text]`` (text ids are zeros: the identity on text tokens; on the
  first half of each head when the axes cover half of it), and attention at the default scale;
* the pooled CLIP-L + CLIP-G vectors (``pooled_embeds``) join the timestep embedding (adaLN of
  every block): no token of the text reaches the image outside the joint attention (the mixture of
  experts routes each token alone);
* the pipeline's own CFG (``guidance_scale > 1``: Full runs 5.0; Dev and Fast run 0.0, HiDream-I1
  README) batches ``[uncond, cond]`` (the Llama input on axis 1): only the ``cond`` rows are guided.

Attention-level methods: each negative is a prompt of its own in BOTH text streams, encoded alone
and without padding (T5 and Llama at exactly their real token counts: T5 masks its padding and Llama
is causal, so that is the pipeline's own encoding of those tokens). Its T5 tokens are appended to
the T5 input and its Llama tokens to every layer of the Llama input, so every block sees the
negative's ``[T5, Llama last, Llama of this block]`` exactly where it sees the prompt's, projected
by the same layers, at zero text positions. The text stream of a guided call is laid out for the
core as ``[P, N_1, ...]``, each ``[T5, Llama last, Llama of the block]`` (``join_negatives``,
``project``); the pooled vector stays the positive one.

``negative_prompt_embeds``: a dict ``{"prompt_embeds_t5": (rows, n_t5, t5_dim),
"prompt_embeds_llama3": (layers, rows, n_llama, llama_dim)}`` as ``encode_prompt`` returns them
(attention-level methods use every given token), plus ``"pooled_prompt_embeds": (rows,
pooled_dim)`` for prediction-level methods (CFG), whose T5 and Llama lengths must be the prompt's.
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
from negguide.errors import NegativePromptError
from negguide.errors import NoAdapterError

T5, LLAMA = "encoder_hidden_states_t5", "encoder_hidden_states_llama3"
#: one piece of the text stream: (start in the model's order, start in the core's ``[P, N_1, ...]``, length)
Piece = tuple[int, int, int]


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(HiDreamAdapter)


class HiDreamAdapter(JointAttentionAdapter):
    """Adapter for ``HiDreamImageTransformer2DModel`` (HiDream-I1 Full, Dev and Fast)."""

    family = "hidream"
    text_input = T5
    pipeline_cfg = "batched"
    batched_inputs = ("hidden_states", "timesteps", "img_ids", "img_sizes", "hidden_states_masks")
    conditioning_inputs = {T5: "embeds", LLAMA: "llama3", "pooled_embeds": "pooled"}
    batch_dims = {LLAMA: 1}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import HiDreamImageTransformer2DModel

        return isinstance(denoiser, HiDreamImageTransformer2DModel)

    # ------------------------------------------------------------------ encoding

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        pipe, args = self.pipe, call.arguments
        msl, dtype = int(args.get("max_sequence_length") or 128), args.get("dtype")
        if padded:  # exactly the pipeline's own negative (CFG batches it beside the prompt)
            t5, _, llama, _, pooled, _ = call.encode(
                prompt=[text], device=call.device, dtype=dtype, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=msl,
            )  # fmt: skip
            return _conditioning(t5, llama, pooled)
        missing = [n for n in ("text_encoder_3", "tokenizer_3", "text_encoder_4", "tokenizer_4")
                   if getattr(pipe, n, None) is None]  # fmt: skip
        if missing:
            raise NegativePromptError(
                f"hidream: expected the pipeline's T5 and Llama encoders to encode the negative prompt, got None for "
                f"{missing}. Pass negative_prompt_embeds instead."
            )
        # T5 masks its padding and Llama is causal: encoded at exactly their real token counts there is no padding
        t5 = pipe._get_t5_prompt_embeds(prompt=[text], max_sequence_length=_length(pipe.tokenizer_3, text, msl),
                                        device=call.device, dtype=dtype)  # fmt: skip
        llama = pipe._get_llama3_prompt_embeds(prompt=[text], max_sequence_length=_length(pipe.tokenizer_4, text, msl),
                                               device=call.device, dtype=dtype)  # fmt: skip
        return _conditioning(t5, llama)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        got = type(embeds).__name__
        if isinstance(embeds, dict):
            t5, llama, pooled = (embeds.get(k) for k in ("prompt_embeds_t5", "prompt_embeds_llama3",
                                                         "pooled_prompt_embeds"))  # fmt: skip
            got = ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}" for k, v in embeds.items())
            if (isinstance(t5, torch.Tensor) and t5.ndim == 3 and isinstance(llama, torch.Tensor) and llama.ndim == 4
                    and llama.shape[1] == t5.shape[0] and (pooled is not None or not padded)):  # fmt: skip
                return _conditioning(t5, llama, pooled)
        raise NegativePromptError(
            "hidream: expected `negative_prompt_embeds` as a dict {'prompt_embeds_t5': (rows, n_t5, t5_dim), "
            "'prompt_embeds_llama3': (layers, rows, n_llama, llama_dim)} as encode_prompt returns them"
            + (", with 'pooled_prompt_embeds': (rows, pooled_dim) for CFG" if padded else "")
            + f", got {{{got}}}."
        )

    # ------------------------------------------------------------------ joining the negatives

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        raise NoAdapterError(
            "hidream: a negative enters through two inputs (T5 and every Llama layer): expected the core to call "
            "`join_negatives`, got a call of `join`. Update negguide."
        )

    def join_negatives(self, kwargs: dict[str, Any], negatives: list[Conditioning]) -> Joined:
        t5, llama = kwargs[T5], kwargs[LLAMA]
        t5_parts, llama_parts, sizes, spans, masks = [t5], [llama], [], [], []
        start = num_pos = t5.shape[1] + 2 * llama.shape[2]  # the prompt: [T5, Llama last, Llama of the block]
        for c in negatives:
            layers = c.extras.get("llama3")
            if layers is None or layers.shape[1] != llama.shape[0]:
                raise NegativePromptError(
                    f"hidream: expected each negative with its {llama.shape[0]} Llama layers (extra 'llama3'), got "
                    f"{None if layers is None else tuple(layers.shape)}. Encode it with this pipeline."
                )
            a, b = c.embeds.shape[1], layers.shape[2]
            t5_parts.append(c.embeds.to(t5))
            llama_parts.append(layers.movedim(0, 1).to(llama))
            t5_mask = torch.ones(t5.shape[0], a, dtype=torch.bool) if c.mask is None else c.mask
            llama_mask = c.extras.get("llama3_mask", torch.ones(t5.shape[0], b, dtype=torch.bool))
            t5_mask, llama_mask = t5_mask.to(t5.device), llama_mask.to(t5.device)
            masks.append(torch.cat([t5_mask, llama_mask, llama_mask], dim=1))
            sizes.append((a, b))
            spans.append((start, start + a + 2 * b))
            start += a + 2 * b
        out = {**kwargs, T5: torch.cat(t5_parts, dim=1), LLAMA: torch.cat(llama_parts, dim=2)}
        carry = _pieces(t5.shape[1], llama.shape[2], sizes)
        return Joined(out, num_pos, carry=carry, spans=tuple(spans), masks=tuple(masks))

    # ------------------------------------------------------------------ attention level

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor

        blocks = [f"double_stream_blocks.{i}" for i in range(len(denoiser.double_stream_blocks))]
        blocks += [f"single_stream_blocks.{j}" for j in range(len(denoiser.single_stream_blocks))]
        modules = {}
        for index, name in enumerate(blocks):
            processor = denoiser.get_submodule(f"{name}.block.attn1").processor
            if not isinstance(processor, HiDreamAttnProcessor):
                raise NoAdapterError(
                    f"hidream: expected HiDreamAttnProcessor in {name}, got {type(processor).__name__}. Restore "
                    "HiDream's own processor or use 'cfg'."
                )
            modules[f"{name}.block.attn1.processor"] = index
        return modules

    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        hidden_states_masks: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Projected:
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype, rows, h = hidden_states.dtype, hidden_states.shape[0], attn.heads
        q = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype).unflatten(-1, (h, -1))
        k = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype).unflatten(-1, (h, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (h, -1))
        if hidden_states_masks is not None:  # HiDream zeroes the keys of its padded image tokens (not -inf)
            k = k * hidden_states_masks.view(rows, -1, 1, 1)
        if not attn.single:  # double-stream: the text stream beside the image, image first
            tq = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype).unflatten(-1, (h, -1))
            tk = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype).unflatten(-1, (h, -1))
            q, k = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1)
            v = torch.cat([v, attn.to_v_t(encoder_hidden_states).unflatten(-1, (h, -1))], dim=1)
        if q.shape[-1] == image_rotary_emb.shape[-3] * 2:  # type: ignore[union-attr]
            q, k = apply_rope(q, k, image_rotary_emb)
        else:  # the rotary axes cover the first half of each head
            (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
            q1, k1 = apply_rope(q1, k1, image_rotary_emb)
            q, k = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        i, pieces = q.shape[2] - text.num_text, text.carry

        def core(x: torch.Tensor) -> torch.Tensor:  # the model's text order -> [P, N_1, ...]
            return torch.cat([x[:, :, i + m : i + m + n] for m, _, n in pieces], dim=2)

        image = QKV(q[:, :, :i], k[:, :, :i], v[:, :, :i])
        return Projected(image, QKV(core(q), core(k), core(v)), carry=(pieces, q.dtype))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        pieces, dtype = projected.carry
        model = torch.cat([text[:, :, c : c + n] for _, c, n in sorted(pieces)], dim=2)  # type: ignore[index]
        if attn.single:
            return attn.to_out(merge_heads(torch.cat([image, model], dim=2), dtype))
        return attn.to_out(merge_heads(image, dtype)), attn.to_out_t(merge_heads(model, dtype))


def _length(tokenizer: Any, text: str, max_sequence_length: int) -> int:
    """The real tokens of ``text`` as the pipeline tokenizes it (special tokens included), truncated as it does."""
    limit = min(max_sequence_length, tokenizer.model_max_length)
    return len(tokenizer(text, truncation=True, max_length=limit, add_special_tokens=True).input_ids)


def _conditioning(t5: torch.Tensor, llama: torch.Tensor, pooled: torch.Tensor | None = None) -> Conditioning:
    """The T5 tokens as ``embeds``; the Llama layers batch-first ``(rows, layers, n, dim)`` with their mask."""
    extras = {"llama3": llama.movedim(1, 0), "llama3_mask": torch.ones(llama.shape[1:3], dtype=torch.bool)}
    return Conditioning(t5, extras=extras if pooled is None else {**extras, "pooled": pooled})


def _pieces(n_t5: int, n_llama: int, sizes: list[tuple[int, int]]) -> tuple[Piece, ...]:
    """Where the parts of the text stream sit: the model orders it ``[T5 of P, N_1.., Llama-last of P, N_1..,
    Llama-of-the-block of P, N_1..]``, the core ``[P, N_1, ...]``, each ``[T5, Llama-last, Llama-of-the-block]``.
    ``n_t5``, ``n_llama``: the prompt's T5 and Llama lengths; ``sizes``: each negative's."""
    last = n_t5 + sum(a for a, _ in sizes)  # the model's start of the Llama-last tokens
    block = last + n_llama + sum(b for _, b in sizes)  # ... and of the block's Llama tokens
    pieces = [(0, 0, n_t5), (last, n_t5, n_llama), (block, n_t5 + n_llama, n_llama)]
    core, ta, tb = n_t5 + 2 * n_llama, n_t5, n_llama
    for a, b in sizes:
        pieces += [(ta, core, a), (last + tb, core + a, b), (block + tb, core + a + b, b)]
        core, ta, tb = core + a + 2 * b, ta + a, tb + b
    return tuple(p for p in pieces if p[2])
