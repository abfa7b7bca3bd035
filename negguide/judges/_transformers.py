"""What the judges built on a transformers model share: a model passed in loaded, or loaded from a folder/hub id."""

from __future__ import annotations

from typing import Any

from negguide.errors import ConfigError


def model_label(model: Any) -> str:
    """What a loaded model is recorded as in ``run.json``: its folder or hub id if it knows one, else its class."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name if isinstance(name, str) and name else f"<{type(model).__name__}>"


def given_model(judge: str, params: dict[str, Any], processor: Any) -> tuple[dict[str, Any], Any]:
    """``params`` with a loaded ``model`` replaced by its label, and that model (``None`` when ``model`` is a name).

    Raises:
        ConfigError: a loaded model without its ``processor``.
    """
    model = params.get("model")
    if model is None or isinstance(model, str):
        return params, None
    if processor is None:
        raise ConfigError(
            f"judge {judge}: got a loaded model ({type(model).__name__}) but no `processor`; "
            "pass its AutoProcessor as `processor=`"
        )
    return {**params, "model": model_label(model)}, model


def load_pretrained(judge: str, auto_model: Any, where: str, dtype: str, kind: str) -> tuple[Any, Any]:
    """``auto_model.from_pretrained(where)`` in ``dtype`` and its ``AutoProcessor``.

    Raises:
        ConfigError: nothing loadable at ``where``, naming ``kind`` (the kind of model the judge expects).
    """
    import torch
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(where)
        model = auto_model.from_pretrained(where, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"judge {judge}: expected `model` to be a local folder or hub id of {kind}, "
            f"got {where!r} ({first}); pass model=PATH of a downloaded one"
        ) from None
    return model, processor
