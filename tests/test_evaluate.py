"""Perplexity over contiguous non-overlapping windows, checked against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from atprune.api import evaluate_perplexity
from atprune.data import EvalSet
from atprune.eval.perplexity import _exp, perplexity
from tests.conftest import tiny_model

SEQLEN = 16


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _hand_nll(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> tuple[float, int, int]:
    """(sum of -log p(x_{t+1} | x_<=t) in float64, predicted tokens, windows), one window at a time."""
    nwin = tokens.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    nll, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for k in range(nwin):
            window = tokens[k * seqlen : (k + 1) * seqlen]
            logits = model(input_ids=window[None]).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(seqlen - 1):
                nll -= logp[t, window[t + 1]]
                count += 1
    return float(nll), count, nwin


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_perplexity_matches_hand_computation_and_drops_the_tail(arch):
    model = tiny_model(arch, layers=2)
    tokens = _tokens(5 * SEQLEN + 7)
    nll, count, nwin = _hand_nll(model, tokens, SEQLEN)
    assert (nwin, count) == (5, 5 * (SEQLEN - 1))
    res = perplexity(model, tokens, SEQLEN)
    assert res["windows"] == res["windows_total"] == 5
    assert res["predicted_tokens"] == count and res["seqlen"] == SEQLEN and res["tokens_total"] == 5 * SEQLEN + 7
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the 7 tail tokens do not count: changing them changes nothing
    other_tail = tokens.clone()
    other_tail[-7:] = (other_tail[-7:] + 1) % 128
    assert perplexity(model, other_tail, SEQLEN)["ppl"] == res["ppl"]
    # but every token inside a window does
    other_body = tokens.clone()
    other_body[3] = (other_body[3] + 1) % 128
    assert perplexity(model, other_body, SEQLEN)["ppl"] != res["ppl"]


def test_perplexity_with_bos_prepends_it_to_every_window_and_predicts_every_text_token():
    model = tiny_model("llama", layers=2)
    tokens = _tokens(5 * (SEQLEN - 1) + 3, seed=4)
    bos = 1
    with_bos = torch.cat([torch.cat([torch.tensor([bos]), tokens[k * (SEQLEN - 1) : (k + 1) * (SEQLEN - 1)]])
                          for k in range(5)])
    nll, count, nwin = _hand_nll(model, with_bos, SEQLEN)  # the hand reference over BOS-prefixed windows
    res = perplexity(model, tokens, SEQLEN, bos=bos, batch_size=2)
    assert res["windows"] == res["windows_total"] == nwin == 5 and res["bos_per_window"] is True
    assert res["predicted_tokens"] == count == 5 * (SEQLEN - 1)
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert perplexity(model, tokens, SEQLEN)["windows"] == (5 * (SEQLEN - 1) + 3) // SEQLEN  # no BOS: plain slices
    with pytest.raises(ValueError, match="no room"):
        perplexity(model, tokens, 1, bos=bos)


def test_max_windows_is_respected_and_recorded():
    model = tiny_model("llama", layers=2)
    tokens = _tokens(5 * SEQLEN, seed=1)
    nll, count, _ = _hand_nll(model, tokens, SEQLEN, max_windows=2)
    res = perplexity(model, tokens, SEQLEN, max_windows=2)
    assert res["windows"] == 2 and res["windows_total"] == 5 and res["predicted_tokens"] == 2 * (SEQLEN - 1)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, tokens, SEQLEN, max_windows=99)["windows"] == 5


def test_batch_size_does_not_change_the_result_and_progress_counts_windows():
    model = tiny_model("llama", layers=2)
    tokens = _tokens(5 * SEQLEN, seed=2)
    calls1, calls3 = [], []
    r1 = perplexity(model, tokens, SEQLEN, batch_size=1, progress=lambda d, t: calls1.append((d, t)))
    r3 = perplexity(model, tokens, SEQLEN, batch_size=3, progress=lambda d, t: calls3.append((d, t)))
    assert r3["ppl"] == pytest.approx(r1["ppl"], rel=1e-5)
    assert r3["windows"] == r1["windows"] == 5
    assert calls1 == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert calls3 == [(3, 5), (5, 5)]


def test_uniform_logits_give_the_vocabulary_size():
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokens = _tokens(3 * SEQLEN, seed=3)
    res = perplexity(model, tokens, SEQLEN, batch_size=2)
    assert res["ppl"] == pytest.approx(128.0, rel=1e-6)
    assert res["nll_sum"] == pytest.approx(3 * (SEQLEN - 1) * math.log(128), rel=1e-6)


def test_fewer_tokens_than_one_window_is_an_error():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="less than one window"):
        perplexity(model, _tokens(SEQLEN - 1), SEQLEN)


def test_exp_gives_inf_on_overflow_and_keeps_nan():
    assert _exp(1.0) == pytest.approx(math.e)
    assert _exp(800.0) == float("inf")
    assert math.isnan(_exp(float("nan")))


def test_evaluate_perplexity_on_an_eval_set_adds_its_description():
    model = tiny_model("llama", layers=2)
    tokens = _tokens(4 * SEQLEN, seed=4)
    info = {"dataset": "mem", "split": "test", "origin": "mem", "documents": 1, "bos_policy": "x"}
    res = evaluate_perplexity(model, None, EvalSet(tokens, info), seqlen=SEQLEN, progress=False)
    nll, count, _ = _hand_nll(model, tokens, SEQLEN)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["dataset"] == "mem" and res["bos_policy"] == "x" and res["windows"] == 4
