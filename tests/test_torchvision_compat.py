"""A CPU torch next to PyPI's CUDA-built torchvision (what CI's timm pulls in): transformers imports must work in a
fresh process once atprune is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atprune.torchvision_compat import _cpu_torch_beside_other_torchvision


@pytest.mark.skipif(not _cpu_torch_beside_other_torchvision(), reason="only with a CPU torch next to another "
                    "torchvision build (as in CI)")
def test_transformers_imports_after_atprune_in_a_fresh_process():
    code = ("import atprune\nfrom transformers import LlamaConfig, AutoProcessor, ViTForImageClassification\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
