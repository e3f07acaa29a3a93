"""The honest accuracy test: a small timm ViT and a small timm ConvNeXt trained here on scikit-learn's digits (real
labelled images), then pruned by Wanda at 50 % (uniform) and 70 % (ATP, beta by golden search on held-out training
images). The dense models must have learned (well above the 10 % of chance) and every pruned model must hold the
zeros its per-block rates ask for. docs/vision.md has the full table (benchmarks/vision_digits.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from atprune.vision.adapter import VisionAdapter

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vision_digits.py"
_spec = importlib.util.spec_from_file_location("vision_digits", _PATH)
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)


@pytest.fixture(scope="module")
def data():
    return digits.digits()


@pytest.mark.parametrize("build,epochs", [(digits.small_vit, 10), (digits.small_convnext, 6)])
def test_trained_model_learns_and_prunes_to_target(data, build, epochs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits.train(build(), data[0], data[1], epochs=epochs)
        dense = digits.top1(model, data[2], data[3])
        assert dense > 60.0, dense  # 10 classes: chance is 10 %
        rows = digits.prune_cells(model, *data, [("wanda", 0.5, "uniform"), ("wanda", 0.7, "atp")], max_trials=3)
    finally:
        torch.set_num_threads(threads)
    for row, target in zip(rows, (0.5, 0.7)):
        adapter = VisionAdapter.for_model(row["model"])
        layers = [(l, r) for b, r in zip(adapter.blocks, row["rates"]) for l in adapter.linears(b).values()]
        zeros = sum(int((l.weight == 0).sum()) for l, _ in layers)
        # wanda zeroes floor(in * rate) weights of each row, from the shapes alone
        assert zeros == sum(l.out_features * int(l.in_features * r) for l, r in layers)
        weights = [l.weight.numel() for l, _ in layers]
        assert abs(sum(r * w for (_, r), w in zip(layers, weights)) / sum(weights) - target) < 1e-9
        assert abs(row["achieved"] - target) < 0.01
    rates = rows[1]["rates"]  # ATP: one step of beta from block to block
    assert all(abs(b - a - rows[1]["beta"]) < 1e-9 for a, b in zip(rates, rates[1:]))
