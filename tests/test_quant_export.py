"""Pruning and quantizing in one run on a tiny model: CLI errors before loading, zeros and grid through the save
and reload, the compressed-tensors pack-quantized folder decoded by transformers + compressed-tensors bit for bit,
ATP bits per block, and search / compare with quantization."""

from __future__ import annotations

import json
import re

import pytest
import torch

import atprune.jobs.prune
import atprune.models.sources
from atprune.cli import main
from tests.conftest import random_text, save_tiny_model

LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.\w+_proj\.weight$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    save_tiny_model(root / "model", layers=3, seed=1)
    (root / "calib.txt").write_text(random_text(3000, seed=1))
    (root / "eval.txt").write_text(random_text(200, seed=2))
    return root


def _base(root, *extra) -> list[str]:
    return ["prune", "--model", str(root / "model"), "--calib-data", str(root / "calib.txt"), "--eval-data",
            str(root / "eval.txt"), "--nsamples", "4", "--seqlen", "32", "--quiet", *extra]


@pytest.fixture
def no_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(atprune.models.sources, "load_model", forbidden)
    monkeypatch.setattr(atprune.jobs.prune, "load_model", forbidden)


BAD = {
    "bits 9": (["--quantize", "w9"], r"--quantize takes wN with N in \{2, 3, 4, 5, 6, 7, 8\}.*'w9'"),
    "int4": (["--quantize", "int4"], r"--quantize takes wN"),
    "method": (["--quantize", "w4", "--quant-method", "awq"], r"unknown --quant-method 'awq'; choose one of: gptq, rtn"),
    "group": (["--quantize", "w4", "--group-size", "-3"], r"--group-size must be a positive integer"),
    "mean without atp": (["--quantize", "w4", "--bits-mean", "3"], r"apply to --bits-allocation atp only"),
    "mean out of range": (["--quantize", "w4", "--bits-allocation", "atp", "--bits-mean", "9"], r"outside"),
    "choices": (["--quantize", "w4", "--bits-allocation", "atp", "--bits-choices", "2,x"], r"comma list"),
    "packed without quantize": (["--format", "pack-quantized", "--out", "unused"], r"add --quantize"),
    "atp without quantize": (["--bits-allocation", "atp"], r"need --quantize"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantization_options_exit_2_before_loading(files, no_load, capsys, case):
    extra, pattern = BAD[case]
    code = main(_base(files, *extra))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


def test_group_size_that_does_not_divide_a_width_is_refused_before_calibration(files, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("calibration data was read before the bad group size was reported")

    monkeypatch.setattr(atprune.jobs.prune.data_mod, "load_text", forbidden)
    code = main(_base(files, "--quantize", "w4", "--group-size", "48"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--group-size 48 does not divide the input width 64 of block 0" in err[0]


def _load_dequantized_by_compressed_tensors(folder, via_transformers_dequantize=False):
    """The folder's weights as transformers + compressed-tensors decode them: loaded compressed (each layer gets the
    scheme of its config group, as vLLM reads it) then decompressed module by module by compressed-tensors; or with
    transformers' ``dequantize=True`` load (which applies one scheme to every dense layer: uniform bits only)."""
    from compressed_tensors.compressors import decompress_module
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if via_transformers_dequantize:
        config = CompressedTensorsConfig(dequantize=True)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).state_dict()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert any(n.endswith(".weight_packed") for n in model.state_dict())
    for module in model.modules():
        decompress_module(module)
    return model.state_dict()


@pytest.mark.parametrize("method,asym", [("wanda", False), ("sparsegpt", True)])
def test_pruned_and_quantized_model_saves_reloads_and_exports_exactly(files, capsys, method, asym):
    from safetensors.torch import load_file

    out = files / f"out-{method}"
    args = _base(files, "--method", method, "--sparsity", "0.5", "--quantize", "w4", "--group-size", "32",
                 "--format", "pack-quantized", "--out", str(out), "--json") + (["--asym"] if asym else [])
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    saved = load_file(out / "model.safetensors")
    packed = load_file(out / "pack-quantized" / "model.safetensors")
    names = [n for n in saved if LINEAR.match(n)]
    assert len(names) == 3 * 7
    for name in names:
        w = saved[name]
        # pruned: at least half of every row is exactly 0 (Wanda per row; SparseGPT per block of 128 >= width 64..96)
        zeros = (w == 0).sum(1) if method == "wanda" else (w == 0).sum()
        assert torch.all(zeros >= (w.shape[1] // 2 if method == "wanda" else w.numel() // 2))
        # on the grid: the stored scale of every group of 32 columns makes every weight an integer code
        module = name.removesuffix(".weight")
        scale = packed[f"{module}.weight_scale"].float().repeat_interleave(32, 1)
        k = w.double() / scale.double()
        assert torch.allclose(k, k.round(), atol=1e-5), name
        codes = k.round().reshape(w.shape[0], -1, 32)
        assert torch.all(codes.amax(-1) - codes.amin(-1) <= 15), name  # 16 codes at most per row of a group
        assert f"{module}.weight" not in packed and packed[f"{module}.weight_packed"].dtype == torch.int32
        assert (f"{module}.weight_zero_point" in packed) == asym
    config = json.loads((out / "pack-quantized" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config.get("sparsity_config") is None
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert group["weights"]["symmetric"] == (not asym)
    # transformers + compressed-tensors decode the export to the saved weights, bit for bit
    # (transformers 5's compressed load of an asymmetric checkpoint expects an unpacked zero point; the packed one is
    # what compressed-tensors' own compressor writes, checked below, so the asymmetric case loads with dequantize=True)
    for via in ((True,) if asym else (False, True)):
        decoded = _load_dequantized_by_compressed_tensors(out / "pack-quantized", via)
        for name in names:
            assert torch.equal(decoded[name], saved[name]), name
    # the tensors are what compressed-tensors' own PackedQuantizationCompressor.compress writes for these weights
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    for name in names[:4]:
        module = name.removesuffix(".weight")
        state = {"weight": saved[name], "weight_scale": packed[f"{module}.weight_scale"]}
        if asym:
            zp = packed[f"{module}.weight_zero_point"]
            state["weight_zero_point"] = unpack_from_int32(zp, 4, (saved[name].shape[0], zp.shape[1]), packed_dim=0)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert set(theirs) == {k.removeprefix(module + ".") for k in packed if k.startswith(module + ".")}
        for key, value in theirs.items():
            assert torch.equal(value, packed[f"{module}.{key}"]), (name, key)
    q = report["quantization"]
    assert q["block_bits"] == [4, 4, 4] and q["joint"] == (method == "sparsegpt")
    per = q["sizes"]["bits_per_weight"]
    # codes + one float32 scale (+ a 4-bit zero point) per 32 weights
    assert per["packed"] == pytest.approx(4 + (32 + (4 if asym else 0)) / 32)
    assert per["sparse_packed"] < per["packed"]
    sizes = json.loads((out / "report.json").read_text())["export"]["sizes_bytes"]
    assert sizes["pack-quantized"] < sizes["dense"]


def test_atp_bits_per_block_reach_the_saved_model_and_the_export(files, capsys):
    from safetensors.torch import load_file

    out = files / "out-atp"
    # 3 equal blocks, mean 3, step 1 from {2, 3, 4}: targets 4, 3, 2 exactly
    assert main(_base(files, "--method", "magnitude", "--sparsity", "0.5", "--quantize", "w3", "--quant-method", "rtn",
                      "--group-size", "0", "--bits-allocation", "atp", "--bits-mean", "3", "--bits-step", "1",
                      "--bits-choices", "2,3,4", "--format", "pack-quantized", "--out", str(out), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"]["block_bits"] == [4, 3, 2] and report["quantization"]["mean_bits"] == 3.0
    assert [b["bits"] for b in report["pruning"]["blocks"]] == [4, 3, 2]
    saved = load_file(out / "model.safetensors")
    for name in (n for n in saved if LINEAR.match(n)):
        block = int(LINEAR.match(name).group(1))
        distinct = torch.tensor([len(torch.unique(row)) for row in saved[name]])
        assert distinct.max() <= 2 ** [4, 3, 2][block], name  # per-channel grid: at most 2^bits values per row
    groups = json.loads((out / "pack-quantized" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [2, 3, 4]
    decoded = _load_dequantized_by_compressed_tensors(out / "pack-quantized")
    assert all(torch.equal(decoded[n], saved[n]) for n in saved if LINEAR.match(n))


def test_search_and_compare_quantize_every_trial(files, capsys):
    out = files / "search"
    args = ["search", "--model", str(files / "model"), "--calib-data", str(files / "calib.txt"), "--eval-data",
            str(files / "eval.txt"), "--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--max-trials", "3",
            "--quiet", "--quantize", "w4", "--group-size", "32", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["spec"]["bits"] == 4 and report["quantization"]["block_bits"] == [4, 4, 4]
    # a resumed search must not reuse trials quantized otherwise
    capsys.readouterr()
    assert main([("w8" if a == "w4" else a) for a in args] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "options differ (quantize)" in err
    cmp_out = files / "compare"
    assert main(["compare", "--model", str(files / "model"), "--calib-data", str(files / "calib.txt"), "--eval-data",
                 str(files / "eval.txt"), "--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--methods", "wanda",
                 "--sparsities", "0.5", "--allocations", "uniform", "--quiet", "--quantize", "w8", "--group-size", "0", "--out",
                 str(cmp_out)]) == 0
    rows = json.loads((cmp_out / "compare.json").read_text())["rows"]
    assert rows[0]["quantization"]["block_bits"] == [8, 8, 8]
