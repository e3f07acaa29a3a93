"""The compressed-tensors ``pack-quantized`` checkpoint of a quantized model (``--format pack-quantized``).

Each quantized matrix ``<module>.weight`` (``[rows, cols]``, on the grid of :class:`atprune.quant.grid.Grid`) is
stored as compressed-tensors' pack-quantized compressor stores it (compressed-tensors 0.20,
``compressors/pack_quantized/base.py``, ``PackedQuantizationCompressor``):

- ``<module>.weight_packed``: int32 ``[rows, ceil(cols * bits / 32)]``, the signed codes ``q - 2^(bits-1)`` packed
  by the library's ``pack_to_int32``;
- ``<module>.weight_scale``: ``[rows, groups]`` (``[rows, 1]`` per channel) in the checkpoint's dtype;
- ``<module>.weight_shape``: int64 ``[2]``;
- asymmetric grids only: ``<module>.weight_zero_point``, the signed zero points ``zero - 2^(bits-1)`` packed along
  dimension 0.

The library decodes ``(code - zero_point) * scale`` in the scale's dtype, which equals atprune's grid value
``(q - zero) * scale`` bit for bit (see :mod:`atprune.quant.grid`); the writer decodes every matrix it wrote with
the library's own ``PackedQuantizationCompressor.decompress`` and refuses the checkpoint unless it matches the
saved dequantized weights exactly. ``config.json`` gets a ``quantization_config`` (``format: pack-quantized``, one
config group per bit width listing its layers, no ``sparsity_config``): the dense W4A16 / W8A16 form vLLM loads.
Pruned zeros are stored as the zero point's code, so they cost as much as any other weight here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from atprune.errors import ConfigError

PACKED_DIR = "pack-quantized"


def check_available() -> None:
    """Raises ConfigError (with the pip command) unless a compressed-tensors with the classmethod pack-quantized
    compressor (0.20; tested with 0.20.1) is installed."""
    try:
        import compressed_tensors.compressors.pack_quantized.base  # noqa: F401
    except ImportError:
        raise ConfigError("--format pack-quantized needs compressed-tensors 0.20: "
                          "pip install 'compressed-tensors>=0.20,<0.21'") from None


def weight_args(bits: int, group_size: int | None, symmetric: bool) -> dict:
    """compressed-tensors ``QuantizationArgs`` fields of an integer weight grid (static min-max, no activations)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group_size else "channel",
            "group_size": group_size, "dynamic": False, "observer": "minmax"}


def scheme(bits: int, group_size: int | None, symmetric: bool, targets: list[str]):
    """The compressed-tensors ``QuantizationScheme`` of weights quantized on such a grid (16-bit activations)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**weight_args(bits, group_size, symmetric)))


def pack_matrix(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                symmetric: bool) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one matrix.

    Args:
        weight: ``[rows, cols]`` the dequantized weight as saved (its dtype is the scales' dtype).
        codes: ``[rows, cols]`` integer codes in ``[0, 2^bits - 1]``; scale, zero: ``[rows, groups]`` float32.

    Returns:
        ``{"weight_packed", "weight_scale", "weight_shape"}`` and ``"weight_zero_point"`` when asymmetric.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (bits - 1)
    out = {"weight_packed": pack_to_int32((codes.to(torch.int32) - offset).to(torch.int8), bits),
           "weight_scale": scale.to(weight.dtype).contiguous(),
           "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32((zero.to(torch.int32) - offset).to(torch.int8), bits,
                                                 packed_dim=0).contiguous()
    return out


def unpack_matrix(parts: Mapping[str, torch.Tensor], bits: int, group_size: int | None,
                  symmetric: bool) -> torch.Tensor:
    """Dense matrix decoded by compressed-tensors' own ``PackedQuantizationCompressor.decompress``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = {k: v for k, v in parts.items()}
    return PackedQuantizationCompressor.decompress(state, scheme(bits, group_size, symmetric, ["Linear"]))["weight"]


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    t = t + 0.0
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def write_pack_quantized(dense_dir: Path, out_dir: Path, matrices: Mapping[str, torch.Tensor],
                         grids: Mapping[str, dict], tokenizer=None) -> int:
    """Write the pack-quantized checkpoint of the dense checkpoint in ``dense_dir`` into ``out_dir`` (created).

    Args:
        matrices: the quantized weights as saved (name -> ``[rows, cols]``).
        grids: name -> ``{"bits", "group_size", "symmetric", "scale", "zero"}`` (scale/zero ``[rows, groups]``
            float32), for every name in ``matrices``.

    Returns:
        Size of the written ``model.safetensors`` in bytes.

    Raises:
        ConfigError: a matrix has no grid.
        MaskViolation: a matrix read back from the file and decoded by compressed-tensors differs from the saved one.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from atprune.export.files import safetensors_files
    from atprune.export.masks import MaskViolation

    missing = [n for n in matrices if n not in grids]
    if missing:
        raise ConfigError(f"pack-quantized export: no quantization grid for {missing[0]}")
    out_dir.mkdir(parents=True)
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(dense_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in matrices:
                    state[key] = f.get_tensor(key)
    groups: dict[tuple, list[str]] = {}
    for name, weight in matrices.items():
        g = grids[name]
        width = g["group_size"] or weight.shape[1]
        scale = g["scale"].repeat_interleave(width, 1)[:, :weight.shape[1]]
        zero = g["zero"].repeat_interleave(width, 1)[:, :weight.shape[1]]
        codes = torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2 ** g["bits"] - 1)
        for k, v in pack_matrix(weight, codes, g["scale"], g["zero"], g["bits"], g["symmetric"]).items():
            state[f"{_module(name)}.{k}"] = v
        groups.setdefault((g["bits"], g["group_size"], g["symmetric"]), []).append(_module(name))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    for extra in ("generation_config.json",):
        if (dense_dir / extra).is_file():
            shutil.copyfile(dense_dir / extra, out_dir / extra)
    config = json.loads((dense_dir / "config.json").read_text())
    config_groups = {f"group_{i}": scheme(b, gs, sym, sorted(names))
                     for i, ((b, gs, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][0]))}
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed")
    config["quantization_config"] = qc.model_dump(exclude_none=False) | {"version": compressed_tensors.__version__}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    back = load_pack_quantized(out_dir, names=matrices)
    for name, weight in matrices.items():
        got = back.get(name)
        if got is None or got.dtype != weight.dtype or not torch.equal(_bits_view(got), _bits_view(weight)):
            raise MaskViolation(f"{name}: the pack-quantized checkpoint does not decode to the saved weights")
    return (out_dir / "model.safetensors").stat().st_size


def load_pack_quantized(folder: str | Path, names=None) -> dict[str, torch.Tensor]:
    """Decode the quantized matrices of a pack-quantized folder (its ``config.json`` says each layer's grid) with
    compressed-tensors; returns name -> ``[rows, cols]`` tensor in the scales' dtype (only ``names`` if given)."""
    from safetensors import safe_open

    from atprune.export.files import safetensors_files

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    layer_args = {}
    for group in qc["config_groups"].values():
        w = group["weights"]
        for target in group["targets"]:
            layer_args[target] = (w["num_bits"], w.get("group_size"), w["symmetric"])
    wanted = None if names is None else {_module(n) for n in names}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                module, _, param = key.rpartition(".")
                if module in layer_args and (wanted is None or module in wanted):
                    parts.setdefault(module, {})[param] = f.get_tensor(key)
    return {f"{m}.weight": unpack_matrix(p, *layer_args[m]) for m, p in parts.items()}
