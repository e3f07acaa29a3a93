"""Text sources (files, folders, named sets read locally) and token windows for calibration / evaluation."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest
import torch

from atprune import data as data_mod
from atprune.data import (
    TextSource,
    calibration_windows,
    eval_set,
    evaluation_tokens,
    load_text,
    sample_windows,
    token_stream,
    wikitext_rows,
)
from atprune.errors import ConfigError
from tests.conftest import DATA_DIR, WIKITEXT, char_tokenizer, require_data

C4_SAMPLE = DATA_DIR / "c4" / "c4-sample.00000-of-00001.jsonl"


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("ATPRUNE_DATA_DIR", raising=False)


def _file_rows(path) -> list[str]:
    """Rows the way the Hugging Face ``wikitext`` builder makes them: iterate the opened file line by line."""
    with open(path, encoding="utf-8") as fh:
        return [row if row.strip() else "" for row in fh]


# ---------------------------------------------------------------- wikitext rows


def test_wikitext_rows_blank_lines_become_empty_and_others_keep_newline():
    text = " \n = Title = \n\t  \nfirst line .\n \nlast line without newline"
    assert wikitext_rows(text) == ["", " = Title = \n", "", "first line .\n", "", "last line without newline"]


def test_wikitext_rows_split_only_at_newline_like_file_iteration(tmp_path):
    # characters str.splitlines() also treats as line breaks, but a file read line by line does not
    # (and a CRLF line, which reading in text mode turns into "\n")
    text = " \nA\x0cB page\n \r\nC\u2028D\x1cE\x85F\r\nG\x1dH\n"
    path = tmp_path / "odd.raw"
    path.write_bytes(text.encode("utf-8"))
    expected = _file_rows(path)
    assert expected == ["", "A\x0cB page\n", "", "C\u2028D\x1cE\x85F\n", "G\x1dH\n"]
    assert wikitext_rows(text) == expected
    assert wikitext_rows(path.read_text(encoding="utf-8")) == expected
    assert load_text(str(path), "test").documents == ["\n\n".join(expected)]


@pytest.mark.parametrize("name, rows, num_bytes", [("wiki.test.raw", 4358, 1_305_092),
                                                   ("wiki.valid.raw", 3760, 1_159_292)])
def test_real_wikitext_rows_match_hf_split(name, rows, num_bytes):
    path = require_data(WIKITEXT / name)
    got = wikitext_rows(path.read_text(encoding="utf-8"))
    assert got == _file_rows(path)
    assert len(got) == rows
    # SOURCE.md: HF Arrow num_bytes = utf-8 bytes of the rows + 4 bytes of offset per row + 4
    assert sum(len(r.encode("utf-8")) for r in got) + 4 * len(got) + 4 == num_bytes
    assert all(r == "" or r.endswith("\n") for r in got)


def test_real_wikitext_test_starts_like_source_md():
    path = require_data(WIKITEXT / "wiki.test.raw")
    source = load_text(str(path), "test")
    assert source.joined and len(source.documents) == 1
    assert source.documents[0].startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert source.documents[0] == "\n\n".join(_file_rows(path))


# ---------------------------------------------------------------- load_text: files


def test_load_raw_file(tmp_path):
    path = tmp_path / "x.raw"
    path.write_text(" \n = T = \n \nbody .\n", encoding="utf-8")
    src = load_text(str(path), "test")
    assert src.documents == ["\n\n = T = \n\n\n\n\nbody .\n"]
    assert src.joined and src.split == "file" and src.origin == str(path)  # no split label made up for a file
    assert load_text(str(path), "train").split == "file"


def test_load_txt_file_is_one_document_verbatim(tmp_path):
    text = " \nline one\n\n  \nline two"
    path = tmp_path / "x.txt"
    path.write_text(text, encoding="utf-8")
    src = load_text(str(path), "train")
    assert src.documents == [text] and src.joined


RECORDS = [{"text": "first doc", "url": "a"}, {"text": ""}, {"text": "second\ndoc", "n": 2}, {"text": "third"}]
TEXTS = ["first doc", "second\ndoc", "third"]  # empty texts are dropped


def test_load_jsonl(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    src = load_text(str(path), "train")
    assert src.documents == TEXTS and not src.joined


def test_load_json_array(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("  \n" + json.dumps(RECORDS, indent=1), encoding="utf-8")
    assert load_text(str(path), "train").documents == TEXTS


@pytest.mark.parametrize("suffix", [".json.gz", ".jsonl.gz"])
def test_load_gzip_json_lines(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in RECORDS))
    assert load_text(str(path), "train").documents == TEXTS


def test_load_parquet(tmp_path):
    import pyarrow as pa  # a hard dependency: a broken install fails here, it does not skip
    import pyarrow.parquet as pq
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta gamma"], "id": [1, 2, 3, 4]}), path)
    src = load_text(str(path), "train")
    assert src.documents == ["alpha", "beta gamma"] and not src.joined
    bad = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(ConfigError, match="no 'text' column"):
        load_text(str(bad), "train")


# ---------------------------------------------------------------- load_text: folders and named sets


def test_wikitext2_from_data_dir_and_folder_specs():
    path = require_data(WIKITEXT / "wiki.test.raw")
    expected = "\n\n".join(_file_rows(path))
    by_name = load_text("wikitext2", "test", data_dir=DATA_DIR)
    assert by_name.name == "wikitext2" and by_name.documents == [expected] and by_name.origin == str(path)
    assert load_text(str(DATA_DIR), "test").documents == [expected]  # folder holding wikitext-2-raw-v1/
    valid = load_text(str(WIKITEXT), "validation")  # the wikitext folder itself
    assert valid.documents == ["\n\n".join(_file_rows(WIKITEXT / "wiki.valid.raw"))]


def test_wikitext2_from_env_data_dir(monkeypatch, tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \nhello\n", encoding="utf-8")
    monkeypatch.setenv("ATPRUNE_DATA_DIR", str(tmp_path))
    assert load_text("WikiText-2", "test").documents == ["\n\nhello\n"]


def test_c4_name_with_only_the_sample_warns_and_uses_it():
    require_data(C4_SAMPLE)
    with open(C4_SAMPLE, encoding="utf-8") as fh:
        expected = [json.loads(line)["text"] for line in fh if line.strip()]
    assert len(expected) == 1000
    with pytest.warns(UserWarning, match="not comparable"):
        src = load_text("c4", "train", data_dir=DATA_DIR)
    assert src.name == "c4" and src.documents == expected and not src.joined
    assert "c4-sample" in src.origin
    # evaluation never falls back to a file that is not a validation shard (it may be the calibration text)
    with pytest.raises(ConfigError, match="c4 validation not found"):
        load_text("c4", "validation", data_dir=DATA_DIR)


def test_c4_splits_never_cross(tmp_path):
    folder = tmp_path / "c4"
    folder.mkdir()
    (folder / "c4-validation.00001-of-00008.jsonl").write_text(json.dumps({"text": "val doc"}) + "\n")
    with pytest.raises(ConfigError, match="c4 train not found"):
        load_text("c4", "train", data_dir=tmp_path)
    with pytest.warns(UserWarning, match="not comparable"):
        assert load_text("c4", "validation", data_dir=tmp_path).documents == ["val doc"]


def test_c4_exact_shard_is_used_without_warning(tmp_path):
    shard = tmp_path / "c4" / "c4-train.00000-of-01024.json.gz"
    shard.parent.mkdir()
    with gzip.open(shard, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "real shard doc"}) + "\n")
    # a decoy that must not be picked when the exact shard exists
    (tmp_path / "c4" / "a-sample.jsonl").write_text(json.dumps({"text": "decoy"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = load_text("c4", "train", data_dir=tmp_path)
    assert src.documents == ["real shard doc"] and src.origin == str(shard)


# ---------------------------------------------------------------- load_text: errors


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="data not found"):
        load_text(str(tmp_path / "missing.txt"), "train")
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="unsupported data file"):
        load_text(str(csv), "train")
    notext = tmp_path / "x.jsonl"
    notext.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ConfigError, match="'text' field"):
        load_text(str(notext), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError):
        load_text(str(empty), "train")
    with pytest.raises(ConfigError, match="splits"):
        load_text("wikitext2", "dev", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="splits"):
        load_text("c4", "test", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="not found in data folder"):
        load_text("wikitext2", "test", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="c4 train not found in data folder"):
        load_text("c4", "train", data_dir=tmp_path)


def test_wikitext2_train_missing_in_shared_folder_is_a_config_error():
    require_data(WIKITEXT)
    if (WIKITEXT / "wiki.train.raw").exists():
        pytest.skip("the shared folder has the train split")
    with pytest.raises(ConfigError, match="wiki.train.raw"):
        load_text("wikitext2", "train", data_dir=DATA_DIR)


# ---------------------------------------------------------------- sample_windows


def _check_disjoint_contiguous(groups, n, seqlen):
    seen = []
    for g in groups:
        assert g.dtype == torch.long and g.dim() == 2 and g.shape[1] == seqlen
        for w in g:
            assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + seqlen))  # a contiguous slice
            assert 0 <= int(w[0]) and int(w[-1]) < n
            seen.extend(w.tolist())
    assert len(seen) == len(set(seen)), "two windows share a token"
    return seen


def test_sample_windows_contiguous_disjoint_within_and_across_groups():
    n, seqlen = 1000, 16  # 62 slots, 8 spare tokens
    stream = torch.arange(n)
    groups = sample_windows(stream, seqlen, [20, 30, 5], seed=3)
    assert [g.shape[0] for g in groups] == [20, 30, 5]
    _check_disjoint_contiguous(groups, n, seqlen)


def test_sample_windows_deterministic_and_seed_dependent():
    stream = torch.arange(4000)
    a = sample_windows(stream, 32, [8, 4], seed=7)
    b = sample_windows(stream, 32, [8, 4], seed=7)
    c = sample_windows(stream, 32, [8, 4], seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sample_windows_short_groups_when_slots_run_out():
    n, seqlen = 100, 16  # 6 slots
    groups = sample_windows(torch.arange(n), seqlen, [4, 4, 3], seed=0)
    assert [tuple(g.shape) for g in groups] == [(4, 16), (2, 16), (0, 16)]
    assert groups[2].dtype == torch.long
    _check_disjoint_contiguous(groups, n, seqlen)


def test_sample_windows_cover_the_whole_stream_when_it_divides():
    groups = sample_windows(torch.arange(96), 16, [6], seed=1)
    assert sorted(_check_disjoint_contiguous(groups, 96, 16)) == list(range(96))


# ---------------------------------------------------------------- token streams, calibration windows


def _random_text(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    alphabet = "abcdefghij klmnop.\nQRS"
    return "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=g).tolist())


def _is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    cand = stream.unfold(0, window.numel(), 1)
    return bool((cand == window).all(dim=1).any())


@pytest.mark.parametrize("bos", [True, False])
def test_token_stream_separators_follow_bos_policy(bos):
    tok = char_tokenizer(bos)
    src = TextSource("d", "train", "mem", ["ab", "cde", "f"])
    stream = token_stream(tok, src, seed=0).tolist()
    ids = {d: tok(d)["input_ids"] for d in src.documents}
    if bos:  # every document starts with its BOS, no EOS added
        assert len(stream) == 3 + 6 and stream.count(tok.bos_token_id) == 3 and tok.eos_token_id not in stream
    else:  # an EOS after every document
        assert len(stream) == 6 + 3 and stream.count(tok.eos_token_id) == 3 and tok.bos_token_id not in stream
    sep = [] if bos else [tok.eos_token_id]
    pieces, rest = [], stream
    while rest:
        doc = next(d for d in src.documents if rest[: len(ids[d]) + len(sep)] == ids[d] + sep)
        pieces.append(doc)
        rest = rest[len(ids[doc]) + len(sep):]
    assert sorted(pieces) == sorted(src.documents)


def test_calibration_windows_shape_and_slices():
    tok = char_tokenizer(bos=False)
    text = _random_text(3000)
    src = TextSource("t", "train", "mem", [text], joined=True)
    cw = calibration_windows(tok, src, nsamples=10, seqlen=32, seed=0)
    assert cw.windows.shape == (10, 32) and cw.windows.dtype == torch.int64
    stream = torch.tensor(tok(text)["input_ids"])
    assert all(_is_slice_of(w, stream) for w in cw.windows)
    assert cw.info["nsamples"] == 10 and cw.info["nsamples_requested"] == 10 and cw.info["tokens"] == 320
    assert cw.info["bos_added"] is False
    again = calibration_windows(tok, src, nsamples=10, seqlen=32, seed=0)
    assert torch.equal(cw.windows, again.windows)


def test_calibration_windows_shortfall_warns_and_records_count():
    tok = char_tokenizer(bos=True)
    text = _random_text(100)  # 101 tokens with the BOS -> 3 windows of 32
    src = TextSource("t", "train", "mem", [text], joined=True)
    with pytest.warns(UserWarning, match="only 3 windows"):
        cw = calibration_windows(tok, src, nsamples=8, seqlen=32, seed=0)
    assert cw.windows.shape == (3, 32)
    assert cw.info["nsamples"] == 3 and cw.info["nsamples_requested"] == 8 and cw.info["tokens_available"] == 101
    with pytest.raises(ConfigError, match="strict"):
        calibration_windows(tok, src, nsamples=8, seqlen=32, seed=0, strict=True)
    with pytest.raises(ConfigError, match="too few calibration tokens"):
        calibration_windows(tok, src, nsamples=8, seqlen=200, seed=0)


# ---------------------------------------------------------------- evaluation tokens


@pytest.mark.parametrize("bos", [True, False])
def test_evaluation_tokens_bos_policy(bos):
    """The stream holds the text tokens only; a BOS-adding tokenizer's BOS id is recorded for the windows."""
    tok = char_tokenizer(bos)
    docs = ["first doc", "second one", "third"]
    ids, info = evaluation_tokens(tok, TextSource("d", "test", "mem", docs))
    joined = "first doc\n\nsecond one\n\nthird"
    expected = [tok.convert_tokens_to_ids(c) for c in joined]
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    assert tok.bos_token_id not in ids.tolist()
    assert info["bos_token_id"] == (1 if bos else None)
    assert ("every window is BOS (id 1)" in info["bos_policy"]) == bos
    assert ("no BOS" in info["bos_policy"]) == (not bos)
    assert info["documents"] == 3 and info["split"] == "test"


@pytest.mark.parametrize("bos", [True, False])
def test_every_evaluation_window_starts_with_bos_iff_the_tokenizer_adds_it(bos):
    """Gemma-style tokenizers (BOS added) get BOS at the start of every perplexity window, SmolLM2-style ones
    (no BOS) get plain slices; both predict seqlen - 1 text tokens per window and cover the text in order."""
    from atprune.api import evaluate_perplexity
    from tests.conftest import tiny_model

    tok = char_tokenizer(bos)
    text = _random_text(16 * 7 + 3)
    model = tiny_model("llama", layers=2)
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    es = eval_set_from_text(tok, text)
    result = evaluate_perplexity(model, tok, es, seqlen=16, batch_size=2, progress=False)
    handle.remove()
    windows = torch.cat(seen)
    text_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in text])
    step = 15 if bos else 16
    assert result["windows"] == windows.shape[0] == len(text) // step and windows.shape[1] == 16
    assert result["bos_per_window"] is bos and result["predicted_tokens"] == windows.shape[0] * 15
    if bos:
        assert (windows[:, 0] == tok.bos_token_id).all() and (windows[:, 1:] != tok.bos_token_id).all()
        assert torch.equal(windows[:, 1:].flatten(), text_ids[: windows.shape[0] * 15])
    else:
        assert (windows != tok.bos_token_id).all()
        assert torch.equal(windows.flatten(), text_ids[: windows.shape[0] * 16])


def eval_set_from_text(tok, text):
    from atprune.data import EvalSet

    return EvalSet(*evaluation_tokens(tok, TextSource("t", "test", "mem", [text], joined=True)))


@pytest.mark.parametrize("bos", [True, False])
def test_calibration_windows_follow_the_bos_policy(bos):
    tok = char_tokenizer(bos)
    text = _random_text(3000)
    cw = calibration_windows(tok, TextSource("t", "train", "mem", [text], joined=True), nsamples=8, seqlen=32, seed=0)
    stream = torch.tensor(tok(text)["input_ids"])
    assert cw.windows.shape == (8, 32) and cw.info["bos_added"] is bos
    if bos:
        assert (cw.windows[:, 0] == tok.bos_token_id).all()
        assert all(_is_slice_of(w[1:], stream[1:]) for w in cw.windows)
    else:
        assert (cw.windows != tok.bos_token_id).all() and all(_is_slice_of(w, stream) for w in cw.windows)


def test_eval_set_reads_a_txt_file_once(tmp_path):
    tok = char_tokenizer(bos=False)
    path = tmp_path / "e.txt"
    path.write_text("abc\n\ndef", encoding="utf-8")
    es = eval_set(tok, str(path), "test")
    assert es.tokens.tolist() == [tok.convert_tokens_to_ids(c) for c in "abc\n\ndef"]
    assert es.info["dataset"] == "e.txt" and "no BOS" in es.info["bos_policy"]


def test_check_readable_accepts_names_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    kinds = [data_mod.check_readable(spec) for spec in ("c4", "wikitext2", "WikiText", str(tmp_path),
                                                         str(tmp_path / "a.txt"))]
    assert kinds == ["named", "named", "named", "folder", "file"]


def test_c4_evaluation_follows_sparsegpt_protocol(tmp_path):
    from atprune.api import evaluate_perplexity
    from tests.conftest import tiny_model

    folder = tmp_path / "c4"
    folder.mkdir()
    docs = [f"doc{i} text" for i in range(1200)]
    with open(folder / "c4-validation.00000-of-00008.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    tok = char_tokenizer(bos=False)
    es = eval_set(tok, "c4", "validation", data_dir=tmp_path)
    expected = tok(" ".join(docs[:1100]))["input_ids"]
    assert es.tokens.tolist() == expected and es.info["max_windows"] == 256
    result = evaluate_perplexity(tiny_model("llama"), tok, es, seqlen=8, progress=False)
    assert result["windows"] == 256 < result["windows_total"]


def test_hub_sets_offline_give_a_one_line_config_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("ATPRUNE_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="cannot load wikitext2 test from the Hugging Face hub"):
        load_text("wikitext2", "test")
