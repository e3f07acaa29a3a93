"""atprune bench: the correctness gate refuses corrupted packed weights; the CLI runs and checks its input.
Nothing here asserts a time."""

from __future__ import annotations

import json

import pytest
import torch

from atprune.cli import main
from atprune.sparse import SparseLinear, pack
from atprune.sparse.bench import BenchMismatch, gate_layer, random_pruned
from tests.test_sparse_model import run  # noqa: F401 - the saved tiny run folder fixture


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_passes_a_good_layer_and_refuses_corrupted_ones(dtype):
    w = random_pruned(40, 100, 0.7, dtype, seed=2)
    assert gate_layer(SparseLinear(pack(w)), w, 3) <= 1.0
    bad_value = SparseLinear(pack(w))
    bad_value.values[5] = bad_value.values[5] * 2 + 1  # one stored weight changed
    with pytest.raises(BenchMismatch, match="refusing to time"):
        gate_layer(bad_value, w, 3)
    bad_bit = SparseLinear(pack(w))
    word = bad_bit.bitmap[0, :4].clone()
    bad_bit.bitmap[0, :4] = torch.tensor([int(b) ^ 0xFF for b in word.tolist()], dtype=torch.uint8)  # mask flipped
    with pytest.raises(BenchMismatch):
        gate_layer(bad_bit, w, 1)


def test_bench_shapes_cli_writes_a_record(tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "--device", "cpu", "--shapes", "64x96", "33x70", "--sparsity", "0.5", "0.8", "--dtype",
                 "float32", "--batch", "1,3", "--repeats", "1", "--layers", "2", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    rows = record["results"]
    assert [(r["shape"], r["sparsity"], r["batch"]) for r in rows] == [
        ([64, 96], 0.5, 1), ([64, 96], 0.5, 3), ([64, 96], 0.8, 1), ([64, 96], 0.8, 3),
        ([33, 70], 0.5, 1), ([33, 70], 0.5, 3), ([33, 70], 0.8, 1), ([33, 70], 0.8, 3)]
    assert all({"torch_us", "sparse_us", "speedup", "layers"} <= set(r) for r in rows)
    assert record["dtype"] == "float32" and record["machine"]["threads"] >= 1 and record["machine"]["cpu"]
    assert "threads" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "8x8", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--shapes", "8x8", "--config", "x.json"], "--config (a random-init model) is for --device cuda"),
    (["--shapes", "8x8", "--kernel", "avx9000"], "unknown kernel"),
    (["--shapes", "8x8", "--dtype", "int8"], "--dtype"),
    (["--shapes", "8by8"], "OUTxIN"),
    (["--shapes", "8x8", "--batch", "1,x"], "--batch"),
    (["--shapes", "8x8", "--sparsity", "1.5"], "sparsity"),
    ([], "either --model"),
    (["--shapes", "8x8", "--threads", "0"], "--threads"),
])
def test_bench_bad_input_is_one_line_exit_2(argv, message, capsys):
    """(On a machine without CUDA, ``--device cuda`` is refused by test_bench_cuda_without_gpu_is_refused.)"""
    assert main(["bench"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_model_runs_and_refuses_a_corrupted_model(run, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "m.json"
    args = ["bench", "--model", str(run), "--dtype", "float32", "--batch", "1,2", "--prompt", "8", "--gen", "3",
            "--repeats", "1", "--runs", "1", "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["swapped_layers"] == 14 and record["gate"]["argmax_agreement"] == 1.0
    assert [r["batch"] for r in record["end_to_end"]] == [1, 2]
    assert all(r["same_greedy_tokens"] == 1.0 for r in record["end_to_end"])

    import atprune.sparse

    real = atprune.sparse.load_sparse

    def corrupted(*a, **k):
        model = real(*a, **k)
        layer = next(m for m in model.modules() if isinstance(m, SparseLinear))
        layer.values[0] += 1.0
        return model

    monkeypatch.setattr(atprune.sparse, "load_sparse", corrupted)
    capsys.readouterr()
    assert main(args[:-2]) == 1
    err = capsys.readouterr().err
    assert "refusing to time" in err


def test_bench_prunes_a_model_that_is_not_a_run_folder(tmp_path, capsys):
    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "model", layers=1, seed=2)
    args = ["bench", "--model", str(folder), "--dtype", "float32", "--batch", "1", "--prompt", "8", "--gen", "2",
            "--repeats", "1", "--runs", "1", "--json", str(tmp_path / "r.json")]
    assert main(args) == 2 and "give one --sparsity" in capsys.readouterr().err
    assert main(args + ["--sparsity", "0.6"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["swapped_layers"] == 7 and "pruned here by magnitude to 0.6" in record["model"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_cuda_without_gpu_is_refused(capsys):
    assert main(["bench", "--shapes", "8x8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1
