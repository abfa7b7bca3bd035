"""Stable Diffusion 1.x / 2.x and SDXL (``UNet2DConditionModel``, text through cross-attention).

Model facts owned here (diffusers 0.42: ``models/unets/unet_2d_condition.py``, ``models/attention.py``,
``models/attention_processor.py``, ``pipelines/stable_diffusion/pipeline_stable_diffusion*.py``,
``pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl*.py``):

* the denoiser is ``pipe.unet``, called with the keyword ``sample``; the text enters only through
  the cross-attention ``attn2`` of every ``BasicTransformerBlock`` (``down_blocks``, ``mid_block``,
  ``up_blocks``); ``attn1`` gets ``encoder_hidden_states=None`` (``only_cross_attention`` is off).
  ``layers`` counts these blocks in execution order: down, mid, up (SD 1.5: 16, SDXL: 70);
* ``encoder_hidden_states`` is per-token CLIP output: SD 1.x/2.x the last hidden state of one
  ``CLIPTextModel`` (CLIP ViT-L, OpenCLIP ViT-H for 2.x; ``clip_skip`` layers earlier plus the final
  layer norm), SDXL the penultimate hidden states (``hidden_states[-(clip_skip + 2)]``) of CLIP ViT-L
  and OpenCLIP bigG concatenated along channels (only bigG in the refiner). 77 tokens padded with
  the end token or ``"!"``; CLIP is causal, so the real tokens cut from a padded encoding are exact;
* SDXL also passes ``added_cond_kwargs = {"text_embeds": pooled bigG vector, "time_ids": ...}`` to the
  time embedding (``addition_embed_type="text_time"``): attention-level methods keep the positive's,
  the negatives enter ``attn2`` only, so nothing leaks. UNets that pool the text elsewhere
  (``addition_embed_type="text"``: DeepFloyd IF) or put image tokens in the context (Kandinsky)
  are refused;
* an IP-Adapter loaded by diffusers (``load_ip_adapter``: ``encoder_hid_proj``, and
  ``IPAdapterAttnProcessor2_0`` on every ``attn2``, which gets ``(text, [image-prompt tokens])``)
  keeps its image-prompt attention apart from the text's (its own softmax, times its ``scale``,
  added before ``to_out``): a guided call guides the text attention and adds that term exactly as
  the original computes it. IP-Adapter masks (``ip_adapter_masks``) are refused. CFG runs the
  negative branch with the positive rows' ``image_embeds``: it equals the pipeline's own CFG with
  the image prompt as its negative image embedding too;
* a negative is encoded by the pipeline's own ``encode_prompt`` with the call's ``clip_skip`` and
  ``lora_scale`` (SDXL: the same text to both encoders, as ``negative_prompt_2=None`` does), cut to
  its real tokens and appended: ``attn2`` sees ``[P (77), N_1, ...]``. For CFG it is encoded as the
  pipeline encodes its own negative (77 tokens, SDXL with its pooled vector; the pipelines'
  negative ignores ``clip_skip``);
* ControlNet (``StableDiffusionControlNetPipeline``...): its residuals are added inside the UNet to
  the rows they were computed for; attention-level methods keep the batch, so they just work. CFG
  is refused: the pipeline's own CFG runs the ControlNet on the negative prompt too, which a
  negative branch of the UNet alone cannot reproduce;
* the pipeline's own CFG (``guidance_scale > 1`` and no ``time_cond_proj_dim``) runs one batch
  ``[uncond, cond]``; only ``cond`` is guided. Few-step models (Turbo, Lightning, LCM, DMD2,
  Hyper-SD) run with it off.

``negative_prompt_embeds``: a tensor ``(1 or prompts or rows, n, cross_attention_dim)`` as
``encode_prompt`` returns it (attention-level methods use every given token: keep the real ones,
``embeds[:, :n]``), or a dict ``{"prompt_embeds": ..., "pooled_prompt_embeds": (rows, pooled_dim)}``;
CFG needs the 77 tokens and, on SDXL, the pooled vector.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from negguide import hookimpl
from negguide.adapter import Conditioning
from negguide.adapter import CrossAttentionAdapter
from negguide.adapter import EncodeCall
from negguide.adapter import Projected
from negguide.adapter import TextLayout
from negguide.adapters._attn_processor import finish_cross
from negguide.adapters._attn_processor import project_cross
from negguide.attention import sdpa
from negguide.errors import NegativePromptError
from negguide.errors import NegGuideError
from negguide.errors import NoAdapterError

#: processors that compute plain attention over ``[image; text]`` (the guided call replaces them exactly)
PLAIN = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
         "AttnProcessorNPU")  # fmt: skip
_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@hookimpl
def register_adapters(register) -> None:  # noqa: ANN001
    register(UNetAdapter)


class UNetAdapter(CrossAttentionAdapter):
    """Adapter for ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL and their img2img and inpaint pipelines)."""

    family = "unet"
    denoisers = ("unet",)
    sample_input = "sample"
    pipeline_cfg = "batched"
    # an IP-Adapter's image embeddings (one (rows, images, dim) tensor per adapter): the negative branch keeps the
    # positive rows' image prompt
    batched_inputs = ("sample", "timestep", "timestep_cond", "class_labels", "added_cond_kwargs.time_ids",
                      "added_cond_kwargs.image_embeds.*")  # fmt: skip
    conditioning_inputs = {"encoder_hidden_states": "embeds", "added_cond_kwargs.text_embeds": "pooled"}
    # NAG paper Table 5 (SDXL phi = 2, so s = 3; SD 1.5: phi = 1), NAG README (nag_scale 3 for SDXL-DMD2),
    # nag/pipeline_sdxl_nag.py @8f2aa4f (nag_tau=2.5, nag_alpha=0.5); VSF and NASA have no published UNet values
    defaults = {"nag": {"scale": 3.0, "tau": 2.5, "alpha": 0.5}}

    @classmethod
    def matches(cls, denoiser: Any) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(denoiser, UNet2DConditionModel)

    def find_denoisers(self) -> list[torch.nn.Module]:
        found = super().find_denoisers()
        for unet in found:
            config, why, fix = unet.config, None, "Use the pipeline's own `negative_prompt` instead."
            if config.encoder_hid_dim_type == "ip_image_proj" and not _diffusers_ip_adapter(unet):
                why = ("an IP-Adapter is loaded (encoder_hid_dim_type='ip_image_proj') that is not diffusers' own "
                       "(`encoder_hid_proj` a MultiIPAdapterImageProjection, IPAdapterAttnProcessor2_0 on every "
                       "`attn2`)")  # fmt: skip
                fix = "Load it with pipe.load_ip_adapter(...), or unload it (pipe.unload_ip_adapter())."
            elif config.addition_embed_type in ("text", "text_image"):
                why = f"it pools the text into its time embedding (addition_embed_type={config.addition_embed_type!r})"
            elif config.encoder_hid_dim_type not in (None, "text_proj", "ip_image_proj"):
                why = f"its context holds image tokens (encoder_hid_dim_type={config.encoder_hid_dim_type!r})"
            if why:
                raise NoAdapterError(
                    "unet: expected a Stable Diffusion 1.x/2.x or SDXL UNet whose text enters through cross-attention "
                    f"only, got one where {why}. {fix}"
                )
        return found

    def _refuse_controlnet_cfg(self) -> None:
        """Prediction level with a ControlNet: refused (its residuals depend on the prompt of each branch)."""
        if getattr(self.pipe, "controlnet", None) is not None:
            raise NoAdapterError(
                f"unet: expected a pipeline without a ControlNet for 'cfg', got {type(self.pipe).__name__}: its own "
                "CFG runs the ControlNet on the negative prompt too (the residuals differ per branch), and negguide's "
                "CFG runs only the UNet's negative branch. Use the pipeline's own `negative_prompt` with "
                "guidance_scale > 1, or an attention-level method ('vsf', 'nag', 'nasa')."
            )

    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        args, pipe = call.arguments, self.pipe
        if padded:
            self._refuse_controlnet_cfg()
        common = {"device": call.device, "num_images_per_prompt": 1, "lora_scale": args.get("lora_scale")}
        if padded:  # exactly the pipeline's own negative (77 tokens; SDXL: and its pooled vector)
            out = call.encode(prompt=[text], negative_prompt=[text], do_classifier_free_guidance=True,
                              clip_skip=args.get("clip_skip"), **common)  # fmt: skip
            return Conditioning(out[1], extras={"pooled": out[3]} if len(out) == 4 else {})
        out = call.encode(prompt=[text], do_classifier_free_guidance=False, clip_skip=args.get("clip_skip"), **common)
        convert = getattr(pipe, "maybe_convert_prompt", None)  # textual inversion, as encode_prompt does
        n = 0
        for tokenizer in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)):
            if tokenizer is not None:
                tokens = convert(text, tokenizer) if convert is not None else text
                n = max(n, len(tokenizer(tokens, truncation=True, max_length=tokenizer.model_max_length).input_ids))
        return Conditioning(out[0][:, :n])  # CLIP is causal: the real tokens do not see the padding

    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        if padded:
            self._refuse_controlnet_cfg()
        pooled = None
        if isinstance(embeds, dict):
            embeds, pooled = embeds.get("prompt_embeds"), embeds.get("pooled_prompt_embeds")
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            got = f"shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise NegativePromptError(
                f"unet: expected `negative_prompt_embeds` as a (rows, tokens, cross_attention_dim) tensor or a dict "
                f"with `prompt_embeds` (and on SDXL `pooled_prompt_embeds`), got {got}. Encode it with "
                "`pipe.encode_prompt(...)`."
            )
        return Conditioning(embeds, extras={} if pooled is None else {"pooled": pooled})

    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        modules = {}
        ip_adapter = _diffusers_ip_adapter(denoiser)
        for i, (name, module) in enumerate(_cross_attentions(denoiser)):
            proc = type(module.processor).__name__
            if proc not in PLAIN and not (ip_adapter and proc == "IPAdapterAttnProcessor2_0"):
                hint = "restore the default with pipe.unet.set_default_attn_processor()"
                if "IPAdapter" in proc:
                    hint = "unload the IP-Adapter (pipe.unload_ip_adapter())"
                elif proc.startswith("Guided"):
                    hint = "the UNet is guided already (by a pipeline sharing it): remove that guidance first"
                raise NoAdapterError(
                    f"unet: expected a plain attention processor ({', '.join(PLAIN)}) in `{name}`, got {proc}, "
                    f"which attention-level methods cannot guide: {hint}, or use 'cfg'."
                )
            modules[f"{name}.processor"] = i
        return modules

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        return len(_cross_attentions(denoiser))

    # AttnProcessor2_0 is called as (attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    def project(
        self,
        attn: Any,
        text: TextLayout,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: Any = None,  # IPAdapterAttnProcessor2_0's (unused there too); AttnProcessor2_0's deprecated *args
        ip_adapter_masks: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Projected | None:
        if encoder_hidden_states is None:
            return None
        if attention_mask is not None or hidden_states.ndim != 3:
            raise NegGuideError(
                "unet: expected the guided cross-attention called as SD pipelines call it, (batch, tokens, "
                f"channels) without a mask, got {hidden_states.ndim}-D hidden states and mask "
                f"{None if attention_mask is None else tuple(attention_mask.shape)}. Remove the guidance "
                "(negguide.remove(pipe)) to pass `encoder_attention_mask`."
            )
        ip_states = None
        if isinstance(encoder_hidden_states, tuple):  # an IP-Adapter: (text, each adapter's image-prompt tokens)
            encoder_hidden_states, ip_states = encoder_hidden_states
        projected = project_cross(attn, hidden_states, encoder_hidden_states, temb)
        if ip_states is None:
            return projected
        terms = _ip_adapter_terms(attn, projected.image.q, ip_states, ip_adapter_masks)  # type: ignore[arg-type]
        return dataclasses.replace(projected, carry=_WithImagePrompt(projected.carry, terms))

    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        carry = projected.carry
        if isinstance(carry, _WithImagePrompt):
            return finish_cross(attn, dataclasses.replace(projected, carry=carry.residual), image, carry.terms)
        return finish_cross(attn, projected, image)


@dataclasses.dataclass(frozen=True)
class _WithImagePrompt:
    """What a guided ``IPAdapterAttnProcessor2_0`` call carries to ``finish``: the residual and the IP terms."""

    residual: torch.Tensor
    terms: list[tuple[Any, torch.Tensor]]


def _diffusers_ip_adapter(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` holds an IP-Adapter exactly as diffusers' ``load_ip_adapter`` installs it: the image
    projection ``encoder_hid_proj`` (``MultiIPAdapterImageProjection``) and ``IPAdapterAttnProcessor2_0`` on every
    ``attn2``."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if unet.config.encoder_hid_dim_type != "ip_image_proj":
        return False
    if not isinstance(getattr(unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection):
        return False
    cross = _cross_attentions(unet)
    return bool(cross) and all(type(m.processor) is IPAdapterAttnProcessor2_0 for _, m in cross)


def _ip_adapter_terms(attn: Any, query: torch.Tensor, ip_states: list[torch.Tensor], masks: Any) -> list[Any]:
    """The image-prompt attention of diffusers' ``IPAdapterAttnProcessor2_0``: the queries ``query``
    ``(batch, heads, tokens, head_dim)`` over each IP-Adapter's image tokens, as ``(scale, output (batch, tokens,
    channels))`` (adapters with scale 0 left out, as the processor skips them). It sees no text: guidance leaves it
    exactly as the unguided processor computes it, added to the guided text attention before ``to_out``."""
    if masks is not None:
        raise NegGuideError(
            "unet: expected no `ip_adapter_masks` in a guided IP-Adapter call, got some. negguide does not apply "
            "IP-Adapter masks yet: pass the call without `cross_attention_kwargs={'ip_adapter_masks': ...}`, or "
            "remove the guidance (negguide.remove(pipe))."
        )
    processor = getattr(attn.processor, "original", attn.processor)  # a guided processor: the one it replaced
    batch, heads, _, dim = query.shape
    terms = []
    for states, scale, to_k_ip, to_v_ip in zip(ip_states, processor.scale, processor.to_k_ip, processor.to_v_ip):
        if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
            continue
        key = to_k_ip(states).view(batch, -1, heads, dim).transpose(1, 2)
        value = to_v_ip(states).view(batch, -1, heads, dim).transpose(1, 2)
        out = sdpa(query, key, value).transpose(1, 2).reshape(batch, -1, heads * dim)
        terms.append((scale, out.to(query.dtype)))
    return terms


def _cross_attentions(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """The ``attn2`` of every transformer block in execution order (down, mid, up); any other text-seeing
    attention (``only_cross_attention``, Kandinsky's added-KV blocks) is refused."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    blocks = {name for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
    found = []
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        block, _, leaf = name.rpartition(".")
        if leaf != "attn2" or block not in blocks:
            raise NoAdapterError(
                f"unet: expected text only in the `attn2` of transformer blocks (SD 1.x/2.x, SDXL), got the "
                f"cross-attention `{name}` too. This UNet is not supported: use 'cfg'."
            )
        found.append((name, module))
    return sorted(found, key=lambda item: _ORDER.get(item[0].split(".")[0], 3))  # stable within a part
