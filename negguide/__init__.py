"""negguide: negative prompts that work on modern diffusion and flow-matching models.

```python
with negguide.apply(pipe, "vsf", negative_prompt="snow", scale=3.5, bias=0.1):
    image = pipe("a canadian winter landscape", num_inference_steps=8, guidance_scale=0.0).images[0]
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from negguide.adapter import QKV
    from negguide.adapter import Adapter
    from negguide.adapter import Conditioning
    from negguide.adapter import CrossAttentionAdapter
    from negguide.adapter import EncodeCall
    from negguide.adapter import Joined
    from negguide.adapter import JointAttentionAdapter
    from negguide.adapter import Projected
    from negguide.adapter import TextLayout
    from negguide.config import GuidanceSpec
    from negguide.config import load_config
    from negguide.errors import ConfigError
    from negguide.errors import NegativePromptError
    from negguide.errors import NegGuideError
    from negguide.errors import NoAdapterError
    from negguide.errors import PluginError
    from negguide.errors import PromptSetError
    from negguide.errors import UnknownJudgeError
    from negguide.errors import UnknownMethodError
    from negguide.hookspecs import hookimpl
    from negguide.judge import Judge
    from negguide.judge import JudgeConfig
    from negguide.judge import Verdict
    from negguide.method import AttentionMethod
    from negguide.method import AttentionMethodConfig
    from negguide.method import GuidanceMethod
    from negguide.method import MethodConfig
    from negguide.method import NegativeTokens
    from negguide.method import PredictionMethod
    from negguide.method import SegmentOutputs
    from negguide.method import Segments
    from negguide.registry import get_adapter
    from negguide.registry import get_judge
    from negguide.registry import get_method
    from negguide.registry import list_adapters
    from negguide.registry import list_judges
    from negguide.registry import list_methods
    from negguide.runtime import GuidanceHandle
    from negguide.runtime import apply
    from negguide.runtime import remove
    from negguide.sweep import Comparison
    from negguide.sweep import compare

_LAZY = {
    "Adapter": "negguide.adapter",
    "Conditioning": "negguide.adapter",
    "CrossAttentionAdapter": "negguide.adapter",
    "EncodeCall": "negguide.adapter",
    "Joined": "negguide.adapter",
    "JointAttentionAdapter": "negguide.adapter",
    "Projected": "negguide.adapter",
    "QKV": "negguide.adapter",
    "TextLayout": "negguide.adapter",
    "GuidanceSpec": "negguide.config",
    "load_config": "negguide.config",
    "ConfigError": "negguide.errors",
    "NegativePromptError": "negguide.errors",
    "NegGuideError": "negguide.errors",
    "NoAdapterError": "negguide.errors",
    "PluginError": "negguide.errors",
    "PromptSetError": "negguide.errors",
    "UnknownMethodError": "negguide.errors",
    "hookimpl": "negguide.hookspecs",
    "AttentionMethod": "negguide.method",
    "AttentionMethodConfig": "negguide.method",
    "GuidanceMethod": "negguide.method",
    "MethodConfig": "negguide.method",
    "NegativeTokens": "negguide.method",
    "PredictionMethod": "negguide.method",
    "SegmentOutputs": "negguide.method",
    "Segments": "negguide.method",
    "get_adapter": "negguide.registry",
    "get_method": "negguide.registry",
    "list_adapters": "negguide.registry",
    "list_methods": "negguide.registry",
    "get_judge": "negguide.registry",
    "list_judges": "negguide.registry",
    "Judge": "negguide.judge",
    "JudgeConfig": "negguide.judge",
    "Verdict": "negguide.judge",
    "UnknownJudgeError": "negguide.errors",
    "GuidanceHandle": "negguide.runtime",
    "apply": "negguide.runtime",
    "remove": "negguide.runtime",
    "Comparison": "negguide.sweep",
    "compare": "negguide.sweep",
}

__all__ = [
    "Adapter",
    "AttentionMethod",
    "AttentionMethodConfig",
    "Comparison",
    "Conditioning",
    "ConfigError",
    "CrossAttentionAdapter",
    "EncodeCall",
    "GuidanceHandle",
    "GuidanceMethod",
    "GuidanceSpec",
    "Joined",
    "JointAttentionAdapter",
    "Judge",
    "JudgeConfig",
    "MethodConfig",
    "NegGuideError",
    "NegativePromptError",
    "NegativeTokens",
    "NoAdapterError",
    "PluginError",
    "PredictionMethod",
    "Projected",
    "PromptSetError",
    "QKV",
    "SegmentOutputs",
    "Segments",
    "TextLayout",
    "UnknownJudgeError",
    "UnknownMethodError",
    "Verdict",
    "__version__",
    "apply",
    "compare",
    "get_adapter",
    "get_judge",
    "get_method",
    "hookimpl",
    "list_adapters",
    "list_judges",
    "list_methods",
    "load_config",
    "remove",
]


def __getattr__(name: str) -> Any:
    # Lazy re-exports: `import negguide` stays cheap (no torch, no diffusers) until a name is used.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version

        try:
            return version("negguide")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'negguide' has no attribute {name!r}")
