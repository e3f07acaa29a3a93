"""A block's layer solves split over 2 and 3 processes (gloo on the CPU), against one-process runs.

The workers are started with ``torch.multiprocessing`` (forked, one thread each, as the references here); with the
``ordered`` reduction every rank holds the one-process statistics, each rank solves only its share of the layers
(:func:`atprune.distributed.solves.assign_layers`) and receives the others' results. Checked bit for bit in float64:
the pruned weights (so the masks) of SparseGPT, of SparseGPT jointly with GPTQ and of Wanda then GPTQ, and the
quantization grids; that each layer is solved exactly once over all ranks; and the broadcast with more ranks than
layers (a rank solving nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from atprune.distributed.solves import assign_layers, balance, layer_cost
from tests.conftest import tiny_model

SEQLEN = 16
# (name, method, quantize): float64, ATP beta 0.2, 7 windows in batches of 2 (ranks hold unequal shares)
CASES = [("sparsegpt", "sparsegpt", False), ("joint", "sparsegpt", True), ("wanda_gptq", "wanda", True)]


def _windows(n: int = 7, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def _pruned(method: str, quantize: bool, data_parallel=None) -> dict:
    from atprune.api import prune
    from atprune.quant import QuantSpec

    model = tiny_model("llama", layers=2, seed=0).to(torch.float64)
    result = prune(model, method=method, sparsity=0.5, allocation="atp", beta=0.2, calib=_windows(), batch_size=2,
                   progress=False, data_parallel=data_parallel,
                   quantize=QuantSpec(bits=4, group_size=32) if quantize else None)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("proj.weight")}
    grids = {k: (g.bits, g.group_size, g.symmetric, g.scale.clone(), g.zero.clone()) for k, g in result.grids.items()}
    return {"weights": weights, "grids": grids}


@dataclass
class _Marked:  # a dataclass in a solve's result, as the quantization Grid is
    by: int
    values: torch.Tensor


def _worker(rank: int, size: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    from atprune.distributed.calibration import DataParallelCalibration
    from atprune.distributed.solves import split_solves
    from atprune.pruners.sparsegpt import SparseGPTPruner

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    solved = []
    original = SparseGPTPruner.prune

    def counted(self, weight, *args, **kw):
        solved.append(tuple(weight.shape))
        return original(self, weight, *args, **kw)

    SparseGPTPruner.prune = counted
    out = {name: _pruned(method, quant, DataParallelCalibration(rank, size, "cpu", "ordered"))
           for name, method, quant in CASES}
    out["solved"] = list(solved)

    # more ranks than layers: two layers over three ranks, each result marked with the rank that computed it
    class Layer:
        def __init__(self, rows, cols):
            self.out_features, self.in_features = rows, cols

    layers = {"a": Layer(3, 4), "b": Layer(5, 2)}

    def solve(name):
        g = torch.Generator().manual_seed(len(name) * 7 + ord(name))
        rows, cols = layers[name].out_features, layers[name].in_features
        return torch.randn(rows, cols, dtype=torch.float64, generator=g), _Marked(rank, torch.arange(rows) + rank)

    out["few"] = split_solves(layers, solve, rank, size, torch.device("cpu"))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: a CPU product's rounding depends on the threads splitting it
    try:
        return {name: _pruned(method, quant) for name, method, quant in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"solves{request.param}")
    torch.multiprocessing.start_processes(_worker, args=(request.param, str(folder)), nprocs=request.param,
                                          start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(request.param)]


def test_balance_is_longest_processing_time_first():
    # costs 5, 4, 3, 3, 2 on 2 ranks: 5 -> r0, 4 -> r1, 3 -> r1 (7), 3 -> r0 (8), 2 -> r1 (9)
    assert balance([3, 5, 2, 4, 3], 2) == [1, 0, 1, 1, 0]
    assert balance([1.0] * 3, 5) == [0, 1, 2]  # more ranks than jobs: the last ranks get none
    with pytest.raises(ValueError):
        balance([1.0], 0)
    # a LLaMA-7B block (q k v o gate up down): the down projection, the dearest, alone on one of 3 ranks
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    assert layer_cost(4096, 11008) == 4096 * 11008 ** 2 + 11008 ** 3
    owners = assign_layers(shapes, 3)
    assert owners[6] == 0 and owners.count(0) == 1 and sorted(set(owners)) == [0, 1, 2]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_split_solves_equal_one_process_bit_for_bit(ranks, references, name):
    ref = references[name]
    for r, out in enumerate(ranks):
        got = out[name]
        assert got["weights"].keys() == ref["weights"].keys()
        for key, w in ref["weights"].items():
            assert torch.equal(got["weights"][key] == 0, w == 0), (r, key)  # the mask
            assert torch.equal(got["weights"][key], w), (r, key)  # the pruned (and quantized) weights
        assert got["grids"].keys() == ref["grids"].keys()
        for key, (bits, group, sym, scale, zero) in ref["grids"].items():
            b, g, s, sc, z = got["grids"][key]
            assert (b, g, s) == (bits, group, sym) and torch.equal(sc, scale) and torch.equal(z, zero), (r, key)


def test_every_layer_is_solved_once_over_the_ranks(ranks):
    # the pruner runs in the "sparsegpt" case only (the joint case walks GPTQ's columns instead): in one process
    # 2 blocks x 7 layers = 14 calls
    counts = [len(out["solved"]) for out in ranks]
    assert sum(counts) == 2 * 7
    assert all(0 < c < 14 for c in counts)  # every rank solved some, none all


def test_more_ranks_than_layers_every_rank_gets_the_owners_results(ranks):
    size = len(ranks)
    owners = assign_layers([(3, 4), (5, 2)], size)
    assert owners == [0, 1]  # b (cost 5*4 + 8 = 28) < a (3*16 + 64 = 112): a -> rank 0, b -> rank 1; rank 2 none
    for name, owner in zip("ab", owners):
        g = torch.Generator().manual_seed(len(name) * 7 + ord(name))
        rows, cols = {"a": (3, 4), "b": (5, 2)}[name]
        expected = torch.randn(rows, cols, dtype=torch.float64, generator=g)
        for out in ranks:
            weight, marked = out["few"][name]
            assert torch.equal(weight, expected) and weight.dtype == torch.float64
            assert isinstance(marked, _Marked) and marked.by == owner
            assert torch.equal(marked.values, torch.arange(rows) + owner)
