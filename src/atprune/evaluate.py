"""Perplexity over contiguous non-overlapping windows (the Wanda / SparseGPT WikiText-2 protocol)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _exp(x: float) -> float:
    """``exp(x)`` that gives ``inf`` instead of overflowing and keeps ``nan``."""
    if math.isnan(x):
        return x
    return math.exp(x) if x < 709.0 else float("inf")


def perplexity(model, tokens: torch.Tensor, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Token-level perplexity ``exp(sum NLL / predicted tokens)``.

    The stream is cut into ``tokens.numel() // seqlen`` contiguous non-overlapping windows (the tail that
    does not fill a window is dropped); within each window every token but the first is predicted from
    the ones before it. With equal windows this equals the reference scripts' mean of per-window losses.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seqlen, vocab]``.
        tokens: ``[N]`` int64 token ids.
        seqlen: window length in tokens.
        max_windows: evaluate only the first this many windows (quick checks; recorded in the result).
        progress: called with (windows done, windows total).

    Returns:
        dict with ``ppl`` (float; ``inf``/``nan`` if the model diverges), ``nll_sum`` (nats), ``predicted_tokens``,
        ``windows``, ``windows_total``, ``seqlen``, ``tokens_total``.

    Raises:
        ValueError: if not even one window fits.
    """
    total = tokens.numel() // seqlen
    if total == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, less than one window of seqlen {seqlen}")
    nwin = total if max_windows is None else min(total, max_windows)
    windows = tokens[: nwin * seqlen].view(nwin, seqlen)
    device = next(model.parameters()).device
    nll = 0.0
    done = 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            done += batch.shape[0]
            if progress is not None:
                progress(done, nwin)
    predicted = nwin * (seqlen - 1)
    mean = nll / predicted
    return {"ppl": _exp(mean), "nll_sum": nll, "predicted_tokens": predicted, "windows": nwin, "windows_total": total,
            "seqlen": seqlen, "tokens_total": int(tokens.numel())}
