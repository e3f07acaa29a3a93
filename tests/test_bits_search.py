"""``atprune search --bits-step search``: the ATP bit schedule's step chosen on held-out data (golden, like beta),
its legal range, the trial runner's cache keyed by bits per block, the final model's grids, bad input."""

import json

import pytest
import torch

import atprune.jobs.search as search_job
from atprune.cli import main
from atprune.errors import ConfigError
from atprune.jobs.search import SearchJob, run_search_job
from atprune.jobs.strategies import GOLDEN
from atprune.jobs.trials import TrialRunner
from atprune.quant import atp_bits, make_spec, step_max
from tests.conftest import random_text, save_tiny_model, tiny_model


@pytest.mark.parametrize("sizes,mean,choices", [([5, 5, 5], 3.0, (2, 3, 4)), ([1, 2, 3, 4], 4.0, (2, 3, 4, 8)),
                                                ([7, 1], 2.5, (2, 3)), ([4], 3.0, (2, 4))])
def test_step_max_is_where_an_end_target_reaches_the_widths(sizes, mean, choices):
    hi = step_max(mean, sizes, choices)
    c = sum(i * p for i, p in enumerate(sizes)) / sum(sizes)
    targets = [mean + hi * (c - i) for i in range(len(sizes))]
    assert sum(t * p for t, p in zip(targets, sizes)) / sum(sizes) == pytest.approx(mean)
    assert min(targets) >= min(choices) - 1e-9 and max(targets) <= max(choices) + 1e-9
    if len(sizes) > 1:  # one end target sits on its bound: a larger step would leave the widths
        assert max(targets) == pytest.approx(max(choices)) or min(targets) == pytest.approx(min(choices))
    else:
        assert hi == 0.0
    assert step_max(min(choices), sizes, choices) == 0.0  # the mean at a bound: no room to move bits


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=3)
    calib = torch.randint(3, 128, (4, 32))
    select = torch.randint(3, 128, (2, 32))
    spec = make_spec("w3", group_size=32, bits_allocation="atp", bits_mean=3.0, bits_choices=(2, 3, 4))
    return TrialRunner(model, calib, select, quantize=spec)


@pytest.mark.parametrize("where", [0.0, 0.3, 0.62, 1.0])
def test_golden_step_search_finds_a_planted_minimum_within_budget(runner, monkeypatch, where):
    hi = runner.bits_step_range()
    assert hi == pytest.approx(1.0)  # 3 equal blocks, mean 3 of {2, 3, 4}: targets 3 + t, 3, 3 - t
    target, calls = where * hi, []

    def planted(method, sparsity, step, *a, **k):  # stands in for the prune + score of one step
        calls.append(step)
        return {"bits_step": step, "metric": abs(step - target) ** 1.3}

    monkeypatch.setattr(TrialRunner, "_bits_objective", lambda self, *a, **k: planted(*a, **k))
    trials, chosen, _ = runner.tune_bits_step("wanda", 0.5, max_trials=7)
    assert trials[0][0] == 0.0 and len(calls) == len(trials) <= 7
    assert all(0.0 <= s <= hi for s, _ in trials)
    assert abs(chosen - target) <= GOLDEN ** 5 * hi + 1e-12


def test_configurations_differ_by_bits_per_block_only(runner):
    from dataclasses import replace

    spec = runner.quantize
    key = {t: runner.configuration("wanda", 0.5, "uniform", quantize=replace(spec, bits_step=t)) for t in
           (0.0, 0.38, 0.62)}
    # step 0.38 rounds to 3, 3, 3 like step 0; step 0.62 to 4, 3, 2 (derived in atp_bits' docstring rule)
    assert atp_bits(3.0, 0.38, runner.block_sizes, (2, 3, 4)) == [3, 3, 3]
    assert atp_bits(3.0, 0.62, runner.block_sizes, (2, 3, 4)) == [4, 3, 2]
    assert key[0.0] == key[0.38] != key[0.62]
    assert key[0.0] == runner.configuration("wanda", 0.5, "uniform", quantize=make_spec("w3", group_size=32))
    assert key[0.0] != runner.configuration("wanda", 0.5, "uniform", quantize=make_spec("w4", group_size=32))
    # the prunes: step 0 and uniform 3 bits are one pass, bit for bit; 0.62 another
    first = runner.prunes
    runner.prune("wanda", 0.5, "uniform", quantize=replace(spec, bits_step=0.0))
    a = {n: lin.weight.detach().clone() for n, lin in runner.linears.items()}
    runner.restore()  # the model no longer holds it: the uniform prune must run again, not come from the cache
    runner.prune("wanda", 0.5, "uniform", quantize=make_spec("w3", group_size=32))
    assert all(torch.equal(a[n], lin.weight) for n, lin in runner.linears.items())
    runner.prune("wanda", 0.5, "uniform", quantize=replace(spec, bits_step=0.62))
    assert runner.prunes == first + 3
    assert any(not torch.equal(a[n], lin.weight) for n, lin in runner.linears.items())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bits")
    (root / "calib.txt").write_text(random_text(3000, seed=3))
    (root / "eval.txt").write_text(random_text(400, seed=4))
    return {"root": root, "model": str(save_tiny_model(root / "model", layers=3)), "calib": str(root / "calib.txt"),
            "eval": str(root / "eval.txt")}


def _args(tiny, out, *extra):
    return ["search", "--model", tiny["model"], "--method", "wanda", "--sparsity", "0.5", "--calib-data",
            tiny["calib"], "--eval-data", tiny["eval"], "--nsamples", "4", "--nselect", "3", "--seqlen", "32",
            "--max-trials", "5", "--out", str(out), "--quiet", *extra]


def test_step_search_final_model_has_the_schedules_bits_on_its_grids(tiny, capsys):
    from safetensors.torch import load_file

    out = tiny["root"] / "run"
    assert main(_args(tiny, out, "--quantize", "w3", "--bits-allocation", "atp", "--bits-choices", "2,3,4",
                      "--bits-step", "search", "--group-size", "32", "--format", "pack-quantized")) == 0
    assert "chosen bits step" in capsys.readouterr().out
    state = json.loads((out / "search.json").read_text())
    steps = [t["bits_step"] for t in state["trials"]]
    hi = state["bits_step_max"]
    assert hi == pytest.approx(1.0) and steps[:3] == pytest.approx([0.0, (1 - GOLDEN) * hi, GOLDEN * hi])
    assert len(steps) <= 5 and all(0 <= s <= hi for s in steps)
    assert state["trials"][0]["block_bits"] == [3, 3, 3]
    chosen = state["chosen"]
    assert chosen["metric"] == min(t["metric"] for t in state["trials"])
    sizes = [64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 96] * 3  # q, o 64x64; k, v 32x64; gate, up, down 64x96
    bits = atp_bits(3.0, chosen["bits_step"], sizes, (2, 3, 4))
    assert chosen["block_bits"] == bits
    for t in state["trials"]:
        assert t["block_bits"] == atp_bits(3.0, t["bits_step"], sizes, (2, 3, 4))
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["bits_step"] == chosen["bits_step"] and report["quantization"]["block_bits"] == bits
    saved, packed = load_file(out / "model.safetensors"), load_file(out / "pack-quantized" / "model.safetensors")
    names = [n for n in saved if ".layers." in n and n.endswith("proj.weight")]
    assert len(names) == 21
    for name in names:
        b = bits[int(name.split(".layers.")[1].split(".")[0])]
        w = saved[name]
        scale = packed[name.removesuffix(".weight") + ".weight_scale"].double().repeat_interleave(32, 1)
        k = w.double() / scale
        assert torch.allclose(k, k.round(), atol=1e-5), name  # on its group's grid
        # symmetric b-bit codes: q - 2^(b-1) in [-2^(b-1), 2^(b-1) - 1]
        assert k.round().min() >= -2 ** (b - 1) and k.round().max() <= 2 ** (b - 1) - 1, name
        assert ((w == 0).sum(1) >= w.shape[1] // 2).all(), name  # the Wanda mask kept
    config = json.loads((out / "pack-quantized" / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in config["config_groups"].values()) == sorted(set(bits))


import atprune.jobs.multimodal  # noqa: E402


def _refused(tiny, capsys, monkeypatch, *extra) -> str:
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(atprune.jobs.multimodal, "load_model", forbidden)  # search loads through it
    code = main(_args(tiny, tiny["root"] / "bad", *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--bits-step", "search"], "needs --quantize"),
    (["--quantize", "w4", "--bits-step", "search"], "needs --bits-allocation atp"),
    (["--quantize", "w4", "--bits-allocation", "atp", "--bits-step", "search", "--attn-offset", "search"],
     "one knob per search"),
    (["--quantize", "w4", "--bits-allocation", "atp", "--bits-step", "search", "--strategy", "grid"], "golden"),
    (["--beta", "0.01"], "--beta fixes ATP's sparsity schedule"),
    (["--quantize", "w4", "--bits-allocation", "atp", "--bits-step", "fast"], "takes a number"),
])
def test_bad_step_search_input_is_one_line_before_loading(tiny, capsys, monkeypatch, extra, message):
    assert message in _refused(tiny, capsys, monkeypatch, *extra)


def test_step_search_is_a_search_option_only(tiny, capsys):
    code = main(["prune", "--model", tiny["model"], "--calib-data", tiny["calib"], "--quantize", "w4",
                 "--bits-allocation", "atp", "--bits-step", "search", "--out", str(tiny["root"] / "p")])
    assert code == 2 and "atprune search option" in capsys.readouterr().err


def test_resume_refuses_a_beta_search_folder_for_a_step_search(tiny):
    base = dict(model=tiny["model"], method="wanda", sparsity=0.5, calib_data=tiny["calib"], eval_data=None,
                nsamples=4, nselect=3, seqlen=32, max_trials=3, progress=False, quantize="w3", group_size=32,
                bits_allocation="atp", bits_choices=(2, 3, 4))
    out = tiny["root"] / "beta"
    run_search_job(SearchJob(**base, out=str(out)))
    with pytest.raises(ConfigError, match="cannot resume.*bits_step_search"):
        run_search_job(SearchJob(**base, out=str(out), resume=True, bits_step_search=True))
