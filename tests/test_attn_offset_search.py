"""Searching ATP's beta with its attention/MLP offset: the two-parameter rule on planted objectives, trial keys that
tell an offset from plain ATP, and the search / compare jobs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import atprune
from atprune.errors import ConfigError
from atprune.jobs.strategies import GOLDEN, best_offset_trial, golden_search, offset_search
from atprune.jobs.trials import TrialRunner
from tests.conftest import random_text, save_tiny_model, tiny_model

HI = 0.02


def _range(beta):
    """A planted legal interval that narrows with beta: (-(0.3 - 5 beta), 0.2 - 4 beta)."""
    return -(0.3 - 5 * beta), 0.2 - 4 * beta


@pytest.mark.parametrize("d_star", [0.15, -0.2, 0.0])
@pytest.mark.parametrize("where", [0.0, 0.3, 0.8])
def test_offset_search_finds_the_planted_point_within_budget(d_star, where):
    b_star = where * HI
    calls = []

    def f(beta, d):
        calls.append((beta, d))
        return 3.0 + 1e3 * abs(beta - b_star) ** 1.5 + 4.0 * (d - d_star) ** 2

    budget = 6
    trials = offset_search(f, HI, _range, max_trials=budget)
    assert len(calls) == len(trials) == budget
    assert trials[0][0] == (0.0, 0.0)  # uniform first
    # beta: golden on budget - 2 trials at D = 0, the very points plain golden search visits first
    plain = golden_search(lambda b: f(b, 0.0), HI, budget - 2)
    assert [x for x, _ in trials[:budget - 2]] == [(b, 0.0) for b, _ in plain]
    b_hat = min(plain, key=lambda t: t[1])[0]
    assert abs(b_hat - b_star) <= GOLDEN ** (budget - 4) * HI + 1e-15
    # D: +-D0 at b_hat, D0 = half the smaller side of (-(0.3 - 5 b), 0.2 - 4 b)
    d0 = min(0.3 - 5 * b_hat, 0.2 - 4 * b_hat) / 2
    assert [x for x, _ in trials[budget - 2:]] == [(b_hat, d0), (b_hat, -d0)]
    (beta, d), _ = best_offset_trial(trials)
    want = 0.0 if d_star == 0 else (d0 if d_star > 0 else -d0)  # the planted optimum's side, or no offset
    assert (beta, d) == (b_hat, want)


def test_offset_search_budget_and_a_degenerate_range():
    with pytest.raises(ConfigError, match="max-trials >= 5"):
        offset_search(lambda b, d: b, HI, _range, max_trials=4)
    trials = offset_search(lambda b, d: b + d, HI, lambda b: (0.0, 0.0), max_trials=5)
    assert len(trials) == 3 and all(d == 0.0 for (_, d), _ in trials)  # only D = 0 is legal: no offset trial
    # ties go to D = 0
    assert best_offset_trial([((0.01, 0.1), 2.0), ((0.01, 0.0), 2.0)])[0] == (0.01, 0.0)


def _runner(seed=2):
    base = tiny_model("llama", layers=3, seed=seed)
    calib = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    return base, calib, TrialRunner(copy.deepcopy(base), calib, select)


def test_the_trial_key_tells_an_offset_from_plain_atp():
    base, calib, runner = _runner()
    plain = runner.configuration("wanda", 0.6, "atp", 0.1)
    offset = runner.configuration("wanda", 0.6, "atp", 0.1, {"attn_offset": 0.2})
    assert plain[:3] == offset[:3] and plain != offset  # same block rates, different layer rates
    assert plain[3] == () and dict(offset[3][0])["self_attn.q_proj"] == pytest.approx(0.62)
    assert runner.configuration("wanda", 0.6, "atp", 0.1, {"attn_offset": 0.0}) == plain
    first = runner.trial("wanda", 0.6, 0.1, "atp")
    second = runner.trial("wanda", 0.6, 0.1, "atp", attn_offset=0.2)
    assert "cached" not in second and runner.prunes == 2 and second["attn_offset"] == 0.2
    assert second["metric"] != first["metric"]
    assert runner.trial("wanda", 0.6, 0.1, "atp", attn_offset=0.2)["cached"] and runner.prunes == 2
    fresh = copy.deepcopy(base)
    atprune.prune(fresh, method="wanda", sparsity=0.6, allocation="atp", beta=0.1, calib=calib, progress=False,
                  allocation_options={"attn_offset": 0.2})
    for (name, got), (_, want) in zip(runner.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(got, want), name
    refused = runner.trial("wanda", 0.6, 0.1, "atp", attn_offset=0.6)  # outside (-0.75, 0.5): scores inf, no prune
    assert refused["metric"] == float("inf") and "(-0.75, 0.5)" in refused["refused"] and runner.prunes == 2


def test_tune_offset_on_a_model_shares_the_golden_trials():
    _, _, runner = _runner(seed=3)
    trials, (beta, d), value = runner.tune_offset("wanda", 0.6, max_trials=5)
    assert len(trials) == 5 and runner.prunes == 5
    assert (beta, d) in [x for x, _ in trials] and value == min(v for _, v in trials)
    lo, hi = runner.offset_range(0.6, beta)
    assert lo < 0 < hi and (d == 0 or lo < d < hi)
    # plain ATP's golden search with the same budget starts with the same three points: no new prune for them
    runner.tune("wanda", 0.6, "atp", max_trials=5)
    assert runner.prunes <= 5 + 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("offset")
    model = save_tiny_model(root / "model", layers=3)
    calib = root / "calib.txt"
    calib.write_text(random_text(3000, seed=3))
    evalf = root / "eval.txt"
    evalf.write_text(random_text(400, seed=4))
    return {"root": root, "model": str(model), "calib": str(calib), "eval": str(evalf)}


def _common(tiny):
    return ["--model", tiny["model"], "--sparsity", "0.6", "--calib-data", tiny["calib"], "--eval-data", tiny["eval"],
            "--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--quiet"]


def test_search_cli_with_the_offset(tiny, capsys):
    from atprune.cli import main

    out = tiny["root"] / "search"
    assert main(["search", *_common(tiny), "--max-trials", "5", "--attn-offset", "search", "--out", str(out)]) == 0
    state = json.loads((out / "search.json").read_text())
    assert len(state["trials"]) == 5 and state["config"]["attn_offset"] == "search"
    chosen = state["chosen"]
    best = min(state["trials"], key=lambda t: t["metric"])
    assert (chosen["beta"], chosen["attn_offset"]) == (best["beta"], best.get("attn_offset", 0.0))
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["spec"].get("allocator_attn_offset", 0.0) == chosen["attn_offset"]
    assert "chosen beta" in capsys.readouterr().out
    for bad, msg in ((["--attn-offset", "0.1"], "takes --attn-offset search"),
                     (["--attn-offset", "search", "--strategy", "grid"], "golden strategy only"),
                     (["--attn-offset", "search", "--max-trials", "4"], "max-trials >= 5")):
        assert main(["search", *_common(tiny), *bad, "--out", str(tiny["root"] / "bad")]) == 2
        assert msg in capsys.readouterr().err


def test_compare_adds_the_offset_column(tiny):
    from atprune.cli import main

    out = tiny["root"] / "cmp"
    args = ["compare", "--model", tiny["model"], "--methods", "wanda", "--sparsities", "0.6", "--allocations",
            "uniform", "atp", "--calib-data", tiny["calib"], "--eval-data", tiny["eval"], "--nsamples", "4",
            "--nselect", "2", "--seqlen", "32", "--max-trials", "5", "--atp-offset", "--quiet", "--out", str(out)]
    assert main(args) == 0
    state = json.loads((out / "compare.json").read_text())
    rows = {r["column"]: r for r in state["rows"]}
    assert list(rows) == ["uniform", "atp", "atp (attn/mlp offset)"]
    off = rows["atp (attn/mlp offset)"]
    assert off["beta"] is not None and "attn_offset" in off["options"] and len(off["trials"]) == 5
    # uniform 1, plain ATP's golden 4 more (its first is uniform) and its cell again, then the offset search's 3
    # golden points (remembered: the first three of plain ATP's), its 2 offsets and its cell again
    assert state["prune_passes"] <= 1 + 4 + 1 + 2 + 1
    assert rows["atp"]["options"] is None  # the plain column is unchanged
    assert "atp (attn/mlp offset)" in (out / "results.md").read_text().splitlines()[0]


@pytest.mark.parametrize("command", ["search", "compare"])
def test_a_layer_neither_attention_nor_mlp_is_refused_before_any_trial(tiny, capsys, monkeypatch, command):
    """``--attn-offset search`` / ``--atp-offset`` on a model with a layer that is neither attention nor MLP: one
    line naming it, before the runner scores anything (search: before the dense model's scores; compare: before its
    first cell, so no compare.json)."""
    import atprune.allocation as allocation_mod
    import atprune.jobs.compare as compare_mod
    import atprune.jobs.search as search_mod
    from atprune.cli import main

    real = allocation_mod.sublayer
    monkeypatch.setattr(allocation_mod, "sublayer", lambda name: None if name == "mlp.down_proj" else real(name))

    def no_runner(*a, **k):
        raise AssertionError("the trial runner was built")

    monkeypatch.setattr(search_mod, "TrialRunner", no_runner)
    monkeypatch.setattr(compare_mod, "TrialRunner", no_runner)
    out = tiny["root"] / f"neither-{command}"
    if command == "search":
        args = ["search", *_common(tiny), "--max-trials", "5", "--attn-offset", "search", "--out", str(out)]
    else:
        args = ["compare", "--model", tiny["model"], "--methods", "wanda", "--sparsities", "0.6", "--allocations",
                "uniform", "atp", "--calib-data", tiny["calib"], "--eval-data", tiny["eval"], "--nsamples", "4",
                "--nselect", "2", "--seqlen", "32", "--max-trials", "5", "--atp-offset", "--quiet", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block 0 layer 'mlp.down_proj' is neither" in err, err
    assert not (out / "compare.json").exists() and not (out / "search.json").exists()
