"""Saving a pruned model: files, exact reload, tied embeddings, refusal to clobber, no temp leftovers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from atprune.errors import ConfigError
from atprune.export import check_output_dir, save_pruned, write_json
from tests.conftest import char_tokenizer


def _model(tied: bool, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # some pruned weights, as after a real run
        for i, layer in enumerate(model.model.layers):
            w = layer.mlp.up_proj.weight
            w[w.abs() < w.abs().median()] = 0.0
            layer.self_attn.q_proj.weight[:, ::2] = 0.0
    return model


def _dot_entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("tied", [True, False])
def test_save_pruned_round_trip(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _model(tied), char_tokenizer(bos=True)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    report = {"pruning": {"overall_sparsity": 0.25}, "evaluation": {"sparse": {"ppl": float("inf")}}}
    out = save_pruned(model, tok, tmp_path / "out", report)
    assert out == (tmp_path / "out").resolve()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "report.json"} <= names
    saved_report = json.loads((out / "report.json").read_text())
    export = saved_report.pop("export")
    assert saved_report == {"pruning": {"overall_sparsity": 0.25}, "evaluation": {"sparse": {"ppl": None}}}
    assert "export" not in report  # the caller's dict is not modified
    assert len(export["matrices"]) == 2 * 7 and export["dtype"] == "float32" and export["formats"] == ["dense"]
    assert _dot_entries(tmp_path) == []

    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ref, got = model.state_dict(), again.state_dict()
    assert set(ref) == set(got)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
        assert torch.equal(got[name] == 0, t == 0), name
    assert int((got["model.layers.0.self_attn.q_proj.weight"] == 0).sum()) == 64 * 32
    assert again.config.tie_word_embeddings == tied
    assert (again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()) == tied
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2("ab c")["input_ids"] == tok("ab c")["input_ids"] == [1, 13, 14, 97, 15]


def test_existing_folder_refused_without_overwrite_and_replaced_with_it(tmp_path):
    model = _model(False, layers=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        save_pruned(model, None, out, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert _dot_entries(tmp_path) == []

    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a model"):
        save_pruned(model, None, out, {})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]

    save_pruned(model, None, out, {"run": 2}, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"config.json", "model.safetensors", "report.json"} <= names
    assert json.loads((out / "report.json").read_text()).keys() == {"run", "export"}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert _dot_entries(tmp_path) == []


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_pruned(_model(False, layers=1), None, out, {})
    assert (out / "model.safetensors").is_file() and _dot_entries(tmp_path) == []


class _Boom(RuntimeError):
    pass


class _FailingModel:
    """Writes part of a checkpoint, then fails, like a full disk would."""

    def save_pretrained(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise _Boom("disk full")


def test_failure_leaves_no_temp_folder_and_no_output(tmp_path):
    with pytest.raises(_Boom):
        save_pruned(_FailingModel(), None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_failure_with_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(_Boom):
        save_pruned(_FailingModel(), None, out, {}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"


def test_check_output_dir_refuses_the_input_model(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for bad in (model_dir, model_dir / "pruned", model_dir / "a" / "b", tmp_path):
        with pytest.raises(ConfigError, match="overlaps the input model"):
            check_output_dir(bad, overwrite=True, inputs=(str(model_dir),))
    # a GGUF file: a folder that would contain it is refused, a folder beside it is fine
    gguf = model_dir / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for bad in (model_dir, tmp_path):
        with pytest.raises(ConfigError, match="overlaps the input model"):
            check_output_dir(bad, overwrite=True, inputs=(str(gguf),))
    assert check_output_dir(model_dir / "out", inputs=(str(gguf),)) == (model_dir / "out").resolve()
    ok = tmp_path / "sibling"
    assert check_output_dir(ok, inputs=(str(model_dir),)) == ok.resolve()
    assert not ok.exists()  # checking creates nothing
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(a_file, overwrite=True)


def test_write_json_non_finite_floats_become_null(tmp_path):
    payload = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": float("nan"), "e": "x"},
               "f": 3, "g": None, "h": True, "i": 0.0}
    path = tmp_path / "sub" / "r.json"
    write_json(path, payload)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": "x"}, "f": 3,
                                "g": None, "h": True, "i": 0.0}
    assert payload["a"] != payload["a"] and math.isinf(payload["b"][1])  # the caller's dict is not modified
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_failure_leaves_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
