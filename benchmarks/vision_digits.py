"""Digits: a small ViT and a small ConvNeXt (timm architectures) trained on scikit-learn's digits (1797 8x8 grey
images, 10 classes; 1437 train / 360 test, stratified, seed 0), then pruned with magnitude and Wanda at 50 % and 70 %, uniform and
ATP (beta chosen by golden search on 128 training images held out from calibration), scored by top-1 on the test
split (ViT trained 20 epochs, ConvNeXt 12; one CPU thread). tests/test_vision_digits.py runs the same code (fewer cells) and asserts that the dense models learned.

    HF_HUB_OFFLINE=1 python benchmarks/vision_digits.py
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F


def digits(seed: int = 0):
    """``(train_x, train_y, test_x, test_y)``: ``[n, 1, 8, 8]`` float32 scaled to [0, 1] then standardised with the
    training mean / std, and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    mean, std = x[tr].mean(), x[tr].std()
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def small_vit():
    """timm VisionTransformer: 8x8x1 input, 2x2 patches (16 tokens + class token), width 64, 4 blocks, 4 heads."""
    from atprune.vision.compat import import_timm

    timm = import_timm()
    return timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                                            embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


def small_convnext():
    """timm ConvNeXt: 8x8x1 input, stem 1x1 (patch 1), four stages (timm's fixed count) of depths (1, 2, 2, 1) and
    widths (16, 32, 48, 64) at 8x8, 4x4, 2x2 and 1x1 (each later stage behind a 2x2 downsampling layer)."""
    from atprune.vision.compat import import_timm

    timm = import_timm()
    return timm.models.convnext.ConvNeXt(in_chans=1, num_classes=10, depths=(1, 2, 2, 1), dims=(16, 32, 48, 64), patch_size=1,
                                         ls_init_value=None)


def train(model, x, y, epochs: int = 12, lr: float = 4e-3, seed: int = 0):
    """AdamW, batch 64, cosine schedule; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def top1(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def prune_cells(model, train_x, train_y, test_x, test_y, cells, nsamples: int = 256, nselect: int = 128,
                max_trials: int = 5):
    """Prune a copy of ``model`` per ``(method, sparsity, allocation)`` cell; ATP's beta by golden search on the
    selection images' cross-entropy. Returns one dict per cell (``beta``, ``achieved``, ``top1``)."""
    import copy

    from atprune.allocation import block_sizes
    from atprune.allocators import beta_max
    from atprune.jobs.strategies import best_trial, golden_search
    from atprune.vision.adapter import VisionAdapter
    from atprune.vision.data import draw
    from atprune.vision.prune import block_inputs, prune_classifier

    calib_idx, sel_idx = draw(len(train_y), (nsamples, nselect), seed=0)
    adapter = VisionAdapter.for_model(model)
    inputs = block_inputs(adapter, train_x[calib_idx])
    sizes = block_sizes(adapter)
    rows = []
    for method, sparsity, allocation in cells:
        beta = None
        if allocation == "atp":
            def loss(b):
                m = copy.deepcopy(model)
                prune_classifier(m, method=method, sparsity=sparsity, allocation="atp", beta=b, inputs=inputs)
                with torch.no_grad():
                    return float(F.cross_entropy(m(train_x[sel_idx]), train_y[sel_idx]))

            beta = best_trial(golden_search(loss, beta_max(sparsity, sizes), max_trials))[0]
        m = copy.deepcopy(model)
        result = prune_classifier(m, method=method, sparsity=sparsity, allocation=allocation, beta=beta, inputs=inputs)
        rows.append({"method": method, "sparsity": sparsity, "allocation": allocation, "beta": beta,
                     "achieved": result.overall_sparsity, "rates": result.spec["rates"],
                     "top1": top1(m, test_x, test_y), "model": m})
    return rows


def main() -> int:
    torch.set_num_threads(1)  # one thread: the same numbers on any machine
    data = digits()
    cells = [(m, s, a) for m in ("magnitude", "wanda") for s in (0.5, 0.7) for a in ("uniform", "atp")]
    print("| model | dense top-1 % | method | sparsity | allocation | beta | achieved | top-1 % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, build, epochs in (("small ViT", small_vit, 20), ("small ConvNeXt", small_convnext, 12)):
        t = time.perf_counter()
        model = train(build(), data[0], data[1], epochs=epochs)
        dense = top1(model, data[2], data[3])
        for r in prune_cells(model, *data, cells):
            beta = "-" if r["beta"] is None else f"{r['beta']:.4f}"
            print(f"| {name} | {dense:.2f} | {r['method']} | {r['sparsity']:g} | {r['allocation']} | {beta} | "
                  f"{r['achieved']:.4f} | {r['top1']:.2f} |")
        print(f"<!-- {name}: {time.perf_counter() - t:.0f} s -->", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
