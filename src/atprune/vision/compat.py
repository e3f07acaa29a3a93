"""Importing timm (the optional ``atprune[vision]`` extra) with a one-line error when it is missing.

timm imports torchvision at import time (``timm.layers`` uses ``torchvision.ops.misc``). The torchvision wheels on
PyPI for Linux x86_64 are built against CUDA torch; next to the CPU build of torch their C++ extension cannot load
(it links ``libtorch_cuda.so``), and torchvision 0.28 then fails at import with ``RuntimeError: operator
torchvision::nms does not exist``: ``torchvision/_meta_registrations.py`` registers fake kernels for ``nms`` and
``qnms`` without checking that the extension loaded (its other registrations do check). :func:`import_timm`
handles exactly that case through :mod:`atprune.torchvision_compat`.
"""

from __future__ import annotations

import importlib
import sys

from atprune.errors import ConfigError
from atprune.torchvision_compat import import_torchvision as _import_torchvision

_MISSING = ("timm models need the optional vision extra: pip install 'atprune[vision]' (timm and torchvision "
            "matching your torch)")


def import_torchvision():
    """``import torchvision`` (see :mod:`atprune.torchvision_compat`).

    Raises:
        ConfigError: torchvision is not installed.
    """
    try:
        return _import_torchvision()
    except ModuleNotFoundError as err:
        if err.name == "torchvision":
            raise ConfigError(_MISSING) from None
        raise


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
