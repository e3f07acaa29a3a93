"""Saving a pruned model: safetensors + tokenizer + report.json, written atomically, and checked.

Everything is written into a temporary folder next to the destination and renamed into place at the
end, so an interrupted run never leaves a half-written model, and an existing output is replaced only
when the user asked for it (``overwrite``). The input model is never a valid destination.

Masks. The zeros of every prunable matrix (the pruning mask) are recorded (:func:`record_masks`) and
checked at every step that could re-densify a weight: in memory before saving, after the cast to the save
dtype, and in the files written (read back from disk). A masked weight that is non-zero at any of these
steps refuses the checkpoint (:class:`MaskViolation`, naming the matrix); nothing is written. A cast to
float16 can also turn a tiny non-zero weight into 0 (underflow): such extra zeros are allowed, counted per
matrix and reported (``report["export"]``). The report stores, per matrix, the sha256 of the packed mask
and of the packed zero pattern actually saved; :func:`verify_checkpoint` recomputes them from the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from atprune.errors import ConfigError
from atprune.export.files import (check_output_dir, public_permissions, read_tensors, replace_folder,
                                  safetensors_files, saved_names, tensors_digest, write_json)
from atprune.export.nm import matrix_patterns, nm_violations
from atprune.export.masks import check_masks, check_saveable, mask_digest, matrix_entries, record_masks

log = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("dense", "compressed", "pack-quantized")
COMPRESSED_DIR = "compressed"

def _cast_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors cast to ``dtype`` (shared tensors, e.g. tied embeddings,
    stay shared) and every zero made +0.0."""
    memo: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key not in memo:
            c = t.detach().to(dtype) if t.is_floating_point() else t.detach()
            memo[key] = c + 0.0 if c.is_floating_point() else c  # -0.0 + 0.0 == +0.0
        out[name] = memo[key]
    return out


def _blocks_path(name: str) -> str | None:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers`` (the dotted path before the first index)."""
    match = re.match(r"^(.*?)\.\d+\.", name)
    return match.group(1) if match else None


def _fix_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    write_json(path, config)


def check_export_options(save_dtype: str | None, formats) -> tuple[torch.dtype | None, tuple[str, ...]]:
    """Validate ``--save-dtype`` and ``--format``.

    Returns:
        ``(dtype or None, formats)``; ``"dense"`` is always in the formats (it is the default and the
        compressed format is written in addition to it).

    Raises:
        ConfigError: unknown dtype or format, or ``compressed`` without the compressed-tensors package.
    """
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"unknown save dtype {save_dtype!r}; choose one of: {', '.join(SAVE_DTYPES)}")
    formats = (formats,) if isinstance(formats, str) else tuple(formats or ("dense",))
    for f in formats:
        if f not in FORMATS:
            raise ConfigError(f"unknown format {f!r}; choose one of: {', '.join(FORMATS)}")
    if "compressed" in formats:
        from atprune.export.compressed import check_available

        check_available()
    if "pack-quantized" in formats:
        from atprune.export.packed import check_available

        check_available()
    return (SAVE_DTYPES[save_dtype] if save_dtype else None), tuple(dict.fromkeys(("dense", *formats)))


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False,
                extra: dict[str, dict] | None = None, files: dict[str, Path] | None = None, *,
                masks: Mapping[str, torch.Tensor] | None = None, save_dtype: str | None = None,
                formats=("dense",), blocks_path: str | None = None,
                untouched: Mapping[str, dict] | None = None, grids: Mapping[str, dict] | None = None) -> Path:
    """Save ``model`` (safetensors, tied weights kept tied), ``tokenizer``, ``report.json``, the JSON documents
    in ``extra`` (file name -> content) and copies of ``files`` (file name -> source path) into ``out``, all
    in one atomic swap.

    Args:
        blocks_path: the blocks' dotted path for layouts atprune does not recognise (see :func:`record_masks`).
        masks: the pruning masks (:func:`record_masks`, taken right after pruning); None records them from
            the model now. Checked in memory, after the cast and in the files written (see the module doc).
        save_dtype: ``float32``, ``float16`` or ``bfloat16``; None saves in the model's dtype. The in-memory
            model is not changed.
        formats: ``("dense",)`` (default) or with ``"compressed"``: the compressed-tensors sparse-bitmask
            checkpoint is written in addition, to ``out/compressed/`` (see :mod:`atprune.export.compressed`);
            with ``"pack-quantized"``: the compressed-tensors pack-quantized checkpoint of the quantized matrices, to
            ``out/pack-quantized/`` (see :mod:`atprune.export.packed`; needs ``grids``).
        untouched: parts that pruning must not change (e.g. a vision tower): part -> ``{"names": [parameter
            names], "sha256": tensors_digest of them before pruning, in the save dtype}``. The digest of those
            tensors as written is recorded next to it (``export.untouched``) and :func:`verify_checkpoint`
            recomputes it from the files. Matrices and parts are recorded under their keys in the files
            (:func:`atprune.export.files.saved_names`).
        grids: name -> quantization grid of each quantized matrix (``bits``, ``group_size``, ``symmetric``,
            ``scale``, ``zero``), for ``pack-quantized``.

    The report gets an ``export`` section (dtype, formats, sizes in bytes, per-matrix zeros, sparsity,
    mask checksums, underflow zeros); the caller's dict is not modified.

    Returns:
        The resolved output folder.

    Raises:
        ConfigError: see :func:`check_output_dir` and :func:`check_export_options`.
        MaskViolation: a pruned weight is non-zero in memory, after the cast or in the written files;
            nothing is written.
    """
    dtype, formats = check_export_options(save_dtype, formats)
    out = check_output_dir(out, overwrite)
    if isinstance(model, torch.nn.Module):
        check_saveable(model, blocks_path)
    if masks is None and isinstance(model, torch.nn.Module):
        masks = record_masks(model, blocks_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if masks:
            params = dict(model.named_parameters())
            check_masks({n: params[n] for n in masks if n in params}, masks, "in memory before saving")
        if dtype is not None and dtype != next(model.parameters()).dtype:
            state = _cast_state_dict(model, dtype)
            if masks:
                check_masks(state, masks, f"after the cast to {str(dtype).removeprefix('torch.')}")
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            del state
            _fix_config_dtype(tmp, dtype)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if masks:
            # the files' keys (transformers may write a class under its checkpoints' historical names)
            keys = saved_names(model, list(masks)) if isinstance(model, torch.nn.Module) else {n: n for n in masks}
            in_files = read_tensors(tmp, keys.values())
            saved = {n: in_files[k] for n, k in keys.items() if k in in_files}
            del in_files
            check_masks(saved, masks, "in the saved checkpoint")
            export = {"dtype": str(next(iter(saved.values())).dtype).removeprefix("torch."), "formats": list(formats),
                      "blocks_path": getattr(masks, "blocks_path", None) or _blocks_path(next(iter(masks))),
                      "sizes_bytes": {"dense": sum(p.stat().st_size for p in safetensors_files(tmp))},
                      "underflow_zeros": 0,
                      "matrices": {keys[n]: e for n, e in matrix_entries(saved, masks).items()}}
            saved = {keys[n]: t for n, t in saved.items()}  # by file key from here on
            export["underflow_zeros"] = sum(m["underflow_zeros"] for m in export["matrices"].values())
            if isinstance(model, torch.nn.Module):  # N:M runs: each matrix's N:M (mixed: per block), checked by verify
                for name, rec in matrix_patterns(model, report.get("pruning"), blocks_path).items():
                    key = keys.get(name, name)  # the name in the files (older key names for some classes)
                    if key in export["matrices"]:
                        export["matrices"][key] |= {"pattern": rec["pattern"], "pattern_axis": rec["axis"]}
            warnings = list(report.get("warnings") or [])
            if export["underflow_zeros"]:
                warnings.append(f"the cast to {export['dtype']} turned {export['underflow_zeros']} small non-zero "
                                "weights into 0 (per matrix: export.matrices.*.underflow_zeros)")
                log.warning("%s", warnings[-1])
            if "compressed" in formats:
                from atprune.export.compressed import write_compressed

                export["sizes_bytes"]["compressed"] = write_compressed(
                    tmp, tmp / COMPRESSED_DIR, saved, tokenizer,
                    structure=_structure((report.get("pruning") or {}).get("spec") or {}))
            if "pack-quantized" in formats:
                from atprune.export.packed import PACKED_DIR, write_pack_quantized

                if not grids:
                    raise ConfigError("--format pack-quantized needs quantized weights (--quantize)")
                file_grids = {keys.get(n, n): g for n, g in grids.items()}  # by the files' key names
                quantized = read_tensors(tmp, file_grids)
                absent = [k for k in file_grids if k not in quantized]
                if absent:
                    raise ConfigError(f"pack-quantized: {len(absent)} quantized matrices are not in the saved files "
                                      f"(e.g. {absent[0]})")
                export["sizes_bytes"]["pack-quantized"] = write_pack_quantized(
                    tmp, tmp / PACKED_DIR, quantized, file_grids, tokenizer)
            del saved
            if untouched:
                export["untouched"] = {}
                for part, rec in untouched.items():
                    keys = saved_names(model, rec["names"])
                    written = read_tensors(tmp, keys.values())
                    by_name = {n: written[k] for n, k in keys.items() if k in written}
                    export["untouched"][part] = {"names": list(rec["names"]), "files": [keys[n] for n in rec["names"]],
                                                 "sha256": rec["sha256"], "saved_sha256": tensors_digest(by_name),
                                                 "saved_tensors": len(by_name)}
            report = report | {"export": export} | ({"warnings": warnings} if export["underflow_zeros"] else {})
        write_json(tmp / "report.json", report)
        for name, payload in (extra or {}).items():
            write_json(tmp / name, payload)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        public_permissions(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _structure(spec: dict) -> str:
    """compressed-tensors' ``sparsity_structure`` of a run: its N:M, or ``unstructured`` for unstructured and for
    mixed N:M (blocks of different N; the bitmask stores any pattern, the report gives each block's N)."""
    return "unstructured" if spec.get("mixed_nm") else str(spec.get("pattern") or "unstructured")


def verify_checkpoint(folder: str | os.PathLike) -> list[dict]:
    """Recompute the zeros of every pruned matrix from a saved checkpoint and compare with its report.

    Reads ``folder/report.json`` (its ``export`` section, written by :func:`save_pruned`) and the dense
    safetensors files; if ``folder/compressed/`` exists, its matrices are decompressed and checked too.

    Returns:
        One row per (format, matrix): ``format`` (``dense``/``compressed``), ``name``, ``expected`` (saved
        sparsity in the report), ``found`` (recomputed; None if the matrix is missing), ``pruned`` (sparsity
        of the pruning mask), ``underflow`` (extra zeros from the cast), ``ok`` and ``problem`` (empty, or
        comma-separated: corrupt (does not decompress), missing, shape, dtype, sparsity, checksum, ``not N:M``
        (an N:M run's matrix with a group of M holding more than N non-zeros; mixed N:M: its block's N)). Then one
        row per part the report says pruning left untouched (``export.untouched``, e.g. a vision tower):
        ``expected``, ``found`` and ``pruned`` None, ``ok`` when the saved tensors digest to the dense model's
        checksum.

    Raises:
        ConfigError: no report.json, or a report without an ``export`` section (nothing to compare with).
    """
    folder = Path(folder).expanduser()
    path = folder / "report.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no report.json; give a folder written by atprune prune --out")
    try:
        export = json.loads(path.read_text()).get("export")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not export or not export.get("matrices"):
        raise ConfigError(f"{path} has no export section with mask checksums (saved by an older atprune?)")
    matrices = export["matrices"]
    checks = [("dense", read_tensors(folder, matrices), {})]
    if (folder / COMPRESSED_DIR).is_dir():
        from atprune.export.compressed import load_compressed

        failed: dict[str, str] = {}
        checks.append(("compressed", load_compressed(folder / COMPRESSED_DIR, names=matrices, failed=failed), failed))
    rows = []
    for fmt, tensors, failed in checks:
        for name, rec in matrices.items():
            t, problems, found = tensors.get(name), [], None
            if name in failed:
                problems.append("corrupt")
            elif t is None:
                problems.append("missing")
            elif list(t.shape) != rec["shape"]:
                problems.append("shape")
            else:
                zeros = t == 0
                count = int(torch.count_nonzero(zeros))
                found = count / t.numel()
                if str(t.dtype).removeprefix("torch.") != export["dtype"]:
                    problems.append("dtype")
                if count != rec["saved_zeros"]:
                    problems.append("sparsity")
                if mask_digest(zeros) != rec["saved_sha256"]:
                    problems.append("checksum")
                if rec.get("pattern") and nm_violations(t, rec["pattern"], rec.get("pattern_axis", 1)):
                    problems.append(f"not {rec['pattern']}")
            rows.append({"format": fmt, "name": name, "expected": rec["saved_sparsity"], "found": found,
                         "pruned": rec["sparsity"], "underflow": rec["underflow_zeros"], "ok": not problems,
                         "problem": ", ".join(problems)})
    for part, rec in (export.get("untouched") or {}).items():
        in_files = read_tensors(folder, rec["files"])  # digested under the model's parameter names
        tensors = {n: in_files[k] for n, k in zip(rec["names"], rec["files"]) if k in in_files}
        problems = ["missing"] if len(tensors) != len(rec["names"]) else []
        if not problems and tensors_digest(tensors) != rec["sha256"]:
            problems.append("checksum")
        rows.append({"format": "dense", "name": f"{part} (dense, {len(rec['names'])} tensors)", "expected": None,
                     "found": None, "pruned": None, "underflow": 0, "ok": not problems, "problem": ", ".join(problems)})
    return rows


def format_verify_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`verify_checkpoint` rows, with a summary line."""
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'format':<10} {'matrix':<{width}} {'report':>8} {'found':>8} {'underflow':>9}  status"]
    for r in rows:
        found = "-" if r["found"] is None else f"{r['found']:.4f}"
        expected = "-" if r["expected"] is None else f"{r['expected']:.4f}"
        status = ("ok" if r["expected"] is not None else "unchanged") if r["ok"] else f"MISMATCH ({r['problem']})"
        lines.append(f"{r['format']:<10} {r['name']:<{width}} {expected:>8} {found:>8} {r['underflow']:>9}  {status}")
    bad = sum(not r["ok"] for r in rows)
    formats = sorted({r["format"] for r in rows})
    lines.append(f"{len(rows) - bad}/{len(rows)} matrices match the report ({', '.join(formats)})"
                 + (f"; {bad} MISMATCHES" if bad else ""))
    return "\n".join(lines)
