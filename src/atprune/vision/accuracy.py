"""Top-1 / top-5 accuracy of an image classifier."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of rows of ``logits`` ``[n, classes]`` whose label ``labels`` ``[n]`` (int64) is among the ``k``
    largest logits, per ``k`` (``k`` above the number of classes counts every row). Ties are broken by
    ``torch.topk``'s order."""
    top = logits.float().topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.to(top.device).unsqueeze(1)
    return {k: int(hit[:, :k].any(1).sum()) for k in ks}


def accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor],
             batches: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: Callable[[int], None] | None = None) -> dict:
    """Top-1 and top-5 accuracy (percent) over every image of ``batches``.

    Args:
        logits_fn: ``images [b, C, H, W] -> logits [b, classes]`` (e.g. :meth:`VisionAdapter.logits`).
        batches: ``(images, labels)`` pairs; labels ``[b]`` int64 class indices.
        progress: called with the number of images done so far.

    Returns:
        ``{"top1": %, "top5": %, "images": n}``.
    """
    n, hits = 0, {1: 0, 5: 0}
    with torch.no_grad():
        for images, labels in batches:
            for k, c in topk_correct(logits_fn(images), labels).items():
                hits[k] += c
            n += len(labels)
            if progress is not None:
                progress(n)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": 100.0 * hits[1] / n, "top5": 100.0 * hits[5] / n, "images": n}
