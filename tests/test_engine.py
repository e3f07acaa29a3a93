import pytest
import torch

from atprune.engine.passes import first_block_inputs, run_block, sequential
from atprune.models.adapter import Adapter
from tests.conftest import ARCHS, tiny_model


def _last_block_outputs(model, adapter, windows):
    """The last block's outputs in one ordinary forward pass of the whole model (the parity reference)."""
    ref = []
    h = adapter.blocks[-1].register_forward_hook(lambda m, a, out: ref.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    h.remove()
    return ref[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_sequential_at_sparsity_zero_reproduces_full_model(arch, attn):
    model = tiny_model(arch, layers=4)
    model.config._attn_implementation = attn
    adapter = Adapter.for_model(model)
    windows = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(1))
    # reference: the last block's outputs in one ordinary forward pass
    ref = [_last_block_outputs(model, adapter, windows)]
    touched = []
    outs = sequential(adapter, windows, lambda i, block, linears, stats: touched.append((i, sorted(linears))),
                      needs_hessian=True, batch_size=2)
    got = torch.cat(outs)
    assert got.shape == ref[0].shape == (5, 32, 64)
    assert (got - ref[0]).abs().max().item() < 1e-4
    assert [i for i, _ in touched] == [0, 1, 2, 3]
    assert touched[0][1] == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])


def test_stats_reach_every_linear_with_all_tokens(llama):
    adapter = Adapter.for_model(llama)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    seen = {}

    def record(i, block, linears, stats):
        seen[i] = {n: (s.ntokens, s.xtx is not None) for n, s in stats.items()}

    sequential(adapter, windows, record, needs_hessian=False, batch_size=2)
    assert set(seen) == {0, 1, 2}
    for per_block in seen.values():
        assert all(v == (48, False) for v in per_block.values())


def test_last_output_pass_can_be_skipped(llama):
    adapter = Adapter.for_model(llama)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(4))
    inputs = first_block_inputs(adapter, windows, batch_size=2)  # 2 batches (this runs every block once)
    calls = []
    h = adapter.blocks[-1].mlp.down_proj.register_forward_hook(lambda m, a, out: calls.append(1))
    assert sequential(adapter, windows, lambda *a: None, inputs=inputs, last_outputs=False) == []
    # the last block's statistics pass runs down_proj for its first batch only (counting calls), and its output
    # pass is skipped
    assert len(calls) == 1
    assert len(sequential(adapter, windows, lambda *a: None, inputs=inputs)) == 2
    h.remove()
    assert len(calls) == 1 + 1 + 2


def test_statistics_pass_stops_after_the_last_layer_input(llama):
    # the statistics pass needs no block output: after the first batch (run in full to count the layer calls)
    # down_proj, the last layer reached, never runs in it, while its statistics equal those of its inputs in a
    # complete forward pass of the block
    from atprune.engine.passes import collect_stats

    adapter = Adapter.for_model(llama)
    windows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    inputs = first_block_inputs(adapter, windows, batch_size=2)
    block = adapter.blocks[0]
    down = block.mlp.down_proj
    calls, full = [], []
    h = down.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    stats = collect_stats(block, 0, adapter.linears(block), inputs, hessian=True)
    h.remove()
    assert len(calls) == 1  # of 4 batches
    h = down.register_forward_hook(lambda m, a, out: full.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    outs = run_block(block, 0, inputs)
    h.remove()
    assert len(outs) == 4 and len(full) == 4  # the output pass does run every layer
    x = torch.cat(full)
    st = stats["mlp.down_proj"]
    assert st.ntokens == 128
    torch.testing.assert_close(st.sq_norm.double(), (x**2).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.hessian().double(), x.T @ x / 128, rtol=1e-5, atol=1e-6)


def test_block_zero_kwargs_are_captured(llama):
    adapter = Adapter.for_model(llama)
    inputs = first_block_inputs(adapter, torch.zeros(2, 8, dtype=torch.long), batch_size=1)
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (1, 8, 64)
    cos, sin = inputs.kwargs(0, 1)["position_embeddings"]
    assert cos.shape[-2:] == (8, 16)
    assert inputs.kwargs(0, 1)["use_cache"] is False
    assert inputs.overrides == {1: {}}  # llama: every block gets block 0's arguments


def _per_layer_type_model(kind: str):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    else:
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["gemma3", "qwen2-sliding"])
def test_per_layer_attention_types_get_their_own_mask(kind):
    """Sliding-window and full-attention blocks receive different masks; replaying block 0's would be wrong."""
    model = _per_layer_type_model(kind)
    adapter = Adapter.for_model(model)
    windows = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(7))
    ref = [_last_block_outputs(model, adapter, windows)]
    inputs = first_block_inputs(adapter, windows, batch_size=2)
    assert any(inputs.overrides[2].values()) and any(inputs.overrides[1].values())  # some blocks differ
    got = torch.cat(sequential(adapter, windows, lambda *a: None, needs_stats=False, batch_size=2, inputs=inputs))
    assert (got - ref[0]).abs().max().item() < 1e-4


class TupleBlock(torch.nn.Module):
    """Wraps a decoder layer the way older transformers returned it: a tuple ``(hidden_states,)``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, **kwargs):
        out = self.inner(hidden_states, **kwargs)
        return (out[0] if isinstance(out, tuple) else out,)


def test_blocks_returning_tuples_are_handled():
    model = tiny_model("llama", layers=3)
    adapter = Adapter.for_model(model)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(6))
    inputs = first_block_inputs(adapter, windows, batch_size=1)
    block = adapter.blocks[0]
    plain = run_block(block, 0, inputs)
    wrapped = run_block(TupleBlock(block), 0, inputs)
    assert len(plain) == len(wrapped) == 2 and all(torch.equal(a, b) for a, b in zip(plain, wrapped))


def _full_pass_stats(block, index, linears, inputs) -> dict[str, tuple]:
    """Brute force: every layer's inputs in complete forward passes of the block (no early stop, no sharing)."""
    rows: dict[str, list] = {n: [] for n in linears}
    hooks = [lin.register_forward_hook(lambda m, a, out, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in linears.items()]
    run_block(block, index, inputs)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in rows.items():
        x = torch.cat(xs).double() if xs else torch.zeros(0, linears[n].in_features, dtype=torch.float64)
        out[n] = (x.shape[0], (x**2).sum(0), x.T @ x)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stopped_statistics_equal_a_full_pass_in_every_family(arch):
    from atprune.engine.passes import collect_stats

    model = tiny_model(arch, layers=2)
    adapter = Adapter.for_model(model)
    windows = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(8))
    inputs = first_block_inputs(adapter, windows, batch_size=2)
    for i, block in enumerate(adapter.blocks):
        linears = adapter.linears(block)
        got = collect_stats(block, i, linears, inputs, hessian=True)
        ref = _full_pass_stats(block, i, linears, inputs)
        for n, (ntok, sq, xtx) in ref.items():
            assert got[n].ntokens == ntok, (arch, i, n)
            if ntok:  # float32 sums against float64: tolerances relative to the largest entry
                torch.testing.assert_close(got[n].sq_norm.double(), sq, rtol=1e-5, atol=1e-6 * sq.max().item())
                torch.testing.assert_close(got[n].xtx.double(), xtx, rtol=1e-5, atol=1e-6 * xtx.abs().max().item())


def test_layers_called_several_times_per_block_keep_all_their_statistics():
    # a feed-forward applied in chunks (transformers' chunk_size_feed_forward) calls its layers once per chunk: the
    # early stop must wait for every call, not stop at the first call of the last layer
    from transformers import BertConfig, BertLMHeadModel

    from atprune.engine.passes import collect_stats

    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, is_decoder=True, chunk_size_feed_forward=4)
    torch.manual_seed(0)
    model = BertLMHeadModel(config).eval()
    adapter = Adapter.for_model(model)
    windows = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(9))
    inputs = first_block_inputs(adapter, windows, batch_size=2)
    block = adapter.blocks[0]
    linears = adapter.linears(block)
    got = collect_stats(block, 0, linears, inputs, hessian=False)
    ref = _full_pass_stats(block, 0, linears, inputs)
    assert {n: s.ntokens for n, s in got.items()} == {n: r[0] for n, r in ref.items()}
    assert got["intermediate.dense"].ntokens == 96  # 6 windows x 16 tokens, over 4 chunk calls per window batch
    for n, (_, sq, _) in ref.items():
        torch.testing.assert_close(got[n].sq_norm.double(), sq, rtol=1e-5, atol=1e-6 * sq.max().item())


def test_bfloat16_model_prunes_end_to_end_as_a_hand_computation():
    """The CUDA default dtype through ``prune()`` on a CPU: weights stay bfloat16, every row of every layer keeps
    exactly its share, and block 0's Wanda mask is the brute-force one (float64 norms of the bfloat16 inputs that
    block 0 receives, lowest |W| * ||X_j|| per row)."""
    import atprune
    from atprune.models.adapter import Adapter

    model = tiny_model("llama", layers=3, seed=4).to(torch.bfloat16)
    windows = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(12))
    adapter = Adapter.for_model(model)
    dense = {n: lin.weight.detach().clone() for n, lin in adapter.linears(adapter.blocks[0]).items()}
    feats: dict[str, list[torch.Tensor]] = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: feats.setdefault(n, []).append(a[0].detach().clone()))
             for n, lin in adapter.linears(adapter.blocks[0]).items()]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)  # the dense model: block 0 sees the same inputs when pruning
    for h in hooks:
        h.remove()
    result = atprune.prune(model, method="wanda", sparsity=0.5, calib=windows, progress=False)
    for block in adapter.blocks:
        for name, lin in adapter.linears(block).items():
            assert lin.weight.dtype == torch.bfloat16
            zeros = (lin.weight == 0).sum(dim=1)
            assert torch.all(zeros == lin.in_features // 2), name
    assert result.overall_sparsity == pytest.approx(0.5)
    for name, lin in adapter.linears(adapter.blocks[0]).items():
        x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[name]]).double()
        score = dense[name].double().abs() * x.square().sum(0).sqrt()
        drop = score.argsort(dim=1, stable=True)[:, : lin.in_features // 2]
        want = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
        assert torch.equal(lin.weight != 0, want & (dense[name] != 0)), name
