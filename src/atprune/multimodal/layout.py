"""Where the parts of a transformers vision-language model are: the language model's decoder blocks (the only thing
atprune prunes), and the parts that stay dense (vision tower, projector, token embeddings, output head).

The paths are those of transformers 5.x (``modeling_llava.py``: ``LlavaForConditionalGeneration.model`` is a
``LlavaModel`` holding ``vision_tower``, ``multi_modal_projector`` and ``language_model``; ``modeling_qwen2_vl.py``:
``Qwen2VLModel.visual`` with its ``merger`` and ``language_model``; ``modeling_idefics3.py``: ``Idefics3Model``
holding ``vision_model``, ``connector`` and ``text_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from atprune.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Dotted module paths inside one vision-language class.

    Attributes:
        blocks: the language model's decoder-block ``nn.ModuleList`` (what is pruned).
        vision: the vision tower (kept dense).
        projector: the modules mapping image features into the language model's width (kept dense; Qwen2-VL's
            patch merger lives inside its vision tower and is reported with it).
    """

    blocks: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]


_LLAVA = Layout("model.language_model.layers", ("model.vision_tower",), ("model.multi_modal_projector",))
_QWEN = Layout("model.language_model.layers", ("model.visual",), ())
_IDEFICS = Layout("model.text_model.layers", ("model.vision_model",), ("model.connector",))

LAYOUTS: dict[str, Layout] = {
    "LlavaForConditionalGeneration": _LLAVA,
    # the learned row separator between image tiles is part of the projection
    "LlavaNextForConditionalGeneration": Layout(_LLAVA.blocks, _LLAVA.vision,
                                                ("model.multi_modal_projector", "model.image_newline")),
    "Qwen2VLForConditionalGeneration": _QWEN,
    "Qwen2_5_VLForConditionalGeneration": _QWEN,
    "Gemma3ForConditionalGeneration": _LLAVA,
    "Idefics3ForConditionalGeneration": _IDEFICS,
    "SmolVLMForConditionalGeneration": _IDEFICS,
}

SUPPORTED = tuple(LAYOUTS)


def is_vision_language_config(config) -> bool:
    """Whether a transformers config describes a vision-language model (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def layout_of(model: nn.Module) -> Layout | None:
    """The :class:`Layout` of ``model``'s class, None for a model that is not vision-language.

    Raises:
        ConfigError: a vision-language model (its config has a ``vision_config``) of a class atprune does not
            support, naming the supported ones.
    """
    found = LAYOUTS.get(type(model).__name__)
    if found is None and is_vision_language_config(getattr(model, "config", None)):
        raise ConfigError(f"vision-language class {type(model).__name__} is not supported yet; supported: "
                          f"{', '.join(SUPPORTED)}")
    return found


def _module(model: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def dense_parts(model: nn.Module) -> dict[str, list[str]]:
    """The parameters that pruning must leave untouched, by part: ``vision_tower``, ``projector``,
    ``embeddings`` (input token embeddings) and ``lm_head`` (the output head; empty when it is tied to the
    embeddings, whose parameter is listed once, under ``embeddings``).

    Returns:
        part -> parameter names as ``model.named_parameters()`` gives them (each shared parameter once).

    Raises:
        ConfigError: ``model`` is not a supported vision-language model, or a path of its layout is missing.
    """
    layout = layout_of(model)
    if layout is None:
        raise ConfigError(f"{type(model).__name__} is not a vision-language model; supported: {', '.join(SUPPORTED)}")
    names = {id(p): n for n, p in model.named_parameters()}  # the first name of each (tied) parameter
    parts: dict[str, list[str]] = {}
    for part, paths in (("vision_tower", layout.vision), ("projector", layout.projector)):
        found: list[str] = []
        for path in paths:
            module = _module(model, path)
            if module is None:
                raise ConfigError(f"{type(model).__name__} has no {path} (transformers layout changed?)")
            params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
            found += [names[id(p)] for p in params if id(p) in names]
        parts[part] = found
    for part, module in (("embeddings", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        taken = {n for ns in parts.values() for n in ns}
        parts[part] = [names[id(p)] for p in module.parameters() if names[id(p)] not in taken]
    return parts
