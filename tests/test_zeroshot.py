"""Zero-shot evaluation through lm-eval: converters, adapter loglikelihood, exact accuracy, errors, real data."""

from __future__ import annotations

import bz2
import json
import math

import pytest
import torch

from atprune.errors import ConfigError
from atprune.eval.zeroshot import adapter, check_zero_shot, evaluate_zero_shot, sanity_gate
from atprune.eval.zeroshot import tasks as T
from tests.conftest import DATA_DIR, char_tokenizer, require_data, tiny_model

import lm_eval  # noqa: F401,E402  (a hard dependency: a broken install fails here, it does not skip)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- converters (hand-written original records)

def test_boolq_converter(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", [
        {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."},
        {"question": "is snow hot", "title": "Snow", "answer": False, "passage": "Snow is cold."}])
    recs = T.convert_boolq(tmp_path)
    assert recs == [{"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 0, "label": 1},
                    {"question": "is snow hot", "passage": "Snow -- Snow is cold.", "idx": 1, "label": 0}]


def test_piqa_converter_and_label_count_check(tmp_path):
    _write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g1", "sol1": "a", "sol2": "b"}, {"goal": "g2", "sol1": "c", "sol2": "d"}])
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    assert T.convert_piqa(tmp_path) == [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1},
                                        {"goal": "g2", "sol1": "c", "sol2": "d", "label": 0}]
    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(ConfigError, match="1 labels for 2 records"):
        T.convert_piqa(tmp_path)


def test_winogrande_converter(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", [{"qID": "x-1", "sentence": "Ann beat Bo so _ won.", "option1": "Ann",
                                           "option2": "Bo", "answer": "1"}])
    assert T.convert_winogrande(tmp_path) == [{"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                                               "answer": "1"}]


def test_arc_converters_both_formats(tmp_path):
    original = {"id": "M_1", "question": {"stem": "Q?", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"},
                                                                     {"text": "z", "label": "3"}]}, "answerKey": "3"}
    _write_jsonl(tmp_path / "c" / "ARC-Challenge-Test.jsonl", [original])
    hf = {"id": "M_2", "question": "Q2?", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "B"}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "test.json").write_text(json.dumps([hf], indent=2))
    rec = T.convert_arc_challenge(tmp_path / "c")[0]
    assert rec == {"id": "M_1", "question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                   "answerKey": "3"}
    assert rec["choices"]["label"].index(rec["answerKey"]) == 2  # the stock doc_to_target
    assert T.convert_arc_easy(tmp_path / "e") == [hf]


def test_openbookqa_converter(tmp_path):
    _write_jsonl(tmp_path / "test.jsonl", [{"id": "8-1", "question": {"stem": "Sun is a", "choices": [
        {"text": "star", "label": "A"}, {"text": "moon", "label": "B"}]}, "answerKey": "A"}])
    assert T.convert_openbookqa(tmp_path) == [{"id": "8-1", "question_stem": "Sun is a", "answerKey": "A",
                                               "choices": {"text": ["star", "moon"], "label": ["A", "B"]}}]


def test_hellaswag_converter_splits_unfinished_sentence(tmp_path):
    items = ["Roof shingle removal: A man is sitting on a roof. he", "3", "e0", "e1", "e2", "e3",
             "Home and Garden: How to paint a wall. Buy paint. Clean the wall first.", "0", "f0", "f1", "f2", "f3"]
    with bz2.open(tmp_path / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("\n".join(items) + "\n")
    a, b = T.convert_hellaswag(tmp_path)
    assert (a["activity_label"], a["ctx_a"], a["ctx_b"], a["endings"], a["label"]) == \
        ("Roof shingle removal", "A man is sitting on a roof.", "he", ["e0", "e1", "e2", "e3"], "3")
    assert (b["activity_label"], b["ctx_a"], b["ctx_b"], b["label"]) == \
        ("Home and Garden", "How to paint a wall. Buy paint. Clean the wall first.", "", "0")


def test_stock_prompts_on_converted_records(tmp_path):
    """The stock lm-eval task definitions turn converted records into the documented prompts."""
    _write_jsonl(tmp_path / "boolq" / "dev.jsonl", [{"question": "is it", "title": "T", "answer": True, "passage": "P."}])
    (tmp_path / "hellaswag").mkdir()
    with bz2.open(tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("Roof shingle removal: A man is sitting on a roof. he\n3\na.\nb.\nc.\nd.\n")
    work = tmp_path / "work"
    work.mkdir()
    boolq = adapter.build_task("boolq", T.write_local("boolq", tmp_path, work))
    doc = adapter.task_docs(boolq)[0]
    assert boolq.doc_to_text(doc) == "T -- P.\nQuestion: is it?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and boolq.doc_to_target(doc) == 1
    hs = adapter.build_task("hellaswag", T.write_local("hellaswag", tmp_path, work))
    doc = adapter.task_docs(hs)[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_choice(doc) == ["a.", "b.", "c.", "d."] and hs.doc_to_target(doc) == 3


# ---------------------------------------------------------------- adapter vs direct forward pass

def _direct_loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) from one forward pass, tokenized as the tokenizer does."""
    n_spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing context spaces to the continuation
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@pytest.mark.parametrize("bos", [True, False])
def test_adapter_loglikelihood_equals_forward_pass(bos):
    model, tok = tiny_model("llama", seed=3), char_tokenizer(bos=bos)
    lm = adapter.make_lm(model, tok, batch_size=3)
    pairs = [("Question: what is red?\nAnswer:", " an apple"), ("abc", "defgh"), ("Hello there ", "world."),
             ("x", " y")]
    got = adapter.loglikelihood(lm, pairs)
    for (ctx, cont), (ll, _greedy) in zip(pairs, got):
        assert ll == pytest.approx(_direct_loglik(model, tok, ctx, cont), abs=1e-4)
    assert lm.n_requests == len(pairs)


# ---------------------------------------------------------------- exact accuracy on a hand-made task

def test_accuracy_exact_on_hand_made_piqa(tmp_path):
    """Labels are set from the model's own preferences (direct forward pass), so acc and acc_norm are known."""
    model, tok = tiny_model("llama", seed=5), char_tokenizer()
    goals = [("open a jar", "twist the lid", "hit it with a hammer hard"), ("dry hair", "use a towel", "use water"),
             ("cut bread", "use a knife", "use a spoon please"), ("light a room", "turn on lamp", "close eyes"),
             ("boil water", "heat it", "freeze it in the cold"), ("write", "use a pen", "use a rock")]
    rows, labels, want_acc, want_norm = [], [], [], []
    for i, (goal, s1, s2) in enumerate(goals):
        ctx = f"Question: {goal}\nAnswer:"
        ll = [_direct_loglik(model, tok, ctx, " " + s) for s in (s1, s2)]
        pref = int(ll[1] > ll[0])
        pref_norm = int(ll[1] / len(s2) > ll[0] / len(s1))
        label = pref if i % 3 else 1 - pref  # items 0 and 3 are labelled against the model's preference
        rows.append({"goal": goal, "sol1": s1, "sol2": s2})
        labels.append(label)
        want_acc.append(pref == label)
        want_norm.append(pref_norm == label)
    _write_jsonl(tmp_path / "piqa" / "valid.jsonl", rows)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for y in labels))
    out = evaluate_zero_shot(model, tok, "piqa", tmp_path, batch_size=4)
    r = out["tasks"]["piqa"]
    assert r["n"] == r["n_total"] == len(goals) and r["requests"] == 2 * len(goals)
    assert r["acc"] == pytest.approx(sum(want_acc) / len(goals), abs=1e-12)
    assert r["acc"] == pytest.approx(4 / 6, abs=1e-12)
    assert r["acc_norm"] == pytest.approx(sum(want_norm) / len(goals), abs=1e-12)
    p = r["acc"]
    assert r["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(goals) - 1)))
    assert out["mean_acc"] == r["acc"] and out["requests_per_s"] > 0
    assert out["lm_eval_version"] == "0.4.13"


# ---------------------------------------------------------------- errors and the gate

def test_bad_options_raise_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown zero-shot task 'mmlu'.*boolq, piqa"):
        check_zero_shot("boolq,mmlu", tmp_path)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="--limit must be a positive integer"):
            check_zero_shot("piqa", None, bad)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"valid-labels.lst not found in .*piqa"):
        check_zero_shot("piqa", tmp_path)
    with pytest.raises(ConfigError, match="--task-data folder not found"):
        check_zero_shot("piqa", tmp_path / "nope")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="give --task-data DIR"):
        check_zero_shot("piqa", None)
    if DATA_DIR.exists():
        assert check_zero_shot("all", DATA_DIR) == list(T.PAPER_TASKS)


def test_sanity_gate_flags_chance_everywhere():
    def result(accs):
        per = {k: {"acc": v} for k, v in accs.items()}
        from atprune.eval.zeroshot import at_or_below_chance
        return {"tasks": per, "at_or_below_chance_everywhere": at_or_below_chance(per)}

    dense = result({"boolq": 0.62, "arc_easy": 0.55})
    collapsed = result({"boolq": 0.5, "arc_easy": 0.24})
    partial = result({"boolq": 0.49, "arc_easy": 0.30})
    g = sanity_gate(collapsed, dense)
    assert g["flagged"] and not g["dense_at_or_below_chance_everywhere"]
    assert g["acc_drop"] == pytest.approx({"boolq": 0.12, "arc_easy": 0.31})
    assert not sanity_gate(partial, dense)["flagged"]
    assert "DENSE" in sanity_gate(collapsed, collapsed)["reason"]


# ---------------------------------------------------------------- every task on the real files (CI)

FULL = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
        "openbookqa": 500}


def test_all_seven_tasks_on_shared_data_with_limit():
    data = require_data(DATA_DIR / "piqa")
    model, tok = tiny_model("llama", seed=2), char_tokenizer()
    out = evaluate_zero_shot(model, tok, "all", data.parent, limit=6, batch_size=8)
    assert list(out["tasks"]) == list(FULL)
    for name, r in out["tasks"].items():
        assert r["n"] == 6 and r["n_total"] == FULL[name], name
        assert 0 <= r["acc"] <= 1 and r["chance"] == T.TASKS[name].chance
        assert (r["acc_norm"] is None) == (name in ("boolq", "winogrande"))
        choices = {"boolq": 2, "piqa": 2, "winogrande": 2, "hellaswag": 4, "openbookqa": 4}.get(name)
        if choices is None:  # ARC: 3 to 5 choices per question
            choices = sum(len(r["choices"]["text"]) for r in T.TASKS[name].convert(data.parent / name)[:6]) / 6
        assert r["requests"] == 6 * choices, name
    assert out["mean_acc"] == pytest.approx(sum(r["acc"] for r in out["tasks"].values()) / 7)


def test_real_first_records():
    """First records of the real files, as each SOURCE.md describes them, after conversion."""
    require_data(DATA_DIR / "hellaswag")
    hs = T.convert_hellaswag(DATA_DIR / "hellaswag")
    assert len(hs) == 10042 and hs[0]["ctx_b"] == "he" and hs[0]["label"] == "3"
    wg = T.convert_winogrande(DATA_DIR / "winogrande")
    assert wg[0]["answer"] == "2" and wg[0]["sentence"].startswith("Sarah was a much better surgeon")
    bq = T.convert_boolq(DATA_DIR / "boolq")
    assert bq[0]["label"] == 0 and bq[0]["passage"].startswith("Ethanol fuel -- ")
    assert sum(r["label"] for r in bq) == 2033
    ob = T.convert_openbookqa(DATA_DIR / "openbookqa")
    assert ob[0]["id"] == "8-343" and ob[0]["choices"]["label"].index(ob[0]["answerKey"]) == 1
    pq = T.convert_piqa(DATA_DIR / "piqa")
    assert sum(r["label"] for r in pq) == 928


def test_unreachable_hub_is_one_line_config_error(monkeypatch):
    """The online path: a data set that cannot be downloaded is a ConfigError naming --task-data, no traceback."""
    class Offline:
        def load(self, specs):
            raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(adapter, "_task_manager", lambda: Offline())
    with pytest.raises(ConfigError, match=r"task piqa: cannot load its data set \(ConnectionError: Couldn't reach") as e:
        adapter.build_task("piqa")
    assert "\n" not in str(e.value) and "--task-data" in str(e.value)
