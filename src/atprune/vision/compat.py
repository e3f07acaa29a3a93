"""Importing timm (the optional ``atprune[vision]`` extra) with a one-line error when it is missing.

timm imports torchvision at import time (``timm.layers`` uses ``torchvision.ops.misc``). The torchvision wheels on
PyPI for Linux x86_64 are built against CUDA torch; next to the CPU build of torch their C++ extension cannot load
(it links ``libtorch_cuda.so``), and torchvision 0.28 then fails at import with ``RuntimeError: operator
torchvision::nms does not exist``: ``torchvision/_meta_registrations.py`` registers fake kernels for ``nms`` and
``qnms`` without checking that the extension loaded (its other registrations do check). :func:`import_timm`
handles exactly that case: it declares the two operator schemas (as torchvision's C++ source declares them), so that
the import goes through; ``torchvision.ops.nms`` then raises when called (it has no kernel), which no model atprune
prunes uses.
"""

from __future__ import annotations

import importlib
import sys

from atprune.errors import ConfigError

_MISSING = ("timm models need the optional vision extra: pip install 'atprune[vision]' (timm and torchvision "
            "matching your torch)")
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
    """``import torchvision``, working around a CUDA-built torchvision next to a CPU torch (see the module
    docstring).

    Raises:
        ConfigError: torchvision is not installed.
    """
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as err:
        if err.name == "torchvision":
            raise ConfigError(_MISSING) from None
        raise
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    _forget("torchvision")
    _declare_torchvision_nms()
    return importlib.import_module("torchvision")


def import_timm():
    """``import timm`` (and torchvision first, see :func:`import_torchvision`).

    Raises:
        ConfigError: timm or torchvision is not installed (the message names the ``atprune[vision]`` extra).
    """
    if sys.modules.get("timm") is not None:
        return sys.modules["timm"]
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as err:
        if err.name == "timm":
            raise ConfigError(_MISSING) from None
        raise
