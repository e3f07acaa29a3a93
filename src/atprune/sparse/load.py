"""``load_sparse``: build a model with :class:`SparseLinear` layers straight from an atprune run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from atprune.errors import ConfigError
from atprune.sparse import kernels
from atprune.sparse.convert import MIN_SPARSITY, _conv1d_class
from atprune.sparse.format import DTYPES, pack
from atprune.sparse.linear import MAX_SPARSE_TOKENS, SparseLinear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_run_folder(folder: str | Path) -> tuple[Path, dict]:
    """``(folder, report)`` of an atprune run folder (``report.json`` with a ``pruning`` section, ``config.json``
    and safetensors weights).

    Raises:
        ConfigError: one line saying what is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"run folder {folder} does not exist")
    missing = [n for n in ("report.json", "config.json") if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ConfigError(f"{folder} is not an atprune run folder (missing {', '.join(missing)}); make one with "
                          "`atprune prune ... --out DIR`")
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}/report.json is not readable JSON ({err})") from None
    if not isinstance(report, dict) or not report.get("pruning"):
        raise ConfigError(f"{folder}/report.json has no 'pruning' section: not an atprune run folder")
    return folder, report


def _weight_map(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update({k: path for k in f.keys()})
    return names


class _Reader:
    """Reads one tensor at a time from the checkpoint's safetensors files (kept open)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.where = _weight_map(folder)
        self._open = {p: safe_open(str(p), framework="pt") for p in set(self.where.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self._open[self.where[name]].get_tensor(name)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def load_sparse(run_folder: str | Path, dtype: str | torch.dtype | None = None, kernel: str = "auto",
                min_sparsity: float = MIN_SPARSITY, max_sparse_tokens: int = MAX_SPARSE_TOKENS) -> nn.Module:
    """The causal LM saved in ``run_folder`` (by ``atprune prune/search --out``) on CPU, in eval mode, with every
    ``Linear``/``Conv1D`` whose weight has at least ``min_sparsity`` zeros built directly as a
    :class:`SparseLinear`. The model skeleton is created without memory (parameters on the meta device); each
    weight is read from the safetensors files, packed and dropped before the next one is read, so at most one dense
    layer exists at a time. Tied output embeddings are tied again.

    Args:
        dtype: ``float32``, ``bfloat16``, ``float16`` (or the torch dtype); None keeps the checkpoint's dtype.
        kernel, min_sparsity, max_sparse_tokens: as in :func:`atprune.sparse.sparsify_for_inference`.

    Returns:
        The model; ``model.atprune_sparse`` holds ``{"run_report": report.json, "swapped": [names], "skipped":
        [names], "dense_bytes", "sparse_bytes"}``.

    Raises:
        ConfigError: not a run folder, an unsupported dtype or kernel, no pruned layer in it, or a tensor the model
            needs missing from the checkpoint.
    """
    folder, report = check_run_folder(run_folder)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    kernels.resolve_kernel(kernel)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (e.g. rotary) really built
        model = AutoModelForCausalLM.from_config(config)
    reader = _Reader(folder)
    conv1d = _conv1d_class()
    swapped, skipped, dense_bytes, sparse_bytes = [], [], 0, 0
    modules = dict(model.named_modules())
    for name, module in modules.items():
        is_conv = conv1d is not None and isinstance(module, conv1d)
        key = f"{name}.weight"
        if not (isinstance(module, nn.Linear) or is_conv) or key not in reader:
            continue
        w = reader.get(key)
        w = w.to(dtype) if dtype is not None else w
        sparsity = float((w == 0).sum()) / max(1, w.numel())
        if sparsity < min_sparsity or w.dtype not in DTYPES:
            skipped.append(name)
            continue
        bias = reader.get(f"{name}.bias").to(w.dtype) if module.bias is not None and f"{name}.bias" in reader else None
        packed = pack(w.t() if is_conv else w)
        del w
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child,
                SparseLinear(packed, bias, kernel=kernel, max_sparse_tokens=max_sparse_tokens))
        swapped.append(name)
        dense_bytes += packed.dense_nbytes
        sparse_bytes += packed.nbytes
    if not swapped:
        raise ConfigError(f"{folder} has no pruned layer (no Linear/Conv1D weight with sparsity >= {min_sparsity})")
    for full, module in model.named_modules():
        if isinstance(module, SparseLinear):
            continue
        for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or not t.is_meta:
                continue
            key = f"{full}.{pname}" if full else pname
            if key in reader:
                value = reader.get(key)
                _set_tensor(module, pname, value.to(dtype) if dtype is not None and value.is_floating_point() else value)
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and not isinstance(out, SparseLinear) and out.weight.is_meta:
            out.weight = inp.weight
    left = [f"{n}.{p}" for n, m in model.named_modules() for p, t in
            list(m._parameters.items()) + list(m._buffers.items()) if t is not None and t.is_meta]
    if left:
        raise ConfigError(f"{folder}: the checkpoint lacks {len(left)} tensors the model needs, e.g. {left[0]}")
    model.eval()
    model.atprune_sparse = {"run_report": report, "swapped": swapped, "skipped": skipped,
                            "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes}
    return model
