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
