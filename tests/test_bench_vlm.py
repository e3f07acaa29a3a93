"""The vision-language timing benchmark's model (benchmarks/vlm_prune_speed.py: the LLaVA-1.5-7B config file, shrunk
as its ``--tiny`` does): text-only calibration through ``atprune.prune`` changes nothing but the language blocks'
matrices, and each block reaches its ATP rate. Timings are never asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import atprune

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_prune_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vlm_prune_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_text_only_prune_of_the_llava_shape_touches_only_the_language_matrices(bench, method):
    raw = bench.read_config(bench.DEFAULT_CONFIG, text_layers=2, vision_layers=1, tiny=True)
    model = bench.build(raw, torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = bench.token_windows(model.config, 2, 32)
    sparsity, beta = 0.5, 0.1
    result = atprune.prune(model, method=method, sparsity=sparsity, allocation="atp", beta=beta, calib=windows,
                           progress=False)
    # found by module names alone: the Linear weights under model.language_model.layers
    language = {f"{n}.weight": m for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("model.language_model.layers.")}
    assert language
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dense[n])}
    assert changed <= set(language)  # vision tower, projector, embeddings, lm_head, norms, biases: bit-identical
    assert any(n.startswith("model.vision_tower.") for n in dense) and any("multi_modal_projector" in n for n in dense)
    # ATP on 2 equal blocks: rates S - beta/2 and S + beta/2
    for i, rate in enumerate((sparsity - beta / 2, sparsity + beta / 2)):
        block = [m for n, m in language.items() if n.startswith(f"model.language_model.layers.{i}.")]
        zeros = sum(int((m.weight == 0).sum()) for m in block)
        weights = sum(m.weight.numel() for m in block)
        if method == "wanda":  # floor(in x rate) weights of every row
            assert zeros == sum(m.out_features * int(m.in_features * rate) for m in block)
        else:
            assert zeros / weights == pytest.approx(rate, abs=0.01)
    assert result.blocks[0]["target"] == pytest.approx(sparsity - beta / 2)
