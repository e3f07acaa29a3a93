"""Data-parallel calibration over 2 and 3 processes (gloo on the CPU), against one-process runs.

The workers are started with ``torch.multiprocessing`` (forked) (one launch per world size runs every case and saves
its pruned weights); the references are plain one-process :func:`atprune.api.prune` runs in this process. A
torchrun launch of the command-line tool checks the end-to-end path: a run equal to one process, and a rank failing
mid-run (the rank and the error named, no output folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from atprune.distributed.calibration import shard_bounds
from atprune.engine.stats import InputStats
from atprune.errors import ConfigError
from tests.conftest import random_text, save_tiny_model, tiny_model

# (name, method, dtype, reduce, batch size, windows, refine): exact cases use the ordered reduction
CASES = [("wanda64", "wanda", torch.float64, "ordered", 1, 7, None),
         ("sparsegpt64", "sparsegpt", torch.float64, "ordered", 2, 7, None),
         ("dsnot64", "wanda", torch.float64, "ordered", 1, 7, "dsnot"),  # reads the first moment and window count
         ("wanda32", "wanda", torch.float32, "sum", 1, 6, None),
         ("sparsegpt32", "sparsegpt", torch.float32, "sum", 1, 6, None),
         ("dsnot32", "wanda", torch.float32, "sum", 1, 6, "dsnot")]
SEQLEN = 16


def _windows(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def _pruned(method, dtype, reduce, batch_size, n, refine, data_parallel=None) -> dict[str, torch.Tensor]:
    from atprune.api import prune

    model = tiny_model("llama", layers=2, seed=0).to(dtype)
    prune(model, method=method, sparsity=0.5, allocation="atp", beta=0.2, calib=_windows(n), batch_size=batch_size,
          progress=False, refine=refine, data_parallel=data_parallel)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("proj.weight")}


def _worker(rank: int, size: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (as DataLoader workers do)
    from atprune.distributed.calibration import DataParallelCalibration

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    out = {}
    for name, method, dtype, reduce, bs, n, refine in CASES:
        out[name] = _pruned(method, dtype, reduce, bs, n, refine, DataParallelCalibration(rank, size, "cpu", reduce))
    errors = {}
    for case, windows in (("too_few", _windows(size - 1)), ("disagree", _windows(4, seed=rank))):
        try:
            DataParallelCalibration(rank, size).shard(windows, 1)
        except ConfigError as err:
            errors[case] = str(err)
    out["errors"] = errors
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    # one thread, as in the workers: a CPU matrix product's rounding depends on how many threads split it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case[0]: _pruned(*case[1:]) for case in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"world{request.param}")
    # forked, not spawned: the children inherit the imported modules (no import of transformers each)
    torch.multiprocessing.start_processes(_worker, args=(request.param, str(folder)), nprocs=request.param,
                                          start_method="fork")
    return [torch.load(folder / f"rank{r}.pt") for r in range(request.param)]


def test_every_running_sum_of_input_stats_is_listed_for_the_reduction():
    s = InputStats(8, hessian=True)
    s.add(torch.randn(2, 3, 8))
    tensors = {k for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
    counts = {k for k, v in vars(s).items() if type(v) is int and k != "in_features"}
    assert tensors == set(InputStats.SUMS) and counts == set(InputStats.COUNTS)


def test_shard_bounds_cover_whole_batches_once():
    # 7 windows in batches of 2 -> batches [0,2) [2,4) [4,6) [6,7); 3 ranks: 2 + 1 + 1 batches
    assert [shard_bounds(7, 2, r, 3) for r in range(3)] == [(0, 4), (4, 6), (6, 7)]
    assert [shard_bounds(6, 1, r, 2) for r in range(2)] == [(0, 3), (3, 6)]
    with pytest.raises(ConfigError, match="3 ranks but only 2 calibration batch"):
        shard_bounds(4, 2, 0, 3)


@pytest.mark.parametrize("name", ["wanda64", "sparsegpt64", "dsnot64"])
def test_ordered_reduction_equals_one_process_bit_for_bit(ranks, references, name):
    ref = references[name]
    for r, out in enumerate(ranks):
        for key, w in ref.items():
            assert torch.equal(out[name][key] == 0, w == 0), (r, key)  # the mask
            assert torch.equal(out[name][key], w), (r, key)  # the pruned weights


@pytest.mark.parametrize("name", ["wanda32", "sparsegpt32", "dsnot32"])
def test_sum_reduction_equals_one_process_within_float32_rounding(ranks, references, name):
    ref = references[name]
    for key, w in ref.items():
        for out in ranks[1:]:  # every rank holds the very same weights
            assert torch.equal(out[name][key], ranks[0][name][key]), key
        got = ranks[0][name][key]
        assert (got == 0).float().mean() == (w == 0).float().mean()  # sparsity exact
        assert ((got == 0) != (w == 0)).float().mean() < 0.01, key  # masks: at most near ties differ
        both = (got != 0) & (w != 0)
        torch.testing.assert_close(got[both], w[both], rtol=1e-4, atol=1e-5)


def test_too_many_ranks_and_disagreeing_tokens_are_one_line_errors(ranks):
    size = len(ranks)
    for out in ranks:
        assert f"{size} ranks but only {size - 1} calibration batch" in out["errors"]["too_few"]
        msg = out["errors"]["disagree"]
        assert "ranks disagree on the calibration tokens" in msg and "\n" not in msg
        assert f"rank(s) {', '.join(map(str, range(1, size)))} differ from rank 0" in msg


# --- torchrun launches of the command-line tool -----------------------------------------------------------------

HARNESS = """
import os, sys
from atprune.pruners.wanda import WandaPruner
calls = []
original = WandaPruner.prune
def prune(self, *args, **kw):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 8:  # rank 1, second block
        raise RuntimeError("injected failure")
    return original(self, *args, **kw)
WandaPruner.prune = prune
from atprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    save_tiny_model(folder / "model", layers=2, seed=1)
    (folder / "calib.txt").write_text(random_text(4000, seed=2))
    (folder / "harness.py").write_text(textwrap.dedent(HARNESS))
    return folder


def _torchrun(files, out: Path, fail: bool, nproc: int = 2):
    args = ["prune", "--model", str(files / "model"), "--calib-data", str(files / "calib.txt"), "--no-eval",
            "--nsamples", "4", "--seqlen", "16", "--method", "wanda", "--sparsity", "0.5", "--batch-size",
            "1", "--device", "cpu", "--dtype", "float32", "--dist-reduce", "ordered", "--out", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the harness injects the failure; without it, what users run: torchrun -m atprune prune ...
    target = [str(files / "harness.py")] if fail else ["-m", "atprune"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300), args


def test_torchrun_prune_equals_one_process(files, tmp_path):
    from safetensors.torch import load_file

    from atprune.cli import main

    proc, args = _torchrun(files, tmp_path / "two", fail=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank under torchrun (OMP_NUM_THREADS=1): the same rounding of each product
    try:
        assert main([a if a != str(tmp_path / "two") else str(one) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)
    got, ref = load_file(tmp_path / "two" / "model.safetensors"), load_file(one / "model.safetensors")
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_a_rank_failing_mid_run_is_named_and_leaves_no_output(files, tmp_path):
    out = tmp_path / "run"
    proc, _ = _torchrun(files, out, fail=True)
    assert proc.returncode != 0
    assert "atprune: rank 1 of 2 failed: RuntimeError: injected failure" in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary folder left beside it either
