"""OWL, AlphaPruning and DLP: invariants on tiny models, and their statistics against hand computations."""


import math

import numpy as np
import pytest
import torch

import atprune
from atprune.allocation import block_sizes, block_statistic
from atprune.allocators import get_allocator
from atprune.allocators.alphapruning import alpha_peak
from atprune.allocators.dlp import default_alpha
from atprune.allocators.owl import outlier_ratio
from atprune.engine.passes import first_block_inputs
from atprune.errors import ConfigError
from atprune.models.adapter import Adapter
from tests.conftest import tiny_model

WINDOWS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(11))


class _Context:
    """A tiny model with its calibration inputs; ``run(alloc, S)`` computes what ``alloc`` needs and allocates."""

    def __init__(self, adapter, windows=None):
        self.adapter, self.windows = adapter, windows
        self.block_inputs = first_block_inputs(adapter, windows) if windows is not None else None

    def block_params(self):
        return block_sizes(self.adapter)

    def run(self, alloc, sparsity):
        stat = block_statistic(alloc, self.adapter, self.windows, self.block_inputs)
        return alloc.allocate(sparsity, self.block_params(), stat)


def _context(layers=6, seed=0):
    return _Context(Adapter.for_model(tiny_model("llama", layers=layers, seed=seed)), WINDOWS)


@pytest.mark.parametrize("name,options,width", [("owl", {}, 0.16), ("owl", {"lam": 0.05}, 0.10),
                                                 ("dlp", {}, 0.2), ("dlp", {"alpha": 0.04}, 0.08)])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_window_allocators_invariants(name, options, width, sparsity):
    ctx = _context()
    alloc = get_allocator(name, **options)
    allocation = ctx.run(alloc, sparsity)
    rates = allocation.rates
    params = ctx.block_params()
    if name == "dlp" and not options:
        width = 2 * default_alpha(sparsity)
    assert len(rates) == 6 and all(0 <= r < 1 for r in rates)
    assert sum(r * p for r, p in zip(rates, params)) / sum(params) == pytest.approx(sparsity, abs=1e-12)
    assert max(rates) - min(rates) == pytest.approx(width, abs=1e-12)
    stat = allocation.statistic["outlier_ratio" if name == "owl" else "mean_wanda_score"]
    assert len(stat) == 6
    # OWL: more outliers -> pruned less; DLP (official get_dlp_ratios): higher mean Wanda score -> pruned more
    order = sorted(range(6), key=lambda i: stat[i])
    assert [rates[i] for i in order] == sorted(rates, reverse=(name == "owl"))


def test_owl_outlier_ratio_is_the_hand_computation():
    ctx = _context(layers=2)
    alloc = get_allocator("owl", M=3.0)
    allocation = ctx.run(alloc, 0.5)
    # by hand: the dense model's block-0 inputs, Wanda scores of all 7 layers, share above 3 x their mean
    block = ctx.adapter.blocks[0]
    feats = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, n=n: feats.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in ctx.adapter.linears(block).items()]
    with torch.no_grad():
        for h in ctx.block_inputs.hidden:
            block(h, **ctx.block_inputs.kwargs(0, h.shape[0]))
    for h in hooks:
        h.remove()
    scores = []
    for n, lin in ctx.adapter.linears(block).items():
        x = torch.cat(feats[n]).double()
        scores.append((lin.weight.double().abs() * x.square().sum(0).sqrt()).flatten())
    s = torch.cat(scores)
    expected = (s > 3.0 * s.mean()).double().mean().item()
    assert allocation.statistic["outlier_ratio"][0] == pytest.approx(expected, abs=1e-6)
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 9.0]), 2.0) == 0.25  # mean 3: only 9 > 6


def test_dlp_rates_follow_the_official_formula_on_a_planted_statistic():
    """ironartisan/DLP lib/prune.py get_dlp_ratios, written out by hand: importance 1 - s / sum(s), min-max scaled to
    [0, 2 alpha], density = scaled - mean(scaled) + 1 - S, sparsity = 1 - density. Scores rising with depth (as the
    mean Wanda score does in LLaMA) give sparsities rising from S - alpha to S + alpha, the pattern of the released
    ratio files (about 0.53 -> 0.83 at 70 %)."""
    scores = [1.0, 1.5, 2.0, 3.0, 5.0, 9.0]
    S, alpha = 0.7, 0.15
    total = sum(scores)
    imp = [1 - v / total for v in scores]
    lo, hi = min(imp), max(imp)
    scaled = [(v - lo) / (hi - lo) * 2 * alpha for v in imp]
    mean = sum(scaled) / len(scaled)
    official = [1 - (v - mean + 1 - S) for v in scaled]
    got = get_allocator("dlp", alpha=alpha).allocate(S, 6, scores)
    assert list(got.rates) == pytest.approx(official, abs=1e-12)
    assert list(got.rates) == sorted(got.rates) and got.rates[-1] - got.rates[0] == pytest.approx(0.3)
    assert got.statistic["mean_wanda_score"] == scores and got.statistic["alpha"] == alpha


def _brute_force_alpha_peak(eigs: np.ndarray) -> float:
    """The official xmin_peak fit (haiquanlu/AlphaPruning lib/esd_utils.py) as plain loops over numpy float64:
    every candidate cut-off, its Hill alpha and its KS distance, element by element."""
    eigs = np.sort(eigs)
    logs10 = np.log10(eigs)
    counts, edges = np.histogram(logs10, bins=100, range=(logs10.min(), logs10.max()))
    xmin2 = 10 ** edges[int(np.argmax(counts))]
    low, high = np.log10(0.95 * xmin2), 1.5 * xmin2
    n_all = len(eigs)
    alphas, ds = [0.0] * (n_all - 1), [1.0] * (n_all - 1)
    for i in range(n_all - 1):
        if eigs[i] < low:
            continue
        if eigs[i] > high:
            break
        n = n_all - i
        alpha = 1 + n / (sum(math.log(e) for e in eigs[i:]) - n * math.log(eigs[i]))
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = max(abs(1 - (eigs[i + k] / eigs[i]) ** (1 - alpha) - k / n) for k in range(n))
    return alphas[int(np.argmin(ds))]


@pytest.mark.parametrize("planted", [2.5, 4.0, 6.0])
def test_alpha_peak_is_the_brute_force_ks_scan_and_recovers_a_planted_power_law(planted):
    g = torch.Generator().manual_seed(int(planted * 10))
    n = 256
    # eigenvalues of W^T W drawn from p(x) ~ x^-planted, x >= 1 (inverse-CDF sampling): their log-histogram peaks at
    # the low end, where the power law starts, as the xmin_peak rule expects
    u = torch.rand(n, generator=g, dtype=torch.float64)
    eigs = (1 - u) ** (-1 / (planted - 1))
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = q1 @ torch.diag(eigs.sqrt()) @ q2.T
    want = _brute_force_alpha_peak(torch.linalg.svdvals(w).square().numpy())
    assert alpha_peak(w) == pytest.approx(want, rel=1e-9)
    assert want == pytest.approx(planted, rel=0.2)


def test_alpha_peak_tries_the_official_cutoff_range():
    """The xmin_peak rule by hand: log10 of the eigenvalues 1, 10^0.5, 10, 10, 10, 100 spans [0, 2] in 100 bins of 0.02;
    the fullest bin starts at 1.0, so xmin2 = 10, and cut-offs are tried from log10(0.95 * 10) (the official code
    compares a linear eigenvalue with this logarithm) up to 1.5 * 10."""
    from atprune.allocators.alphapruning import peak_cutoff_range

    eigs = torch.tensor([1.0, 10 ** 0.5, 10.0, 10.0, 10.0, 100.0], dtype=torch.float64)
    low, high = peak_cutoff_range(eigs)
    assert low == pytest.approx(math.log10(9.5), rel=1e-12) and high == pytest.approx(15.0, rel=1e-12)
    # and the fit follows the brute force on a spectrum whose small eigenvalues lie inside that odd range
    g = torch.Generator().manual_seed(3)
    spectrum = torch.cat([torch.logspace(0.7, 3.9, 40, dtype=torch.float64),
                          1e4 * (1 + 0.01 * torch.rand(200, generator=g, dtype=torch.float64)),
                          1e4 * torch.logspace(0.2, 2, 30, dtype=torch.float64)])
    assert alpha_peak(torch.diag(spectrum.sqrt())) == pytest.approx(_brute_force_alpha_peak(spectrum.numpy()), rel=1e-9)


def test_alpha_peak_of_a_flat_spectrum_is_inf_and_alphapruning_refuses_it():
    # equal singular values: the official Hill estimate divides n by 0, giving inf (torch float division)
    assert alpha_peak(2 * torch.eye(8)) == math.inf
    with pytest.raises(ConfigError, match="not finite"):
        get_allocator("alphapruning").allocate(0.5, 3, [3.0, math.inf, 4.0])


def test_alphapruning_orders_rates_by_alpha_and_keeps_the_weighted_mean():
    ctx = _Context(Adapter.for_model(tiny_model("llama", layers=6, seed=3)))  # no data needed
    alloc = get_allocator("alphapruning", eps=0.2)
    allocation = ctx.run(alloc, 0.6)
    rates, alphas = allocation.rates, allocation.statistic["alpha"]
    params = ctx.block_params()
    assert sum(r * p for r, p in zip(rates, params)) / sum(params) == pytest.approx(0.6, abs=1e-12)
    order = sorted(range(6), key=lambda i: alphas[i])
    assert [rates[i] for i in order] == sorted(rates)  # higher alpha -> higher sparsity
    lo, hi = min(rates), max(rates)
    assert hi / lo == pytest.approx(1.2 / 0.8)  # the [S(1-eps), S(1+eps)] window survives the rescaling


def test_prune_with_peer_allocations_end_to_end():
    for name in ("owl", "dlp", "alphapruning"):
        model = tiny_model("llama", layers=4)
        r = atprune.prune(model, method="wanda", sparsity=0.5, allocation=name, calib=WINDOWS, progress=False)
        assert len(r.spec["rates"]) == 4 and r.spec["rates"] != [0.5] * 4
        for b, rate in zip(r.blocks, r.spec["rates"]):
            assert b["target"] == rate and abs(b["achieved"] - rate) < 0.02
        assert any(k.startswith("allocator_") for k in r.spec)  # the statistic goes to the report


def test_peer_allocator_bad_options():
    with pytest.raises(ConfigError, match="lam < 0.5"):
        get_allocator("owl", lam=0.7)
    with pytest.raises(ConfigError, match="does not take options"):
        get_allocator("owl", eps=0.1)
    with pytest.raises(ConfigError, match="too wide"):
        _context().run(get_allocator("owl", lam=0.4), 0.05)
    with pytest.raises(ConfigError, match="needs the model"):
        get_allocator("alphapruning").allocate(0.5, 4)


def _compare_inputs(tmp_path):
    """A saved tiny model, a calibration text and an evaluation text for ``atprune compare`` runs."""
    from tests.conftest import random_text, save_tiny_model

    model = save_tiny_model(tmp_path / "model", layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(4000, seed=5))
    evalf = tmp_path / "eval.txt"
    evalf.write_text(random_text(300, seed=6))
    return model, calib, evalf


def test_compare_cli_writes_tables(tmp_path, capsys):
    import csv
    import json

    from atprune.cli import main
    model, calib, evalf = _compare_inputs(tmp_path)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(model), "--methods", "wanda", "magnitude", "--sparsities", "0.5",
                 "--allocations", "uniform", "atp", "owl", "alphapruning", "dlp", "--calib-data", str(calib),
                 "--eval-data", str(evalf), "--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--max-trials", "3",
                 "--out", str(out), "--quiet"])
    assert code == 0
    state = json.loads((out / "compare.json").read_text())
    assert len(state["rows"]) == 10
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["allocation"]) for r in rows][:5] == [("wanda", a) for a in
                                                                  ("uniform", "atp", "owl", "alphapruning", "dlp")]
    for r in state["rows"]:
        assert r["ppl"] > 0 and abs(sum(r["rates"]) / 3 - 0.5) < 1e-9
        assert (r["beta"] is not None) == (r["allocation"] == "atp")
    md = (out / "results.md").read_text()
    assert md.count("**") == 4  # one best cell per (pruner, sparsity) line
    assert (out / "rates.png").stat().st_size > 1000
    assert main(["compare", "--model", str(model), "--allocations", "bogus", "--out", str(tmp_path / "x")]) == 2


def test_compare_tunes_every_peer_with_the_same_budget_and_marks_selection_on_test(tmp_path):
    import json

    from atprune.cli import main
    model, calib, evalf = _compare_inputs(tmp_path)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(model), "--methods", "wanda", "--sparsities", "0.6", "--allocations",
                 "uniform", "atp", "owl", "alphapruning", "dlp", "--calib-data", str(calib), "--eval-data", str(evalf),
                 "--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--max-trials", "3", "--tune-peers",
                 "--atp-on-test", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    columns = [r["column"] for r in rows]
    assert columns == ["uniform", "atp", "atp (selected on test)", "owl", "owl (tuned)", "alphapruning",
                       "alphapruning (tuned)", "dlp", "dlp (tuned)"]
    knobs = {"owl": "lam", "alphapruning": "eps", "dlp": "alpha"}
    for r in rows:
        if r["variant"] == "default" and r["allocation"] != "atp":
            assert r["options"] is None and "trials" not in r
            continue
        # golden search: 3 trials, the first is 0 (uniform), all inside [0, the option's legal maximum]
        assert len(r["trials"]) == 3 and r["trials"][0][0] == 0.0
        if r["allocation"] != "atp":
            knob = knobs[r["allocation"]]
            assert list(r["options"]) == [knob]
            assert r["options"][knob] in [t[0] for t in r["trials"]]
            assert r["statistic"][f"allocator_{knob}"] == r["options"][knob]  # the final prune used the tuned value
        # the tuned value is the trial with the best selection metric
        assert min(r["trials"], key=lambda t: t[1])[0] == (r["beta"] if r["allocation"] == "atp"
                                                            else r["options"][knobs[r["allocation"]]])
    md = (out / "results.md").read_text()
    header = md.splitlines()[0]
    assert "owl (tuned)" in header and "atp (selected on test)" in header
    best = md.splitlines()[2].rsplit("|", 2)[1].strip()
    assert best != "atp (selected on test)"


def test_compare_prunes_a_configuration_once_and_its_cells_equal_fresh_prunes(tmp_path):
    """With --tune-peers and --atp-on-test, 9 cells and 5 searches of 3 trials ask for 24 prunes; uniform (the first
    trial of every search) and the configuration the test-split search chose (its cell) are met again and not
    pruned again: at most 24 - 6 = 18 passes. Every cell's perplexity equals a fresh prune of the saved model with
    the cell's options, evaluated by evaluate_perplexity (the path of ``atprune prune``), and the search on the test
    split scores its trial at 0 with the uniform cell's very number."""
    import json

    import atprune
    from atprune.api import evaluate_perplexity
    from atprune.cli import main
    from atprune.models.sources import load_model
    from atprune.data import TokenWindows  # noqa: F401  (the calibration windows come from the same loader)
    from atprune.jobs.search import selection_windows

    model, calib, evalf = _compare_inputs(tmp_path)
    out = tmp_path / "cmp"
    args = ["--methods", "wanda", "--sparsities", "0.6", "--allocations", "uniform", "atp", "owl", "alphapruning",
            "dlp", "--calib-data", str(calib), "--eval-data", str(evalf), "--nsamples", "4", "--nselect", "2",
            "--seqlen", "32", "--max-trials", "3", "--tune-peers", "--atp-on-test"]
    assert main(["compare", "--model", str(model), *args, "--out", str(out), "--quiet"]) == 0
    state = json.loads((out / "compare.json").read_text())
    rows = {r["column"]: r for r in state["rows"]}
    assert len(rows) == 9 and state["prune_passes"] <= 18
    on_test = rows["atp (selected on test)"]
    assert on_test["trials"][0] == [0.0, rows["uniform"]["ppl"]]
    assert on_test["ppl"] == min(t[1] for t in on_test["trials"])
    from atprune.jobs.compare import CompareJob

    job = CompareJob(model=str(model), calib_data=str(calib), eval_data=str(evalf), nsamples=4, nselect=2, seqlen=32,
                     out=str(tmp_path / "unused"))
    for column, r in rows.items():
        if r.get("refused"):
            continue
        fresh, tokenizer = load_model(str(model))
        windows, _, _ = selection_windows(job, tokenizer)
        atprune.prune(fresh, method="wanda", sparsity=0.6, allocation=r["allocation"], beta=r["beta"], calib=windows,
                      allocation_options=r["options"], progress=False)
        ev = evaluate_perplexity(fresh, tokenizer, str(evalf), seqlen=32, progress=False)
        assert ev["ppl"] == pytest.approx(r["ppl"], rel=1e-12), column
