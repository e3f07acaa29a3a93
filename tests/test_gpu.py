"""CUDA path: the same engine and pruners on a GPU agree with the CPU. Skipped without CUDA (CI has none)."""

from __future__ import annotations

import copy

import pytest
import torch

import atprune
from atprune.engine import sequential
from atprune.models import Adapter
from tests.conftest import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_parity_at_sparsity_zero_on_cuda():
    model = tiny_model("llama", layers=4).cuda()
    adapter = Adapter.for_model(model)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    ref = []
    h = adapter.blocks[-1].register_forward_hook(lambda m, a, out: ref.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=windows.cuda(), use_cache=False)
    h.remove()
    got = torch.cat(sequential(adapter, windows, lambda *a: None, needs_stats=False))
    assert got.device.type == "cuda"
    assert (got - ref[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cuda_matches_cpu(method):
    cpu = tiny_model("llama", layers=3)
    gpu = copy.deepcopy(cpu).cuda()
    windows = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(4))
    kw = dict(method=method, sparsity=0.6, allocation="atp", beta=0.1, calib=windows, progress=False)
    r_cpu, r_gpu = atprune.prune(cpu, **kw), atprune.prune(gpu, **kw)
    assert [b["zeros"] for b in r_gpu.blocks] == pytest.approx([b["zeros"] for b in r_cpu.blocks], abs=3)
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        same = ((a == 0) == (b.cpu() == 0)).float().mean().item()
        assert same > 0.995, name
        assert torch.allclose(a, b.cpu(), atol=1e-3, rtol=1e-3) or method == "sparsegpt", name
