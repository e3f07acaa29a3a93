"""Scoring a model: perplexity and KL to a reference (:mod:`.perplexity`), zero-shot accuracy through lm-eval
(:mod:`.zeroshot`, imported on demand). Later: top-1 accuracy of image classifiers."""

from atprune.eval.perplexity import kl_to_reference, next_token_logprobs, perplexity

__all__ = ["kl_to_reference", "next_token_logprobs", "perplexity"]
