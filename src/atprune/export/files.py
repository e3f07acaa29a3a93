"""Files of a run folder: checkpoint tensors read back, output folders checked, JSON written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from atprune.atomic import atomic_file, umask
from atprune.errors import ConfigError


def safetensors_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder (one file, or the shards an index lists)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def read_tensors(folder: Path, names) -> dict[str, torch.Tensor]:
    """Read the named tensors (those present) from a checkpoint folder's safetensors files, on CPU."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = f.get_tensor(key)
    return found


def saved_names(model, names) -> dict[str, str]:
    """Where ``model.save_pretrained`` writes each named parameter: ``{parameter name: key in the safetensors
    files}``. transformers 5 writes some classes under their checkpoints' historical names (e.g. LLaVA's
    ``model.language_model.layers.0...`` as ``language_model.model.layers.0...``), by reverting its load-time
    renaming (``transformers.core_model_loading.revert_weight_conversion``); names it does not rename map to
    themselves."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers without load-time renaming
        return {n: n for n in names}
    for name in names:
        renamed = revert_weight_conversion(model, {name: params[name].detach()})
        out[name] = next(iter(renamed)) if len(renamed) == 1 else name
    return out


def tensors_digest(tensors, dtype: torch.dtype | None = None) -> str:
    """sha256 (hex) of named tensors: for each name in sorted order, the name, dtype, shape and the raw bytes
    (row-major), so two sets digest alike iff they hold the same names with bit-identical values.

    Args:
        tensors: name -> tensor (any device), or ``(name, tensor)`` pairs.
        dtype: cast floating tensors to this dtype first (to compare with a checkpoint saved in it).
    """
    import hashlib

    digest = hashlib.sha256()
    items = dict(tensors.items() if hasattr(tensors, "items") else tensors)
    for name in sorted(items):
        t = items[name].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(items[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    with atomic_file(path) as fh:
        json.dump(_finite(payload), fh, indent=2)
        fh.write("\n")


def _finite(obj):
    if isinstance(obj, float) and not (obj == obj and abs(obj) != float("inf")):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def public_permissions(path: Path) -> None:
    """Give a folder tree made by mkdtemp/mkstemp (0700/0600) the permissions the user's umask asks for."""
    mask = umask()
    for p in [path, *path.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (same file system), replacing an existing ``out`` whole: the old
    one is moved aside first and removed only after the swap, so ``out`` is at every moment either the old folder or
    the new one."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
