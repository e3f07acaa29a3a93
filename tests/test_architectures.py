"""Every supported decoder family, as a tiny random model: blocks and prunable matrices found, the engine's parity
guard at sparsity 0, and 50 % Wanda / SparseGPT prunes that reach their targets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import atprune
from atprune.engine.passes import sequential
from atprune.errors import ConfigError
from atprune.models.adapter import Adapter, ExpertLinear, TransposedLinear
from tests.conftest import ARCHS, tiny_model

LAYERS = 3

# (blocks path, prunable matrices of one block); for Mixtral the expert matrices come from the fused 3D weights
EXPECTED = {
    "llama": ("model.layers", "llama"),
    "mistral": ("model.layers", "llama"),
    "qwen2": ("model.layers", "llama"),
    "qwen3": ("model.layers", "llama"),
    "gemma2": ("model.layers", "llama"),
    "gemma3": ("model.layers", "llama"),
    "mixtral": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
                + [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")]),
    "phi3": ("model.layers", ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "opt": ("model.decoder.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                     "fc1", "fc2"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "gpt_neox": ("gpt_neox.layers", ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                     "mlp.dense_4h_to_h"]),
    "falcon": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                                 "mlp.dense_4h_to_h"]),
}
LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


def _windows(n=4, seqlen=24, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _brute_force(model: nn.Module, blocks_path: str) -> set[str]:
    """Every weight matrix that should be prunable, found by walking the whole module tree independently of the
    adapter: Linear and Conv1D weights and every expert slice of 3D expert weights under the block list, minus
    embeddings / output head; named relative to their block as ``<index>/<name>``."""
    protected = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    found = set()
    for name, module in model.named_modules():
        if not name.startswith(blocks_path + ".") or id(module) in protected:
            continue
        index, _, rel = name[len(blocks_path) + 1:].partition(".")
        if isinstance(module, (nn.Linear, Conv1D)):
            found.add(f"{index}/{rel}")
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                found.update(f"{index}/{rel}.{e}.{pname}" for e in range(p.shape[0]))
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_every_block_and_every_matrix_is_found(arch):
    model = tiny_model(arch, layers=LAYERS)
    adapter = Adapter.for_model(model)
    path, names = EXPECTED[arch]
    names = LLAMA if names == "llama" else names
    assert adapter.blocks_path == path and adapter.num_blocks == LAYERS
    got = {f"{i}/{n}" for i, b in enumerate(adapter.blocks) for n in adapter.linears(b)}
    assert got == {f"{i}/{n}" for i in range(LAYERS) for n in names}
    assert got == _brute_force(model, path)
    for block in adapter.blocks:
        for lin in adapter.linears(block).values():
            assert lin.weight.shape == (lin.out_features, lin.in_features)
    # never the embeddings, the output head or a MoE router
    every = {id(lin) for b in adapter.blocks for lin in adapter.linears(b).values()}
    assert id(model.get_output_embeddings()) not in every and id(model.get_input_embeddings()) not in every
    routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
    assert (len(routers) == LAYERS) == (arch == "mixtral")


def _last_hidden_reference(model, adapter, windows):
    ref = []
    h = adapter.blocks[-1].register_forward_hook(lambda m, a, out: ref.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    h.remove()
    return ref[0], logits


def _logits_from_last_hidden(model, adapter, windows, hidden):
    """The model's logits when the last block's outputs are replaced by ``hidden`` (one tensor per batch of
    windows): the engine's outputs go through the model's own final norm and head."""
    out, feed = [], iter(hidden)

    def swap(module, args, output):
        h = next(feed)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = adapter.blocks[-1].register_forward_hook(swap)
    try:
        with torch.no_grad():
            for batch, h in zip(windows.split(hidden[0].shape[0]), hidden):
                out.append(model(input_ids=batch, use_cache=False).logits)
    finally:
        handle.remove()
    return torch.cat(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_guard_sparsity_zero_reproduces_the_full_model(arch):
    model = tiny_model(arch, layers=LAYERS)
    adapter = Adapter.for_model(model)
    windows = _windows()
    ref_hidden, ref_logits = _last_hidden_reference(model, adapter, windows)
    got = sequential(adapter, windows, lambda *a: None, needs_hessian=True, batch_size=2)
    assert (torch.cat(got) - ref_hidden).abs().max().item() < 1e-4
    # and through the final norm and head: the same logits as the full model
    logits = _logits_from_last_hidden(model, adapter, windows, got)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    # a prune at sparsity 0 changes nothing
    before = model(input_ids=windows, use_cache=False).logits.detach()
    result = atprune.prune(model, method="wanda", sparsity=0.0, calib=windows, progress=False)
    assert result.overall_sparsity < 0.01
    assert torch.allclose(model(input_ids=windows, use_cache=False).logits, before, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_prune_reaches_its_targets(arch, method):
    model = tiny_model(arch, layers=LAYERS)
    windows = _windows(n=8, seqlen=32)
    embed = model.get_input_embeddings().weight.detach().clone()
    result = atprune.prune(model, method=method, sparsity=0.5, calib=windows, batch_size=4, progress=False)
    adapter = Adapter.for_model(model)
    assert result.overall_sparsity == pytest.approx(0.5, abs=0.01)
    for i, block in enumerate(adapter.blocks):
        assert result.blocks[i]["achieved"] == pytest.approx(0.5, abs=0.01)
        for name, lin in adapter.linears(block).items():
            zeros = int((lin.weight == 0).sum())
            assert abs(zeros - 0.5 * lin.weight.numel()) <= lin.out_features, (i, name)
            if method == "wanda":  # Wanda compares within each output row: every row is pruned at 50 %
                assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all(), (i, name)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    logits = model(input_ids=windows, use_cache=False).logits
    assert torch.isfinite(logits).all()


def _block_inputs_of(module, model, windows):
    """Positional and keyword inputs of ``module`` in one forward pass of ``model``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    return seen[0]


def test_gpt2_conv1d_is_pruned_per_output_row_with_its_own_inputs():
    """GPT-2 stores Conv1D weights [in, out]: the adapter shows them [out, in], Wanda's scores use the layer's
    input norms along the input axis, and the zeros land in the stored layout transposed."""
    from atprune.engine.passes import collect_stats, first_block_inputs
    from atprune.pruners import Pattern, get_pruner

    model = tiny_model("gpt2", layers=2)
    adapter = Adapter.for_model(model)
    block = adapter.blocks[0]
    lin = adapter.linears(block)["mlp.c_fc"]
    assert isinstance(lin, TransposedLinear) and isinstance(lin.module, Conv1D)
    assert (lin.in_features, lin.out_features) == (64, 96) and lin.module.weight.shape == (64, 96)
    windows = _windows(n=2, seqlen=16)
    (x,), _ = _block_inputs_of(lin.module, model, windows)
    stats = collect_stats(block, 0, {"c_fc": lin}, first_block_inputs(adapter, windows, 2), hessian=True)["c_fc"]
    assert stats.ntokens == 32 and torch.allclose(stats.col_norm(), x.reshape(-1, 64).norm(dim=0), atol=1e-5)
    assert torch.allclose(stats.xtx, x.reshape(-1, 64).T @ x.reshape(-1, 64), atol=1e-4)
    stored = lin.module.weight.detach().clone()  # [in, out]
    pruned = get_pruner("wanda").prune(lin.weight, stats, 0.5, Pattern())
    from atprune.models.adapter import set_weight

    set_weight(lin, pruned)
    # manual Wanda in the stored layout: per output column j of W[in, out], drop the 32 inputs of lowest |W_ij|*||X_i||
    score = stored.abs() * x.reshape(-1, 64).norm(dim=0)[:, None]
    keep = score.argsort(dim=0, descending=True)[:32]
    expected = torch.zeros_like(stored).scatter(0, keep, stored.gather(0, keep))
    assert torch.equal(lin.module.weight, expected)
    assert ((lin.module.weight == 0).sum(0) == 32).all()  # every output column of the stored [in, out] weight


def test_mixtral_expert_statistics_see_only_their_routed_tokens():
    from atprune.engine.passes import collect_stats, first_block_inputs

    model = tiny_model("mixtral", layers=2)
    adapter = Adapter.for_model(model)
    block = adapter.blocks[0]
    experts = block.mlp.experts
    windows = _windows(n=2, seqlen=16)
    (hidden, index, _), kw = _block_inputs_of(experts, model, windows)
    linears = adapter.linears(block)
    stats = collect_stats(block, 0, linears, first_block_inputs(adapter, windows, 2), hessian=False)
    assert sum(stats[f"mlp.experts.{e}.gate_up_proj"].ntokens for e in range(4)) == 32 * 2  # top-2 routing
    for e in range(4):
        assert isinstance(linears[f"mlp.experts.{e}.down_proj"], ExpertLinear)
        x = hidden[(index == e).any(-1)]
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        inter = experts.act_fn(gate) * up
        assert stats[f"mlp.experts.{e}.gate_up_proj"].ntokens == x.shape[0]
        assert torch.allclose(stats[f"mlp.experts.{e}.gate_up_proj"].col_norm(), x.norm(dim=0), atol=1e-5)
        assert torch.allclose(stats[f"mlp.experts.{e}.down_proj"].col_norm(), inter.norm(dim=0), atol=1e-5)
    router = block.mlp.gate.weight.detach().clone()
    atprune.prune(model, method="sparsegpt", sparsity=0.5, calib=windows, progress=False)
    assert torch.equal(block.mlp.gate.weight, router)  # the router is never pruned
    assert (experts.gate_up_proj == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


class _Renamed(nn.Module):
    """A model whose blocks live at an unusual path, next to a second list of the same length (so no rule can
    pick one): what an unknown architecture looks like to the adapter."""

    def __init__(self, inner):
        super().__init__()
        self.config = inner.config
        self.embed = inner.get_input_embeddings()
        self.stack = nn.Module()
        self.stack.units = nn.ModuleList(list(inner.model.layers))
        self.shadow = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in inner.model.layers)
        self.head = inner.lm_head

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_unknown_layout_names_the_paths_tried_and_blocks_path_selects_the_list():
    model = _Renamed(tiny_model("llama", layers=2))
    with pytest.raises(ConfigError) as err:
        Adapter.for_model(model)
    msg = str(err.value)
    assert "model.layers" in msg and "model.decoder.layers" in msg and "transformer.h" in msg
    assert "gpt_neox.layers" in msg and "--blocks-path" in msg and "stack.units" in msg and "shadow" in msg
    adapter = Adapter.for_model(model, blocks_path="stack.units")
    assert adapter.blocks is model.stack.units and adapter.blocks_path == "stack.units"
    assert sorted(adapter.linears(adapter.blocks[1])) == sorted(LLAMA)


@pytest.mark.parametrize("path, what", [("model.decoder.layers", "no module at that path"),
                                        ("stack", "not a non-empty nn.ModuleList"),
                                        ("stack.units.0", "not a non-empty nn.ModuleList"),
                                        ("stack.units.9", "no module at that path")])
def test_bad_blocks_path_is_a_config_error(path, what):
    model = _Renamed(tiny_model("llama", layers=2))
    with pytest.raises(ConfigError, match=what):
        Adapter.for_model(model, blocks_path=path)


def test_blocks_path_through_the_api_and_the_cli(tmp_path, capsys):
    from atprune.cli import main
    from tests.conftest import char_tokenizer, random_text

    model = tiny_model("opt", layers=2)
    windows = _windows(n=4, seqlen=16)
    result = atprune.prune(model, method="wanda", sparsity=0.5, calib=windows, blocks_path="model.decoder.layers",
                           progress=False)
    assert len(result.blocks) == 2 and result.overall_sparsity == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ConfigError, match="model.decoder.layers.fc1"):
        atprune.prune(model, method="wanda", sparsity=0.5, calib=windows, blocks_path="model.decoder.layers.fc1",
                      progress=False)
    folder = tmp_path / "opt"
    tiny_model("opt", layers=2).save_pretrained(folder)
    char_tokenizer(bos=True).save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(random_text(3000, seed=3))
    base = ["prune", "--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--calib-data", str(text),
            "--eval-data", str(text), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--quiet", "--json"]
    assert main(base + ["--blocks-path", "model.decoder.layers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pruning"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert main(base + ["--blocks-path", "model.decoder.nothing"]) == 2
    assert "--blocks-path 'model.decoder.nothing'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
@pytest.mark.parametrize("allocation", ["owl", "alphapruning"])
def test_model_dependent_allocators_work_on_views_of_conv1d_and_experts(arch, allocation):
    """OWL (dense Wanda statistics; DLP shares that path) and AlphaPruning (weight spectra) read the weights and
    statistics through the Conv1D and expert views."""
    model = tiny_model(arch, layers=4)
    windows = _windows(n=4, seqlen=16)
    result = atprune.prune(model, method="wanda", sparsity=0.5, allocation=allocation, calib=windows,
                           batch_size=2, progress=False)
    # Wanda rounds each row down to whole weights: with 64-wide rows the mean may fall short by up to 1/64
    assert 0.5 - 1 / 64 <= result.overall_sparsity <= 0.5 + 1e-9
    assert len({round(b["target"], 6) for b in result.blocks}) > 1  # non-uniform rates were applied


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_search_trials_restore_dense_weights_through_views(arch):
    from atprune.jobs.search import TrialRunner

    model = tiny_model(arch, layers=3)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runner = TrialRunner(model, _windows(n=4, seqlen=16), _windows(n=2, seqlen=16, seed=5))
    runner.prune("sparsegpt", 0.6, "uniform")
    assert any(not torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    runner.restore()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_saves_reloads_and_verifies(arch, tmp_path):
    """Masks are recorded under the stored parameters' names and layouts (GPT-2 Conv1D ``[in, out]``, fused expert
    tensors), so every family saves, reloads with plain transformers with exactly its zeros, and verifies."""
    from transformers import AutoModelForCausalLM

    from atprune.export import record_masks, save_pruned, verify_checkpoint

    model = tiny_model(arch, layers=2)
    atprune.prune(model, method="wanda", sparsity=0.5, calib=_windows(), progress=False)
    masks = record_masks(model)
    stored = dict(model.named_parameters())
    assert masks and all(tuple(stored[n].shape) == masks.shape(n) for n in masks)
    if arch == "mixtral":  # fused experts: refused up front, nothing written
        with pytest.raises(ConfigError, match="fused mixture-of-experts"):
            save_pruned(model, None, tmp_path / "out", {"pruning": {}}, masks=masks)
        assert not (tmp_path / "out").exists()
        return
    out = save_pruned(model, None, tmp_path / "out", {"pruning": {}}, masks=masks, formats=("dense", "compressed"))
    rows = verify_checkpoint(out)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]][:3]
    back = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name in masks:
        assert torch.equal(back[name].detach() == 0, masks[name]), name


def test_masks_of_an_unknown_layout_need_its_blocks_path():
    from atprune.export import record_masks

    model = _Renamed(tiny_model("llama", layers=2))
    with torch.no_grad():
        model.stack.units[0].mlp.up_proj.weight[0, :5] = 0
    masks = record_masks(model, "stack.units")
    assert masks.blocks_path == "stack.units" and len(masks) == 2 * 7
    assert masks.zeros("stack.units.0.mlp.up_proj.weight") == 5
    with pytest.raises(ConfigError):
        record_masks(model)
