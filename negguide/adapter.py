"""The contract of a model-family adapter: the facts of one family, and nothing live.

An adapter states what negguide must know about one model family, as class attributes and
small methods that the core installation (``negguide.installation``) acts on:

* **what it patches**: ``matches`` (which denoiser it knows) and ``denoisers`` (the pipeline
  attributes that hold denoisers: ``pipe.transformer``, ``transformer_2``, ``pipe.unet``...);
* **the denoiser's inputs**: ``sample_input`` (the batched latents), ``text_input`` (the text
  conditioning, ``(rows, tokens, channels)``), ``text_mask_input`` (its padding mask, if the
  family passes one), ``batched_inputs``, ``conditioning_inputs`` and ``batch_dims`` (for
  prediction-level methods, which run the negative branch batched beside the positive one);
* **the pipeline's own CFG**: ``pipeline_cfg`` = ``"batched"`` (one forward over
  ``[uncond, cond]``; ``uncond_rows`` says otherwise) or ``"separate"`` (the unconditional
  branch is another forward, named by ``cache_context("uncond")`` (``"pred_uncond"`` under
  diffusers' guiders) or the second forward of a step); the core guides the conditional rows only;
* **encoding**: ``encode_negative`` turns ONE negative prompt into one row with the pipeline's
  own encoders (without padding where the family allows it); ``negative_from_embeds`` reads
  user-given embeddings. The core loops over prompts and negatives, pads, stacks and repeats
  per image;
* **joining**: ``join`` appends the negative tokens to the text input and says how many
  positive tokens there are and their padding mask; the core knows where each negative sits.
  A negative that enters through several inputs (its ``Conditioning.extras``: HiDream's T5 and
  per-block Llama tokens) is joined by ``join_negatives``, which also says where each negative
  sits in the text stream (``Joined.spans``, ``Joined.masks``).
  A denoiser that builds its attention sequence itself (Z-Image) names the methods that do it
  in ``patched_methods``: while installed the core routes them through ``patched``, which sees
  the guided forward (and what ``join`` left in ``Joined.carry``);
* **attention**: ``attention_modules`` lists the processors of the attention modules that see
  text (name -> block index), ``project`` turns one call's inputs into queries, keys and values
  (norms, rotary embeddings) of the image tokens and of the text stream, and ``finish`` puts
  the outputs back in the model's order and applies the output projections.

An adapter holds no guidance math and no live state: it is made once per installation with the
pipeline (to reach its encoders) and never changes. A family that needs no special case is one
short file; ``negguide.testing`` is the conformance kit every adapter passes.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from abc import abstractmethod
from collections.abc import Callable
from typing import Any
from typing import ClassVar
from typing import Literal

import torch

from negguide.errors import NegativePromptError
from negguide.method import Layout

#: how a pipeline runs its own classifier-free guidance
PipelineCFG = Literal["batched", "separate"]


@dataclasses.dataclass(frozen=True)
class EncodeCall:
    """What the installation learnt from one call of the pipeline's own ``encode_prompt``."""

    arguments: dict[str, Any]  #: the call's bound arguments, defaults applied
    output: Any  #: what ``encode_prompt`` returned
    batch: int  #: rows of the positive conditioning (prompts x images per prompt)
    num_per_prompt: int  #: images (or videos) per prompt
    device: torch.device
    dtype: torch.dtype
    encode: Callable[..., Any]  #: the pipeline's original ``encode_prompt`` (unwrapped)

    @property
    def prompts(self) -> int:
        """Number of prompts of the call."""
        return self.batch // self.num_per_prompt


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Encoded text: ``embeds`` ``(rows, tokens, channels)`` in the space the denoiser's text input
    expects, an optional ``mask`` ``(rows, tokens)`` (``False`` on padding) and ``extras`` a family
    needs beside it (``"pooled"`` for SD3 and Flux), each ``(rows, ...)``."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens per row, padding included."""
        return self.embeds.shape[1]


@dataclasses.dataclass(frozen=True)
class Joined:
    """What ``Adapter.join`` returns: the denoiser's new inputs and where the positive text is.

    The text stream the attention modules see is then ``[P, N_1, ..., N_k]``: ``num_pos``
    positive tokens followed by the negative block the core passed, in its order. A family whose
    text stream is built from several inputs (HiDream: T5 tokens, then per-block Llama tokens)
    says where each negative sits in that stream and its padding mask there (``spans``, ``masks``),
    and ``project`` lays the stream out in that order.
    """

    kwargs: dict[str, Any]
    num_pos: int  #: positive text tokens ahead of the negative block
    pos_mask: torch.Tensor | None = None  #: ``(rows, num_pos)`` boolean, ``False`` on the prompt's padding
    #: anything the adapter's ``patched`` methods and ``project`` need in this forward (``Forward.carry``,
    #: ``TextLayout.carry``), e.g. the negative tokens
    carry: Any = None
    #: where each negative sits in the text stream, ``(start, stop)`` in the core's order (empty: the negatives as
    #: passed, one after the other from ``num_pos``)
    spans: tuple[tuple[int, int], ...] = ()
    #: each negative's ``(rows, stop - start)`` padding mask in the text stream, with ``spans`` (``None``: all real)
    masks: tuple[torch.Tensor | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Where the text sits in the current guided forward, as ``project`` needs it."""

    num_pos: int  #: positive tokens
    num_text: int  #: positive plus negative tokens: the length of the text stream
    #: where each negative sits in the text stream, ``(start, stop)`` in order (families whose text tokens carry
    #: positions, e.g. rotary ones, place each negative like a prompt of its own)
    spans: tuple[tuple[int, int], ...] = ()
    carry: Any = None  #: what ``join`` returned as ``Joined.carry``


@dataclasses.dataclass(frozen=True)
class QKV:
    """Queries, keys and values of one token group, ``(batch, heads, tokens, head_dim)``; ``q`` may be ``None``
    (a cross-attention's text is keys and values only)."""

    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class Projected:
    """One guided attention call, projected: the image tokens and the whole text stream ``[P, N_1..]``.

    ``scale`` is the softmax scale (``None``: ``1 / sqrt(head_dim)``); ``carry`` is anything the
    adapter's ``finish`` needs back (the original's dtype, an image context's attention...).
    """

    image: QKV
    text: QKV
    scale: float | None = None
    carry: Any = None


class Adapter(ABC):
    """The facts of one model family. See the module docstring; ``negguide.testing`` checks them.

    Required: ``family``, ``layout``, ``matches``, ``encode_negative``, ``negative_from_embeds``,
    and for attention-level methods ``attention_modules``, ``project`` and ``finish``. Everything
    else has a default that fits transformer pipelines with one text input.
    """

    #: a short lowercase id: the key of the per-family method defaults
    family: ClassVar[str]
    #: ``"joint"`` (image and text tokens share one attention sequence) or ``"cross"`` (text is a context)
    layout: ClassVar[Layout]
    #: pipeline attributes that may hold denoisers to patch, in order (absent or ``None`` ones are skipped)
    denoisers: ClassVar[tuple[str, ...]] = ("transformer",)
    #: the pipeline method that encodes the prompt (wrapped to encode the negatives with the call's settings)
    encode_method: ClassVar[str] = "encode_prompt"
    #: keyword of ``encode_method`` giving the number of images (or videos) per prompt
    num_per_prompt_arg: ClassVar[str] = "num_images_per_prompt"
    #: the denoiser's batched latent input (its first dimension is the forward's batch)
    sample_input: ClassVar[str] = "hidden_states"
    #: the denoiser's text input, ``(rows, tokens, channels)``
    text_input: ClassVar[str] = "encoder_hidden_states"
    #: the denoiser's text padding-mask input ``(rows, tokens)``, if the family passes one
    text_mask_input: ClassVar[str | None] = None
    #: how the pipeline runs its own CFG (see the module docstring)
    pipeline_cfg: ClassVar[PipelineCFG] = "separate"
    #: prediction level: denoiser inputs with a batch dimension (a row may own several entries); a dotted name
    #: reaches into a dict, list or tuple input (``"added_cond_kwargs.time_ids"``), and ``"<input>.*"`` names every
    #: entry of one (a ControlNet's per-block residuals: ``"controlnet_block_samples.*"``)
    batched_inputs: ClassVar[tuple[str, ...]] = ("hidden_states", "timestep")
    #: prediction level: denoiser input -> the ``Conditioning`` field it takes (``"embeds"``, ``"mask"`` or an extra);
    #: dotted names as in ``batched_inputs`` (``{"added_cond_kwargs.text_embeds": "pooled"}``)
    conditioning_inputs: ClassVar[dict[str, str]] = {"encoder_hidden_states": "embeds"}
    #: prediction level: a negative shorter than the positive text is zero-padded to its length (else refused)
    pad_text_with_zeros: ClassVar[bool] = False
    #: prediction level: a negative's padding mask shorter than the denoiser's mask input is extended with ones
    #: (Chroma's ``attention_mask`` covers the text, then the image tokens, which every branch keeps)
    pad_mask_with_ones: ClassVar[bool] = False
    #: prediction level: denoiser inputs whose batch axis is not the first -> that axis (HiDream's per-layer Llama
    #: states ``(layers, rows, tokens, channels)``: 1); the ``Conditioning`` extras they take are batch-first
    batch_dims: ClassVar[dict[str, int]] = {}
    #: denoiser methods routed through ``patched`` while an attention-level method is installed (instance
    #: attributes, undone on removal); for models that build the joint sequence inside their forward. A dotted name
    #: is a submodule's method (``"patch_embed.forward"``: CogVideoX embeds its joint sequence there)
    patched_methods: ClassVar[tuple[str, ...]] = ()
    #: attention level, under diffusers' context parallelism (``enable_parallelism``): how the family's ``_cp_plan``
    #: treats the text stream. ``"split"``: sharded along the sequence like the image tokens (Flux: each rank's
    #: processors see one chunk of ``[P, N_1..]``); ``"whole"``: every rank sees all the text (Wan's cross-attention
    #: keys); ``None``: not checked, so the core refuses a context-parallel denoiser. See ``docs/integration.md``
    context_parallel: ClassVar[Literal["split", "whole"] | None] = None
    #: per method name, the parameters that replace the method's defaults on this family (see
    #: ``negguide.registry.family_defaults``: the adapter's entries win over the method's for its family)
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    # ------------------------------------------------------------------ what is patched

    @classmethod
    @abstractmethod
    def matches(cls, denoiser: Any) -> bool:
        """Whether this adapter knows ``denoiser``; import diffusers classes inside (``import negguide`` is cheap)."""

    def find_denoisers(self) -> list[torch.nn.Module]:
        """The denoisers of the pipeline to patch: ``denoisers`` that are set, each once."""
        found: list[torch.nn.Module] = []
        for name in self.denoisers:
            module = getattr(self.pipe, name, None)
            if module is not None and all(module is not f for f in found):
                found.append(module)
        return found

    # ------------------------------------------------------------------ encoding

    @abstractmethod
    def encode_negative(self, text: str, call: EncodeCall, padded: bool) -> Conditioning:
        """Encode ONE non-empty negative prompt into one row (``rows = 1``) with the pipeline's own encoders.

        ``padded`` False (attention level): only the real tokens, no padding, where the family
        allows it. ``padded`` True (prediction level): exactly as the pipeline encodes its own
        negative prompt for CFG, with what the denoiser needs beside it (``extras``).
        ``call.encode`` is the pipeline's original ``encode_prompt``.
        """

    @abstractmethod
    def negative_from_embeds(self, embeds: Any, call: EncodeCall, padded: bool) -> Conditioning:
        """Read user-given negative embeddings (the family's documented format) into a ``Conditioning``
        with 1, ``call.prompts`` or ``call.batch`` rows, on any device and dtype (the core moves it)."""

    def positive(self, output: Any) -> torch.Tensor:
        """The positive text embeddings in ``encode_method``'s output (its rows are the call's batch)."""
        first = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(first, torch.Tensor):
            raise NegativePromptError(
                f"{self.family}: expected `{self.encode_method}` to return the prompt embeddings first, "
                f"got {type(first).__name__}. The adapter must override `positive`."
            )
        return first

    # ------------------------------------------------------------------ joining the negatives

    def join_negatives(self, kwargs: dict[str, Any], negatives: list[Conditioning]) -> Joined:
        """Join this forward's negatives, each a ``Conditioning`` with the forward's rows (``embeds``
        ``(batch, n_i, channels)``, ``mask``, ``extras``), to the denoiser's inputs.

        The default concatenates them (masks made where some negative has one) and calls ``join``;
        a family whose negative enters through several inputs (its ``extras``) overrides this.
        """
        negative = torch.cat([c.embeds for c in negatives], dim=1) if len(negatives) > 1 else negatives[0].embeds
        mask = None
        if any(c.mask is not None for c in negatives):
            mask = torch.cat(
                [torch.ones(c.embeds.shape[:2], dtype=torch.bool, device=c.embeds.device) if c.mask is None
                 else c.mask.to(c.embeds.device) for c in negatives], dim=1)  # fmt: skip
        return self.join(kwargs, negative, mask)

    def join(self, kwargs: dict[str, Any], negative: torch.Tensor, mask: torch.Tensor | None) -> Joined:
        """Append the negative tokens ``(batch, n, channels)`` (and their ``mask``) to the text input.

        The default appends to ``text_input`` along the token axis and, when the family has a
        ``text_mask_input``, extends that mask (positive tokens keep theirs, the negative block
        takes ``mask``, all ``True`` when ``None``).
        """
        text = kwargs[self.text_input]
        out = dict(kwargs)
        out[self.text_input] = torch.cat([text, negative.to(device=text.device, dtype=text.dtype)], dim=1)
        pos_mask = None
        if self.text_mask_input is not None and kwargs.get(self.text_mask_input) is not None:
            pos_mask = kwargs[self.text_mask_input]
            neg = torch.ones(negative.shape[:2], dtype=torch.bool, device=pos_mask.device) if mask is None else mask
            out[self.text_mask_input] = torch.cat([pos_mask, neg.to(device=pos_mask.device, dtype=pos_mask.dtype)], 1)
            pos_mask = pos_mask.bool()
        return Joined(out, text.shape[1], pos_mask)

    def uncond_rows(self, kwargs: dict[str, Any], call: EncodeCall | None, batch: int) -> slice | None:
        """``pipeline_cfg = "batched"``: the rows of this forward (``batch`` rows, inputs ``kwargs``) that are the
        pipeline's own unconditional branch, or ``None`` when every row is conditional.

        The default reads a batch of twice the call's rows as ``[uncond, cond]``.
        """
        if call is not None and batch == 2 * call.batch:
            return slice(0, call.batch)
        return None

    def patched(self, name: str, original: Callable[..., Any], forward: Any, *args: Any, **kwargs: Any) -> Any:
        """The denoiser method ``name`` (one of ``patched_methods``) in a guided forward.

        ``original`` is the bound original method (of the submodule, for a dotted name), ``forward`` the guided
        forward in progress (``negguide.installation.Forward``: text layout, negative spans and masks, ``carry``).
        Outside guided forwards the core calls ``original`` itself.
        """
        return original(*args, **kwargs)

    # ------------------------------------------------------------------ attention level

    @abstractmethod
    def attention_modules(self, denoiser: torch.nn.Module) -> dict[str, int]:
        """The processors to guide -> block index for ``layers``.

        Names are those of ``denoiser.attn_processors`` (``"blocks.0.attn2.processor"``), or for a model
        without diffusers' ``AttentionMixin`` the same ``"<module path>.processor"`` form
        (``negguide.installation.attention_processors`` lists them).

        Raise ``NoAdapterError`` for a processor the family cannot guide (an IP-Adapter's, say).
        """

    def num_layers(self, denoiser: torch.nn.Module) -> int:
        """Number of block indices ``attention_modules`` can return (negative ``layers`` count from it)."""
        return len(set(self.attention_modules(denoiser).values()))

    @abstractmethod
    def project(self, attn: Any, text: TextLayout, *args: Any, **kwargs: Any) -> Projected | None:
        """One guided call of a text-seeing attention module: its q/k/v as the model computes them.

        ``args``/``kwargs`` are exactly what the module passed to its processor (after ``attn``).
        Return the image tokens' and the whole text stream's queries, keys and values
        ``(batch, heads, tokens, head_dim)`` after norms and rotary embeddings, or ``None`` when
        this call does not see the text (the original processor then runs).
        """

    @abstractmethod
    def finish(self, attn: Any, projected: Projected, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        """The processor's return value from the attention outputs ``(batch, heads, tokens, head_dim)`` of the
        image tokens and of the text stream (joint layout; ``None`` in the cross layout)."""


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(batch, tokens, heads * dim)`` -> ``(batch, heads, tokens, dim)``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, heads, tokens, dim)`` -> ``(batch, tokens, heads * dim)`` in ``dtype``."""
    return x.transpose(1, 2).flatten(2, 3).to(dtype)


def embeds_and_mask(family: str, embeds: Any, width: int | str, hint: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """User-given negative embeddings of families with a text padding mask (Chroma, PixArt, Lumina2, AuraFlow...).

    Accepts a ``(rows, tokens, width)`` tensor or a dict with ``prompt_embeds`` and ``prompt_attention_mask``
    ``(rows, tokens)`` (or ``(rows, tokens * width)``, as AuraFlow's ``encode_prompt`` returns it); ``width`` is
    checked when it is a number and only named in messages when it is a string (``"joint_attention_dim"``). Returns
    the embeddings and the mask as booleans (``True``: a real token), or ``None`` without one. ``hint`` ends the
    error message: what to pass instead.
    """
    mask = None
    if isinstance(embeds, dict):
        embeds, mask = embeds.get("prompt_embeds"), embeds.get("prompt_attention_mask")
    if (
        not isinstance(embeds, torch.Tensor)
        or embeds.ndim != 3
        or (isinstance(width, int) and embeds.shape[-1] != width)
    ):
        got = f"a tensor of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise NegativePromptError(
            f"{family}: expected `negative_prompt_embeds` as a (rows, tokens, {width}) tensor or a dict with "
            f"`prompt_embeds` and `prompt_attention_mask` (rows, tokens), got {got}. {hint}"
        )
    if mask is None:
        return embeds, None
    rows, tokens, dim = embeds.shape
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == tokens * dim and dim > 1:
        mask = mask.reshape(rows, tokens, dim)[..., 0]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (rows, tokens):
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise NegativePromptError(
            f"{family}: expected `prompt_attention_mask` of shape {(rows, tokens)} (rows, tokens of `prompt_embeds`), "
            f"got {got}. Pass the mask `pipe.encode_prompt` returns with the embeddings."
        )
    return embeds, mask != 0


def text_and_pooled(family: str, embeds: Any, needs_pooled: bool) -> Conditioning:
    """User-given negative embeddings of joint families with a pooled vector (SD3, Flux).

    Accepts a ``(rows, tokens, channels)`` tensor or a dict with ``prompt_embeds`` and
    ``pooled_prompt_embeds`` ``(rows, pooled_dim)``; the pooled vector is required by
    prediction-level methods (``needs_pooled``).
    """
    pooled = None
    if isinstance(embeds, dict):
        pooled = embeds.get("pooled_prompt_embeds")
        embeds = embeds.get("prompt_embeds")
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        got = f"a tensor of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise NegativePromptError(
            f"{family}: expected `negative_prompt_embeds` as a (rows, tokens, joint_attention_dim) tensor "
            f"or a dict with `prompt_embeds` and `pooled_prompt_embeds`, got {got}."
        )
    if needs_pooled and pooled is None:
        raise NegativePromptError(
            f"{family}: CFG needs the negative pooled vector too: pass negative_prompt_embeds="
            "{'prompt_embeds': ..., 'pooled_prompt_embeds': ...}."
        )
    return Conditioning(embeds, extras={} if pooled is None else {"pooled": pooled})


class JointAttentionAdapter(Adapter):
    """Base of adapters whose image and text tokens share one attention sequence (SD3, Flux)."""

    layout: ClassVar[Layout] = "joint"


class CrossAttentionAdapter(Adapter):
    """Base of adapters whose text enters through cross-attention (Wan)."""

    layout: ClassVar[Layout] = "cross"


def contract_problems(cls: type) -> list[str]:
    """What ``cls`` lacks to be an adapter negguide can install (empty: nothing), for registration errors."""
    problems = []
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        problems.append("`family` (a short lowercase id, e.g. family = 'mymodel')")
    if getattr(cls, "layout", None) not in ("joint", "cross"):
        problems.append(f"`layout` ('joint' or 'cross'), got {getattr(cls, 'layout', None)!r}")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        problems.append("the method(s) " + ", ".join(f"`{m}`" for m in missing))
    if getattr(cls, "pipeline_cfg", None) not in ("batched", "separate"):
        problems.append(f"`pipeline_cfg` ('batched' or 'separate'), got {getattr(cls, 'pipeline_cfg', None)!r}")
    denoisers = getattr(cls, "denoisers", None)
    if not isinstance(denoisers, tuple) or not denoisers or not all(isinstance(d, str) for d in denoisers):
        problems.append(f"`denoisers` (a non-empty tuple of pipeline attribute names), got {denoisers!r}")
    for name in ("encode_method", "num_per_prompt_arg", "sample_input", "text_input"):
        if not isinstance(getattr(cls, name, None), str):
            problems.append(f"`{name}` (a string), got {getattr(cls, name, None)!r}")
    if not isinstance(getattr(cls, "conditioning_inputs", None), dict):
        problems.append("`conditioning_inputs` (a dict of denoiser input -> Conditioning field)")
    defaults = getattr(cls, "defaults", None)
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        problems.append("`defaults` (a dict of method name -> parameters)")
    return problems
