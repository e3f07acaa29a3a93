"""Saving a pruned model: safetensors + tokenizer + report.json, written atomically.

Everything is written into a temporary folder next to the destination and renamed into place at the
end, so an interrupted run never leaves a half-written model, and an existing output is replaced only
when the user asked for it (``overwrite``). The input model is never a valid destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from atprune.errors import ConfigError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: tuple[str, ...] = ()) -> Path:
    """Refuse a destination that would lose data; call before any heavy work.

    Args:
        inputs: paths of the input model (a folder, or a file such as a ``.gguf``).

    Raises:
        ConfigError: ``out`` is a file; is or contains an input file; is, contains or lies inside an input
            folder; or is a non-empty folder (e.g. holding a model) and ``overwrite`` is False.
    """
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src_path = Path(src).expanduser().resolve()
        overlaps = (src_path.is_relative_to(out) if src_path.is_file()
                    else out == src_path or src_path.is_relative_to(out) or out.is_relative_to(src_path))
        if overlaps:
            raise ConfigError(f"output folder {out} overlaps the input model at {src_path}; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        holds_model = (out / "config.json").exists() or any(out.glob("*.safetensors"))
        what = "already holds a model" if holds_model else "is not empty"
        raise ConfigError(f"output folder {out} {what}; pass --overwrite to replace it")
    return out


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON atomically (temp file + rename). Non-finite floats become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_finite(payload), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    if isinstance(obj, float) and not (obj == obj and abs(obj) != float("inf")):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _public(path: Path) -> None:
    """Give a folder tree made by mkdtemp/mkstemp (0700/0600) the permissions the user's umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False,
                extra: dict[str, dict] | None = None, files: dict[str, Path] | None = None) -> Path:
    """Save ``model`` (safetensors, tied weights kept tied), ``tokenizer``, ``report.json``, the JSON documents
    in ``extra`` (file name -> content) and copies of ``files`` (file name -> source path) into ``out``, all
    in one atomic swap.

    Returns:
        The resolved output folder.

    Raises:
        ConfigError: see :func:`check_output_dir`.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)
        for name, payload in (extra or {}).items():
            write_json(tmp / name, payload)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        _public(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
