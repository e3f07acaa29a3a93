"""Batching, block offloading and shared statistics in the engine (issue: prune big models on one GPU).

On CPU the moves of an offloaded block are no-ops, so these tests check the bookkeeping (one block on the
compute device at a time, in order), make transfers visible with a fake device whose copies are fresh CPU storage,
and check that results do not change; tests/test_gpu.py repeats them on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

import atprune
from atprune.engine.passes import collect_stats, first_block_inputs
from atprune.models.adapter import Adapter
from atprune.engine.placement import Placement, auto_batch_size
from atprune.engine.stats import InputStats
from tests.conftest import tiny_model


class RecordingPlacement(Placement):
    """A CPU placement that logs every block move."""

    def __init__(self, **kw):
        super().__init__(torch.device("cpu"), **kw)
        self.log: list[tuple[str, int]] = []
        self.resident: set[int] = set()
        self.max_resident = 0

    def enter(self, block):
        self.log.append(("enter", id(block)))
        self.resident.add(id(block))
        self.max_resident = max(self.max_resident, len(self.resident))
        super().enter(block)

    def leave(self, block, modified=True):
        self.log.append(("leave", id(block)))
        self.resident.discard(id(block))
        super().leave(block, modified)


def windows(n=8, seqlen=24, seed=5):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["atp", "owl"])
def test_batch_size_1_and_8_give_identical_masks(method, allocation):
    base = tiny_model("llama", layers=3)
    m1, m8 = copy.deepcopy(base), copy.deepcopy(base)
    beta = 0.1 if allocation == "atp" else None
    kw = dict(method=method, sparsity=0.6, allocation=allocation, beta=beta, calib=windows(), progress=False)
    r1 = atprune.prune(m1, batch_size=1, **kw)
    r8 = atprune.prune(m8, batch_size=8, **kw)
    assert r1.calibration["batch_size"] == 1 and r8.calibration["batch_size"] == 8
    assert r1.spec["rates"] == pytest.approx(r8.spec["rates"], abs=1e-9)
    for (name, a), (_, b) in zip(m1.named_parameters(), m8.named_parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_gives_identical_weights_and_moves_one_block_at_a_time(method):
    base = tiny_model("llama", layers=4)
    plain, off = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(method=method, sparsity=0.5, allocation="atp", beta=0.05, calib=windows(), batch_size=4, progress=False)
    atprune.prune(plain, **kw)
    placement = RecordingPlacement(offload=True, offload_activations=True)
    placement.prepare(off, Adapter.for_model(off).blocks)
    atprune.prune(off, placement=placement, **kw)
    for (name, a), (_, b) in zip(plain.named_parameters(), off.named_parameters()):
        assert torch.equal(a, b), name
    blocks = [id(b) for b in Adapter.for_model(off).blocks]
    assert placement.max_resident == 1
    # the capture pass streams every block once, then the pruning pass visits each once, in order
    pruning = placement.log[-2 * len(blocks):]
    assert pruning == [(what, b) for b in blocks for what in ("enter", "leave")]
    assert not placement.resident


class FakeDevicePlacement(Placement):
    """A CPU placement whose "device copies" are fresh CPU storage, so that transfers become visible on a CPU:
    entering a block gives its tensors new storage (as a copy to a GPU would), and leaving it must give back the
    original storage. ``device_ptrs`` holds the storage addresses of the device copies."""

    def __init__(self):
        super().__init__(torch.device("cpu"), offload=True)
        self.device_ptrs: set[int] = set()
        self.entered: list[int] = []

    def enter(self, block):
        fresh = id(block) not in self._home
        super().enter(block)  # records the CPU ("home") storage; the move itself is a no-op on a CPU
        if fresh:
            self.entered.append(id(block))
            for p in block.parameters():
                p.data = p.data.clone()
                self.device_ptrs.add(p.data_ptr())


def test_offload_streaming_evaluation_runs_each_block_on_the_device_and_copies_nothing_back():
    model = tiny_model("llama", layers=3)
    blocks = Adapter.for_model(model).blocks
    tokens = windows(4, 32).flatten()
    from atprune.eval.perplexity import perplexity

    ref = perplexity(model, tokens, 32)["ppl"]
    home = {n: (p.data_ptr(), p.detach().clone()) for n, p in blocks.named_parameters()}
    placement = FakeDevicePlacement()
    seen = []

    def on_device(i):
        def check(module, args):
            # this block runs on its device copy; every other block sits in its home storage
            for j, other in enumerate(blocks):
                where = {p.data_ptr() in placement.device_ptrs for p in other.parameters()}
                assert where == {j == i}, (i, j)
            seen.append(i)
        return check

    def scribble(module, args, out):  # a write into the device copy must never reach the CPU storage
        next(module.parameters()).data.fill_(123.0)

    with placement.streaming(blocks):
        hooks = [b.register_forward_pre_hook(on_device(i)) for i, b in enumerate(blocks)]
        hooks += [b.register_forward_hook(scribble, prepend=True) for b in blocks]  # before the leave hook
        try:
            got = perplexity(model, tokens, 32, batch_size=2)["ppl"]
        finally:
            for h in hooks:
                h.remove()
    assert seen == [0, 1, 2] * 2  # 2 batches of 2 windows, every block once per batch, in order
    assert placement.entered == [id(b) for b in blocks] * 2
    for n, p in blocks.named_parameters():  # the home storage is back, untouched by the scribbles
        assert p.data_ptr() == home[n][0] and torch.equal(p, home[n][1]), n
    # every batch ran on unscribbled copies of the home weights (batches of 2 against 1: float32 rounding only)
    assert got == pytest.approx(ref, rel=1e-6)


def test_unmodified_blocks_are_not_copied_back():
    # "meta" stands in for the compute device: a copy back from it would fail, so this shows that leaving an
    # unmodified block only restores its CPU tensors, the very same storage as before
    block = tiny_model("llama", layers=1).model.layers[0]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in block.named_parameters()}
    placement = Placement(torch.device("meta"), offload=True)
    placement.enter(block)
    assert all(p.device.type == "meta" for p in block.parameters())
    placement.leave(block, modified=False)
    for n, p in block.named_parameters():
        assert p.device.type == "cpu" and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    placement.enter(block)
    placement.enter(block)  # entering twice keeps the CPU storage remembered the first time
    with pytest.raises(NotImplementedError):  # a modified block is copied back, here from "meta"
        placement.leave(block)


def test_modified_blocks_are_copied_into_their_own_cpu_storage():
    block = tiny_model("llama", layers=1).model.layers[0]
    placement = Placement(torch.device("cpu"), offload=True)
    ptr = block.mlp.down_proj.weight.data_ptr()
    placement.enter(block)
    block.mlp.down_proj.weight.data = torch.zeros_like(block.mlp.down_proj.weight)  # as a pruner may assign
    placement.leave(block)
    assert block.mlp.down_proj.weight.data_ptr() == ptr and not block.mlp.down_proj.weight.any()


def test_a_failing_streamed_pass_returns_blocks_to_the_cpu():
    model = tiny_model("llama", layers=2)
    blocks = Adapter.for_model(model).blocks
    ptrs = [p.data_ptr() for p in blocks.parameters()]
    placement = Placement(torch.device("meta"), offload=True)  # CPU inputs meet "meta" weights: the pass fails
    with pytest.raises((RuntimeError, NotImplementedError)):
        with placement.streaming(blocks), torch.no_grad():
            model(input_ids=windows(2, 8))
    assert all(p.device.type == "cpu" for p in blocks.parameters())
    assert [p.data_ptr() for p in blocks.parameters()] == ptrs


def test_layers_reading_the_same_input_share_statistics():
    model = tiny_model("llama", layers=2)
    adapter = Adapter.for_model(model)
    inputs = first_block_inputs(adapter, windows(4, 16), batch_size=2)
    block = adapter.blocks[0]
    linears = adapter.linears(block)
    stats = collect_stats(block, 0, linears, inputs, hessian=True)
    attn = [n for n in linears if n.endswith(("q_proj", "k_proj", "v_proj"))]
    mlp = [n for n in linears if n.endswith(("gate_proj", "up_proj"))]
    assert len(attn) == 3 and len(mlp) == 2
    assert all(stats[n] is stats[attn[0]] for n in attn) and all(stats[n] is stats[mlp[0]] for n in mlp)
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # attention input, o_proj input, MLP input, down_proj input
    # and the shared numbers are what each layer would have collected alone
    own = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, n=n: own.setdefault(n, InputStats(m.in_features, True)).add(a[0]))
             for n, lin in linears.items()]
    with torch.no_grad():
        for h in inputs.hidden:
            block(h, **inputs.kwargs(0, h.shape[0]))
    for h in hooks:
        h.remove()
    for n in linears:
        assert stats[n].ntokens == own[n].ntokens == 4 * 16
        torch.testing.assert_close(stats[n].xtx, own[n].xtx)
        torch.testing.assert_close(stats[n].sq_norm, own[n].sq_norm)


def _measured_peak_bytes(fn) -> int:
    """Peak of the CPU memory allocated and not yet freed while ``fn()`` runs (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("hidden,inter,heads,attn", [(64, 96, 4, "sdpa"), (256, 688, 8, "sdpa"),
                                                     (64, 96, 4, "eager"), (128, 512, 8, "eager")])
def test_window_estimate_covers_the_measured_peak_of_a_block(hidden, inter, heads, attn):
    """The per-window estimate behind the automatic batch size against the measured peak of one window's statistics
    and output passes through a real (tiny) LLaMA block: never below it, and within 2x of it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from atprune.engine.passes import run_block
    from atprune.engine.placement import window_bytes

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, num_hidden_layers=1, vocab_size=128)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = Adapter.for_model(model)
    block, seqlen = adapter.blocks[0], 256
    inputs = first_block_inputs(adapter, windows(1, seqlen))
    measured = max(_measured_peak_bytes(lambda: collect_stats(block, 0, adapter.linears(block), inputs, False)),
                   _measured_peak_bytes(lambda: run_block(block, 0, inputs)))
    estimate = window_bytes(model.config, seqlen)
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_auto_batch_size_divides_half_the_free_memory(monkeypatch):
    from transformers import LlamaConfig

    from atprune.engine.placement import window_bytes

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, vocab_size=32000)
    assert auto_batch_size(cfg, 2048, 128, torch.device("cpu"), torch.bfloat16) == 1
    per_window = window_bytes(cfg, 2048)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * per_window, 80 * 2**30))
    assert auto_batch_size(cfg, 2048, 128, torch.device("cuda"), torch.bfloat16) == 5
    assert auto_batch_size(cfg, 2048, 3, torch.device("cuda"), torch.bfloat16) == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**50, 2**50))
    assert auto_batch_size(cfg, 2048, 128, torch.device("cuda"), torch.bfloat16) == 16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * per_window, 2**50))
    # the logits of an evaluation pass (2048 x 32000 x 12 bytes = 786 MB per window) take room too
    assert window_bytes(cfg, 2048, logits=True) == per_window + 2048 * 32000 * 12
    assert auto_batch_size(cfg, 2048, 128, torch.device("cuda"), torch.bfloat16, logits=True) == \
        10 * per_window // 2 // (per_window + 2048 * 32000 * 12)
    # memory PyTorch's allocator has reserved but not handed out counts as free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * per_window, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * per_window)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * per_window)
    assert auto_batch_size(cfg, 2048, 128, torch.device("cuda"), torch.bfloat16) == 5  # (4 + 9 - 3) / 2


def test_auto_batch_size_is_capped_at_4_with_offload(monkeypatch):
    from atprune.api import resolve_batch_size

    model = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**50, 2**50))
    calib = torch.zeros(128, 64, dtype=torch.long)
    cuda = torch.device("cuda")
    assert resolve_batch_size("auto", model, calib, Placement(cuda)) == 16
    assert resolve_batch_size("auto", model, calib, Placement(cuda, offload=True)) == 4
    assert resolve_batch_size(8, model, calib, Placement(cuda, offload=True)) == 8


@pytest.mark.parametrize("bad", [0, None, 2.0, True])
def test_bad_batch_size_is_a_config_error(bad):
    with pytest.raises(atprune.ConfigError, match="positive integer or 'auto'"):
        atprune.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calib=windows(), batch_size=bad,
                      progress=False)


def test_offload_needs_cuda():
    from atprune.jobs.prune import PruneJob, check_job

    with pytest.raises(atprune.ConfigError, match="need --device cuda"):
        check_job(PruneJob(model="smollm2-135m", device="cpu", offload=True))


def test_offload_with_zero_shot_is_refused_before_loading():
    from atprune.jobs.prune import PruneJob, check_job

    with pytest.raises(atprune.ConfigError, match="--zero-shot with --offload"):
        check_job(PruneJob(model="smollm2-135m", device="cpu", offload=True, zero_shot="piqa"))


@pytest.mark.parametrize("field", ["seqlen", "eval_seqlen"])
def test_one_token_windows_are_refused_before_loading(field):
    from atprune.jobs.prune import PruneJob, check_job

    with pytest.raises(atprune.ConfigError, match="at least 2 tokens"):
        check_job(PruneJob(model="smollm2-135m", device="cpu", **{field: 1}))
