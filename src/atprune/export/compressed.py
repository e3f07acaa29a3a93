"""The compressed-tensors sparse-bitmask checkpoint (``--format compressed``).

Each pruned matrix ``W`` (``[rows, cols]``) named ``<module>.weight`` is stored as four tensors, the layout of
compressed-tensors' ``sparse-bitmask`` format:

- ``<module>.shape``: int64 ``[2]``, the dense shape;
- ``<module>.compressed``: the non-zero values in row-major order, 1-D, in the checkpoint's dtype;
- ``<module>.bitmask``: uint8 ``[rows, ceil(cols / 8)]``, bit j of a row set where the weight is non-zero
  (packed by compressed-tensors' ``pack_bitmasks``, little bit order);
- ``<module>.row_offsets``: int64 ``[rows]``, index in ``compressed`` where each row starts.

Every other tensor (embeddings, norms, biases) is stored unchanged. ``config.json`` gets a
``quantization_config`` with ``quant_method: compressed-tensors`` and a ``sparsity_config`` built from the
library's ``BitmaskConfig``. At 70 % sparsity a float32 matrix takes 0.3 * 4 + 1/8 = 1.325 bytes per weight
instead of 4 (bfloat16/float16: 0.725 instead of 2).

compressed-tensors dropped its sparse-bitmask *compressor* after 0.14 (the config class and the bit-packing
helpers remain), so atprune writes the tensors itself with the library's helpers and decompresses with the
library's legacy ``BitmaskCompressor`` when the installed version has it (<= 0.14), otherwise with the
library's ``unpack_bitmasks``. A zero is always restored as +0.0 (the sign of a zero is not stored).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from atprune.errors import ConfigError

PARAMS = ("shape", "compressed", "bitmask", "row_offsets")


def check_available() -> None:
    """Raises ConfigError (with the pip command) if compressed-tensors is not installed."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError("--format compressed needs the compressed-tensors package: "
                          "pip install 'atprune[compressed]'") from None


def compress_matrix(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bitmask-compress one 2-D weight (any float dtype, CPU); returns the four tensors named in :data:`PARAMS`."""
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu()
    if weight.dim() != 2:
        raise ValueError(f"bitmask compression takes a 2-D matrix, got shape {tuple(weight.shape)}")
    nonzero = weight != 0
    counts = torch.count_nonzero(nonzero, dim=1)
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64), "compressed": weight[nonzero].contiguous(),
            "bitmask": pack_bitmasks(nonzero).contiguous(), "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def decompress_matrix(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Dense matrix from the four tensors of :func:`compress_matrix`, decompressed by compressed-tensors."""
    try:  # compressed-tensors <= 0.14: the library's own sparse-bitmask decompressor
        from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskTensor
    except ImportError:
        BitmaskTensor = None
    if BitmaskTensor is not None:
        return BitmaskTensor(**{k: parts[k] for k in PARAMS}).decompress()
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(v) for v in parts["shape"].tolist()]
    nonzero = unpack_bitmasks(parts["bitmask"], shape)
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[nonzero] = parts["compressed"]
    return dense


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def write_compressed(dense_dir: Path, out_dir: Path, matrices: Mapping[str, torch.Tensor], tokenizer=None,
                     structure: str = "unstructured") -> int:
    """Write the sparse-bitmask checkpoint of the dense checkpoint in ``dense_dir`` into ``out_dir`` (created).

    Args:
        dense_dir: a folder written by ``save_pretrained`` (safetensors, config.json).
        matrices: the pruned weights as saved (name -> ``[rows, cols]`` tensor); these are compressed, every
            other tensor of the dense checkpoint (including fused 3-D expert weights) is copied unchanged.
        tokenizer: saved alongside when given.
        structure: the sparsity pattern the pruning used (``"unstructured"`` or ``"N:M"``, e.g. ``"2:4"``), recorded as
            the config's ``sparsity_structure`` (the bitmask itself stores any pattern).

    Returns:
        Size of the compressed ``model.safetensors`` in bytes.

    Raises:
        MaskViolation: a matrix read back from the written file and decompressed is not bit-identical to the
            saved dense one (zeros compared as +0.0).
    """
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from atprune.export.files import safetensors_files
    from atprune.export.masks import MaskViolation

    out_dir.mkdir(parents=True)
    matrices = {n: w for n, w in matrices.items() if w.dim() == 2}  # fused expert tensors [E, ., .] stay dense
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(dense_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in matrices:
                    state[key] = f.get_tensor(key)
    total = zeros = 0
    for name, weight in matrices.items():
        for k, v in compress_matrix(weight).items():
            state[f"{_module(name)}.{k}"] = v
        total, zeros = total + weight.numel(), zeros + weight.numel() - int(torch.count_nonzero(weight))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    for extra in ("generation_config.json",):
        if (dense_dir / extra).is_file():
            shutil.copyfile(dense_dir / extra, out_dir / extra)
    config = json.loads((dense_dir / "config.json").read_text())
    sparsity = BitmaskConfig(global_sparsity=zeros / max(total, 1), sparsity_structure=structure,
                             targets=sorted(_module(n) for n in matrices), ignore=[])
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                     "format": "dense", "sparsity_config": sparsity.model_dump(),
                                     "config_groups": {}, "quantization_status": "compressed"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    back = load_compressed(out_dir, names=matrices)
    for name, weight in matrices.items():
        got = back.get(name)
        if got is None or got.dtype != weight.dtype or not torch.equal(_bits(got), _bits(weight)):
            raise MaskViolation(f"{name}: the compressed checkpoint does not decompress to the saved weights")
    return (out_dir / "model.safetensors").stat().st_size


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor with -0.0 made +0.0, for bit-exact comparison."""
    t = t + 0.0
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def load_compressed(folder: str | Path, names=None, failed: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Read a sparse-bitmask checkpoint folder (written by :func:`write_compressed`) into a dense state dict.

    Args:
        names: only these weights (full names ending in ``.weight``); None: every tensor of the checkpoint.
        failed: if given, a matrix whose four tensors do not decompress (a corrupt file) is left out and its
            name -> error message put here; otherwise the error is raised.

    Returns:
        name -> CPU tensor; compressed matrices decompressed to ``[rows, cols]`` in their stored dtype.
    """
    from safetensors import safe_open

    from atprune.export.files import safetensors_files

    wanted = None if names is None else set(names)
    raw: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                module, _, param = key.rpartition(".")
                target = f"{module}.weight" if param in PARAMS else key
                if wanted is None or target in wanted:
                    raw[key] = f.get_tensor(key)
    out, groups = {}, {}
    for key, t in raw.items():
        module, _, param = key.rpartition(".")
        if param in PARAMS:
            groups.setdefault(module, {})[param] = t
        else:
            out[key] = t
    for module, parts in groups.items():
        if set(parts) == set(PARAMS):
            try:
                out[f"{module}.weight"] = decompress_matrix(parts)
            except (RuntimeError, ValueError) as err:
                if failed is None:
                    raise
                failed[f"{module}.weight"] = str(err).splitlines()[0]
        else:  # an ordinary tensor that happens to be named like a parameter of the format
            out.update({f"{module}.{p}": t for p, t in parts.items()})
    return out
