"""A simple built-in multimodal check: the log-likelihood of given captions for given images.

For each pair the model reads the image prompt (the processor's image tokens) followed by the caption, and only
the caption's tokens are scored: ``nll = -sum_t log p(c_t | image, c_<t) / T`` over all caption tokens ``c_t`` of
all pairs (natural log), and ``ppl = exp(nll)``. Comparing dense and pruned on the same pairs shows how much the
language model's use of the image degrades.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atprune.errors import ConfigError
from atprune.multimodal.pairs import Pair, feed, image_prompt


def _prompt_ids(processor, pair: Pair) -> torch.Tensor:
    """Token ids ``[tokens]`` of the image prompt alone (the processor's expansion of the image placeholder), for
    ``pair``'s image."""
    from PIL import Image

    with Image.open(pair.image) as im:
        rgb = im.convert("RGB")
    return processor(images=[rgb], text=[image_prompt(processor)], return_tensors="pt")["input_ids"][0]


def caption_loglik(model, processor, pairs: list[Pair]) -> dict:
    """Mean negative log-likelihood of the captions of ``pairs`` given their images.

    Args:
        model: a vision-language model (``logits`` ``[1, tokens, vocab]``), any device and dtype (log-softmax in
            float32).
        processor: its processor.
        pairs: the image-caption pairs (:func:`atprune.multimodal.pairs.read_pairs`); a caption that already holds
            the image placeholder is refused (the scored tokens must be the caption's alone). Captions are not
            cut.

    Returns:
        ``{"nll": mean NLL per caption token (nats), "ppl": exp(nll), "pairs": n, "tokens": caption tokens scored,
        "per_pair": [mean NLL of each pair]}``.

    Raises:
        ConfigError: a caption holds the image placeholder, or the prompt's tokens are not a prefix of the
            pair's tokens (the processor tokenizes the boundary differently).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompt = image_prompt(processor)
    total, count, per_pair = 0.0, 0, []
    model.eval()
    for pair in pairs:
        if prompt in pair.text:
            raise ConfigError(f"caption for {pair.image} holds the image placeholder {prompt!r}; give the caption only")
        inputs = feed(processor, pair)
        prefix = _prompt_ids(processor, pair)
        start, ids = prefix.numel(), inputs["input_ids"]
        if ids.shape[1] <= start or not torch.equal(ids[0, :start], prefix):
            raise ConfigError(f"caption for {pair.image}: the image prompt's tokens are not a prefix of the "
                              "prompt + caption tokens, so the caption's tokens cannot be told apart")
        with torch.no_grad():
            inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            logits = model(**inputs, use_cache=False).logits[0].float()
        # logits at position t predict token t + 1: score caption tokens start .. end-1
        logp = F.log_softmax(logits[start - 1:-1], dim=-1)
        target = ids[0, start:].to(logp.device)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        total += float(nll.sum())
        count += int(target.numel())
        per_pair.append(float(nll.mean()))
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "pairs": len(pairs), "tokens": count, "per_pair": per_pair}
