"""Check a tokenizer that transformers built from a GGUF file against the file's own tokenizer metadata.

transformers converts the GGUF tokenizer (``tokenizer.ggml.*`` keys) into a Hugging Face tokenizer itself, and how
well it does so depends on its version: for the Gemma 3 GGUF, transformers 5.17 adds no BOS and merges wrongly
(``▁w or ld``), 5.19-5.21 merge right but add no BOS, 5.23 and later are right (issue 21; the measured table is in
docs/architectures.md). A wrong tokenizer gives numbers that are silently wrong, so :func:`check_gguf_tokenizer`
compares the tokenizer with the file before any work:

(a) the special-token rule: the tokenizer puts the BOS (id ``tokenizer.ggml.bos_token_id``) before a text iff the
    file's ``tokenizer.ggml.add_bos_token`` says so, and an EOS after it iff ``tokenizer.ggml.add_eos_token`` says so;
(b) probe words: common English words that the file's vocabulary ``tokenizer.ggml.tokens`` holds as one token with
    the word-start marker (SentencePiece ``▁``, GPT-2 byte-level ``Ġ``) encode to exactly that one token id;
(c) the round trip ``decode(encode(text)) == text`` on a probe text with punctuation, digits, accents, CJK,
    doubled spaces, a tab and newlines.

Only the metadata is read (``gguf.GGUFReader`` maps the file; no tensor data is read). This module imports only
:mod:`atprune.errors` and third-party packages.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from atprune.errors import ConfigError

#: the oldest transformers release whose GGUF tokenizers pass this check for every built-in alias (measured, see
#: docs/architectures.md, "GGUF tokenizers and the transformers version")
KNOWN_GOOD_TRANSFORMERS = "5.23.0"

#: candidate probe words, in this order; a word is a probe when the file's vocabulary holds it, with the word-start
#: marker, as a single normal token
PROBE_WORDS = ("the", "world", "this", "that", "with", "from", "people", "language", "first", "would", "after",
               "about")
MAX_PROBES = 8
MIN_PROBES = 3
MESSAGE_PROBLEMS = 3  # problems named in the one-line message; the check's record keeps them all

#: decoded back unchanged by a correct tokenizer (no BOS/EOS in it; no leading space)
PROBE_TEXT = ("Hello world, this is a test of the tokenizer: 12.50 EUR (naïve café), Tōkyō 東京 — done!\n"
              "Two  spaces,\ta tab; and\n\nthe end.")

_WORD_START = {"llama": "\u2581", "gpt2": "\u0120"}  # SentencePiece ▁ / GPT-2 byte-level Ġ (for a space)
# llama.cpp's defaults where a file lacks the key (llama: SentencePiece, gpt2: byte-level BPE)
_DEFAULT_ADD_BOS = {"llama": True, "gpt2": False}
_DEFAULT_SPACE_PREFIX = {"llama": True, "gpt2": False}
_NORMAL = 1  # tokenizer.ggml.token_type of an ordinary token (llama.cpp LLAMA_TOKEN_TYPE_NORMAL)


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """What a GGUF file says about its tokenizer (see :func:`read_gguf_tokenizer`).

    ``add_bos`` is None when the file lacks ``tokenizer.ggml.add_bos_token`` and its tokenizer model has no known
    default (the BOS rule is then not checked).
    """

    model: str  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (byte-level BPE), ...
    tokens: list[str] = field(repr=False)
    token_types: list[int] | None = field(repr=False)
    add_bos: bool | None
    add_eos: bool
    bos_id: int | None
    eos_id: int | None
    add_space_prefix: bool


def _field(fields, key: str, default=None):
    return fields[key].contents() if key in fields else default


def read_gguf_tokenizer(gguf_path: str | os.PathLike) -> GGUFTokenizerInfo:
    """Read the ``tokenizer.ggml.*`` metadata of a GGUF file with ``gguf.GGUFReader`` (memory-mapped; tensor data
    is not read).

    Missing ``add_bos_token`` / ``add_space_prefix`` keys take llama.cpp's defaults for the tokenizer model (llama:
    BOS and a space prefix; gpt2: neither); a missing ``add_eos_token`` means no EOS.

    Raises:
        ConfigError: the gguf package is missing, the file cannot be read as GGUF, or it has no
            ``tokenizer.ggml.tokens``.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading .gguf models needs the gguf package: pip install gguf") from None
    try:
        fields = GGUFReader(os.fspath(gguf_path)).fields
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the GGUF metadata of {gguf_path}: {err}") from None
    if "tokenizer.ggml.tokens" not in fields:
        raise ConfigError(f"{gguf_path}: GGUF metadata has no tokenizer.ggml.tokens")
    model = str(_field(fields, "tokenizer.ggml.model", ""))
    add_bos = _field(fields, "tokenizer.ggml.add_bos_token", _DEFAULT_ADD_BOS.get(model))
    bos_id, eos_id = _field(fields, "tokenizer.ggml.bos_token_id"), _field(fields, "tokenizer.ggml.eos_token_id")
    types = _field(fields, "tokenizer.ggml.token_type")
    return GGUFTokenizerInfo(
        model=model, tokens=[str(t) for t in fields["tokenizer.ggml.tokens"].contents()],
        token_types=[int(t) for t in types] if types is not None else None,
        add_bos=None if add_bos is None else bool(add_bos),
        add_eos=bool(_field(fields, "tokenizer.ggml.add_eos_token", False)),
        bos_id=None if bos_id is None else int(bos_id), eos_id=None if eos_id is None else int(eos_id),
        add_space_prefix=bool(_field(fields, "tokenizer.ggml.add_space_prefix",
                                     _DEFAULT_SPACE_PREFIX.get(model, False))))


def probe_tokens(info: GGUFTokenizerInfo) -> dict[str, int]:
    """The probe words of (b), chosen from the file's own vocabulary: ``{text: token id}`` where ``text`` is the
    word as it appears after a space (``" world"``; without the space when the file adds a space prefix itself).

    Takes the words of ``PROBE_WORDS`` (in that order, at most ``MAX_PROBES``) that the vocabulary holds as one
    normal token with the word-start marker; if fewer than ``MIN_PROBES`` are found, adds the lowest-id normal
    tokens made of the marker and 4-10 lowercase ASCII letters. Empty for a tokenizer model without a known marker.
    """
    marker = _WORD_START.get(info.model)
    if marker is None:
        return {}
    index = {tok: i for i, tok in reversed(list(enumerate(info.tokens)))}  # first id of each token string

    def normal(i: int) -> bool:
        return info.token_types is None or info.token_types[i] == _NORMAL

    words = [w for w in PROBE_WORDS if marker + w in index and normal(index[marker + w])][:MAX_PROBES]
    if len(words) < MIN_PROBES:
        for i, tok in enumerate(info.tokens):
            word = tok[len(marker):]
            if (tok.startswith(marker) and 4 <= len(word) <= 10 and word.isascii() and word.isalpha()
                    and word.islower() and normal(i) and word not in words):
                words.append(word)
                if len(words) >= MIN_PROBES:
                    break
    space = "" if info.add_space_prefix else " "
    return {space + w: index[marker + w] for w in words}


@dataclass(frozen=True)
class TokenizerCheck:
    """The outcome of :func:`check_gguf_tokenizer`: ``problems`` is empty when the tokenizer matches the file.

    ``to_dict()`` is what a report records (``ok``, ``problems``, the versions, the probes and the BOS rule).
    """

    gguf_path: str
    transformers: str
    tokenizers: str
    add_bos: bool | None
    bos_id: int | None
    probes: dict[str, int]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        """One line naming the mismatches (the first ``MESSAGE_PROBLEMS``, then how many more), the transformers
        version found and the one known to work."""
        shown = "; ".join(self.problems[:MESSAGE_PROBLEMS])
        if len(self.problems) > MESSAGE_PROBLEMS:
            shown += f"; and {len(self.problems) - MESSAGE_PROBLEMS} more"
        return (f"the tokenizer that transformers {self.transformers} (tokenizers {self.tokenizers}) built from "
                f"{os.path.basename(self.gguf_path)} does not match the file: {shown}; "
                f"transformers>={KNOWN_GOOD_TRANSFORMERS} is known to build it right (pip install "
                f"'transformers>={KNOWN_GOOD_TRANSFORMERS}')")

    def raise_if_bad(self) -> None:
        """Raises:
            ConfigError: :meth:`message` when there is a mismatch."""
        if self.problems:
            raise ConfigError(self.message())

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "problems": list(self.problems)}


def _versions() -> tuple[str, str]:
    import tokenizers
    import transformers

    return transformers.__version__, tokenizers.__version__


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _special_rule_problems(tokenizer, info: GGUFTokenizerInfo, text: str) -> list[str]:
    """(a): the ids with special tokens must be the file's BOS (iff add_bos_token), the plain ids, the file's EOS
    (iff add_eos_token). Not checked when the file gives no BOS rule (``add_bos`` None) or no BOS id."""
    if info.add_bos is None or info.bos_id is None:
        return []
    problems = []
    with_special, plain = _encode(tokenizer, text, True), _encode(tokenizer, text, False)
    expected = ([info.bos_id] if info.add_bos else []) + plain
    expected += [info.eos_id] if info.add_eos and info.eos_id is not None else []
    if with_special != expected:
        added_bos = with_special[:1] == [info.bos_id] and plain[:1] != [info.bos_id]
        if info.add_bos and not added_bos:
            problems.append(f"the file says add_bos_token=true (BOS id {info.bos_id}) but the tokenizer adds no BOS")
        elif not info.add_bos and added_bos:
            problems.append(f"the file says add_bos_token=false but the tokenizer adds BOS id {info.bos_id}")
        else:
            problems.append(f"with special tokens the tokenizer gives ids {with_special[:2]}...{with_special[-2:]} "
                            f"where the file's rule (add_bos_token={str(info.add_bos).lower()}, "
                            f"add_eos_token={str(info.add_eos).lower()}) gives {expected[:2]}...{expected[-2:]}")
    tok_bos = getattr(tokenizer, "bos_token_id", None)
    if tok_bos is not None and tok_bos != info.bos_id:
        problems.append(f"tokenizer.bos_token_id is {tok_bos}, the file's tokenizer.ggml.bos_token_id is {info.bos_id}")
    return problems


def check_gguf_tokenizer(tokenizer, gguf_path: str | os.PathLike, info: GGUFTokenizerInfo | None = None
                         ) -> TokenizerCheck:
    """Compare a Hugging Face ``tokenizer`` (built from ``gguf_path``, e.g. by ``AutoTokenizer.from_pretrained(dir,
    gguf_file=name)``) with the GGUF file's tokenizer metadata: (a) the BOS/EOS rule, (b) the probe words of
    :func:`probe_tokens` as single tokens with the file's ids, (c) ``decode(encode(PROBE_TEXT)) == PROBE_TEXT``.

    Args:
        tokenizer: a transformers tokenizer (anything with ``__call__(text, add_special_tokens=...)``,
            ``decode`` and ``convert_ids_to_tokens``).
        gguf_path: the GGUF file the tokenizer came from.
        info: the file's metadata if already read (:func:`read_gguf_tokenizer`); read from ``gguf_path`` otherwise.

    Returns:
        A :class:`TokenizerCheck`; call ``raise_if_bad()`` to turn a mismatch into an error.

    Raises:
        ConfigError: the file's metadata cannot be read (see :func:`read_gguf_tokenizer`).
    """
    info = info if info is not None else read_gguf_tokenizer(gguf_path)
    problems = _special_rule_problems(tokenizer, info, PROBE_TEXT)
    if info.bos_id is not None and 0 <= info.bos_id < len(info.tokens):
        name = tokenizer.convert_ids_to_tokens(info.bos_id)
        if name != info.tokens[info.bos_id]:
            problems.append(f"id {info.bos_id} is {name!r} in the tokenizer but the file's BOS "
                            f"{info.tokens[info.bos_id]!r}")
    probes = probe_tokens(info)
    for text, token_id in probes.items():
        ids = _encode(tokenizer, text, False)
        if ids != [token_id]:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            problems.append(f"{text!r} encodes to {' '.join(map(str, pieces))} (ids {ids}) instead of the file's "
                            f"single token {info.tokens[token_id]} (id {token_id})")
    ids = _encode(tokenizer, PROBE_TEXT, False)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != PROBE_TEXT:
        at = next((i for i, (a, b) in enumerate(zip(back, PROBE_TEXT)) if a != b), min(len(back), len(PROBE_TEXT)))
        problems.append(f"decode(encode(text)) differs from the text at character {at} "
                        f"({PROBE_TEXT[at:at + 12]!r} became {back[at:at + 12]!r})")
    transformers_version, tokenizers_version = _versions()
    return TokenizerCheck(gguf_path=os.fspath(gguf_path), transformers=transformers_version,
                          tokenizers=tokenizers_version, add_bos=info.add_bos, bos_id=info.bos_id, probes=probes,
                          problems=tuple(problems))


def tokenizer_record(tokenizer) -> tuple[dict | None, list[str]]:
    """What a report records of a loaded tokenizer's GGUF check: ``(check.to_dict() or None, warnings)``; the
    warning (one line) is there only when a mismatch was allowed (``load_model(..., allow_tokenizer_mismatch=True)``).
    None for tokenizers not built from a GGUF file."""
    check = getattr(tokenizer, "atprune_gguf_check", None)
    if check is None:
        return None, []
    return check.to_dict(), ([] if check.ok else [f"TOKENIZER MISMATCH ALLOWED: {check.message()}"])
