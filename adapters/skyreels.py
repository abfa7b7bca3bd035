"""SkyReels-V2 (Wan-based video DiT, text through cross-attention; T2V, I2V and the diffusion-forcing pipelines).

Model facts owned here (diffusers 0.42.1, ``models/transformers/transformer_skyreels_v2.py`` and
``pipelines/skyreels_v2/``); the facts SkyReels-V2 shares with Wan (UMT5 text appended per token,
``attn2`` the only text-seeing attention, the I2V image context ahead of the text, the processor's
call and projections, the unguided ``cache_context("uncond")`` forward) are stated once, in
``adapters/_wan_family.py``:

* one denoiser, ``SkyReelsV2Transformer3DModel``, for every pipeline: ``SkyReelsV2Pipeline`` (T2V),
  ``SkyReelsV2ImageToVideoPipeline`` (I2V and first-last-frame: CLIP image context,
  ``encoder_hidden_states_image``, ahead of the text in ``attn2``; ``SkyReelsV2AttnProcessor``
  hard-codes ``total - 512`` like Wan's), and the diffusion-forcing pipelines
  ``SkyReelsV2DiffusionForcingPipeline``, ``...ImageToVideoPipeline`` and ``...VideoToVideoPipeline``
  (the conditioning frames are latent prefixes, no image context);
* diffusion forcing (``enable_diffusion_forcing=True``): a per-frame ``timestep`` ``(B, frames)`` and,
  with ``num_frame_per_block > 1``, a block-causal mask over the video tokens, passed to the
  self-attention ``attn1`` only; ``attn2`` is called with no mask, so the guided cross-attention is
  the same in every mode. The prediction-level negative branch takes the per-frame ``timestep`` rows
  like the latents;
* ``inject_sample_info`` (SkyReels-V2-DF-1.3B): ``fps`` (a Python list, one entry per row) is added to
  the modulation repeated ``frames`` times along the batch, which only broadcasts for one row: such a
  transformer runs one row per forward, so a negative branch batched beside the positive one
  (prediction-level methods) is refused; attention-level methods keep the batch and work;
* every pipeline runs its own CFG as a second forward inside ``cache_context("uncond")``.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, text_dim)`` of raw UMT5
embeddings as ``encode_prompt`` returns them. Attention-level methods use every given token
(trim the zero padding yourself if you do not want the model to see it); prediction-level
methods (CFG) zero-pad a shorter tensor to the positive's length, as the pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import EncodeCall
from negguide.adapters._wan_family import WanFamilyAdapter
from negguide.errors import ConfigError


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(SkyReelsAdapter)


class SkyReelsAdapter(WanFamilyAdapter):
    """Adapter for ``SkyReelsV2Transformer3DModel`` (T2V, I2V, diffusion forcing T2V/I2V/V2V)."""

    family = "skyreels"
    model_name = "SkyReels-V2"
    prompt_module = "diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2"
    processor_classes = (
        "diffusers.models.transformers.transformer_skyreels_v2",
        ("SkyReelsV2AttnProcessor", "SkyReelsV2AttnProcessor2_0"),
    )
    batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states_image")

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import SkyReelsV2Transformer3DModel

        return isinstance(denoiser, SkyReelsV2Transformer3DModel)

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._check_batched_branch()
        return super().encode_negative(text, call, padded)

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._check_batched_branch()
        return super().negative_from_embeds(embeds, call, padded)

    def _check_batched_branch(self) -> None:
        if getattr(self.find_denoisers()[0].config, "inject_sample_info", False):
            raise ConfigError(
                "skyreels: prediction-level methods run the negative branch batched beside the positive one, which "
                "a transformer with `inject_sample_info` (SkyReels-V2-DF-1.3B) cannot do: diffusers adds its fps "
                "embedding repeated per frame along the batch, so it runs one row per forward. Expected a "
                "transformer without it, got inject_sample_info=True. Use the pipeline's own CFG "
                "(guidance_scale > 1 with negative_prompt) or an attention-level method (vsf, nag, nasa)."
            )

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        return self.checked(denoiser, {f"blocks.{i}.attn2.processor": i for i in range(len(denoiser.blocks))})
