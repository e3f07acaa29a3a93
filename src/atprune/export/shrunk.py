"""Saving a structurally pruned (smaller) model: safetensors, tokenizer and report.json in one atomic folder swap.

The checkpoint is what ``save_pretrained`` writes for the shrunk transformers model, with the widths in its config
(:mod:`atprune.models.shrink`); there are no masks to check, every stored weight is kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from atprune.export.files import check_output_dir, public_permissions, replace_folder, write_json


def save_shrunk(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False) -> Path:
    """Write ``model`` (its config holding the new widths), ``tokenizer`` and ``report.json`` into ``out``.

    Everything goes to a temporary folder beside ``out`` and is renamed into place at the end; an existing ``out`` is
    replaced only with ``overwrite``.

    Raises:
        ConfigError: see :func:`atprune.export.files.check_output_dir`.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)
        public_permissions(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
