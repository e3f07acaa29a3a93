"""Image classifiers: block-by-block parity at sparsity 0 on architecture-exact random-init timm models (ViT, DeiT,
distilled DeiT, ConvNeXt) and small transformers ViT / ConvNext, achieved sparsity counted in the weights, the CLI on
an ImageFolder, and the one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from atprune.cli import main
from atprune.engine.passes import sequential
from atprune.errors import ConfigError
from atprune.vision.accuracy import topk_correct
from atprune.vision.adapter import VisionAdapter, WithDownsample
from atprune.vision.compat import import_timm
from atprune.vision.prune import block_inputs, prune_classifier

timm = import_timm()


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=5)).eval()


def _hf_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2,
                                                         num_labels=5, image_size=16)).eval()


def _timm(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize("build,size,family,blocks", [
    (lambda: _timm("vit_tiny_patch16_224"), 224, "timm-vit", 12),
    (lambda: _timm("deit_tiny_patch16_224"), 224, "timm-vit", 12),
    (lambda: _timm("deit_tiny_distilled_patch16_224"), 224, "timm-vit", 12),
    (lambda: _timm("convnext_atto"), 96, "timm-convnext", 12),  # depths 2+2+6+2, 1x1-conv MLPs
    (_hf_vit, 16, "hf-vit", 3),
    (_hf_convnext, 16, "hf-convnext", 4),
])
def test_block_by_block_reproduces_the_logits(build, size, family, blocks):
    """The engine's pass over the adapter's blocks, from the captured block-0 inputs, then the head, gives the
    model's own logits (fp32); so ConvNeXt's downsampling layers run between the right blocks."""
    model = build()
    torch.manual_seed(1)
    images = torch.randn(3, 3, size, size)
    adapter = VisionAdapter.for_model(model)
    assert (adapter.family, adapter.num_blocks) == (family, blocks)
    inputs = block_inputs(adapter, images, batch_size=2)  # batches of 2 and 1
    out = sequential(adapter, None, lambda *a: None, needs_stats=False, inputs=inputs)
    logits = torch.cat([adapter.head(h) for h in out])
    with torch.no_grad():
        reference = adapter.logits(images)
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_convnext_blocks_and_prunable_layers():
    model = _timm("convnext_atto")
    adapter = VisionAdapter.for_model(model)
    # the first block of stages 1-3 carries that stage's downsampling layer; stage 0's is the identity
    wrapped = [i for i, b in enumerate(adapter.blocks) if isinstance(b, WithDownsample)]
    assert wrapped == [2, 4, 10]
    assert adapter.blocks[2].downsample is model.stages[1].downsample
    assert sorted(adapter.linears(adapter.blocks[2])) == ["mlp.fc1", "mlp.fc2"]  # not the downsampling conv


def _counted(layers):
    zeros = sum(int((l.weight == 0).sum()) for l in layers)
    return zeros, sum(l.weight.numel() for l in layers)


@pytest.mark.parametrize("name,allocation,beta", [("deit_tiny_patch16_224", "uniform", None),
                                                  ("convnext_atto", "atp", 0.04)])
def test_wanda_reaches_the_target_sparsity(name, allocation, beta):
    model = _timm(name)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)
    images = torch.randn(4, 3, 224 if "deit" in name else 64, 224 if "deit" in name else 64)
    result = prune_classifier(model, images, method="wanda", sparsity=0.5, allocation=allocation, beta=beta)
    adapter = VisionAdapter.for_model(model)
    per_block = [_counted(adapter.linears(b).values()) for b in adapter.blocks]
    zeros, total = map(sum, zip(*per_block))
    # wanda removes floor(in * rate) weights of every row: count it from the shapes alone
    expected = sum(l.out_features * int(l.in_features * rate)
                   for b, rate in zip(adapter.blocks, result.spec["rates"]) for l in adapter.linears(b).values())
    assert zeros == expected and total == result.pruned_params
    assert abs(zeros / total - 0.5) < 0.002
    if allocation == "atp":  # ConvNeXt's later blocks are wider: size-aware steps of beta, weighted mean S
        rates = result.spec["rates"]
        assert all(abs(b - a - beta) < 1e-9 for a, b in zip(rates, rates[1:]))
        sizes = [t for _, t in per_block]
        assert abs(sum(r * s for r, s in zip(rates, sizes)) / sum(sizes) - 0.5) < 1e-9
    # only the blocks' matrices changed: patch embedding / stem, downsampling layers, norms and head are dense
    pruned = {f"{n}.weight" for n, m in model.named_modules()
              if any(m is (l.module if hasattr(l, "module") else l) for b in adapter.blocks
                     for l in adapter.linears(b).values())}
    for key, value in model.state_dict().items():
        if key not in pruned:
            assert torch.equal(value, dense[key]), key


def test_topk_counts_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4], [5.0, 1.0, 2.0, 3.0, 4.0, 0.0]])
    # row 0: label 1 is top-1; row 1: label 5 is the lowest logit (rank 6), label 0 would be top-1
    assert topk_correct(logits, torch.tensor([1, 5])) == {1: 1, 5: 1}
    assert topk_correct(logits, torch.tensor([3, 0])) == {1: 1, 5: 2}


def _image_folder(root, n_per_class=6, classes=3, size=16):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_cli_prune_search_compare_on_an_image_folder(tmp_path, capsys):
    model_dir = tmp_path / "vit"
    _hf_vit().save_pretrained(model_dir)
    images = _image_folder(tmp_path / "images")
    base = ["--model", str(model_dir), "--calib-data", str(images), "--eval-data", str(images), "--nsamples", "8",
            "--quiet", "--device", "cpu"]
    assert main(["prune", *base, "--sparsity", "0.6", "--allocation", "atp", "--beta", "0.1",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["evaluation"]["sparse"]["images"] == 18 and report["pruning"]["calibration"]["nsamples"] == 8
    assert [round(b["target"], 6) for b in report["pruning"]["blocks"]] == [0.5, 0.6, 0.7]
    from transformers import ViTForImageClassification

    saved = ViTForImageClassification.from_pretrained(tmp_path / "run")
    last = [m.weight for m in saved.vit.layers[2].modules() if isinstance(m, nn.Linear)]
    # wanda at 0.7 keeps ceil(0.3 * in) weights per row: floor(0.7 * 32) / 32 = floor(0.7 * 64) / 64 = 0.6875
    assert len(last) == 6 and all(float((w == 0).float().mean()) == 0.6875 for w in last)
    capsys.readouterr()
    assert main(["search", *base, "--sparsity", "0.5", "--nselect", "6", "--max-trials", "3",
                 "--out", str(tmp_path / "search")]) == 0
    assert "chosen beta" in capsys.readouterr().out
    assert main(["compare", *base, "--nselect", "6", "--max-trials", "3", "--methods", "magnitude",
                 "--sparsities", "0.5", "--allocations", "uniform", "atp", "--out", str(tmp_path / "cmp")]) == 0
    cells = json.loads((tmp_path / "cmp" / "compare.json").read_text())["cells"]
    assert [c["allocation"] for c in cells] == ["uniform", "atp"] and all(abs(c["achieved"] - 0.5) < 0.01
                                                                           for c in cells)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "vit"
    _hf_vit().save_pretrained(model_dir)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    images = _image_folder(tmp_path / "images", n_per_class=1)
    capsys.readouterr()  # the save's progress bar
    err = _error(capsys, ["prune", "--model", str(model_dir), "--calib-data", str(flat)])
    assert "no class sub-folders" in err
    err = _error(capsys, ["prune", "--model", str(model_dir), "--calib-data", "c4"])
    assert "is text data" in err
    err = _error(capsys, ["prune", "--model", str(model_dir)])
    assert "give --calib-data" in err
    err = _error(capsys, ["prune", "--model", "smollm2-135m", "--calib-data", str(images)])
    assert "holds images" in err and "text model" in err
    err = _error(capsys, ["prune", "--model", str(model_dir), "--calib-data", str(images), "--nsamples", "8"])
    assert "has 3 training images" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(capsys, ["prune", "--model", "timm:deit_tiny_patch16_224", "--calib-data", str(images), "--nsamples", "2"])
    assert "--checkpoint" in err
    err = _error(capsys, ["prune", "--model", "timm:no_such_net", "--random-init", "--calib-data", str(images), "--nsamples", "2"])
    assert "timm has no model" in err


def test_missing_timm_names_the_extra(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "timm")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"pip install 'atprune\[vision\]'"):
        import_timm()


def test_a_folder_with_split_folders_but_not_the_one_asked_is_refused(tmp_path):
    from atprune.errors import ConfigError
    from atprune.vision.data import open_images

    _image_folder(tmp_path / "root" / "train")
    _image_folder(tmp_path / "root" / "test")
    assert len(open_images(str(tmp_path / "root"), "train")) == 18  # the train/ split, 3 classes x 6 images
    with pytest.raises(ConfigError, match=r"has split folders \(test, train\) but no val/validation/valid/"):
        open_images(str(tmp_path / "root"), "validation")  # else train/ and test/ would be read as two classes


def test_n_m_with_a_non_uniform_allocation_is_refused_on_image_models():
    from atprune.errors import ConfigError

    model = _timm("deit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="mixed N:M per block is for language models"):
        prune_classifier(model, torch.randn(2, 3, 224, 224), method="wanda", sparsity=None, pattern="2:4",
                         allocation="atp", beta=0.05)


def test_eval_images_limit_takes_a_seeded_subset_across_classes(tmp_path):
    from atprune.vision.data import open_images

    images = open_images(str(_image_folder(tmp_path / "f", n_per_class=10, classes=5)), "validation")
    import torchvision.transforms.functional as TF

    labels = [int(x) for _, y in images.batches(TF.to_tensor, 4, limit=15) for x in y]
    again = [int(x) for _, y in images.batches(TF.to_tensor, 4, limit=15) for x in y]
    assert len(labels) == 15 and labels == again  # seeded
    assert len(set(labels)) > 2  # the first 15 in class order would hold only classes 0 and 1
    assert sorted(labels) == labels  # index order (a class-sorted folder)
