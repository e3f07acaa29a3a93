import json
import math

import pytest
import torch

import atprune.jobs.search as search_job
from atprune import data as data_mod
from atprune.allocators import beta_max
from atprune.jobs.analysis import reconstruction_errors
from atprune.cli import main
from atprune.errors import ConfigError
from atprune.jobs.strategies import GOLDEN, best_trial, golden_search, grid_betas
from atprune.jobs.search import SearchJob, run_search_job
from tests.conftest import random_text, save_tiny_model, tiny_model


@pytest.mark.parametrize("s,L", [(0.7, 30), (0.5, 32), (0.2, 12), (0.9, 80)])
def test_grid_is_the_reference_grid_up_to_the_legal_bound(s, L):
    hi = min(2 * s, 2 * (1 - s)) / (L - 1)
    betas = grid_betas(s, L)
    assert betas[0] == 0.0
    assert betas[1:] == pytest.approx([0.002 * k for k in range(1, len(betas))])
    assert betas[-1] <= hi + 1e-12 and 0.002 * len(betas) > hi


@pytest.mark.parametrize("where", [0.0, 0.05, 0.2, 0.381966, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("budget", [4, 6, 8])
def test_golden_finds_minimum_of_unimodal_function_within_budget(where, budget):
    hi = beta_max(0.7, 30)
    target = where * hi
    calls = []

    def f(beta):
        calls.append(beta)
        return 3.0 + abs(beta - target) ** 1.5 * 1e3

    trials = golden_search(f, hi, max_trials=budget)
    assert len(calls) == len(trials) <= budget
    assert all(0.0 <= b <= hi for b, _ in trials)  # never an illegal beta
    best, _ = best_trial(trials)
    assert abs(best - target) <= GOLDEN ** (budget - 2) * hi + 1e-15


def test_golden_rejects_tiny_budget_and_best_trial_skips_nan():
    with pytest.raises(ConfigError, match="max-trials >= 3"):
        golden_search(lambda b: b, 0.01, max_trials=2)
    assert best_trial([(0.0, 5.0), (0.01, math.nan), (0.02, 4.0)]) == (0.02, 4.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model = save_tiny_model(root / "model", layers=3)
    calib = root / "calib.txt"
    calib.write_text(random_text(3000, seed=3))
    evalf = root / "eval.txt"
    evalf.write_text(random_text(400, seed=4))
    return {"root": root, "model": str(model), "calib": str(calib), "eval": str(evalf)}


def _job(tiny, out, **kw):
    base = dict(model=tiny["model"], method="wanda", sparsity=0.6, calib_data=tiny["calib"], eval_data=tiny["eval"],
                nsamples=4, nselect=3, seqlen=32, max_trials=4, out=str(out), progress=False)
    return SearchJob(**(base | kw))


def test_selection_windows_are_disjoint_from_calibration(tiny, monkeypatch):
    monkeypatch.setattr(data_mod, "token_stream", lambda tok, src, max_tokens=None, seed=0: torch.arange(1000))
    calib, select, info = search_job.selection_windows(_job(tiny, tiny["root"] / "unused", nsamples=10, nselect=5), None)
    assert calib.shape == (10, 32) and select.shape == (5, 32)
    positions_c, positions_s = set(calib.flatten().tolist()), set(select.flatten().tolist())
    assert len(positions_c) == 320 and len(positions_s) == 160 and not positions_c & positions_s
    assert "disjoint" in info["source"]


def test_search_then_resume_skips_finished_trials(tiny, monkeypatch):
    out = tiny["root"] / "run"
    state = run_search_job(_job(tiny, out))
    assert len(state["trials"]) == 4 and not state["selected_on_test"]
    hi = state["beta_max"]
    assert [t["beta"] for t in state["trials"][:3]] == pytest.approx([0.0, (1 - GOLDEN) * hi, GOLDEN * hi])
    assert state["chosen"]["metric"] == min(t["metric"] for t in state["trials"])
    for t in state["trials"]:
        assert sum(t["rates"]) / len(t["rates"]) == pytest.approx(0.6)
    assert (out / "search.png").stat().st_size > 1000 and (out / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["beta"] == state["chosen"]["beta"]

    saved = json.loads((out / "search.json").read_text())
    saved["trials"] = saved["trials"][:2]
    (out / "search.json").write_text(json.dumps(saved))
    calls = []
    import atprune.jobs.trials as trials_mod

    real = trials_mod.prune
    monkeypatch.setattr(trials_mod, "prune", lambda *a, **k: calls.append(k["beta"]) or real(*a, **k))
    again = run_search_job(_job(tiny, out, resume=True))
    # 2 trials redone, the 2 recorded ones not; then the final prune, unless the model still holds the chosen beta
    # (the last trial's)
    last_chosen = again["chosen"]["beta"] == again["trials"][-1]["beta"]
    assert len(calls) == 3 - last_chosen and calls[:2] == pytest.approx([t["beta"] for t in state["trials"][2:]])
    assert [t["metric"] for t in again["trials"]] == pytest.approx([t["metric"] for t in state["trials"]])


def test_resume_refuses_different_options(tiny):
    out = tiny["root"] / "run"
    with pytest.raises(ConfigError, match="cannot resume.*nsamples"):
        run_search_job(_job(tiny, out, resume=True, nsamples=5))


def test_selection_on_evaluation_data_is_refused_unless_marked(tiny, capsys):
    with pytest.raises(ConfigError, match="select-on-test"):
        run_search_job(_job(tiny, tiny["root"] / "a", select_data=tiny["eval"]))
    out = tiny["root"] / "b"
    state = run_search_job(_job(tiny, out, select_on_test=True, max_trials=3))
    assert state["selected_on_test"] and state["selection_data"]["source"] == "selected on test"
    report = json.loads((out / "report.json").read_text())
    assert report["selected_on_test"] is True and any("SELECTED ON TEST" in w for w in report["warnings"])


def test_search_cli_kl_metric_and_grid(tiny, capsys):
    out = tiny["root"] / "kl"
    code = main(["search", "--model", tiny["model"], "--method", "magnitude", "--sparsity", "0.5", "--calib-data",
                 tiny["calib"], "--eval-data", tiny["eval"], "--nsamples", "3", "--nselect", "2", "--seqlen", "32",
                 "--strategy", "grid", "--step", "0.1", "--metric", "kl", "--out", str(out), "--quiet"])
    assert code == 0
    state = json.loads((out / "search.json").read_text())
    assert [t["beta"] for t in state["trials"]] == pytest.approx(grid_betas(0.5, 3, 0.1))
    assert all(t["metric"] > 0 for t in state["trials"])  # pruned at 50%: predictions moved from the dense model
    assert "chosen beta" in capsys.readouterr().out


def test_search_rejects_unknown_strategy_before_loading(tiny, capsys):
    code = main(["search", "--model", tiny["model"], "--calib-data", tiny["calib"], "--strategy", "random",
                 "--out", str(tiny["root"] / "z")])
    assert code == 2 and "unknown strategy 'random'" in capsys.readouterr().err


def test_reconstruction_error_is_zero_at_sparsity_zero_and_grows_otherwise():
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    zero = reconstruction_errors(tiny_model("llama", layers=4), windows, method="sparsegpt", sparsity=0.0)
    assert zero["local"] == [0.0] * 4 and zero["accumulated"] == [0.0] * 4
    errs = reconstruction_errors(tiny_model("llama", layers=4), windows, method="wanda", sparsity=0.6)
    assert errs["accumulated"][0] == errs["local"][0] > 0  # block 0 sees the dense input either way
    assert all(a > 0 for a in errs["accumulated"])
    assert errs["accumulated"][-1] > errs["local"][-1]


def test_analyze_cli_writes_curves_per_allocation(tiny, capsys):
    out = tiny["root"] / "analyze"
    code = main(["analyze", "--model", tiny["model"], "--method", "wanda", "--sparsity", "0.6", "--allocations",
                 "uniform", "atp:0.2", "--calib-data", tiny["calib"], "--nsamples", "3", "--seqlen", "32",
                 "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    assert list(result["curves"]) == ["uniform", "atp:0.2"]
    assert result["curves"]["atp:0.2"]["rates"] == pytest.approx([0.4, 0.6, 0.8])
    assert (out / "analysis.png").stat().st_size > 1000
    code = main(["analyze", "--model", tiny["model"], "--sparsity", "0.6", "--allocations", "atp:0.9",
                 "--calib-data", tiny["calib"], "--out", str(tiny["root"] / "bad")])
    assert code == 2 and "illegal beta 0.9" in capsys.readouterr().err


def test_resume_never_touches_the_input_model_and_accepts_nonfinite_trials(tiny):
    with pytest.raises(ConfigError, match="overlaps the input model"):
        run_search_job(_job(tiny, tiny["model"], resume=True))
    out = tiny["root"] / "nan"
    first = run_search_job(_job(tiny, out, max_trials=3))
    saved = json.loads((out / "search.json").read_text())
    saved["trials"][1]["metric"] = None  # as write_json stores a non-finite metric
    (out / "search.json").write_text(json.dumps(saved))
    again = run_search_job(_job(tiny, out, max_trials=3, resume=True))
    assert math.isinf(again["trials"][1]["metric"])
    assert again["chosen"]["beta"] in (first["trials"][0]["beta"], first["trials"][2]["beta"])


def test_selection_identity_compares_the_text_actually_read(tiny, tmp_path):
    import shutil

    copy = tmp_path / "same.txt"
    shutil.copyfile(tiny["eval"], copy)
    link = tmp_path / "link.txt"
    link.symlink_to(tiny["eval"])
    with pytest.raises(ConfigError, match="selection data is the evaluation data"):
        search_job.check_search(_job(tiny, tmp_path / "o1", select_data=str(link)))
    # a different file (even with equal content) is a different text: allowed
    search_job.check_search(_job(tiny, tmp_path / "o2", select_data=str(copy)))
    assert data_mod.identity("wikitext2", "validation", "/nowhere") != data_mod.identity("wikitext2", "test", "/nowhere")


def test_search_validates_step_and_trials_before_loading(tiny):
    with pytest.raises(ConfigError, match="max-trials >= 3"):
        search_job.check_search(_job(tiny, tiny["root"] / "t", max_trials=2))
    with pytest.raises(ConfigError, match="grid step must be > 0"):
        search_job.check_search(_job(tiny, tiny["root"] / "t", strategy="grid", step=0.0))


@pytest.mark.parametrize("method,allocation,value", [("wanda", "atp", 0.1), ("sparsegpt", "atp", 0.1),
                                                    ("wanda", "owl", 0.1), ("wanda", "alphapruning", 0.2),
                                                    ("sparsegpt", "dlp", 0.1)])
def test_a_trial_on_cached_inputs_gives_the_weights_of_a_fresh_prune(method, allocation, value):
    """The runner captures block 0's inputs once, restores the dense weights before each trial and computes each
    allocator's dense statistic once: a trial must prune exactly as a fresh ``prune()`` of an untouched copy does,
    also after another trial ran in between."""
    import copy

    import atprune

    base = tiny_model("llama", layers=3, seed=2)
    calib = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    fresh = copy.deepcopy(base)
    knob = {"atp": "beta", "owl": "lam", "alphapruning": "eps", "dlp": "alpha"}[allocation]
    kw = {"beta": value} if allocation == "atp" else {"allocation_options": {knob: value}}
    atprune.prune(fresh, method=method, sparsity=0.6, allocation=allocation, calib=calib, progress=False, **kw)
    runner = search_job.TrialRunner(copy.deepcopy(base), calib, select)
    for v in (value, 0.0):  # the second trial changes every weight; pruning ``value`` again must undo it
        record = runner.trial(method, 0.6, v, allocation)
        assert record[knob] == v and record["metric"] > 0
    runner.prune(method, 0.6, allocation, **({"beta": value} if allocation == "atp" else {"options": {knob: value}}))
    assert runner.prunes == 3
    for (name, got), (_, want) in zip(runner.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("allocation", ["owl", "alphapruning"])
def test_analysis_prunes_with_the_rates_of_prune(allocation):
    """Model-dependent allocations in ``analyze``: the rates are those ``prune()`` computes (dense statistics),
    and the model it leaves is the pruned one."""
    import copy

    import atprune

    base = tiny_model("llama", layers=3, seed=5)
    windows = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    fresh = copy.deepcopy(base)
    want = atprune.prune(fresh, method="wanda", sparsity=0.5, allocation=allocation, calib=windows, progress=False)
    got = reconstruction_errors(base, windows, method="wanda", sparsity=0.5, allocation=allocation)
    assert got["rates"] == pytest.approx(want.spec["rates"], abs=1e-12) and len(got["local"]) == 3
    for (name, a), (_, b) in zip(base.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_a_configuration_met_again_is_neither_pruned_nor_scored_again():
    """Uniform is the first point of every search (ATP's beta 0, OWL's lam 0, DLP's alpha 0, AlphaPruning's eps 0
    all give the mean rate in every block): the runner prunes it once, and every later trial at 0 returns the
    remembered metric, which equals a fresh uniform prune of an untouched copy scored independently."""
    import copy

    import atprune
    from atprune.eval.perplexity import perplexity

    base = tiny_model("llama", layers=3, seed=2)
    calib = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    fresh = copy.deepcopy(base)
    atprune.prune(fresh, method="wanda", sparsity=0.6, allocation="uniform", calib=calib, progress=False)
    want = perplexity(fresh, select.flatten(), 24)["ppl"]
    runner = search_job.TrialRunner(copy.deepcopy(base), calib, select)
    first = runner.trial("wanda", 0.6, 0.0, "atp")
    assert first["metric"] == want and "cached" not in first and runner.prunes == 1
    for allocation in ("owl", "dlp", "alphapruning"):
        again = runner.trial("wanda", 0.6, 0.0, allocation)
        assert again["cached"] and again["metric"] == want and again["rates"] == [0.6] * 3
    assert runner.prunes == 1
    runner.trial("wanda", 0.6, 0.1, "atp")  # another configuration: pruned
    assert runner.prunes == 2
    # the one the model holds now is not pruned again: prune() returns its result, the weights stay as they are
    result = runner.prune("wanda", 0.6, "atp", 0.1)
    assert runner.prunes == 2 and result.spec["beta"] == 0.1
    # uniform is no longer in the model: asking for it prunes it again, to the very weights of the fresh copy
    runner.prune("wanda", 0.6, "uniform")
    assert runner.prunes == 3
    for (name, got), (_, ref) in zip(runner.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(got, ref), name
    # another score of a remembered configuration needs its weights: other windows on uniform (held now) cost no prune
    other = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(10))
    rec = runner.trial("wanda", 0.6, 0.0, "atp", select=other)
    assert "cached" not in rec and runner.prunes == 3
    assert rec["metric"] == perplexity(fresh, other.flatten(), 24)["ppl"]


def test_a_configuration_met_under_another_allocation_is_reported_as_the_request():
    """ATP at beta 0 has the uniform run's rates: the runner does not prune it again, but its result describes the
    request (allocation ``atp``, beta 0), as a fresh ``prune()`` with those options does."""
    import copy

    import atprune

    base = tiny_model("llama", layers=3, seed=2)
    calib = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    fresh = atprune.prune(copy.deepcopy(base), method="wanda", sparsity=0.6, allocation="atp", beta=0.0, calib=calib,
                          progress=False)
    runner = search_job.TrialRunner(copy.deepcopy(base), calib, select)
    runner.prune("wanda", 0.6, "uniform")
    got = runner.prune("wanda", 0.6, "atp", 0.0)
    assert runner.prunes == 1
    assert got.spec == fresh.spec and got.spec["allocation"] == "atp"
    assert got.blocks == fresh.blocks and got.overall_sparsity == fresh.overall_sparsity
    assert runner.known("wanda", 0.6, "uniform").spec["allocation"] == "uniform"


def test_a_prune_interrupted_midway_is_not_taken_for_the_dense_model(monkeypatch):
    """A prune that raises after changing weights (e.g. Ctrl-C in a notebook) leaves weights that are neither dense
    nor any configuration: the next allocator statistic (OWL's, read from the dense weights) and the next trial must
    equal an untouched runner's."""
    import copy

    import atprune.jobs.trials as trials_mod

    base = tiny_model("llama", layers=3, seed=2)
    calib = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    want = search_job.TrialRunner(copy.deepcopy(base), calib, select).trial("wanda", 0.6, 0.1, "owl")
    runner = search_job.TrialRunner(copy.deepcopy(base), calib, select)
    real = trials_mod.prune

    def interrupted(*args, **kw):
        real(*args, **kw)  # every weight pruned, then the run is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(trials_mod, "prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.prune("wanda", 0.6, "uniform")
    monkeypatch.setattr(trials_mod, "prune", real)
    got = runner.trial("wanda", 0.6, 0.1, "owl")
    assert got["rates"] == want["rates"] and got["metric"] == want["metric"]
    # the interrupted configuration was never finished: asked again it is pruned, not taken from the model
    runner.prune("wanda", 0.6, "uniform")
    assert runner.prunes == 2


def test_scores_on_windows_of_the_same_tokens_but_another_length_are_not_confused():
    """Perplexity on ``[2, 24]`` windows and on the same tokens as ``[4, 12]`` windows are two scores (each window
    restarts the context): the second is measured, not answered with the first."""
    import copy

    from atprune.eval.perplexity import perplexity

    base = tiny_model("llama", layers=3, seed=2)
    calib = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(8))
    select = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    other = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(10))
    runner = search_job.TrialRunner(copy.deepcopy(base), calib, select)
    long = runner.trial("wanda", 0.6, 0.1, "atp", select=other)
    short = runner.trial("wanda", 0.6, 0.1, "atp", select=other.reshape(4, 12))
    assert long["metric"] == perplexity(runner.model, other.flatten(), 24)["ppl"]
    assert short["metric"] == perplexity(runner.model, other.flatten(), 12)["ppl"] != long["metric"]
    assert "cached" not in short
