"""Image classifiers (timm ViT / DeiT / ConvNeXt, transformers ViT / ConvNext) pruned block by block with the same
pruners and allocators as language models, scored by top-1 / top-5 accuracy (docs/vision.md).

Public names load lazily, so that ``import atprune.vision`` stays light (timm is imported only when a timm model is).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "VisionAdapter": "atprune.vision.adapter",
    "prune_classifier": "atprune.vision.prune",
    "block_inputs": "atprune.vision.prune",
    "load_classifier": "atprune.vision.models",
    "open_images": "atprune.vision.data",
    "from_tensors": "atprune.vision.data",
    "accuracy": "atprune.vision.accuracy",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'atprune.vision' has no attribute {name!r}")
