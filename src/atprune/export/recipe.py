"""Per-block sparsities of a run as an llm-compressor recipe (``atprune recipe``).

llm-compressor's ``SparseGPTModifier`` and ``WandaPruningModifier`` accept ``sparsity`` as a list with one
rate per module matched by ``targets``; every prunable Linear inside the i-th matched module is pruned at
rate i. atprune targets the decoder blocks (``re:model\\.layers\\.\\d+$``), in model order, so the list is
the per-block allocation atprune used (ATP, OWL, ... or uniform), and ``lm_head`` is ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from atprune.atomic import atomic_file
from atprune.errors import ConfigError

MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def recipe_from_report(report: dict, modifier: str | None = None, blocks_path: str | None = None) -> dict:
    """Build the recipe (a plain dict, YAML-ready) from an atprune report.

    Args:
        report: the content of a run's ``report.json`` (``atprune prune`` or ``atprune search``).
        modifier: ``wanda`` or ``sparsegpt`` (or the llm-compressor class name); default: the run's method.
        blocks_path: dotted path of the decoder block list; default: the report's ``export.blocks_path``,
            else ``model.layers``.

    Returns:
        ``{"sparsity_stage": {"sparsity_modifiers": {Modifier: {"sparsity": [L floats in [0, 1], rounded to 6
        decimals], "mask_structure":
        "0:0" or "N:M", "targets": [regex], "ignore": ["re:.*lm_head"]}}}}``.

    Raises:
        ConfigError: the report has no per-block rates, is a mixed N:M or an attn_offset run, or the method has no
            llm-compressor one-shot modifier (magnitude) and none was given.
    """
    pruning = report.get("pruning") or {}
    spec = pruning.get("spec") or {}
    rates = list(spec.get("rates") or [b["target"] for b in pruning.get("blocks") or []])
    if not rates:
        raise ConfigError("the report has no per-block sparsities (pruning.spec.rates); give the report.json of a "
                          "prune or search run")
    name = modifier or spec.get("method")
    cls = MODIFIERS.get(str(name).lower(), name if name in MODIFIERS.values() else None)
    if cls is None:
        raise ConfigError(f"llm-compressor has no one-shot modifier for method {name!r}; pass --modifier wanda or "
                          "--modifier sparsegpt")
    if spec.get("allocator_attn_offset"):
        raise ConfigError("an attn_offset run prunes attention and MLP layers of a block at two rates; a per-block "
                          "recipe cannot hold them (they are in pruning.blocks[i].layer_targets)")
    if spec.get("mixed_nm"):
        raise ConfigError("a mixed N:M run (one N per block) has no single llm-compressor mask_structure; its "
                          "per-block N are in pruning.spec.block_n")
    pattern = str(spec.get("pattern") or "unstructured")
    mask = pattern if re.fullmatch(r"\d+:\d+", pattern) else "0:0"
    path = blocks_path or (report.get("export") or {}).get("blocks_path") or "model.layers"
    body = {"sparsity": [round(float(r), 6) for r in rates], "mask_structure": mask,  # 0.555, not 0.5549999999999999
            "targets": [f"re:{re.escape(path)}\\.\\d+$"], "ignore": ["re:.*lm_head"]}
    return {"sparsity_stage": {"sparsity_modifiers": {cls: body}}}


def write_recipe(report_path: str | os.PathLike, out: str | os.PathLike, modifier: str | None = None,
                 blocks_path: str | None = None, overwrite: bool = False) -> Path:
    """Read ``report_path`` (a report.json, or a run folder holding one) and write its recipe YAML to ``out``
    atomically (temp file + rename), with a comment header saying where the rates came from.

    Returns:
        The resolved path written.

    Raises:
        ConfigError: missing or invalid report (see :func:`recipe_from_report`), ``out`` exists and
            ``overwrite`` is False, or ``out`` is the report itself.
    """
    import json

    import yaml

    src = Path(report_path).expanduser()
    if src.is_dir():
        src = src / "report.json"
    if not src.is_file():
        raise ConfigError(f"report not found: {src}")
    try:
        report = json.loads(src.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{src} is not valid JSON: {err}") from None
    out = Path(out).expanduser().resolve()
    if out == src.resolve():
        raise ConfigError("--out would overwrite the report; choose another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    recipe = recipe_from_report(report, modifier, blocks_path)
    spec = report["pruning"]["spec"]
    beta = f" beta={spec['beta']:g}" if spec.get("beta") is not None else ""
    header = (f"# llm-compressor recipe written by atprune from {src}\n"
              f"# {report.get('model', {}).get('spec', '?')}: method={spec.get('method')} allocation="
              f"{spec.get('allocation')}{beta} S={spec.get('sparsity')}; one sparsity per decoder block, in order\n")
    text = header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=100)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as fh:
        fh.write(text)
    return out
