"""Proof that pruning left the dense parts of a vision-language model alone: checksums of the vision tower, the
projector, the token embeddings and the output head before and after pruning (report) and in the saved files
(``atprune verify``, through :func:`atprune.export.checkpoint.save_pruned`'s ``untouched``)."""

from __future__ import annotations

import torch

from atprune.export.files import tensors_digest
from atprune.multimodal.layout import dense_parts


class DenseParts:
    """The dense parts of ``model``, fingerprinted now (call before pruning).

    Args:
        model: a supported vision-language model (:data:`atprune.multimodal.layout.LAYOUTS`).
        save_dtype: the dtype the checkpoint will be saved in (floating tensors are digested cast to it, so the
            checksum can be compared with the files); None: the model's dtype.

    Raises:
        ConfigError: see :func:`atprune.multimodal.layout.dense_parts`.
    """

    def __init__(self, model: torch.nn.Module, save_dtype: torch.dtype | None = None):
        self.model, self.dtype = model, save_dtype
        self.names = dense_parts(model)
        self.before = {part: self._digest(names) for part, names in self.names.items()}

    def _digest(self, names: list[str]) -> str:
        params = dict(self.model.named_parameters())
        return tensors_digest({n: params[n] for n in names}, self.dtype)

    def report(self) -> dict:
        """Per part: ``tensors``, ``params``, ``sha256_dense`` (before pruning), ``sha256_pruned`` (now) and
        ``unchanged``; ``lm_head`` with no tensors of its own says ``tied_to_embeddings``."""
        params = dict(self.model.named_parameters())
        out = {}
        for part, names in self.names.items():
            now = self._digest(names)
            out[part] = {"tensors": len(names), "params": sum(params[n].numel() for n in names),
                         "sha256_dense": self.before[part], "sha256_pruned": now, "unchanged": now == self.before[part]}
            if part == "lm_head" and not names:
                out[part]["tied_to_embeddings"] = True
        return out

    def untouched(self) -> dict[str, dict]:
        """``save_pruned(..., untouched=)``: part -> names and the dense checksum (parts with tensors only)."""
        return {part: {"names": names, "sha256": self.before[part]} for part, names in self.names.items() if names}
