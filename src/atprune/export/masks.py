"""Pruning masks of a model: recorded packed (1 bit per weight), digested, and checked against saved tensors.

A masked weight that is non-zero at any step of a save raises :class:`MaskViolation`, naming the matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from atprune.errors import ConfigError


class MaskViolation(RuntimeError):
    """A weight the pruning mask says is zero is non-zero (a step re-densified it); the message names it."""


def mask_digest(zeros: torch.Tensor) -> str:
    """sha256 (hex) of a boolean zero pattern: row-major flattened, packed 8 per byte, little bit order
    (``numpy.packbits(..., bitorder="little")``), so the same pattern always gives the same digest.

    Args:
        zeros: bool tensor of any shape (True = weight is zero), any device.
    """
    bits = np.packbits(zeros.detach().reshape(-1).cpu().numpy().astype(bool), bitorder="little")
    return hashlib.sha256(bits.tobytes()).hexdigest()


class Masks(Mapping[str, torch.Tensor]):
    """Pruning masks kept packed, 1 bit per weight (a bool tensor would take 1 byte per weight: 7 GB for a 7B
    model); a read-only mapping: ``masks[name]`` unpacks one bool tensor (True = pruned, must stay 0)."""

    blocks_path: str | None = None

    def __init__(self) -> None:
        self._packed: dict[str, tuple[tuple[int, ...], np.ndarray, int]] = {}

    def add(self, name: str, zeros: torch.Tensor) -> None:
        """Record ``zeros`` (bool tensor, any shape/device) as the mask of ``name``."""
        flat = zeros.detach().reshape(-1).cpu().numpy().astype(bool, copy=False)
        self._packed[name] = (tuple(zeros.shape), np.packbits(flat, bitorder="little"), int(np.count_nonzero(flat)))

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, bits, _ = self._packed[name]
        n = int(np.prod(shape))
        return torch.from_numpy(np.unpackbits(bits, count=n, bitorder="little").astype(bool)).reshape(shape)

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._packed[name][0]

    def zeros(self, name: str) -> int:
        """Number of pruned weights of ``name``."""
        return self._packed[name][2]

    def digest(self, name: str) -> str:
        """:func:`mask_digest` of the mask of ``name`` (from the packed bits, no unpacking)."""
        return hashlib.sha256(self._packed[name][1].tobytes()).hexdigest()


def record_masks(model, blocks_path: str | None = None) -> Masks:
    """The pruning masks of a model: for every stored weight parameter behind the prunable layers of the decoder
    blocks (see :class:`atprune.models.adapter.Adapter`), ``weight == 0`` in the parameter's own layout and under its full
    name (``model.layers.0.mlp.up_proj.weight`` ``[out, in]``; a GPT-2 ``Conv1D`` weight ``[in, out]``; a fused
    mixture-of-experts parameter ``[experts, ., .]`` once for all its experts), packed 1 bit per weight
    (:class:`Masks`). ``masks.blocks_path`` is the blocks' dotted path.

    Args:
        blocks_path: as ``Adapter.for_model`` (for layouts atprune does not recognise).

    Raises:
        ConfigError: the model's decoder blocks cannot be found.
    """
    from atprune.models.adapter import Adapter, stored_parameter

    adapter = Adapter.for_model(model, blocks_path)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = Masks()
    masks.blocks_path = adapter.blocks_path
    for block in adapter.blocks:
        for lin in adapter.linears(block).values():
            param = stored_parameter(lin)
            name = names.get(id(param))
            if name is not None and name not in masks:
                masks.add(name, param.detach() == 0)
    return masks


def check_saveable(model, blocks_path: str | None = None) -> None:
    """Refuse, before any pruning work, a model whose pruned weights atprune cannot yet follow into a checkpoint.

    transformers writes fused mixture-of-experts tensors (e.g. Mixtral's ``experts.gate_up_proj``
    ``[experts, 2I, H]``) back as one matrix per expert under other names, so their masks could not be checked in
    the files; such models prune and evaluate, but ``--out`` is refused.

    Raises:
        ConfigError: names the first fused expert parameter found.
    """
    from atprune.models.adapter import Adapter, ExpertLinear

    adapter = Adapter.for_model(model, blocks_path)
    for i, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            if isinstance(lin, ExpertLinear):
                raise ConfigError(f"saving fused mixture-of-experts weights ({adapter.blocks_path}.{i}.{name}) is not "
                                  "supported yet (transformers re-splits them per expert on save, so the masks could "
                                  "not be checked); prune and evaluate without --out")


def check_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], where: str) -> None:
    """Check that every masked weight is still zero.

    Args:
        tensors: parameter name -> weight tensor (any dtype/device), for at least every name in ``masks``.
        masks: parameter name -> bool tensor of the same shape (True = must be zero).
        where: the step being checked, for the message (e.g. ``"after the cast to float16"``).

    Raises:
        MaskViolation: a name is missing, a shape differs, or a masked weight is non-zero; names the matrix
            and the number of re-densified weights.
    """
    for name, mask in masks.items():
        if name not in tensors:
            raise MaskViolation(f"{name}: pruned matrix missing {where}")
        t = tensors[name]
        if tuple(t.shape) != tuple(mask.shape):
            raise MaskViolation(f"{name}: shape {tuple(t.shape)} {where}, pruned as {tuple(mask.shape)}")
        bad = int(torch.count_nonzero((t.detach().cpu() != 0) & mask))  # count_nonzero: bool .sum() is slow
        if bad:
            raise MaskViolation(f"{name}: {bad} of {int(torch.count_nonzero(mask))} pruned weights are non-zero {where}; "
                                "checkpoint refused")


def matrix_entries(saved: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per matrix: shape, mask zeros and sparsity, and the zeros actually saved (``saved``: name -> tensor read back),
    with the sha256 of both patterns (:func:`mask_digest`) and the underflow zeros (saved zeros the mask lacks)."""
    entries = {}
    for name, mask in masks.items():
        zeros = saved[name] == 0
        n, z, zs = mask.numel(), int(torch.count_nonzero(mask)), int(torch.count_nonzero(zeros))
        digest = masks.digest(name) if isinstance(masks, Masks) else mask_digest(mask)
        entries[name] = {"shape": list(mask.shape), "zeros": z, "sparsity": z / n, "mask_sha256": digest,
                         "saved_zeros": zs, "saved_sparsity": zs / n, "saved_sha256": mask_digest(zeros),
                         "underflow_zeros": zs - z}
    return entries
