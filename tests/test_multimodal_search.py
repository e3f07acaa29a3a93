"""``atprune search`` and ``atprune compare`` on a vision-language model folder (issue 19), on the tiny random-init
LLaVA of tests/vlm_tiny.py saved with its processor: text calibration and text perplexity of the language model,
only the language blocks pruned, the search output loadable with the processor, compare's uniform cell equal to an
independent prune + evaluation; image-text calibration with text selection data; bad input refused before
loading."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

import atprune
from atprune.models.adapter import Adapter
from atprune.multimodal.layout import dense_parts
from tests.conftest import random_text
from tests.vlm_tiny import TEXT_LAYERS, image, tiny_vlm

SPARSITY = 0.6
COMMON = ["--nsamples", "4", "--nselect", "2", "--seqlen", "32", "--max-trials", "3", "--device", "cpu",
          "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_search")
    model, proc = tiny_vlm("llava")
    model.save_pretrained(root / "llava")
    proc.save_pretrained(root / "llava")
    for name, n, seed in (("calib.txt", 3000, 3), ("select.txt", 1500, 5), ("eval.txt", 400, 4)):
        (root / name).write_text(random_text(n, seed=seed))
    lines = []
    for i, text in enumerate(("a red cat sat on the mat", "two dogs run in a green park", "a bird on a wire")):
        image(seed=i, size=40 + 8 * i).save(root / f"im{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "text": text}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _load(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _language_weights(model) -> dict[str, torch.Tensor]:
    adapter = Adapter.for_model(model)
    return {f"{i}.{n}": lin.weight for i, b in enumerate(adapter.blocks) for n, lin in adapter.linears(b).items()}


def _assert_dense_parts_identical(out, folder):
    """Every parameter of the vision tower, projector, embeddings and head of the saved model equals the input's,
    bit for bit, and so does every other parameter outside the language blocks' linear layers (norms)."""
    got, want = _load(out), _load(folder)
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    parts = dense_parts(got)
    assert parts["vision_tower"] and parts["projector"] and parts["embeddings"]
    pruned = {id(w) for w in _language_weights(got).values()}
    for name, p in got_params.items():
        if id(p) not in pruned:
            assert torch.equal(p, want_params[name]), name
    return got


def test_search_on_a_vision_language_folder(files, capsys):
    """Text calibration, beta chosen on held-out text windows of the calibration source, only the language blocks
    pruned (at the chosen beta's rates), the output reloads with its processor and passes verify."""
    from transformers import AutoProcessor

    from atprune.cli import main
    from atprune.export import verify_checkpoint
    from atprune.multimodal.pairs import feed, read_pairs

    out = files / "search"
    code = main(["search", "--model", str(files / "llava"), "--method", "wanda", "--sparsity", str(SPARSITY),
                 "--calib-data", str(files / "calib.txt"), "--eval-data", str(files / "eval.txt"), *COMMON,
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / "search.json").read_text())
    # ATP's legal range for L equal blocks: rates S - beta (L-1)/2 + beta i stay in [0, 1] for beta up to
    # min(2S, 2(1-S)) / (L-1)
    hi = min(2 * SPARSITY, 2 * (1 - SPARSITY)) / (TEXT_LAYERS - 1)
    assert state["beta_max"] == pytest.approx(hi)
    assert len(state["trials"]) == 3 and all(0 <= t["beta"] <= hi for t in state["trials"])
    beta = state["chosen"]["beta"]
    assert 0 <= beta <= hi and state["chosen"]["metric"] == min(t["metric"] for t in state["trials"])
    assert state["selection_data"]["source"].startswith("calibration source, windows disjoint")
    assert state["multimodal"]["class"] == "LlavaForConditionalGeneration"
    assert all(p["unchanged"] for p in state["multimodal"]["dense_parts"].values())
    # only the language blocks were pruned, each at its rate: Wanda removes floor(in * rate) weights of every row
    got = _assert_dense_parts_identical(out, files / "llava")
    rates = [SPARSITY - beta * (TEXT_LAYERS - 1) / 2 + beta * i for i in range(TEXT_LAYERS)]
    adapter = Adapter.for_model(got)
    for block, rate in zip(adapter.blocks, rates):
        for lin in adapter.linears(block).values():
            assert int((lin.weight == 0).sum()) == lin.out_features * int(lin.in_features * rate)
    report = json.loads((out / "report.json").read_text())
    assert report["multimodal"]["language_blocks"] == "model.language_model.layers"
    assert report["pruning"]["calibration"]["dataset"] != "image-text pairs"
    proc = AutoProcessor.from_pretrained(out)
    pair = read_pairs(str(files / "pairs.jsonl"))[0]
    with torch.no_grad():
        assert torch.isfinite(got(**feed(proc, pair), use_cache=False).logits).all()
    rows = verify_checkpoint(out)
    assert all(r["ok"] for r in rows)
    assert {r["name"].split(" ")[0] for r in rows if r["expected"] is None} >= {"vision_tower", "projector",
                                                                                 "embeddings"}


def test_compare_on_a_vision_language_folder(files, capsys):
    """compare's rows have the expected columns, and the uniform cell's perplexity equals an independent Wanda prune
    and evaluation of the same folder (transformers' loading, atprune's Python API)."""
    from transformers import AutoTokenizer

    from atprune.cli import main
    from atprune.jobs.compare import CSV_FIELDS

    out = files / "compare"
    code = main(["compare", "--model", str(files / "llava"), "--methods", "wanda", "--sparsities", str(SPARSITY),
                 "--allocations", "uniform", "atp", "--calib-data", str(files / "calib.txt"), "--select-data",
                 str(files / "select.txt"), "--eval-data", str(files / "eval.txt"), *COMMON, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / "compare.json").read_text())
    rows = {r["column"]: r for r in state["rows"]}
    assert list(rows) == ["uniform", "atp"]
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == CSV_FIELDS and [r["allocation"] for r in table] == ["uniform", "atp"]
    atp = rows["atp"]
    assert 0 <= atp["beta"] <= min(2 * SPARSITY, 2 * (1 - SPARSITY)) / (TEXT_LAYERS - 1)
    assert rows["uniform"]["beta"] is None and len(rows["uniform"]["rates"]) == TEXT_LAYERS
    assert state["selection_data"]["source"] == "held-out data"
    assert all(p["unchanged"] for p in state["multimodal"]["dense_parts"].values())
    # independent: the same folder, the same calibration windows (4 x 32 tokens of calib.txt, seed 0), uniform
    model = _load(files / "llava")
    tok = AutoTokenizer.from_pretrained(files / "llava")
    atprune.prune(model, tok, method="wanda", sparsity=SPARSITY, calib=str(files / "calib.txt"), nsamples=4,
                  seqlen=32, seed=0, progress=False)
    ev = atprune.evaluate_perplexity(model, tok, str(files / "eval.txt"), seqlen=32, progress=False)
    assert rows["uniform"]["eval_windows"] == ev["windows"]
    assert rows["uniform"]["ppl"] == pytest.approx(ev["ppl"], rel=1e-6)
    assert state["dense"]["ppl"] != pytest.approx(ev["ppl"], rel=1e-6)  # the prune did change the model


def test_search_with_image_text_calibration(files, capsys):
    """Image-text pairs calibrate (through the processor and the whole model) while beta is chosen on held-out
    text; the saved model is exactly an independent ATP prune at the chosen beta with the same pairs."""
    from atprune.cli import main
    from atprune.multimodal.loading import load_vision_language
    from atprune.multimodal.pairs import image_text_calibration, read_pairs

    out = files / "search_pairs"
    code = main(["search", "--model", str(files / "llava"), "--method", "wanda", "--sparsity", str(SPARSITY),
                 "--calib-data", str(files / "pairs.jsonl"), "--select-data", str(files / "select.txt"),
                 "--eval-data", str(files / "eval.txt"), *COMMON, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / "search.json").read_text())
    assert state["selection_data"]["source"] == "held-out data"
    report = json.loads((out / "report.json").read_text())
    calib = report["pruning"]["calibration"]
    assert calib["dataset"] == "image-text pairs" and calib["nsamples"] == 3  # every pair (fewer than --nsamples)
    beta = state["chosen"]["beta"]
    got = _assert_dense_parts_identical(out, files / "llava")
    model, proc = load_vision_language(str(files / "llava"), progress=False)
    pairs = image_text_calibration(proc, read_pairs(str(files / "pairs.jsonl"), limit=4), max_text_tokens=32)
    atprune.prune(model, method="wanda", sparsity=SPARSITY, allocation="atp", beta=beta, calib=pairs,
                  progress=False)
    want = _language_weights(model)
    for name, w in _language_weights(got).items():
        assert torch.equal(w, want[name]), name


def test_bad_input_is_a_one_line_error_before_loading(files, tmp_path, capsys, monkeypatch):
    import atprune.jobs.compare
    import atprune.jobs.multimodal
    import atprune.jobs.search
    from atprune.cli import main
    from tests.conftest import save_tiny_model

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(atprune.jobs.multimodal, "load_model", forbidden)  # search's and compare's text models
    monkeypatch.setattr(atprune.jobs.multimodal, "load_vision_language", forbidden)
    text_model = save_tiny_model(tmp_path / "text", layers=2)
    vlm, pairs, text = str(files / "llava"), str(files / "pairs.jsonl"), str(files / "calib.txt")
    search = ["search", "--method", "wanda", "--out", str(tmp_path / "s"), *COMMON]
    compare = ["compare", "--methods", "wanda", "--allocations", "uniform", "atp", "--out", str(tmp_path / "c"),
               *COMMON]
    cases = [
        (search + ["--model", vlm, "--calib-data", pairs, "--eval-data", text],
         r"search with image-text calibration \(.*pairs\.jsonl\) chooses beta on held-out text: give --select-data"),
        (compare + ["--model", vlm, "--calib-data", pairs, "--eval-data", text],
         r"compare with image-text calibration .* give --select-data"),
        (search + ["--model", vlm, "--calib-data", text, "--select-data", pairs],
         r"--select-data .*pairs\.jsonl holds image-text pairs; search selects and evaluates on the language"),
        (compare + ["--model", vlm, "--calib-data", text, "--eval-data", pairs],
         r"--eval-data .*pairs\.jsonl holds image-text pairs; compare selects"),
        (search + ["--model", str(text_model), "--calib-data", pairs, "--select-data", text],
         r"pairs\.jsonl holds image-text pairs, but model .* is a text-only model"),
    ]
    capsys.readouterr()
    for args, pattern in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err
