"""Perplexity over contiguous non-overlapping windows (SparseGPT's WikiText-2 protocol: the test split joined
with ``"\n\n"``, ``numel // seqlen`` windows), and comparisons of next-token distributions."""

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
               progress: Callable[[int, int], None] | None = None, bos: int | None = None) -> dict:
    """Token-level perplexity ``exp(sum NLL / predicted tokens)``.

    The stream is cut into ``tokens.numel() // seqlen`` contiguous non-overlapping windows (the tail that
    does not fill a window is dropped); within each window every token but the first is predicted from
    the ones before it. With equal windows this equals the reference scripts' mean of per-window losses.
    With ``bos`` (models whose tokenizer adds BOS, see :func:`atprune.data.window_bos`) every window is
    ``[bos] + seqlen - 1`` stream tokens, so all ``seqlen - 1`` text tokens of a window are predicted, the first
    from the BOS alone; there are then ``tokens.numel() // (seqlen - 1)`` windows.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seqlen, vocab]``.
        tokens: ``[N]`` int64 token ids.
        seqlen: window length in tokens.
        max_windows: evaluate only the first this many windows (quick checks; recorded in the result).
        bos: BOS token id to start every window with, or None (windows are plain slices of ``tokens``).
        progress: called with (windows done, windows total).

    Returns:
        dict with ``ppl`` (float; ``inf``/``nan`` if the model diverges), ``nll_sum`` (nats), ``predicted_tokens``,
        ``windows``, ``windows_total``, ``seqlen``, ``tokens_total``, ``bos_per_window`` (bool).

    Raises:
        ValueError: if not even one window fits, or ``seqlen`` leaves no text token (``seqlen < 2`` with a BOS).
    """
    from atprune.data import cut_windows

    step = seqlen - 1 if bos is not None else seqlen
    if step < 1:
        raise ValueError(f"seqlen {seqlen} leaves no room for text" + (" after the BOS" if bos is not None else ""))
    total = tokens.numel() // step
    if total == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, less than one window of seqlen {seqlen}")
    nwin = total if max_windows is None else min(total, max_windows)
    windows = cut_windows(tokens, seqlen, bos, nwin)
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
            "seqlen": seqlen, "tokens_total": int(tokens.numel()), "bos_per_window": bos is not None}


def next_token_logprobs(model, windows: torch.Tensor, *, batch_size: int = 1, dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every position, kept on the CPU to compare models later.

    Args:
        windows: ``[n, seqlen]`` int64 token ids.
        dtype: storage dtype (float16 halves the memory of float32; ``n * seqlen * vocab`` values in all).

    Returns:
        One ``[batch, seqlen, vocab]`` tensor per batch of ``batch_size`` windows.
    """
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            out.append(F.log_softmax(logits.float(), dim=-1).to("cpu", dtype))
    return out


def kl_to_reference(model, windows: torch.Tensor, reference: list[torch.Tensor], *, batch_size: int = 1) -> float:
    """Mean over all positions of ``KL(p_ref || p_model)`` of the next-token distributions, in nats.

    A label-free selection metric: how far the (pruned) model's predictions moved from the reference (dense)
    model's on the same tokens. ``reference`` comes from :func:`next_token_logprobs` with the same windows and
    ``batch_size``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, ref in zip(windows.split(batch_size), reference):
            logq = F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1)
            logp = ref.to(device, torch.float32)
            total += (logp.exp() * (logp - logq)).sum().item()
            count += batch.numel()
    return total / count
