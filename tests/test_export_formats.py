"""Sparse checkpoints that stay sparse: save dtypes, mask checksums, the re-densify guard, `atprune verify`,
the compressed-tensors sparse-bitmask format and the llm-compressor recipe (tiny models, fast)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import atprune
from atprune.allocators import atp_rates
from atprune.cli import main
from atprune.export.compressed import compress_matrix, decompress_matrix, load_compressed
from atprune.export import MaskViolation, mask_digest, record_masks, save_pruned, verify_checkpoint
from tests.conftest import char_tokenizer, random_text, save_tiny_model, tiny_model

LAYERS = 3
NAME = "model.layers.1.mlp.down_proj.weight"


def _pruned(sparsity: float = 0.7, seed: int = 0, method: str = "magnitude", allocation: str = "uniform",
            beta: float | None = None, pattern: str = "unstructured"):
    """A tiny llama pruned in memory, its PruneResult and a small report holding it."""
    model = tiny_model("llama", layers=LAYERS, seed=seed)
    calib = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(seed))
    result = atprune.prune(model, None, method=method, sparsity=sparsity, allocation=allocation, beta=beta,
                           pattern=pattern, calib=calib, progress=False)
    return model, result, {"pruning": result.to_dict(), "model": {"spec": "tiny-llama"}}


def _no_dot_entries(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("save_dtype", ["float32", "float16", "bfloat16"])
def test_save_reload_verify_round_trip(tmp_path, save_dtype, capsys):
    from transformers import AutoModelForCausalLM

    model, _, report = _pruned()
    with torch.no_grad():  # two tiny kept weights: float16 underflows them to 0, bfloat16/float32 keep them
        w = dict(model.named_parameters())[NAME]
        kept = (w != 0).nonzero()[:2]
        for r, c in kept.tolist():
            w[r, c] = 1e-9
    masks = record_masks(model)
    dtype = getattr(torch, save_dtype)
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", report, masks=masks, save_dtype=save_dtype)
    assert _no_dot_entries(tmp_path) and model.dtype == torch.float32  # the in-memory model is untouched

    again = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, dtype from config.json
    assert again.dtype == dtype
    saved_report = json.loads((out / "report.json").read_text())
    export = saved_report["export"]
    assert export["dtype"] == save_dtype and len(export["matrices"]) == LAYERS * 7
    assert any("turned 2 small non-zero weights into 0" in w for w in saved_report.get("warnings", [])) \
        == (save_dtype == "float16")
    params = dict(again.named_parameters())
    for name, mask in masks.items():
        got, ref = params[name], dict(model.named_parameters())[name].detach().to(dtype)
        assert torch.equal(got, ref), name  # the saved values are the cast of the in-memory ones
        assert bool((got[mask] == 0).all()), name  # every pruned weight stays exactly 0
        entry = export["matrices"][name]
        assert entry["zeros"] == int(mask.sum()) and entry["mask_sha256"] == mask_digest(mask)
        assert entry["saved_zeros"] == int((got == 0).sum()) and entry["saved_sha256"] == mask_digest(got == 0)
    underflow = 2 if save_dtype == "float16" else 0
    assert export["matrices"][NAME]["underflow_zeros"] == underflow and export["underflow_zeros"] == underflow
    assert (export["matrices"][NAME]["saved_sha256"] == export["matrices"][NAME]["mask_sha256"]) == (underflow == 0)
    assert sum(e["zeros"] for e in export["matrices"].values()) / sum(m.numel() for m in masks.values()) \
        == pytest.approx(0.7, abs=0.01)

    rows = verify_checkpoint(out)
    assert len(rows) == LAYERS * 7 and all(r["ok"] for r in rows)
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{LAYERS * 7}/{LAYERS * 7} matrices match" in text and NAME in text


def test_masks_recorded_after_pruning_catch_a_redensified_weight(tmp_path):
    model, _, report = _pruned()
    masks = record_masks(model)
    with torch.no_grad():  # a later step (a buggy fine-tune, a hook) writes into a pruned position
        w = dict(model.named_parameters())[NAME]
        r, c = masks[NAME].nonzero()[0].tolist()
        w[r, c] = 0.5
    for save_dtype in (None, "bfloat16"):
        with pytest.raises(MaskViolation, match=re.escape(NAME) + r": 1 of \d+ pruned weights are non-zero in memory"):
            save_pruned(model, None, tmp_path / "out", report, masks=masks, save_dtype=save_dtype)
        assert list(tmp_path.iterdir()) == []  # nothing written, no temp folder left


def test_a_save_that_redensifies_is_refused(tmp_path, monkeypatch):
    """The files are read back after writing: a masked weight non-zero on disk refuses the checkpoint."""
    model, _, report = _pruned()
    real = type(model).save_pretrained

    def densifying_save(self, folder, **kwargs):
        real(self, folder, **kwargs)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors[NAME] = tensors[NAME] + 1e-3  # e.g. a cast or merge that adds a bias everywhere
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(type(model), "save_pretrained", densifying_save)
    with pytest.raises(MaskViolation, match=re.escape(NAME) + r": \d+ of \d+ pruned weights are non-zero in the saved"):
        save_pruned(model, None, tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []


def _tamper(path, fn):
    tensors = load_file(path)
    tensors = fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_detects_tampered_checkpoints(tmp_path, capsys):
    model, _, report = _pruned()
    out = save_pruned(model, None, tmp_path / "out", report, formats=("compressed",))
    assert all(r["ok"] for r in verify_checkpoint(out)) and {r["format"] for r in verify_checkpoint(out)} == {
        "dense", "compressed"}

    def densify(t):  # one pruned weight made non-zero
        w = t[NAME].clone()
        r, c = (w == 0).nonzero()[0].tolist()
        w[r, c] = 0.25
        return t | {NAME: w}

    _tamper(out / "model.safetensors", densify)
    bad = [r for r in verify_checkpoint(out) if not r["ok"]]
    assert [(r["format"], r["name"], r["problem"]) for r in bad] == [("dense", NAME, "sparsity, checksum")]
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert re.search(re.escape(NAME) + r" .*MISMATCH \(sparsity, checksum\)", text) and "1 MISMATCHES" in text

    def move_zero(t):  # same number of zeros, one moved: only the checksum sees it
        w = t[NAME].clone()
        zero, kept = (w[0] == 0).nonzero()[0].item(), (w[0] != 0).nonzero()[0].item()
        w[0, zero], w[0, kept] = w[0, kept].item(), 0.0
        return t | {NAME: w}

    save_pruned(model, None, out, report, formats=("compressed",), overwrite=True)
    _tamper(out / "model.safetensors", move_zero)
    bad = [r for r in verify_checkpoint(out) if not r["ok"]]
    assert [(r["format"], r["name"], r["problem"]) for r in bad] == [("dense", NAME, "checksum")]

    save_pruned(model, None, out, report, formats=("compressed",), overwrite=True)
    module = NAME.removesuffix(".weight")
    values = f"{module}.compressed"
    _tamper(out / "compressed" / "model.safetensors", lambda t: t | {values: torch.where(
        torch.arange(t[values].numel()) == 3, torch.zeros_like(t[values]), t[values])})  # one kept weight -> 0
    bad = [r for r in verify_checkpoint(out) if not r["ok"]]
    assert [(r["format"], r["name"], r["problem"]) for r in bad] == [("compressed", NAME, "sparsity, checksum")]

    bitmask = f"{module}.bitmask"
    _tamper(out / "compressed" / "model.safetensors",
            lambda t: t | {bitmask: t[bitmask] ^ torch.tensor(1, dtype=torch.uint8)})  # no longer decompresses
    bad = [r for r in verify_checkpoint(out) if not r["ok"]]
    assert [(r["format"], r["name"], r["problem"]) for r in bad] == [("compressed", NAME, "corrupt")]
    assert main(["verify", str(out)]) == 1


def test_verify_bad_input_is_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "has no report.json" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"schema": "atprune.report/1"}))
    assert main(["verify", str(tmp_path)]) == 2
    assert "no export section" in capsys.readouterr().err


def test_compress_matrix_layout():
    w = torch.tensor([[0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    parts = compress_matrix(w)
    assert parts["shape"].tolist() == [3, 9]
    assert parts["compressed"].tolist() == [1.5, 2.5, -1.0, 3.0]
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].tolist() == [[2, 1], [0, 0], [5, 0]]
    assert parts["row_offsets"].tolist() == [0, 2, 2]
    assert torch.equal(decompress_matrix(parts), w)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_compressed_is_2x_smaller_at_70_percent_and_bit_exact(tmp_path, save_dtype):
    model, result, report = _pruned(0.7)
    assert result.overall_sparsity == pytest.approx(0.7, abs=0.01)
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", report, save_dtype=save_dtype, formats=("compressed",))
    dense_file, packed_file = out / "model.safetensors", out / "compressed" / "model.safetensors"
    sizes = json.loads((out / "report.json").read_text())["export"]["sizes_bytes"]
    assert sizes == {"dense": dense_file.stat().st_size, "compressed": packed_file.stat().st_size}
    # float32: 0.3 * 4 + 1/8 bytes per pruned weight instead of 4; 16-bit: 0.725 instead of 2. The tiny model's
    # dense embeddings, int64 row offsets (8 bytes per 64-wide row) and safetensors header weigh more than in a
    # real model: 16-bit reaches 1.8x here (SmolLM2: see test_smollm2_export.py and docs/export.md)
    assert sizes["dense"] >= (2 if save_dtype == "float32" else 1.8) * sizes["compressed"], sizes

    dense = load_file(dense_file)
    back = load_compressed(out / "compressed")  # decompressed by compressed-tensors
    assert set(back) == set(dense)
    for name, t in dense.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name].view(torch.int16 if t.element_size() == 2 else torch.int32),
                           t.view(torch.int16 if t.element_size() == 2 else torch.int32)), name  # bit-exact
    masks = record_masks(model)
    assert all(bool((back[n][m] == 0).all()) for n, m in masks.items())
    config = json.loads((out / "compressed" / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-bitmask" and len(sparsity["targets"]) == LAYERS * 7
    assert sparsity["sparsity_structure"] == "unstructured"
    packed = load_file(packed_file)
    assert f"{NAME.removesuffix('.weight')}.bitmask" in packed and NAME not in packed
    assert (out / "compressed" / "tokenizer.json").is_file()


def test_compressed_records_an_n_m_pattern(tmp_path):
    model, result, report = _pruned(None, pattern="2:4")
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", report, formats=("compressed",))
    sparsity = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == pytest.approx(0.5)
    back = load_compressed(out / "compressed")
    w = back[NAME].reshape(-1, 4)
    assert bool(((w != 0).sum(1) <= 2).all())  # every group of 4 keeps at most 2


def test_unknown_format_and_dtype_are_config_errors(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(500, 1))
    base = ["prune", "--model", str(model_dir), "--method", "magnitude", "--calib-data", str(calib), "--no-eval",
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(base + ["--format", "zip"]) == 2
    assert "unknown format 'zip'" in capsys.readouterr().err
    assert main(base + ["--save-dtype", "int8"]) == 2
    assert "unknown save dtype 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prune_save_dtype_and_compressed_then_verify(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(500, 1))
    out = tmp_path / "out"
    code = main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.7", "--allocation",
                 "atp", "--beta", "0.1", "--calib-data", str(calib), "--no-eval", "--out", str(out), "--quiet",
                 "--save-dtype", "bfloat16", "--format", "compressed"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["save_dtype"] == "bfloat16" and report["export"]["formats"] == ["dense", "compressed"]
    assert report["export"]["sizes_bytes"]["dense"] >= 1.8 * report["export"]["sizes_bytes"]["compressed"]
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert f"{2 * LAYERS * 7}/{2 * LAYERS * 7} matrices match the report (compressed, dense)" in capsys.readouterr().out


@pytest.mark.parametrize("method,cls", [("wanda", "WandaPruningModifier"), ("sparsegpt", "SparseGPTModifier")])
def test_recipe_lists_one_rate_per_block_in_order(tmp_path, method, cls):
    model, result, report = _pruned(0.7, method=method, allocation="atp", beta=0.1)
    run = save_pruned(model, None, tmp_path / "run", report)
    assert main(["recipe", "--report", str(run / "report.json"), "--out", str(tmp_path / "recipe.yaml")]) == 0
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    body = recipe["sparsity_stage"]["sparsity_modifiers"][cls]
    assert body["sparsity"] == pytest.approx(atp_rates(0.7, LAYERS, 0.1)) and len(body["sparsity"]) == LAYERS
    assert body["sparsity"] == pytest.approx([b["target"] for b in result.blocks], abs=5e-7)  # block order
    assert all(len(repr(r)) <= 8 for r in body["sparsity"])  # 6 decimals, no 0.5549999999999999
    assert body["sparsity"][0] < body["sparsity"][-1]  # ATP: deeper blocks pruned more
    assert body["mask_structure"] == "0:0" and body["ignore"] == ["re:.*lm_head"]
    (target,) = body["targets"]
    regex = target.removeprefix("re:")
    modules = [n for n, _ in model.named_modules() if re.match(regex, n)]
    assert modules == [f"model.layers.{i}" for i in range(LAYERS)]  # what llm-compressor's targets match


def test_recipe_pattern_magnitude_and_bad_input(tmp_path, capsys):
    _, _, report = _pruned(None, method="magnitude", pattern="2:4")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["recipe", "--report", str(path), "--out", str(tmp_path / "r.yaml")]) == 2
    assert "no one-shot modifier for method 'magnitude'" in capsys.readouterr().err
    assert main(["recipe", "--report", str(tmp_path), "--out", str(tmp_path / "r.yaml"), "--modifier", "sparsegpt"]) == 0
    body = yaml.safe_load((tmp_path / "r.yaml").read_text())["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert body["mask_structure"] == "2:4" and body["sparsity"] == [0.5] * LAYERS
    assert body["targets"] == ["re:model\\.layers\\.\\d+$"]
    assert main(["recipe", "--report", str(path), "--out", str(tmp_path / "r.yaml"), "--modifier", "wanda"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["recipe", "--report", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "report not found" in capsys.readouterr().err
    assert main(["recipe", "--report", str(path), "--out", str(path), "--overwrite"]) == 2
    assert "would overwrite the report" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "report.json"]


def test_search_takes_the_export_options():
    from atprune.cli import build_parser

    args = build_parser().parse_args(["search", "--model", "m", "--out", "o", "--save-dtype", "bfloat16", "--format",
                                      "compressed"])
    assert (args.save_dtype, args.format) == ("bfloat16", "compressed")
    args = build_parser().parse_args(["prune", "--model", "m"])
    assert (args.save_dtype, args.format) == (None, "dense")


def test_masks_are_packed_one_bit_per_weight_and_unpack_exactly():
    model, _, _ = _pruned()
    masks = record_masks(model)
    params = dict(model.named_parameters())
    assert list(masks) == [n for n in params if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    for name in masks:
        w = params[name]
        assert torch.equal(masks[name], w == 0) and masks.zeros(name) == int((w == 0).sum())
        assert masks.digest(name) == mask_digest(w == 0)
        assert masks._packed[name][1].nbytes == -(-w.numel() // 8)
