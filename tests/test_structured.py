"""Structured width pruning: scores as the official FLAP code computes them (by hand), GQA groups removed whole,
ratio 0 reproduces the logits exactly, shapes match the report, the saved model reloads with transformers, the FLAP
bias compensates the removed channels' mean, and bad input is one line (tiny models, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from atprune.engine.stats import InputStats
from atprune.errors import ConfigError
from atprune.jobs.structured import shrink
from atprune.models.shrink import attention_shape, check_family, load_shrunk
from atprune.pruners import structured as sp
from tests.conftest import char_tokenizer, tiny_config, tiny_model


def _calib(n=4, t=32, seed=0):
    return torch.randint(3, 100, (n, t), generator=torch.Generator().manual_seed(seed))


def _stats(x):
    st = InputStats(x.shape[-1])
    st.add(x)
    return st


def test_scores_by_hand():
    x = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]]])  # 2 tokens, 3 inputs
    w = torch.tensor([[1.0, 5.0, -1.0], [-2.0, 1.0, 3.0]])
    st = _stats(x)
    # wanda-sp: mean over rows of |W_ij| * ||X_j||: ||X|| = (sqrt 10, 0, sqrt 8)
    expect = torch.tensor([(1 + 2) / 2 * 10 ** 0.5, 0.0, (1 + 3) / 2 * 8 ** 0.5])
    assert torch.allclose(sp.column_scores("wanda-sp", w, st), expect)
    # flap (WIFV): var_j * sum_i W_ij^2: var = (1, 0, 0), column norms^2 = (5, 26, 10)
    assert torch.allclose(sp.column_scores("flap", w, st), torch.tensor([5.0, 0.0, 0.0]))
    # compensation of removing inputs {0, 2}: W[:, [0, 2]] @ mean[[0, 2]] = W[:,0]*2 + W[:,2]*2
    assert torch.allclose(sp.compensation(w, st, torch.tensor([1])), torch.tensor([0.0, 2.0]))
    assert sp.keep_indices(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [0, 2]  # ties: lower index removed
    assert sp.group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [3.0, 7.0]


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("structure", ["channels", "heads", "both"])
def test_ratio_zero_reproduces_logits_exactly(method, structure):
    model = tiny_model("llama")
    ids = _calib(2, 16, 1)
    with torch.no_grad():
        before = model(ids).logits
    shrink(model, _calib(), method, structure, [0.0] * 3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_removed_channels_equal_masked_model():
    """Removing channels physically gives the same logits as zeroing gate/up rows and down columns of the same
    channels in the dense model (the physical cut changes no other number)."""
    model = tiny_model("llama", layers=2)
    ref = tiny_model("llama", layers=2)
    ids = _calib(2, 16, 3)
    recs = shrink(model, _calib(), "wanda-sp", "channels", [0.25, 0.5])
    for block, rblock, rec in zip(model.model.layers, ref.model.layers, recs):
        # recover which channels were kept by matching rows of gate_proj
        kept = [int((rblock.mlp.gate_proj.weight == row).all(1).nonzero()[0]) for row in block.mlp.gate_proj.weight]
        drop = torch.ones(96, dtype=torch.bool)
        drop[kept] = False
        assert int(drop.sum()) == rec["removed_channels"] == int(96 * rec["rate"])
        with torch.no_grad():
            rblock.mlp.gate_proj.weight[drop] = 0
            rblock.mlp.up_proj.weight[drop] = 0
            rblock.mlp.down_proj.weight[:, drop] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_gqa_groups_removed_whole_and_shapes_match_report(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    recs = shrink(model, _calib(), "wanda-sp", "both", [0.5, 0.5, 0.5])
    for block, rec in zip(model.model.layers, recs):
        assert attention_shape(block) == (2, 1, 16) == (rec["num_heads"], rec["num_kv_heads"], 16)
        assert block.mlp.down_proj.weight.shape == (64, 48) and rec["intermediate_size"] == 48
        assert block.self_attn.q_proj.weight.shape == (32, 64) and block.self_attn.k_proj.weight.shape == (16, 64)
    ids = _calib(2, 16, 2)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # uniform widths: plain transformers
    assert again.config.intermediate_size == 48 and again.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, logits, atol=1e-5)
        out = again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_per_block_widths_reload(tmp_path, method):
    model = tiny_model("llama")
    recs = shrink(model, _calib(), method, "channels", [0.1, 0.3, 0.5])
    assert [r["intermediate_size"] for r in recs] == [96 - 9, 96 - 28, 96 - 48]
    ids = _calib(2, 16, 2)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert [w["intermediate_size"] for w in config["atprune_widths"]] == [87, 68, 48]
    assert config.get("mlp_bias", False) == (method == "flap")
    again = load_shrunk(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, logits, atol=1e-5)


def test_flap_bias_keeps_the_expected_output():
    """With FLAP's compensation, the MLP's output mean over the calibration tokens is the dense one's (the removed
    channels' mean contribution is added back as a bias), which plain removal does not keep."""
    calib = _calib(8, 32)
    outs = {}
    for method in ("flap", "wanda-sp"):
        model = tiny_model("llama", layers=1)
        dense_mlp = torch.nn.ModuleDict({"m": tiny_model("llama", layers=1).model.layers[0].mlp})
        seen = {}
        h = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
        with torch.no_grad():
            model(calib)
        h.remove()
        shrink(model, calib, method, "channels", [0.5])
        with torch.no_grad():
            outs[method] = (model.model.layers[0].mlp(seen["x"]).mean((0, 1)), dense_mlp["m"](seen["x"]).mean((0, 1)))
    got, want = outs["flap"]
    assert torch.allclose(got, want, atol=1e-5)
    plain, want2 = outs["wanda-sp"]
    assert not torch.allclose(plain, want2, atol=1e-5)


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="removes all 2 KV groups"):
        shrink(tiny_model("llama"), _calib(), "wanda-sp", "heads", [0.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="model type 'gpt2'"):
        check_family(tiny_config("gpt2"), "channels", False)
    with pytest.raises(ConfigError, match="cannot be expressed in a qwen2 config"):
        check_family(tiny_config("qwen2"), "channels", True)
    with pytest.raises(ConfigError, match="structured method: wanda-sp, flap"):
        sp.check_structured("wanda", "channels")
    with pytest.raises(ConfigError, match="unknown structure 'rows'"):
        sp.check_structured("flap", "rows")


def test_cli_structured_run_saves_a_smaller_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from atprune.cli import main
    from tests.conftest import random_text, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text(random_text(3000, 1))
    base = ["prune", "--model", str(model_dir), "--calib-data", str(text), "--eval-data", str(text), "--nsamples", "4",
            "--seqlen", "32", "--eval-windows", "2", "--quiet", "--out", str(tmp_path / "out")]
    assert main(base + ["--structure", "channels", "--method", "wanda-sp", "--sparsity", "0.25"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["ordinary_checkpoint"] and report["pruning"]["params_after"] < report["pruning"][
        "params_before"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert [b.mlp.down_proj.in_features for b in again.model.layers] == [
        b["intermediate_size"] for b in report["pruning"]["blocks"]] == [72] * len(again.model.layers)
    capsys.readouterr()
    for extra, message in [(["--structure", "channels", "--method", "wanda"], "structured method"),
                           (["--structure", "rows", "--method", "flap"], "unknown structure 'rows'"),
                           (["--structure", "heads", "--method", "flap", "--pattern", "2:4"], "takes no --pattern")]:
        assert main(base + ["--overwrite"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_other_families_shrink_and_reload(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, layers=2)
    ids = _calib(2, 16, 1)
    with torch.no_grad():
        before = model(ids).logits
    shrink(model, _calib(), "wanda-sp", "both", [0.0, 0.0])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # ratio 0: exactly the same logits
    shrink(model, _calib(), "wanda-sp", "both", [0.5, 0.5])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.get_text_config().intermediate_size == 48
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, logits, atol=1e-5)


def test_removed_kv_groups_equal_masked_heads():
    """Cutting a KV group gives the logits of the dense model with its query heads' o_proj columns zeroed (the heads
    then contribute nothing): the query heads kept are exactly those that attended with the kept KV heads."""
    model = tiny_model("llama", layers=2)
    ref = tiny_model("llama", layers=2)
    ids = _calib(2, 16, 3)
    shrink(model, _calib(), "wanda-sp", "heads", [0.5, 0.5])
    for block, rblock in zip(model.model.layers, ref.model.layers):
        kept_kv = [int((rblock.self_attn.k_proj.weight[::16] == row).all(1).nonzero()[0])
                   for row in block.self_attn.k_proj.weight[::16]]
        assert len(kept_kv) == 1
        gone = [h for h in range(4) if h // 2 not in kept_kv]  # 4 query heads, 2 per KV head
        with torch.no_grad():
            for h in gone:
                rblock.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_flap_head_bias_compensates_removed_heads():
    """FLAP on heads: o_proj's new bias is o_proj's weight on the removed heads' columns times their mean input."""
    model = tiny_model("llama", layers=1)
    o_dense = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    seen = {}
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    calib = _calib(4, 32)
    with torch.no_grad():
        model(calib)
    hook.remove()
    shrink(model, calib, "flap", "heads", [0.5])
    o = model.model.layers[0].self_attn.o_proj
    kept = [int((o_dense == col.unsqueeze(1)).all(0).nonzero()[0]) for col in o.weight.t()]
    gone = sorted(set(range(64)) - set(kept))
    assert len(gone) == 32
    mean = seen["x"].reshape(-1, 64).mean(0)
    assert torch.allclose(o.bias, o_dense[:, gone] @ mean[gone], atol=1e-5)
