"""Loading a vision-language model with its processor, and the checks that run before it is loaded."""

from __future__ import annotations

import torch

from atprune.errors import ConfigError
from atprune.models.sources import ModelSource, resolve_model
from atprune.multimodal.layout import LAYOUTS, SUPPORTED, is_vision_language_config


def source_config(source: ModelSource):
    """The transformers config of a folder or hub model (None for a GGUF file: GGUF holds text models only)."""
    if source.kind == "gguf":
        return None
    from transformers import AutoConfig

    where, kwargs = source.from_pretrained_args()
    try:
        return AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read the config of model {source.spec!r}: {err}") from None


def is_vision_language_source(source: ModelSource, strict: bool = True) -> bool:
    """Whether ``source`` is a vision-language model of a supported class (its config has a ``vision_config``; no
    weights are read). With ``strict=False`` an unsupported vision-language class gives False (the caller then
    treats it as a language model, as atprune did before it knew vision-language classes).

    Raises:
        ConfigError: the config cannot be read, or (``strict``) it is vision-language but of a class atprune does
            not support (from the config's ``architectures``).
    """
    config = source_config(source)
    if config is None or not is_vision_language_config(config):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in LAYOUTS for a in archs):
        if not strict:
            return False
        raise ConfigError(f"vision-language model {source.spec!r} ({', '.join(archs)}) is not supported yet; "
                          f"supported: {', '.join(SUPPORTED)}")
    return True


def check_image_text_calibration(source: ModelSource, spec: str) -> None:
    """Refuse image-text calibration or caption data for a text-only model, before it is loaded.

    Raises:
        ConfigError: ``source`` is not a vision-language model.
    """
    if not is_vision_language_source(source):
        raise ConfigError(f"{spec} holds image-text pairs, but model {source.spec!r} is a text-only model; give "
                          "text calibration data (c4, wikitext2, a text file) or a vision-language model")


def load_vision_language(source: ModelSource | str, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", progress: bool = True):
    """Load ``(model, processor)`` with transformers ``AutoModelForImageTextToText`` / ``AutoProcessor``: eval
    mode, KV cache off, on ``device``, weights in ``dtype``.

    Raises:
        ConfigError: the spec does not resolve, or the model is not a supported vision-language class.
    """
    from atprune.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers' processors import torchvision when it is installed
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import transformers.utils.logging as hf_logging

    if isinstance(source, str):
        source = resolve_model(source)
    where, kwargs = source.from_pretrained_args()
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(where, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as err:  # e.g. a processor that needs torchvision
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot load {where} as a vision-language model with its processor: {first}") from None
    finally:
        if was and not progress:
            hf_logging.enable_progress_bar()
    if type(model).__name__ not in LAYOUTS:
        raise ConfigError(f"{type(model).__name__} is not a supported vision-language class; supported: "
                          f"{', '.join(SUPPORTED)}")
    model.config.use_cache = False
    model.eval().to(device)
    return model, processor
