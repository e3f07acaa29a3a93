"""Models: where they come from (:mod:`.sources`: aliases, GGUF files, folders, hub ids) and what atprune prunes in
them (:mod:`.adapter`: decoder blocks and their matrices). Later: vision and multimodal adapters."""

from atprune.models.adapter import Adapter, set_weight
from atprune.models.sources import ModelSource, load_model, num_blocks, resolve_device, resolve_dtype, resolve_model

__all__ = ["Adapter", "ModelSource", "load_model", "num_blocks", "resolve_device", "resolve_dtype", "resolve_model",
           "set_weight"]
