"""``ToyWorldPipeline``: a real ``StableDiffusion3Pipeline`` in pixel space, with word-level text encoders.

The components are ordinary diffusers/transformers classes, so negguide's SD3 adapter guides it with no
special case: two tiny ``CLIPTextModelWithProjection`` encoders over a word-level tokenizer, no T5, an
``SD3Transformer2DModel`` working directly on ``3 x 32 x 32`` pixels, and an identity "VAE".
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import SD3Transformer2DModel
from diffusers import StableDiffusion3Pipeline
from diffusers.configuration_utils import ConfigMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see TerminalFlowMatchScheduler)
from transformers import CLIPTextConfig
from transformers import CLIPTextModelWithProjection

from negguide.toyworld.world import SIZE
from negguide.toyworld.world import WORDS

#: special tokens of the word-level tokenizer (eos id must not be 2: CLIP's legacy pooling would take argmax)
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: tokens per prompt: the longest caption (8 words) + EOS, with room to spare
MAX_TOKENS = 12
#: default call of the pipeline: 32x32, 8 Euler steps, no classifier-free guidance
CALL_KWARGS: dict[str, Any] = {
    "height": SIZE,
    "width": SIZE,
    "num_inference_steps": 8,
    "guidance_scale": 0.0,
    "max_sequence_length": 0,
    "output_type": "np",
}


class _DeltaDistribution:
    """A point mass: what ``IdentityAutoencoder.encode`` returns as ``latent_dist``."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class _EncoderOutput:
    def __init__(self, value: torch.Tensor) -> None:
        self.latent_dist = _DeltaDistribution(value)


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """The "VAE" of a pixel-space model: latents are the pixels (``vae_scale_factor`` 1, scale 1, shift 0)."""

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (3,),
        latent_channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        # one buffer so that .dtype/.device work and save_pretrained has something to write
        self.register_buffer("anchor", torch.zeros(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        out = _EncoderOutput(x)
        return out if return_dict else (out.latent_dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TerminalFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``shift_terminal`` also works for one step (ToyWorld-Turbo's sampler).

    diffusers 0.42.1 stretches the schedule so its last level is ``shift_terminal`` by dividing by ``1 - sigma_last``,
    which is 0 when the one level of a 1-step schedule is the noise itself: the sigmas come out NaN (diffusers issue
    #14411). One level has nothing to stretch, so it is kept; schedules of two or more steps are diffusers' own.
    A saved pipeline names it ``["negguide.toyworld.pipeline", "TerminalFlowMatchScheduler"]``; diffusers' loader
    finds its base class by the name ``SchedulerMixin`` in this module, hence that import.
    """

    def stretch_shift_to_terminal(self, t: torch.Tensor) -> torch.Tensor:
        if len(t) < 2:
            return t
        return super().stretch_shift_to_terminal(t)


class ToyWorldPipeline(StableDiffusion3Pipeline):
    """SD3 pipeline without T5: ``_get_t5_prompt_embeds`` returns zero tokens, so text is only the CLIP tokens."""

    _optional_components = [*StableDiffusion3Pipeline._optional_components, "text_encoder_3", "tokenizer_3"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: IdentityAutoencoder,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: Any,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: Any,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    def _get_t5_prompt_embeds(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if self.text_encoder_3 is not None:
            return super()._get_t5_prompt_embeds(prompt, num_images_per_prompt, max_sequence_length, device, dtype)
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        rows = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        return torch.zeros(rows, 0, self.transformer.config.joint_attention_dim, device=device, dtype=dtype)


def word_tokenizer(model_max_length: int = MAX_TOKENS) -> Any:
    """A ``PreTrainedTokenizerFast`` over the world's words: ``words <eos>``, lower-cased, else ``<unk>``.

    No ``<bos>`` is prepended: CLIP is causal, so a leading BOS would encode to the same vector in every
    prompt, and the negative's copy of it would carry no information about the negative (attention-level
    methods would then push against the positive's own BOS). ``<bos>`` stays in the vocabulary, unused.
    """
    from tokenizers import Tokenizer
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((PAD, UNK, BOS, EOS, *WORDS))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def build(
    seed: int = 0,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    patch_size: int = 4,
    text_width: int = 32,
) -> ToyWorldPipeline:
    """A freshly initialised (untrained) ToyWorld pipeline.

    Args:
        seed: ``torch.manual_seed`` for the initial weights.
        num_layers: joint transformer blocks.
        num_attention_heads: heads per block.
        attention_head_dim: width of each head.
        patch_size: pixels per patch side (``32 / patch_size`` tokens per side).
        text_width: hidden width of each CLIP encoder (the text stream is ``2 * text_width`` wide).
    """
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = word_tokenizer(), word_tokenizer()

    def clip() -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config)

    transformer = SD3Transformer2DModel(
        sample_size=SIZE,
        patch_size=patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=SIZE // patch_size,
        qk_norm="rms_norm",
    )
    pipe = ToyWorldPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=IdentityAutoencoder(),
        text_encoder=clip(),
        tokenizer=tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
