"""The ``atprune prune`` command line: bad input is exit code 2 and one stderr line before any model is loaded;
one small end-to-end run whose report is checked against the saved weights."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import atprune.jobs.prune
import atprune.models.sources
from atprune.allocators import atp_rates, beta_max
from atprune.cli import main
from tests.conftest import DATA_DIR, WIKITEXT, random_text, require_data, save_tiny_model

LAYERS = 3
LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.\w+_proj\.weight$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random llama saved with its char tokenizer, plus calibration / evaluation texts."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    save_tiny_model(model_dir, layers=LAYERS, seed=1)
    calib, evalf = root / "calib.txt", root / "eval.txt"
    calib.write_text(random_text(2000, seed=1))
    evalf.write_text(random_text(16 * 12 + 5, seed=2))
    holder = root / "holder"  # an output folder that already holds a model
    holder.mkdir()
    (holder / "config.json").write_text("{}")
    (holder / "model.safetensors").write_bytes(b"x")
    csv = root / "data.csv"
    csv.write_text("text\nhello\n")
    return {"root": root, "model": model_dir, "calib": calib, "eval": evalf, "holder": holder, "csv": csv}


@pytest.fixture
def no_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(atprune.models.sources, "load_model", forbidden)
    monkeypatch.setattr(atprune.jobs.prune, "load_model", forbidden)


def _base(files) -> list[str]:
    return ["prune", "--model", str(files["model"]), "--calib-data", str(files["calib"]), "--eval-data",
            str(files["eval"]), "--nsamples", "4", "--seqlen", "16", "--quiet"]


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


BAD = {
    "sparsity 1.0": (["--sparsity", "1.0"], r"sparsity ratio must be in \[0, 1\), got 1\.0"),
    "sparsity -0.1": (["--sparsity", "-0.1"], r"sparsity ratio must be in \[0, 1\), got -0\.1"),
    "pattern 4:2": (["--pattern", "4:2"], r"0 < N < M.*4:2"),
    "pattern 2:2": (["--pattern", "2:2"], r"0 < N < M.*2:2"),
    "unknown method": (["--method", "obs"], r"unknown pruning method 'obs'.*wanda"),
    "unknown allocation": (["--allocation", "slope"], r"unknown allocation 'slope'.*atp.*owl"),
    "atp without beta": (["--allocation", "atp"], r"needs a beta"),
    "beta with uniform": (["--beta", "0.01"], r"--beta applies to allocation 'atp' only"),
    "mixed N:M with M=2": (["--pattern", "1:2", "--allocation", "atp", "--beta", "0"], r"needs M >= 3.*1:2"),
    "N:M with other sparsity": (["--pattern", "2:4", "--sparsity", "0.6"], r"fixes the sparsity ratio at 0\.5"),
    "refine with N:M": (["--pattern", "2:4", "--refine", "dsnot"], r"--refine dsnot refines unstructured masks only"),
    "unknown refine": (["--refine", "obc"], r"unknown refinement 'obc'; known: dsnot"),
    "nsamples 0": (["--nsamples", "0"], r"nsamples must be a positive integer, got 0"),
    "seqlen -1": (["--seqlen", "-1"], r"seqlen must be a positive integer"),
}


def _run(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, out, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("atprune: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert out == ""


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_exit_2_before_loading(files, no_load, capsys, case):
    extra, pattern = BAD[case]  # a repeated flag overrides the base value (argparse keeps the last)
    _assert_one_line_error(*_run(capsys, _base(files) + extra), pattern)


def test_illegal_beta_message_gives_the_range_for_s_and_l_from_the_config(files, no_load, capsys):
    # beta 0.4 is legal for 2 blocks (max 0.6) but not for the model's 3 blocks (max 0.3)
    assert beta_max(0.7, 2) >= 0.4 > beta_max(0.7, LAYERS)
    code, out, err = _run(capsys, _base(files) + ["--sparsity", "0.7", "--allocation", "atp", "--beta", "0.4"])
    _assert_one_line_error(code, out, err, r"illegal beta 0\.4")
    assert f"[0, {beta_max(0.7, LAYERS):.6g}]" in err and "[0, 0.3]" in err
    assert "sparsity 0.7" in err and f"{LAYERS} blocks" in err


def test_bad_model_data_output_and_device_exit_2_before_loading(files, no_load, capsys):
    base = _base(files)
    cases = [
        (_replace(base, "--model", "not/a/real/path/x"), r"unknown model 'not/a/real/path/x'"),
        (_replace(base, "--model", str(files["root"] / "missing.gguf")), r"GGUF file not found"),
        (_replace(base, "--calib-data", str(files["root"] / "missing.txt")), r"data not found: .*missing\.txt"),
        (_replace(base, "--eval-data", str(files["csv"])), r"unsupported data file .*data\.csv"),
        (base + ["--out", str(files["holder"])], r"already holds a model; pass --overwrite"),
        (base + ["--out", str(files["model"]), "--overwrite"], r"overlaps the input model"),
        (base + ["--out", str(files["model"] / "pruned")], r"overlaps the input model"),
        (base + ["--data-dir", str(files["root"] / "nowhere")], r"data folder not found"),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], r"no CUDA device"))
    for args, pattern in cases:
        _assert_one_line_error(*_run(capsys, args), pattern)
    # nothing was written into the folders the refused runs named
    assert sorted(p.name for p in files["holder"].iterdir()) == ["config.json", "model.safetensors"]
    assert not (files["model"] / "pruned").exists()


def _block_linears(state: dict) -> dict[int, list[torch.Tensor]]:
    blocks: dict[int, list[torch.Tensor]] = {}
    for name, t in state.items():
        m = LINEAR.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(t)
    return blocks


def test_end_to_end_prune_report_matches_saved_weights(files, capsys):
    from safetensors.torch import load_file

    out_dir = files["root"] / "out"
    beta = 0.2
    args = _base(files) + ["--method", "wanda", "--sparsity", "0.5", "--allocation", "atp", "--beta", str(beta),
                           "--out", str(out_dir), "--json"]
    code, out, err = _run(capsys, args)
    assert code == 0, err
    printed = json.loads(out)
    report = json.loads((out_dir / "report.json").read_text())
    assert printed["pruning"] == report["pruning"] and printed["evaluation"] == report["evaluation"]
    assert printed["config"] == report["config"]

    rates = atp_rates(0.5, LAYERS, beta)
    assert rates == pytest.approx([0.3, 0.5, 0.7])
    pr = report["pruning"]
    assert pr["spec"]["rates"] == pytest.approx(rates)
    assert [b["target"] for b in pr["blocks"]] == pytest.approx(rates)
    assert pr["calibration"]["nsamples"] == 4 and pr["calibration"]["seqlen"] == 16

    saved = load_file(out_dir / "model.safetensors")
    original = load_file(files["model"] / "model.safetensors")
    blocks = _block_linears(saved)
    assert sorted(blocks) == list(range(LAYERS)) and all(len(ws) == 7 for ws in blocks.values())
    total_params = total_zeros = 0
    for i, weights in blocks.items():
        params = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        rows = sum(w.shape[0] for w in weights)
        entry = pr["blocks"][i]
        assert entry["index"] == i and entry["params"] == params and entry["zeros"] == zeros
        assert entry["achieved"] == pytest.approx(zeros / params)
        assert abs(zeros - rates[i] * params) <= rows  # within one weight per row of the target
        total_params, total_zeros = total_params + params, total_zeros + zeros
    assert pr["pruned_params"] == total_params
    assert pr["overall_sparsity"] == pytest.approx(total_zeros / total_params, rel=1e-12)
    # every tensor outside the block Linear layers (embeddings, head, norms) is untouched
    assert set(saved) == set(original)
    for name, t in original.items():
        if not LINEAR.match(name):
            assert torch.equal(saved[name], t), name
    assert torch.equal(saved["model.embed_tokens.weight"], original["model.embed_tokens.weight"])

    ev = report["evaluation"]
    n_eval = 16 * 12 + 5  # characters; the BOS-adding tokenizer gets BOS + 15 characters per window
    for key in ("dense", "sparse"):
        assert math.isfinite(ev[key]["ppl"]) and ev[key]["ppl"] > 1
        assert ev[key]["windows"] == n_eval // 15 and ev[key]["tokens_total"] == n_eval
        assert ev[key]["bos_per_window"] is True and ev[key]["bos_token_id"] == 1
    assert ev["dense"]["ppl"] != ev["sparse"]["ppl"]
    assert report["config"]["method"] == "wanda" and report["config"]["beta"] == beta
    assert not [p.name for p in files["root"].iterdir() if p.name.startswith(".")]


def test_table_output_without_eval(files, capsys):
    code, out, err = _run(capsys, _base(files) + ["--method", "magnitude", "--sparsity", "0.25", "--no-eval"])
    assert code == 0, err
    assert "method=magnitude pattern=unstructured allocation=uniform target=0.25" in out
    assert "overall sparsity (pruned layers, parameter-weighted): 0.2500" in out
    assert "perplexity" not in out


def test_named_calib_split_missing_from_data_dir_fails_before_loading(files, no_load, capsys):
    require_data(WIKITEXT)
    if (WIKITEXT / "wiki.train.raw").exists():
        pytest.skip("the shared folder has the wikitext2 train split")
    args = _base(files) + ["--calib-data", "wikitext2", "--data-dir", str(DATA_DIR)]
    _assert_one_line_error(*_run(capsys, args), r"wiki\.train\.raw")


def test_eval_on_c4_missing_from_data_dir_fails_before_loading(files, no_load, capsys, tmp_path):
    args = _replace(_base(files), "--eval-data", "c4") + ["--data-dir", str(tmp_path)]
    _assert_one_line_error(*_run(capsys, args), r"c4 validation not found in data folder")


def test_magnitude_needs_no_calibration_data(files, capsys, monkeypatch):
    import atprune.api

    forbidden = lambda *a, **k: (_ for _ in ()).throw(AssertionError("a forward pass ran"))  # noqa: E731
    monkeypatch.setattr(atprune.api, "first_block_inputs", forbidden)  # the names prune() calls
    monkeypatch.setattr(atprune.api, "sequential", forbidden)
    out = files["root"] / "mag"
    code, _, err = _run(capsys, _base(files) + ["--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out",
                                                str(out)])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["calibration"] == {} and report["pruning"]["overall_sparsity"] == 0.5


def test_evaluation_text_shorter_than_a_window_is_a_config_error(files, capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    code, out, err = _run(capsys, _replace(_base(files), "--eval-data", str(short)))
    assert code == 2 and "less than one window of 16" in err
