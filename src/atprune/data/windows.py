"""Token windows for calibration, selection and evaluation, cut from a :class:`~atprune.data.text.TextSource`.

BOS policy: a tokenizer that puts BOS before every text gets windows of ``[BOS] + (seqlen - 1)`` text tokens;
one that adds none gets plain ``seqlen``-token slices (see :func:`window_bos`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from atprune.data.text import C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS, TextSource, load_text
from atprune.errors import ConfigError


@dataclass
class TokenWindows:
    """``windows``: ``[n, seqlen]`` int64 token ids; ``info``: what was asked and what was used."""

    windows: torch.Tensor
    info: dict


def _bos_added(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    return bos is not None and len(probe) > 0 and probe[0] == bos


def window_bos(tokenizer) -> int | None:
    """The BOS policy of every token window (calibration, selection, evaluation).

    A tokenizer that puts BOS before every text it encodes (Gemma, LLaMA) belongs to a model trained to see BOS at
    position 0; without it such models behave far off their trained distribution (Gemma's perplexity explodes).
    For those, every window is ``[BOS] + (seqlen - 1)`` text tokens and this returns the BOS id. A tokenizer that
    adds no BOS (SmolLM2, GPT-2, Qwen), or no tokenizer, gets plain ``seqlen``-token slices of the text and this
    returns None.
    """
    if tokenizer is None:  # windows given as token ids, no tokenizer at hand
        return None
    return tokenizer.bos_token_id if _bos_added(tokenizer) else None


def bos_policy(bos: int | None) -> str:
    """One line describing the window BOS policy (recorded in reports)."""
    if bos is None:
        return "tokenizer adds no BOS: windows are plain slices of the token stream, no BOS"
    return f"tokenizer adds BOS: every window is BOS (id {bos}) + seqlen-1 text tokens"


def cut_windows(tokens: torch.Tensor, seqlen: int, bos: int | None = None, max_windows: int | None = None) -> torch.Tensor:
    """Contiguous non-overlapping windows of a token stream under the BOS policy of :func:`window_bos`.

    Args:
        tokens: ``[N]`` int64 token stream (text tokens; no BOS needed).
        seqlen: tokens per window, BOS included.
        bos: BOS id to put at the start of every window (each then holds ``seqlen - 1`` stream tokens), or None.
        max_windows: keep at most this many.

    Returns:
        ``[n, seqlen]`` int64, ``n = N // (seqlen - 1 if bos is not None else seqlen)`` (capped); the tail that does
        not fill a window is dropped.

    Raises:
        ValueError: ``seqlen`` < 2 with a BOS (no room for text).
    """
    step = seqlen - 1 if bos is not None else seqlen
    if step < 1:
        raise ValueError(f"seqlen {seqlen} leaves no room for text after the BOS")
    n = tokens.numel() // step
    if max_windows is not None:
        n = min(n, max_windows)
    body = tokens[: n * step].view(n, step)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=body.dtype), body], dim=1)


def token_stream(tokenizer, source: TextSource, max_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """Tokenize the documents of ``source`` into one ``[N]`` int64 stream.

    Documents are taken in a seeded random order (in file order when ``source.joined``) and concatenated,
    an EOS token between them when the tokenizer adds no BOS; tokenization stops once ``max_tokens``
    tokens are reached, so a large corpus costs only what is needed.
    """
    order = torch.randperm(len(source.documents), generator=torch.Generator().manual_seed(seed)).tolist()
    sep = [] if _bos_added(tokenizer) or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces, total = [], 0
    for i in order:
        ids = tokenizer(source.documents[i], verbose=False)["input_ids"] + (sep if len(source.documents) > 1 else [])
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def sample_windows(stream: torch.Tensor, seqlen: int, sizes: list[int], seed: int = 0,
                   bos: int | None = None) -> list[torch.Tensor]:
    """Draw disjoint groups of non-overlapping ``seqlen``-token windows from a token stream.

    The stream is cut into ``N // seqlen`` aligned slots after a random offset; a seeded permutation of
    the slots is split into consecutive groups of ``sizes[k]`` slots, so no two windows of any group
    share a token. The sampler is bounded: it never loops looking for text.

    Args:
        stream: ``[N]`` int64 tokens.
        seqlen: tokens per window.
        sizes: windows wanted per group; when fewer slots exist, groups are filled in order and the
            later ones come back short.
        bos: with a BOS id (see :func:`window_bos`), slots hold ``seqlen - 1`` stream tokens and every window
            starts with this BOS.

    Returns:
        One ``[n_k, seqlen]`` int64 tensor per group (``n_k <= sizes[k]``).
    """
    gen = torch.Generator().manual_seed(seed)
    step = seqlen - 1 if bos is not None else seqlen
    slots = stream.numel() // step
    spare = stream.numel() - slots * step
    offset = int(torch.randint(0, spare + 1, (1,), generator=gen)) if spare else 0
    perm = torch.randperm(slots, generator=gen)
    groups, start = [], 0
    for size in sizes:
        idx = perm[start : start + size]
        start += len(idx)
        body = (torch.stack([stream[offset + j * step : offset + (j + 1) * step] for j in idx.tolist()])
                if len(idx) else torch.zeros(0, step, dtype=torch.long))
        if bos is not None:
            body = torch.cat([torch.full((body.shape[0], 1), bos, dtype=torch.long), body], dim=1)
        groups.append(body)
    return groups


def calibration_windows(tokenizer, source: TextSource, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        strict: bool = False) -> TokenWindows:
    """``nsamples`` random windows of exactly ``seqlen`` tokens from ``source`` (seeded, no padding), under the
    BOS policy of :func:`window_bos` (a BOS-adding tokenizer gets BOS at the start of every window).

    Raises:
        ConfigError: no full window can be cut, or fewer than ``nsamples`` and ``strict`` is set.
            Without ``strict`` a shortfall is a warning and the count used goes into ``info``.
    """
    stream = token_stream(tokenizer, source, max_tokens=4 * nsamples * seqlen, seed=seed)
    bos = window_bos(tokenizer)
    (windows,) = sample_windows(stream, seqlen, [nsamples], seed=seed, bos=bos)
    used = windows.shape[0]
    if used == 0:
        raise ConfigError(f"too few calibration tokens: {source.origin} gives {stream.numel()} tokens, "
                          f"less than one window of seqlen {seqlen}")
    if used < nsamples:
        msg = (f"calibration data {source.origin} has {stream.numel()} tokens: only {used} windows of {seqlen} "
               f"tokens instead of {nsamples}")
        if strict:
            raise ConfigError(msg + " (--strict)")
        warnings.warn(msg)
    info = source.describe() | {"seqlen": seqlen, "nsamples_requested": nsamples, "nsamples": used,
                                "tokens": used * seqlen, "tokens_available": int(stream.numel()), "seed": seed,
                                "bos_added": bos is not None, "bos_policy": bos_policy(bos)}
    return TokenWindows(windows, info)


@dataclass
class EvalSet:
    """A tokenized evaluation text: ``tokens`` ``[N]`` int64 and its description ``info``."""

    tokens: torch.Tensor
    info: dict


def eval_set(tokenizer, spec: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> EvalSet:
    """Load and tokenize an evaluation text once (see :func:`load_text`, :func:`evaluation_tokens`)."""
    return EvalSet(*evaluation_tokens(tokenizer, load_text(spec, split, data_dir)))


def evaluation_tokens(tokenizer, source: TextSource) -> tuple[torch.Tensor, dict]:
    """The whole evaluation text as one ``[N]`` int64 stream and its description.

    Several documents are joined with ``"\n\n"`` in file order, then tokenized once. C4 follows SparseGPT: the
    first 1100 documents joined with ``" "``; ``info["max_windows"]`` then caps the evaluation at 256 windows.

    BOS policy (:func:`window_bos`): the stream holds text tokens only (the BOS a BOS-adding tokenizer puts at the
    start is removed); ``info["bos_token_id"]`` is that tokenizer's BOS id, which the perplexity code then puts at
    the start of every window (None: no BOS anywhere). ``info["bos_policy"]`` says which applied.
    """
    extra = {}
    if source.name == "c4":
        text = " ".join(source.documents[:C4_EVAL_DOCUMENTS])
        extra = {"protocol": f"SparseGPT C4: first {C4_EVAL_DOCUMENTS} documents joined with ' ', first "
                             f"{C4_EVAL_WINDOWS} windows", "max_windows": C4_EVAL_WINDOWS}
    else:
        text = source.documents[0] if source.joined else "\n\n".join(source.documents)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    bos = window_bos(tokenizer)
    if bos is not None and ids.numel() and ids[0] == bos:
        ids = ids[1:]
    return ids, source.describe() | extra | {"bos_token_id": bos, "bos_policy": bos_policy(bos)}
