"""Importing torchvision next to a CPU build of torch.

The torchvision wheels on PyPI for Linux x86_64 are built against CUDA torch; next to the CPU build of torch their
C++ extension cannot load (it links ``libtorch_cuda.so``), and torchvision 0.28 then fails at import with
``RuntimeError: operator torchvision::nms does not exist``: ``torchvision/_meta_registrations.py`` registers fake
kernels for ``nms`` and ``qnms`` without checking that the extension loaded (its other registrations do check).
timm imports torchvision at import time, and transformers imports it for its image and video processors
(``AutoProcessor`` of most vision-language models), so that one error breaks both.

:func:`import_torchvision` handles exactly that case: it declares the two operator schemas (as torchvision's C++
source declares them), so that the import goes through; ``torchvision.ops.nms`` then raises when called (it has no
kernel), which nothing atprune runs uses. Any other import error is left alone.
"""

from __future__ import annotations

import importlib
import sys

_LIBRARY = None  # keeps the schema definitions alive


def _declare_torchvision_nms() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` (schemas of torchvision's csrc/ops/nms.cpp and
    quantized qnms), without kernels."""
    global _LIBRARY
    import torch

    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _forget(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def import_torchvision():
    """``import torchvision``, working around a CUDA-built torchvision next to a CPU torch (module docstring).

    Raises:
        ModuleNotFoundError: torchvision is not installed.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    _forget("torchvision")
    _declare_torchvision_nms()
    return importlib.import_module("torchvision")


def _cpu_torch_beside_other_torchvision() -> bool:
    """From the installed packages' metadata alone (nothing imported): a CPU build of torch (``+cpu``) next to a
    torchvision that is not one."""
    from importlib import metadata

    try:
        torch_version, vision_version = metadata.version("torch"), metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return False
    return torch_version.endswith("+cpu") and not vision_version.endswith("+cpu")


def ensure_torchvision_importable() -> None:
    """Make a later ``import torchvision`` (by transformers, even ``from transformers import LlamaConfig``, or by
    timm) work: when a CPU torch sits next to a torchvision of another build, import it now through
    :func:`import_torchvision`. Otherwise (no torchvision, or matching builds) nothing is imported."""
    if _cpu_torch_beside_other_torchvision():
        import_torchvision()
