"""Parallel trials: ``atprune search`` (speculative rounds of trials) and ``atprune compare`` (cells split over the
ranks) on 2 and 3 processes (gloo on the CPU), against one-process runs.

- The round driver on known functions, in this process: the golden search and the grid replayed on gathered
  metrics give exactly the one-process trials, for 1 to 8 ranks.
- Forked workers (one thread each, as the references here): the float64 :class:`TrialRunner` searches (golden on
  ATP's beta and on OWL's lam, the grid) through :class:`ParallelTrials`; then the command-line tool itself
  (``main``, with the torchrun environment set) for ``search`` and ``compare``, against one-process ``main`` runs:
  trials, chosen beta, final perplexity, saved weights, every compare row equal (the seconds apart).
- torchrun launches with a rank failing mid-trial: the rank and error named, no output folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from atprune.cli import main
from atprune.distributed.cells import assign_cells
from atprune.distributed.trials import in_rounds, speculate, next_value
from atprune.jobs.strategies import GOLDEN, best_trial, golden_search
from tests.conftest import random_text, save_tiny_model, tiny_model

SEQLEN = 16


# --- the round driver on known functions ------------------------------------------------------------------------

def _strategy(kind: str, hi: float, budget: int):
    """A ``tune(memo, trial, on_trial)`` over a pure strategy, as TrialRunner.tune runs it."""
    def tune(memo=None, trial=None, on_trial=None):
        memo = dict(memo or {})

        def objective(x):
            if x not in memo:
                record = trial(None, None, x, None, None)
                memo[x] = record["metric"]
                if on_trial is not None:
                    on_trial(record)
            return memo[x]

        trials = (golden_search(objective, hi, budget) if kind == "golden"
                  else [(b, objective(b)) for b in [k * hi / budget for k in range(budget + 1)]])
        return trials, *best_trial(trials)

    return tune


FUNCTIONS = {"valley 0.3": lambda x: (x - 0.3) ** 2, "valley 0.9": lambda x: abs(x - 0.9), "rising": lambda x: x,
             "falling": lambda x: -x, "flat": lambda x: 1.0, "two valleys": lambda x: math.cos(9 * x),
             "refused above 0.5": lambda x: x if x < 0.5 else math.inf}


@pytest.mark.parametrize("kind", ["golden", "grid"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_rounds_replay_exactly_the_one_process_search(kind, name):
    f = FUNCTIONS[name]
    for budget in (3, 4, 6, 9):
        tune = _strategy(kind, 1.0, budget)
        one = tune(trial=lambda m, s, x, a, sel: {"metric": f(x)})
        for width in range(1, 9):
            asked = []

            def evaluate(values):
                asked.append(list(values))
                return {x: {"metric": f(x)} for x in values}

            records, rounds, evaluated = in_rounds(tune, {}, width, evaluate)
            seen = []
            again = tune(trial=lambda m, s, x, a, sel: records[x], on_trial=seen.append)
            assert again == one, (budget, width)
            assert [r["metric"] for r in seen] == [v for _, v in one[0]]
            assert all(len(v) <= width for v in asked) and rounds == len(asked)
            if width == 1:  # nothing speculative: exactly the one-process trials, in order
                assert [v[0] for v in asked] == [x for x, _ in one[0]] and evaluated == len(one[0])
            if kind == "grid":  # the grid's points do not depend on any metric: none is wasted
                assert evaluated == len(one[0]) and rounds == -(-len(one[0]) // width)


class _OffsetRunner:
    """TrialRunner.tune_offset itself over a known function of (beta, offset): no model."""
    block_sizes = [1] * 4  # beta_max(0.6, 4 equal blocks) = 2 * 0.4 / 3

    def __init__(self, f):
        self.f = f

    def offset_range(self, sparsity, beta):
        return -0.3 + beta, 0.2  # a range that moves with beta

    def trial(self, method, sparsity, beta, allocation, select, scorer, attn_offset=0.0):
        return {"beta": beta, "attn_offset": attn_offset, "metric": self.f(beta, attn_offset)}

    from atprune.jobs.trials import TrialRunner
    tune_offset = TrialRunner.tune_offset
    del TrialRunner


OFFSET_FUNCTIONS = {"valley": lambda b, d: (b - 0.2) ** 2 + (d + 0.05) ** 2, "rising": lambda b, d: b + d,
                    "offset refused": lambda b, d: b if d == 0 else math.inf, "flat": lambda b, d: 1.0}


@pytest.mark.parametrize("name", list(OFFSET_FUNCTIONS))
def test_rounds_replay_exactly_the_one_process_offset_search(name):
    runner = _OffsetRunner(OFFSET_FUNCTIONS[name])
    for budget in (5, 6, 8):
        def tune(**kw):
            return runner.tune_offset("wanda", 0.6, max_trials=budget, **kw)

        seen_one = []
        one = tune(on_trial=seen_one.append)
        assert len(one[0]) == budget
        for width in range(1, 6):
            records, rounds, evaluated = in_rounds(
                tune, {}, width, lambda points: {p: runner.trial(None, None, p[0], "atp", None, None,
                                                                 attn_offset=p[1]) for p in points})
            assert all(isinstance(p, tuple) and len(p) == 2 for p in records)
            seen = []
            again = tune(trial=lambda m, s, b, a, sel, sc, attn_offset: records[b, attn_offset],
                         on_trial=seen.append)
            assert again == one and seen == seen_one, (budget, width)
            if width == 1:
                assert evaluated == budget and rounds == budget
            if width >= 2:  # the two offsets at the chosen beta are one round
                assert rounds < budget


def test_golden_speculation_holds_the_first_three_points_then_both_branches():
    tune = _strategy("golden", 1.0, 6)

    def ask(memo):
        return next_value(tune, memo)

    assert speculate(ask, {}, 3) == [0.0, 1 - GOLDEN, GOLDEN]
    assert speculate(ask, {}, 1) == [0.0]
    # best at a = 0.382; the gap to its left (0.382) is wider than to its right (0.236): next x = a - 0.382 a
    a, g = 1 - GOLDEN, 1 - GOLDEN
    known = {0.0: 5.0, a: 4.0, GOLDEN: 6.0}
    x = a - g * a
    # x better: best x, gaps x (left) > a - x (right): x - g x; x worse: best a, gaps a - x < 0.618 - a: a + g (GOLDEN - a)
    assert speculate(ask, known, 3) == pytest.approx([x, x - g * x, a + g * (GOLDEN - a)])
    assert speculate(ask, known, 1) == pytest.approx([x])


def test_cells_are_balanced_by_prune_passes():
    cells = [("wanda", 0.5, "uniform", "default"), ("wanda", 0.5, "atp", "default"),
             ("wanda", 0.5, "owl", "default"), ("wanda", 0.5, "owl", "tuned")]
    # costs 2, 8, 2, 8 (max_trials 6): atp -> r0, owl tuned -> r1, uniform -> r0, owl -> r1
    assert assign_cells(cells, 2, 6) == [0, 0, 1, 1]
    assert assign_cells(cells, 5, 6) == [2, 0, 3, 1]  # more ranks than cells: rank 4 runs none


def test_commands_without_a_parallel_form_are_refused_under_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atprune: error: `atprune verify` does not run under torchrun") and "\n" not in err
    assert main(["search", "--model", "timm:vit_tiny_patch16_224", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "atprune: error: image classifiers do not run under torchrun yet; run them in one process"


# --- forked workers: the trial runner and the command-line tool on 2 and 3 ranks --------------------------------

def _windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


# (name, allocation, options of TrialRunner.tune)
SEARCHES = [("golden", "atp", {"strategy": "golden", "max_trials": 6}),
            ("grid", "atp", {"strategy": "grid", "step": 0.05}),
            ("owl", "owl", {"strategy": "golden", "max_trials": 4})]


def _searches(parallel=None) -> dict:
    from atprune.jobs.trials import TrialRunner

    model = tiny_model("llama", layers=3, seed=0).to(torch.float64)
    runner = TrialRunner(model, _windows(6, 5), _windows(3, 9))
    out = {}
    for name, allocation, options in SEARCHES:
        seen = []
        tune = runner.tune if parallel is None else lambda *a, **k: parallel.tune(runner, *a, **k)
        trials, chosen, value = tune("wanda", 0.6, allocation, on_trial=seen.append, **options)
        out[name] = {"trials": trials, "chosen": (chosen, value),
                     "records": [{k: v for k, v in r.items() if k != "seconds"} for r in seen]}
    seen = []  # ATP's beta with its attention/MLP offset
    tune_offset = runner.tune_offset if parallel is None else lambda *a, **k: parallel.tune_offset(runner, *a, **k)
    trials, chosen, value = tune_offset("wanda", 0.6, max_trials=5, on_trial=seen.append)
    out["offset"] = {"trials": trials, "chosen": (chosen, value),
                     "records": [{k: v for k, v in r.items() if k != "seconds"} for r in seen]}
    return out


def _search_args(files: Path, out: Path) -> list[str]:
    return ["search", "--model", str(files / "model"), "--method", "wanda", "--sparsity", "0.6", "--calib-data",
            str(files / "calib.txt"), "--eval-data", str(files / "eval.txt"), "--nsamples", "4", "--nselect", "3",
            "--seqlen", str(SEQLEN), "--max-trials", "5", "--batch-size", "1", "--device", "cpu", "--dtype",
            "float32", "--quiet", "--out", str(out)]


def _offset_args(files: Path, out: Path) -> list[str]:
    return _search_args(files, out) + ["--attn-offset", "search"]


def _compare_args(files: Path, out: Path) -> list[str]:
    return ["compare", "--model", str(files / "model"), "--methods", "wanda", "sparsegpt", "--sparsities", "0.0", "0.6",
            "--allocations", "uniform", "atp", "owl", "--tune-peers", "--calib-data", str(files / "calib.txt"),
            "--eval-data", str(files / "eval.txt"), "--nsamples", "4", "--nselect", "3", "--seqlen", str(SEQLEN),
            "--max-trials", "3", "--batch-size", "1", "--device", "cpu", "--dtype", "float32", "--quiet", "--out",
            str(out)]


def _worker(rank: int, size: int, folder: str, files: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    from atprune.distributed.trials import ParallelTrials

    def join(tag: str) -> None:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{tag}", rank=rank, world_size=size)

    join("api")
    parallel = ParallelTrials(rank, size)
    result = {"api": _searches(parallel), "rounds": parallel.describe()}
    dist.destroy_process_group()
    # the command-line tool as torchrun starts it in every process (main reuses the group and leaves it)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    for tag, args in (("search", _search_args), ("compare", _compare_args), ("offset", _offset_args)):
        join(tag)
        result[tag] = main(args(Path(files), Path(folder) / tag))
    torch.save(result, f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    save_tiny_model(folder / "model", layers=3, seed=1)
    (folder / "calib.txt").write_text(random_text(4000, seed=2))
    (folder / "eval.txt").write_text(random_text(600, seed=3))
    return folder


@pytest.fixture(scope="module")
def references(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: a CPU product's rounding depends on the threads splitting it
    try:
        codes = [main(args(files, folder / tag)) for tag, args in (("search", _search_args),
                                                                   ("compare", _compare_args),
                                                                   ("offset", _offset_args))]
        assert codes == [0, 0, 0]
        return {"api": _searches(), "folder": folder}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, files, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"world{request.param}")
    torch.multiprocessing.start_processes(_worker, args=(request.param, str(folder), str(files)),
                                          nprocs=request.param, start_method="fork")
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(request.param)]


@pytest.mark.parametrize("name", [s[0] for s in SEARCHES] + ["offset"])
def test_parallel_searches_equal_one_process_exactly(ranks, references, name):
    _, outs = ranks
    ref = references["api"][name]
    assert len(ref["trials"]) >= 4
    for out in outs:  # every rank returns the one-process search: values, metrics (float64), order, choice
        assert out["api"][name] == ref
    used = sum(len(trials["trials"]) for trials in references["api"].values())
    rounds = outs[0]["rounds"]
    # the grid alone (9 points) takes ceil(9 / ranks) rounds: fewer rounds than trials in all
    assert rounds["trials_used"] == used and rounds["rounds"] < used <= rounds["trials_evaluated"]


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def test_search_command_equals_one_process(ranks, references):
    from safetensors.torch import load_file

    folder, outs = ranks
    assert [out["search"] for out in outs] == [0] * len(outs)
    got = json.loads((folder / "search" / "search.json").read_text())
    ref = json.loads((references["folder"] / "search" / "search.json").read_text())
    assert len(ref["trials"]) == 5
    for key in ("trials", "chosen", "final_evaluation", "dense_selection_ppl", "beta_max"):
        assert _without_seconds(got[key]) == _without_seconds(ref[key]), key
    assert got["parallel"]["ranks"] == len(outs) and got["parallel"]["trials_used"] == 5
    w, r = load_file(folder / "search" / "model.safetensors"), load_file(references["folder"] / "search" /
                                                                          "model.safetensors")
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in r)


def test_offset_search_command_equals_one_process(ranks, references):
    """``search --attn-offset search`` under torchrun: its trials spread over the ranks (not all run on every
    rank), the trials, choice and final model those of one process."""
    from safetensors.torch import load_file

    folder, outs = ranks
    assert [out["offset"] for out in outs] == [0] * len(outs)
    got = json.loads((folder / "offset" / "search.json").read_text())
    ref = json.loads((references["folder"] / "offset" / "search.json").read_text())
    assert len(ref["trials"]) == 5 and any(t.get("attn_offset") for t in ref["trials"])
    for key in ("trials", "chosen", "attn_offset_range", "final_evaluation", "dense_selection_ppl"):
        assert _without_seconds(got[key]) == _without_seconds(ref[key]), key
    parallel = got["parallel"]
    assert parallel["ranks"] == len(outs) and parallel["trials_used"] == 5
    assert 0 < parallel["rounds"] < 5 <= parallel["trials_evaluated"]
    w, r = load_file(folder / "offset" / "model.safetensors"), load_file(references["folder"] / "offset" /
                                                                          "model.safetensors")
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in r)


def test_compare_command_rows_equal_one_process(ranks, references):
    folder, outs = ranks
    assert [out["compare"] for out in outs] == [0] * len(outs)
    got = json.loads((folder / "compare" / "compare.json").read_text())
    ref = json.loads((references["folder"] / "compare" / "compare.json").read_text())
    assert len(ref["rows"]) == 16  # 2 pruners x 2 sparsities x (uniform, atp, owl, owl tuned)
    # every field but the seconds, the statistic of a cell choosing the uniform configuration included: a cell met
    # in the runner's cache is reported as its own request (TrialRunner.known), as its own prune would be
    assert [_without_seconds(r) for r in got["rows"]] == [_without_seconds(r) for r in ref["rows"]]
    assert got["prune_passes"] == sum(got["parallel"]["prune_passes"])  # every rank's prune passes, summed
    assert got["dense"] == ref["dense"]
    assert sorted(set(got["parallel"]["cell_ranks"])) == list(range(len(outs)))  # every rank ran cells
    assert sorted(p.name for p in (folder / "compare").iterdir()) == ["compare.json", "rates.png", "results.csv",
                                                                      "results.md"]
    csv_got = (folder / "compare" / "results.csv").read_text().splitlines()
    assert [line.split(",")[:7] for line in csv_got] == [
        line.split(",")[:7] for line in (references["folder"] / "compare" / "results.csv").read_text().splitlines()]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left


# --- torchrun: a rank failing mid-trial -------------------------------------------------------------------------

HARNESS = """
import os, sys
from atprune.jobs.trials import TrialRunner
calls = []
original = TrialRunner.prune
def prune(self, *args, **kw):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # rank 1, its second prune: after a round was gathered
        raise RuntimeError("injected failure")
    return original(self, *args, **kw)
TrialRunner.prune = prune
from atprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["search", "compare"])
def test_a_rank_failing_mid_trial_is_named_and_leaves_no_output(files, tmp_path, command):
    (tmp_path / "harness.py").write_text(textwrap.dedent(HARNESS))
    out = tmp_path / "run"
    args = (_search_args if command == "search" else _compare_args)(files, out)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "harness.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "atprune: rank 1 of 2 failed: RuntimeError: injected failure" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["harness.py"]  # no temporary folder beside it either

