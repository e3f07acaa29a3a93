"""Vision-language models (issue 19), on tiny random-init models of every supported class (tests/vlm_tiny.py):
only the language model's blocks are found and pruned, the engine reproduces the full model with an image input,
image-text calibration reaches the language blocks, the pruned model saves and reloads with its processor, and
bad input is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import atprune
from atprune.engine.passes import first_block_inputs, sequential
from atprune.errors import ConfigError
from atprune.models.adapter import Adapter
from atprune.multimodal.layout import LAYOUTS, dense_parts
from atprune.multimodal.pairs import Pair, feed, image_text_calibration, read_pairs
from tests.vlm_tiny import KINDS, TEXT_LAYERS, image, tiny_vlm

TEXTS = ("a red cat sat on the mat", "two dogs run in a green park by the lake")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, text in enumerate(TEXTS):
        image(seed=i, size=40 + 16 * i).save(folder / f"im{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "text": text}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def _language_linears(model, layout) -> set[int]:
    """ids of the nn.Linear modules under the language blocks' path, found by walking the module names."""
    prefix = layout.blocks + "."
    return {id(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_language_blocks_are_found(kind):
    model, _ = tiny_vlm(kind)
    layout = LAYOUTS[type(model).__name__]
    adapter = Adapter.for_model(model)
    assert adapter.blocks_path == layout.blocks and adapter.num_blocks == TEXT_LAYERS
    found = {id(lin) for b in adapter.blocks for lin in adapter.linears(b).values()}
    assert found == _language_linears(model, layout)
    # no matrix of the vision tower or the projector, and neither the embeddings nor the head
    parts = dense_parts(model)
    params = dict(model.named_parameters())
    dense_ids = {id(params[n]) for names in parts.values() for n in names}
    assert not {id(lin.weight) for b in adapter.blocks for lin in adapter.linears(b).values()} & dense_ids
    vision = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(layout.vision)]
    assert vision and all(n in parts["vision_tower"] for v in vision for n in [v + ".weight"])
    assert parts["embeddings"] and (parts["lm_head"] or model.config.get_text_config().tie_word_embeddings)


def _run_with_last_block(model, adapter, feeds, swap=None):
    """Logits of the full model on every feed, and the last block's outputs; with ``swap`` (one tensor per feed)
    the last block's outputs are replaced by it, so the logits are the model's own norm and head applied to it."""
    seen, it = [], iter(swap or [])

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.append(h)
        if swap is not None:
            new = next(it)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    handle = adapter.blocks[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = [model(**f, use_cache=False).logits for f in feeds]
    finally:
        handle.remove()
    return logits, seen


@pytest.mark.parametrize("kind", KINDS)
def test_parity_guard_with_an_image_input(kind, pairs_file):
    model, proc = tiny_vlm(kind)
    adapter = Adapter.for_model(model)
    feeds = [feed(proc, p) for p in read_pairs(str(pairs_file))]
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    assert all(int((f["input_ids"] == image_id).sum()) > 0 for f in feeds)  # the language blocks see image tokens
    ref_logits, ref_hidden = _run_with_last_block(model, adapter, feeds)
    got = sequential(adapter, feeds, lambda *a: None, needs_hessian=True)
    assert len(got) == len(feeds)
    for g, r in zip(got, ref_hidden):
        assert (g - r).abs().max().item() < 1e-4
    logits, _ = _run_with_last_block(model, adapter, feeds, swap=got)
    for a, b in zip(logits, ref_logits):
        assert (a - b).abs().max().item() < 1e-4
    # a prune at sparsity 0 with image-text calibration changes no logit
    calib = image_text_calibration(proc, read_pairs(str(pairs_file)))
    result = atprune.prune(model, method="wanda", sparsity=0.0, calib=calib, progress=False)
    assert result.overall_sparsity < 0.01
    after, _ = _run_with_last_block(model, adapter, feeds)
    for a, b in zip(after, ref_logits):
        assert torch.allclose(a, b, atol=1e-5)


# tokens one image prompt adds: LLaVA's (28 / 14)^2 patch tokens; SmolVLM's (56 / 14)^2 patches merged 2 x 2 by
# its connector, between <fake_token_around_image><global-img> and <fake_token_around_image> (no image splitting)
IMAGE_TOKENS = {"llava": 4, "smolvlm": 4}
PROMPT_TOKENS = {"llava": 4, "smolvlm": 2 + 4 + 1}


@pytest.mark.parametrize("kind", ["llava", "smolvlm"])
def test_image_text_calibration_changes_the_statistics_and_prunes_to_target(kind, pairs_file):
    """Wanda's input norms of the first language block differ between text-only and image-text calibration (the
    image tokens reach the language blocks), and an ATP prune with image-text calibration reaches every rate."""
    from atprune.engine.passes import collect_stats

    model, proc = tiny_vlm(kind)
    adapter = Adapter.for_model(model)
    pairs = read_pairs(str(pairs_file))
    calib = image_text_calibration(proc, pairs)
    assert calib.info["nsamples"] == 2 and calib.info["image_tokens"] == 2 * IMAGE_TOKENS[kind]
    # text only: the very same texts, without the image
    text_feeds = [{"input_ids": proc.tokenizer(t, return_tensors="pt")["input_ids"]} for t in TEXTS]
    block0 = adapter.blocks[0]
    q = "self_attn.q_proj"
    with_image = collect_stats(block0, 0, adapter.linears(block0), first_block_inputs(adapter, calib.feeds), False)[q]
    text_only = collect_stats(block0, 0, adapter.linears(block0), first_block_inputs(adapter, text_feeds), False)[q]
    assert with_image.ntokens == text_only.ntokens + 2 * PROMPT_TOKENS[kind]  # each pair's image prompt
    # independent: the norms from block 0's input (input layernorm applied by hand) over all tokens of the feeds
    ln = block0.input_layernorm
    with torch.no_grad():
        xs = [model.get_input_embeddings()(f["input_ids"]) for f in text_feeds]
    ref = torch.cat([ln(x).reshape(-1, x.shape[-1]) for x in xs]).pow(2).sum(0).sqrt()
    assert torch.allclose(text_only.col_norm(), ref, atol=1e-5)
    assert (with_image.col_norm() - text_only.col_norm()).abs().max() > 1e-3

    shapes = [[(lin.out_features, lin.in_features) for lin in adapter.linears(b).values()] for b in adapter.blocks]
    result = atprune.prune(model, method="wanda", sparsity=0.5, allocation="atp", beta=0.1, calib=calib,
                           progress=False)
    # ATP with 2 blocks: 0.5 -/+ 0.05; Wanda removes floor(in * rate) weights of every row
    for rec, rate, block in zip(result.blocks, (0.45, 0.55), shapes):
        assert rec["target"] == pytest.approx(rate)
        assert rec["zeros"] == sum(o * int(i * rate) for o, i in block)
    assert result.calibration["dataset"] == "image-text pairs"


def test_caption_loglik_matches_the_models_own_loss(pairs_file):
    """The caption check's mean NLL equals transformers' own loss with the image prompt's labels masked."""
    from atprune.multimodal.caption import caption_loglik

    model, proc = tiny_vlm("gemma3")
    pairs = read_pairs(str(pairs_file))
    got = caption_loglik(model, proc, pairs)
    nll, count = 0.0, 0
    for p in pairs:
        f = feed(proc, p)
        n = len(p.text)  # the char tokenizer: one token per character of the caption
        labels = f["input_ids"].clone()
        labels[:, :-n] = -100
        with torch.no_grad():
            loss = model(**f, labels=labels, use_cache=False).loss
        nll += float(loss) * n
        count += n
    assert got["tokens"] == count == sum(len(t) for t in TEXTS)
    assert abs(got["nll"] - nll / count) < 1e-5


def _save_tiny(kind, folder):
    model, proc = tiny_vlm(kind)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["llava", "gemma3", "idefics3", "smolvlm", "qwen2_vl"])
def test_cli_prunes_saves_reloads_with_the_processor_and_verifies(kind, pairs_file, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from atprune.cli import main
    from atprune.export import verify_checkpoint
    from tests.conftest import random_text

    model_dir = _save_tiny(kind, tmp_path / "model")
    evalf = tmp_path / "eval.txt"
    evalf.write_text(random_text(16 * 4 + 3, seed=2))
    out = tmp_path / "out"
    code = main(["prune", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--allocation", "atp",
                 "--beta", "0.1", "--calib-data", str(pairs_file), "--caption-data", str(pairs_file), "--eval-data",
                 str(evalf), "--seqlen", "16", "--nsamples", "2", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    mm = report["multimodal"]
    assert mm["language_blocks"] == LAYOUTS[mm["class"]].blocks
    assert all(part["unchanged"] for part in mm["dense_parts"].values())
    layout = LAYOUTS[mm["class"]]
    assert mm["dense_parts"]["vision_tower"]["tensors"] > 0
    assert (mm["dense_parts"]["projector"]["tensors"] > 0) == bool(layout.projector)  # Qwen2-VL: inside visual
    assert mm["caption_loglik"]["sparse"]["nll"] != mm["caption_loglik"]["dense"]["nll"]
    assert report["pruning"]["calibration"]["dataset"] == "image-text pairs"
    # reload through transformers, with the processor
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    adapter = Adapter.for_model(reloaded)
    for b in adapter.blocks:
        lins = adapter.linears(b).values()
        zeros = sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)
        assert 0.35 < zeros < 0.65
    dense, _ = tiny_vlm(kind)  # same seed: the dense weights
    want = dict(dense.named_parameters())
    for part, names in dense_parts(reloaded).items():
        for n in names:
            assert torch.equal(dict(reloaded.named_parameters())[n], want[n]), n
    with torch.no_grad():
        logits = reloaded(**feed(proc, read_pairs(str(pairs_file))[0]), use_cache=False).logits
    assert torch.isfinite(logits).all()
    rows = verify_checkpoint(out)
    dense_rows = [r for r in rows if r["expected"] is None]
    assert {r["name"].split(" ")[0] for r in dense_rows} >= {"vision_tower", "embeddings"} | (
        {"projector"} if layout.projector else set())
    assert all(r["ok"] for r in rows)
    # a changed vision weight in the files is caught
    from safetensors.torch import load_file, save_file

    path = next(out.glob("*.safetensors"))
    tensors = load_file(path)
    from atprune.export.files import saved_names

    name = saved_names(reloaded, dense_parts(reloaded)["vision_tower"][:1]).popitem()[1]
    tensors[name] = tensors[name] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    bad = [r for r in verify_checkpoint(out) if not r["ok"]]
    assert [r["name"].split(" ")[0] for r in bad] == ["vision_tower"] and bad[0]["problem"] == "checksum"


def test_qwen2_5_vl_saves_and_reloads_with_its_processor(pairs_file, tmp_path):
    """Qwen2.5-VL (Qwen2-VL goes through the CLI above) pruned, saved and reloaded with ``AutoProcessor`` (its
    video processor included): the reloaded processor gives the same tokens, and the reloaded model the same logits
    on the same inputs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from atprune.export import save_pruned

    model, proc = tiny_vlm("qwen2_5_vl")
    calib = image_text_calibration(proc, read_pairs(str(pairs_file)))
    atprune.prune(model, method="sparsegpt", sparsity=0.5, calib=calib, progress=False)
    save_pruned(model, proc, tmp_path / "out", {})
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(proc2) is type(proc) and type(proc2.video_processor).__name__ == "Qwen2VLVideoProcessor"
    pair = read_pairs(str(pairs_file))[1]
    f, f2 = feed(proc, pair), feed(proc2, pair)
    assert torch.equal(f["input_ids"], f2["input_ids"]) and torch.equal(f["image_grid_thw"], f2["image_grid_thw"])
    with torch.no_grad():
        assert torch.allclose(reloaded(**f, use_cache=False).logits, model(**f, use_cache=False).logits, atol=1e-5)


def test_bad_image_text_input_is_a_one_line_error_before_loading(pairs_file, tmp_path, capsys, monkeypatch):
    import re

    from atprune.cli import main
    from tests.conftest import save_tiny_model

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    import atprune.jobs.multimodal
    import atprune.jobs.prune

    monkeypatch.setattr(atprune.jobs.prune, "load_model", forbidden)
    monkeypatch.setattr(atprune.jobs.multimodal, "load_vision_language", forbidden)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(pairs_file.read_text().splitlines()[0] + "\n" + json.dumps({"image": "nope.png", "text": "x"}))
    (tmp_path / "im0.png").write_bytes((pairs_file.parent / "im0.png").read_bytes())
    vlm_dir = _save_tiny("llava", tmp_path / "vlm")
    text_dir = save_tiny_model(tmp_path / "text", layers=2)
    base = ["prune", "--method", "wanda", "--sparsity", "0.5", "--no-eval", "--seqlen", "16", "--nsamples", "2",
            "--device", "cpu", "--quiet"]
    cases = [
        (["--model", str(vlm_dir), "--calib-data", str(missing)], r"missing\.jsonl line 2: image not found: .*nope\.png$"),
        (["--model", str(text_dir), "--calib-data", str(pairs_file)],
         r"pairs\.jsonl holds image-text pairs, but model .* is a text-only model"),
        (["--model", str(text_dir), "--caption-data", str(pairs_file)],
         r"pairs\.jsonl holds image-text pairs, but model .* is a text-only model"),
        (["--model", str(vlm_dir), "--caption-data", str(tmp_path / "im0.png")], r"not an image-text \.jsonl"),
    ]
    capsys.readouterr()
    for args, pattern in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    with pytest.raises(ConfigError, match=r"line 1: each line must be"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"image": "im0.png"}) + "\n")
        read_pairs(str(bad))


def test_offload_with_text_calibration_takes_the_language_model_path(pairs_file, tmp_path):
    """A vision-language checkpoint pruned with text calibration and --offload (e.g. Gemma 3 27B on one GPU) is
    pruned as a language model, as before vision-language support, instead of being refused; with image-text
    calibration --offload is refused in one line."""
    from atprune.jobs.multimodal import check_vision_language, with_offload
    from atprune.models.sources import resolve_model

    source = resolve_model(str(_save_tiny("llava", tmp_path / "vlm")))
    text = check_vision_language(source, "c4", None, 2)
    assert text.vision_language and not with_offload(text, True).vision_language
    assert with_offload(text, False).vision_language
    pairs = check_vision_language(source, str(pairs_file), None, 2)
    with pytest.raises(ConfigError, match="--offload is not supported with image-text calibration"):
        with_offload(pairs, True)
