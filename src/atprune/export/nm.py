"""N:M patterns of saved matrices: which ``N:M`` each pruned matrix was pruned to (one N per block for mixed N:M)
and a check that a tensor obeys it, used by ``save_pruned`` (recorded in the report) and ``verify`` (rechecked).
"""

from __future__ import annotations

import torch


def matrix_patterns(model, pruning: dict | None, blocks_path: str | None = None) -> dict[str, dict]:
    """Parameter name -> ``{"pattern": "N:M", "axis": a}`` for every matrix of an N:M run.

    Args:
        model: the pruned model (its parameter names are the checkpoint's).
        pruning: the report's ``pruning`` section (:meth:`atprune.api.PruneResult.to_dict`); block ``i``'s
            ``pattern`` key gives its ``N:M``. None or an unstructured run: empty.
        blocks_path: as :meth:`atprune.models.adapter.Adapter.for_model`.

    ``axis`` is the input dimension in the stored layout (1 for ``nn.Linear`` ``[out, in]``, 0 for a GPT-2
    ``Conv1D`` ``[in, out]``): groups of M run along it.
    """
    blocks = (pruning or {}).get("blocks") or []
    if not any("pattern" in b for b in blocks):
        return {}
    from atprune.models.adapter import Adapter, ExpertLinear, TransposedLinear, stored_parameter

    adapter = Adapter.for_model(model, blocks_path)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for rec, block in zip(blocks, adapter.blocks):
        if "pattern" not in rec:
            continue
        for lin in adapter.linears(block).values():
            name = names.get(id(stored_parameter(lin)))
            if name is not None and not isinstance(lin, ExpertLinear):
                out[name] = {"pattern": rec["pattern"], "axis": 0 if isinstance(lin, TransposedLinear) else 1}
    return out


def nm_violations(weight: torch.Tensor, pattern: str, axis: int = 1) -> int:
    """Number of groups of M consecutive weights along ``axis`` with more than N non-zeros (0: the matrix is N:M).

    Args:
        weight: 2-D tensor, any dtype and device.
        pattern: ``"N:M"``.
        axis: the input dimension (see :func:`matrix_patterns`).

    Returns:
        The count of offending groups; a width M does not divide counts as one violation per row.
    """
    n, m = (int(v) for v in pattern.split(":"))
    w = weight.detach()
    if axis == 0:
        w = w.t()
    rows, cols = w.shape
    if cols % m:
        return rows
    nonzero = (w != 0).reshape(rows, cols // m, m).sum(dim=-1)
    return int(torch.count_nonzero(nonzero > n))
