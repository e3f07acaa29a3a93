"""Compatibility module: model loading now lives in :mod:`atprune.sources` and the architecture adapter in
:mod:`atprune.adapter`. Every name this module used to define is re-exported here, so ``from atprune.models
import X`` keeps working; new code should import from the two modules directly.

To monkeypatch a function (e.g. ``load_model``), patch it where the code that calls it looks it up
(:mod:`atprune.sources`, :mod:`atprune.adapter`, or the importing module), not here.
"""

from atprune.adapter import (  # noqa: F401  (private names too: tests and old code import them)
    KNOWN_BLOCK_PATHS,
    Adapter,
    ExpertLinear,
    TransposedLinear,
    _conv1d_class,
    _fused_experts,
    _get_path,
    _has_prunable,
    set_weight,
    stored_parameter,
)
from atprune.sources import (  # noqa: F401
    _GEMMA3,
    ALIASES,
    DTYPES,
    Alias,
    ChunkedAlias,
    ModelSource,
    _config_num_blocks,
    _expected_sha256,
    _loading_bars,
    _package_dir,
    _sha256,
    assemble_chunks,
    cache_dir,
    load_model,
    num_blocks,
    resolve_device,
    resolve_dtype,
    resolve_model,
)

__all__ = [
    "ALIASES", "DTYPES", "KNOWN_BLOCK_PATHS", "Adapter", "Alias", "ChunkedAlias", "ExpertLinear", "ModelSource",
    "TransposedLinear", "assemble_chunks", "cache_dir", "load_model", "num_blocks", "resolve_device", "resolve_dtype",
    "resolve_model", "set_weight", "stored_parameter",
]
