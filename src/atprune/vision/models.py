"""Loading image classifiers: ``timm:NAME`` (timm, the optional ``atprune[vision]`` extra) and transformers
``ViTForImageClassification`` / ``ConvNextForImageClassification`` folders, each with its own preprocessing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from atprune.errors import ConfigError
from atprune.vision.compat import import_timm

HF_CLASSES = ("ViTForImageClassification", "ConvNextForImageClassification")


def _folder_architecture(spec: str) -> str | None:
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return archs[0] if archs else None


def is_vision_model(spec: str) -> bool:
    """Whether ``spec`` names an image classifier: ``timm:NAME`` or a transformers folder whose config lists a
    supported image-classification architecture (read from ``config.json``, no weights loaded)."""
    return str(spec).startswith("timm:") or _folder_architecture(spec) in HF_CLASSES


def check_model_spec(spec: str, checkpoint: str | None = None, random_init: bool = False) -> None:
    """Cheap checks before loading: timm installed and the name known, the checkpoint present, a folder's class
    supported, weights to be had.

    Raises:
        ConfigError: the first problem.
    """
    if checkpoint and random_init:
        raise ConfigError("--checkpoint loads weights and --random-init skips them; give one")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    if str(spec).startswith("timm:"):
        timm = import_timm()
        name = spec[5:]
        if not timm.is_model(name):
            raise ConfigError(f"timm has no model {name!r} (see timm.list_models(), e.g. deit_small_patch16_224, "
                              "vit_base_patch16_224, convnext_tiny)")
        if not checkpoint and not random_init and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"timm:{name} needs pretrained weights from the hub, which HF_HUB_OFFLINE=1 forbids; "
                              "give --checkpoint FILE (or --random-init for architecture-only timing)")
        return
    arch = _folder_architecture(spec)
    if arch not in HF_CLASSES:
        raise ConfigError(f"{spec} is not an image classifier atprune can prune (timm:NAME, or a transformers folder "
                          f"of {' / '.join(HF_CLASSES)}; its config says {arch})")
    if checkpoint:
        raise ConfigError("--checkpoint applies to timm:NAME models; a transformers folder holds its own weights")


def _hf_transform(folder: str, config) -> tuple[Callable, dict]:
    """The folder's image processor (``preprocessor_config.json``) or, without one, a ViT processor at the config's
    ``image_size`` with its default normalisation (mean = std = 0.5)."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    if (Path(folder) / "preprocessor_config.json").is_file():
        processor, origin = AutoImageProcessor.from_pretrained(folder), "preprocessor_config.json"
    else:
        size = int(getattr(config, "image_size", 224))
        processor, origin = ViTImageProcessor(size={"height": size, "width": size}), "default ViT processor"

    def transform(img):
        return processor(images=img, return_tensors="pt")["pixel_values"][0]

    return transform, {"preprocessing": origin}


def load_classifier(spec: str, *, checkpoint: str | None = None, random_init: bool = False,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an image classifier in eval mode.

    Args:
        spec: ``timm:NAME`` (pretrained weights from the hub unless ``checkpoint`` or ``random_init``) or a
            transformers folder.
        checkpoint: timm weights file (``.pth`` / ``.safetensors``), loaded by ``timm.create_model``.
        random_init: the architecture with random weights (timing, tests).

    Returns:
        ``(model, transform, info)``: ``transform(PIL image) -> [C, H, W]`` float tensor (timm's data config /
        the folder's image processor), and a description for the report.

    Raises:
        ConfigError: see :func:`check_model_spec`.
    """
    check_model_spec(spec, checkpoint, random_init)
    if spec.startswith("timm:"):
        timm = import_timm()
        name = spec[5:]
        kwargs = {"checkpoint_path": str(Path(checkpoint).expanduser())} if checkpoint else {}
        model = timm.create_model(name, pretrained=not (checkpoint or random_init), **kwargs)
        data_config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**data_config)
        weights = "checkpoint" if checkpoint else "random" if random_init else "pretrained"
        info = {"source": "timm", "name": name, "weights": weights, "checkpoint": checkpoint,
                "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}}
    else:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(spec, dtype=dtype)
        transform, info = _hf_transform(spec, model.config)
        info = {"source": "folder", "path": str(Path(spec).resolve()), "weights": "folder"} | info
    model = model.to(device=device, dtype=dtype).eval()
    info["class"] = type(model).__name__
    return model, transform, info
