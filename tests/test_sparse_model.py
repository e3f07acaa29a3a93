"""SparseLinear inside whole models: sparsify_for_inference (Linear and GPT-2 Conv1D) and load_sparse of a saved run."""

from __future__ import annotations

import pytest
import torch

import atprune
from atprune.cli import main
from atprune.errors import ConfigError
from atprune.sparse import SparseLinear
from atprune.sparse.format import PAD
from tests.conftest import random_text, save_tiny_model, tiny_model


def prune_by_magnitude(model, sparsity=0.7, skip=("lm_head", "wte", "wpe", "embed")):
    """Zero the smallest |w| of every 2-D weight (brute force: sort each matrix), embeddings and head excepted."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or any(s in name for s in skip):
                continue
            k = int(sparsity * p.numel())
            idx = p.abs().flatten().argsort()[:k]
            p.view(-1)[idx] = 0


def expected_bytes(rows, cols, nnz, itemsize):
    return nnz * itemsize + ((rows + 3) // 4) * ((cols + 31) // 32) * 16 + 8 * ((rows + 3) // 4 + 1) + PAD * itemsize


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsify_keeps_logits_and_generate(arch):
    dense = tiny_model(arch, layers=2, seed=3)
    prune_by_magnitude(dense)
    sparse = tiny_model(arch, layers=2, seed=3)
    sparse.load_state_dict(dense.state_dict())
    weights = {n: m.weight.detach().clone() for n, m in sparse.named_modules() if hasattr(m, "weight") and
               m.weight is not None and m.weight.dim() == 2 and float((m.weight == 0).float().mean()) >= 0.3}
    report = atprune.sparsify_for_inference(sparse)
    assert sorted(s["name"] for s in report["swapped"]) == sorted(n for n in weights)
    expected = 0
    for s in report["swapped"]:
        w = weights[s["name"]]
        rows, cols = (w.shape[1], w.shape[0]) if arch == "gpt2" else tuple(w.shape)  # Conv1D stores [in, out]
        assert s["shape"] == [rows, cols]
        assert s["sparse_bytes"] == expected_bytes(rows, cols, int((w != 0).sum()), 4)
        expected += rows * cols * 4 - s["sparse_bytes"]
    assert report["bytes_saved"] == expected > 0
    assert all(isinstance(sparse.get_submodule(s["name"]), SparseLinear) for s in report["swapped"])
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = dense(ids).logits, sparse(ids).logits  # 18 tokens: the dense fallback
        ref1, got1 = dense(ids[:1, :5]).logits, sparse(ids[:1, :5]).logits  # 5 tokens: the sparse kernel
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got1, ref1, rtol=1e-4, atol=1e-4)
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(sparse.generate(ids[:1, :4], **kwargs), dense.generate(ids[:1, :4], **kwargs))


def test_sparsify_refuses_a_dense_model_and_bad_options():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ConfigError, match="no pruned layer"):
        atprune.sparsify_for_inference(model)
    with pytest.raises(ConfigError, match="min_sparsity"):
        atprune.sparsify_for_inference(model, min_sparsity=2)
    with pytest.raises(ConfigError, match="unknown kernel"):
        atprune.sparsify_for_inference(model, kernel="sse9")
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_run")
    save_tiny_model(root / "model", layers=2, seed=1)
    (root / "calib.txt").write_text(random_text(2000, seed=1))
    out = root / "run"
    code = main(["prune", "--model", str(root / "model"), "--method", "magnitude", "--sparsity", "0.7", "--no-eval",
                 "--calib-data", str(root / "calib.txt"), "--nsamples", "2", "--seqlen", "16", "--out", str(out),
                 "--quiet"])
    assert code == 0
    return out


def test_load_sparse_of_a_saved_run(run):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(run).eval()
    sparse = atprune.load_sparse(run)
    info = sparse.atprune_sparse
    assert len(info["swapped"]) == 2 * 7 and all(".layers." in n for n in info["swapped"])
    assert info["run_report"]["pruning"]["overall_sparsity"] == pytest.approx(0.7, abs=0.01)
    if sparse.config.tie_word_embeddings:
        assert sparse.lm_head.weight is sparse.model.embed_tokens.weight  # tied again, not a copy
    assert torch.equal(sparse.lm_head.weight, dense.lm_head.weight) and "lm_head" in info["skipped"]
    for name in info["swapped"]:
        layer = sparse.get_submodule(name)
        assert torch.equal(layer.dense_weight(), dense.get_submodule(name).weight)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(sparse.generate(ids, **kwargs), dense.generate(ids, **kwargs))
    bf16 = atprune.load_sparse(run, dtype="bfloat16")
    assert bf16.get_submodule(info["swapped"][0]).values.dtype == torch.bfloat16
    with torch.no_grad():
        ref = dense.to(torch.bfloat16)(ids).logits.float()
        got = bf16(ids).logits.float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max() + 0.02


def test_load_sparse_bad_input(run, tmp_path):
    with pytest.raises(ConfigError, match="not an atprune run folder"):
        atprune.load_sparse(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        atprune.load_sparse(run, dtype="float64")
    with pytest.raises(ConfigError, match="no pruned layer"):
        atprune.load_sparse(run, min_sparsity=0.99)
