"""Wan 2.1 / 2.2 (video DiT, text through cross-attention).

Model facts owned here (those Wan shares with SkyReels-V2 are stated once, in ``adapters/_wan_family.py``):

* text enters every block through the cross-attention ``blocks[i].attn2`` only (self-attention
  ``attn1`` never sees it); ``encoder_hidden_states`` is the raw UMT5 output ``(B, P, text_dim)``,
  zero-padded to ``max_sequence_length``, and the transformer's text embedder is per token, so the
  negatives' raw UMT5 tokens, encoded without padding, are appended after it: ``[P, N_1, ...]``;
* image-to-video (Wan 2.1 I2V/FLF2V, ``image_dim`` set): the transformer embeds
  ``encoder_hidden_states_image`` and puts it *ahead* of the text, so ``attn2`` sees
  ``[image_ctx, P, N]``. ``WanAttnProcessor`` hard-codes ``image_context_length = total - 512``;
  the guided call splits at ``total - (P + N)`` and computes the image-context attention exactly
  like the original (``add_k_proj``/``add_v_proj``, ``norm_added_k``, unguided), added to the
  guided text attention;
* VACE (``WanVACETransformer3DModel``): the control blocks ``vace_blocks[j].attn2`` see the same
  context; they are patched too, as block ``vace_layers[j]`` (the block their hint is added to);
* Wan 2.2 A14B has a second expert ``pipe.transformer_2`` (low noise): both are patched and
  restored; TI2V-5B (``expand_timesteps``) passes a ``(B, seq)`` timestep; FLF2V passes two
  images per row;
* the pipeline's own CFG runs a separate forward inside ``cache_context("uncond")``: that
  forward is left unguided.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_dim)`` of raw UMT5
embeddings as ``encode_prompt`` returns them. Attention-level methods use every given token
(trim the zero padding yourself if you do not want the model to see it); prediction-level
methods (CFG) zero-pad a shorter tensor to the positive's length, as the pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapters._wan_family import WanFamilyAdapter


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(WanAdapter)


class WanAdapter(WanFamilyAdapter):
    """Adapter for ``WanTransformer3DModel`` (Wan 2.1/2.2 T2V, I2V, FLF2V, TI2V) and ``WanVACETransformer3DModel``."""

    family = "wan"
    # `_cp_plan`: only the video tokens (and their rotary embeddings) are split; the text keys stay whole
    context_parallel = "whole"
    denoisers = ("transformer", "transformer_2")
    batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states_image", "control_hidden_states")

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import WanTransformer3DModel
        from diffusers import WanVACETransformer3DModel

        return isinstance(denoiser, (WanTransformer3DModel, WanVACETransformer3DModel))

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        modules = {f"blocks.{i}.attn2.processor": i for i in range(len(denoiser.blocks))}
        vace_layers = getattr(denoiser.config, "vace_layers", None) or ()
        for j, _ in enumerate(getattr(denoiser, "vace_blocks", ())):
            modules[f"vace_blocks.{j}.attn2.processor"] = int(vace_layers[j])
        return self.checked(denoiser, modules)

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(denoiser.blocks)
