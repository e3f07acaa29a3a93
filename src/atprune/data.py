"""Text sources and token windows for calibration and evaluation.

A data spec is a name (``wikitext2``, ``c4``), a file (``.raw``/``.txt``/``.jsonl``/``.json``/``.json.gz``/
``.jsonl.gz``/``.parquet``) or a folder. Named sets are read from a local data folder when one is given
(``data_dir`` / ``$ATPRUNE_DATA_DIR``, laid out like ``wikitext-2-raw-v1/wiki.test.raw``, ``c4/...``) and
otherwise from the Hugging Face hub through ``datasets``.

WikiText rows follow the Hugging Face ``wikitext-2-raw-v1`` layout: a whitespace-only line becomes ``""``,
every other line keeps its ``"\\n"``; the standard evaluation text is ``"\\n\\n".join(rows)``.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atprune.errors import ConfigError

log = logging.getLogger(__name__)

WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
NAMES = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2", "c4": "c4"}
TEXT_SUFFIXES = (".raw", ".txt", ".jsonl", ".json", ".json.gz", ".jsonl.gz", ".parquet")


@dataclass
class TextSource:
    """Documents of one data split. ``joined`` says whether ``documents`` is one ``"\\n\\n"``-joined text."""

    name: str
    split: str
    origin: str
    documents: list[str] = field(repr=False)
    joined: bool = False

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "origin": self.origin, "documents": len(self.documents)}


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``data_dir`` if given, else ``$ATPRUNE_DATA_DIR``, else None."""
    value = data_dir or os.environ.get("ATPRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def wikitext_rows(text: str) -> list[str]:
    """Rows of a WikiText ``.raw`` file as Hugging Face ``datasets`` has them.

    Lines are split the way iterating the opened file splits them (at ``\\n``, ``\\r\\n`` or ``\\r``), not at the
    other characters ``str.splitlines`` treats as breaks (``\\x0c``, ``\\x85``, ``\\u2028``, ...).
    """
    return [line if line.strip() else "" for line in io.StringIO(text, newline=None)]


def _read_records(path: Path) -> list[str]:
    """``text`` fields of a JSON-lines, JSON-array, gzip'ed JSON or parquet file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ConfigError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    stripped = raw.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    texts = [r.get("text") if isinstance(r, dict) else None for r in records]
    if not texts or any(t is None for t in texts):
        raise ConfigError(f"{path}: every record needs a 'text' field")
    return [t for t in texts if t]


def check_readable(spec: str) -> None:
    """Fail fast on a data spec that names a local path that cannot be read.

    Raises:
        ConfigError: for a missing path, a directory without known files, or an unsupported suffix.
    """
    if spec.lower() in NAMES:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"data not found: {spec} (give wikitext2, c4, a .raw/.txt/.jsonl/.json(.gz)/.parquet file or a data folder)")
    if path.is_file():
        if not path.name.lower().endswith(TEXT_SUFFIXES):
            raise ConfigError(f"unsupported data file {spec}; use one of {', '.join(TEXT_SUFFIXES)}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"data file not readable: {spec}")


def _named(spec: str, data_dir) -> tuple[str | None, Path | None]:
    """(name key or None for a plain file, local data folder or None)."""
    key = NAMES.get(spec.lower())
    local = default_data_dir(data_dir)
    if key is None and Path(spec).expanduser().is_dir():
        return "wikitext2", Path(spec).expanduser()
    return key, local


C4_EVAL_DOCUMENTS = 1100  # SparseGPT's C4 protocol: the first 1100 validation documents joined with " " ...
C4_EVAL_WINDOWS = 256  # ... and the first 256 windows of seqlen tokens


def eval_split(spec: str) -> str:
    """The split a perplexity evaluation uses: ``validation`` for C4 (SparseGPT's C4 protocol), else ``test``."""
    return "validation" if NAMES.get(spec.lower()) == "c4" else "test"


def _local_file(key: str, split: str, local: Path) -> Path:
    """The file of named set ``key`` / ``split`` in data folder ``local`` (C4: exact shard, else a sample).

    Raises:
        ConfigError: unknown split, or nothing suitable in the folder.
    """
    files = WIKITEXT_FILES if key == "wikitext2" else C4_FILES
    if split not in files:
        raise ConfigError(f"{key} has splits {', '.join(files)}; got {split!r}")
    name = Path(files[split]).name
    if key == "wikitext2":
        candidates = [local / "wikitext-2-raw-v1" / name, local / name]
    else:
        # the exact shard, else another shard of the same split; for calibration (train) only, any other C4
        # file that is not a validation shard (e.g. a sample), never crossing train and validation
        folder = local / "c4"
        same_split = sorted(folder.glob(f"c4-{split}.*.json.gz")) + sorted(folder.glob(f"c4-{split}.*.jsonl"))
        others = [p for p in sorted(folder.glob("*.json.gz")) + sorted(folder.glob("*.jsonl"))
                  if "validation" not in p.name] if split == "train" else []
        candidates = [folder / name] + same_split + others
    for path in candidates:
        if path.is_file():
            return path
    sub = "wikitext-2-raw-v1" if key == "wikitext2" else "c4"
    raise ConfigError(f"{key} {split} not found in data folder {local} (looked for {sub}/{name})")


def check_available(spec: str, split: str, data_dir: str | os.PathLike | None = None) -> None:
    """Everything :func:`load_text` can check without reading the text: file readable, split known, the
    named set present in the local data folder. Hub downloads are not checked.

    Raises:
        ConfigError: see :func:`load_text`.
    """
    check_readable(spec)
    key, local = _named(spec, data_dir)
    if key is None:
        return
    files = WIKITEXT_FILES if key == "wikitext2" else C4_FILES
    if split not in files:
        raise ConfigError(f"{key} has splits {', '.join(files)}; got {split!r}")
    if local is not None:
        _local_file(key, split, local)


def identity(spec: str, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """What text ``spec``/``split`` actually reads: the resolved local file, or ``hf:<name>:<split>``.

    Two specs with the same identity read the same text (used to keep selection data off the evaluation data).
    """
    key, local = _named(spec, data_dir)
    if key is None:
        return str(Path(spec).expanduser().resolve())
    if local is not None:
        try:
            return str(_local_file(key, split, local).resolve())
        except ConfigError:
            return f"missing:{key}:{split}"
    return f"hf:{key}:{split}"


def load_text(spec: str, split: str, data_dir: str | os.PathLike | None = None) -> TextSource:
    """Load the documents of ``spec`` for ``split`` (``train``, ``validation`` or ``test``).

    A folder spec is treated as a data folder for WikiText-2 (``wiki.<split>.raw`` inside it or in its
    ``wikitext-2-raw-v1/`` subfolder).

    Raises:
        ConfigError: unknown name, unreadable file, unsupported format, no text.
    """
    check_available(spec, split, data_dir)
    key, local = _named(spec, data_dir)
    if key is None:  # a file the user named: it is what it is, whatever role (calibration / evaluation) it plays
        return _load_file(Path(spec).expanduser(), "file")
    if local is not None:
        path = _local_file(key, split, local)
        if key == "c4" and path.name.split(".json")[0] != Path(C4_FILES[split]).name.split(".json")[0]:
            warnings.warn(f"C4 shard {Path(C4_FILES[split]).name} not in {path.parent}; using {path.name}, "
                          "whose numbers are not comparable with published C4-calibrated results")
        source = _load_file(path, split)
        source.name = key
        return source
    try:
        if key == "wikitext2":
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return TextSource("wikitext2", split, "hf:wikitext/wikitext-2-raw-v1", ["\n\n".join(rows)], joined=True)
        return _load_c4_hub(split)
    except Exception as err:  # no network, offline mode, missing shard: one clear line instead of a traceback
        raise ConfigError(f"cannot load {key} {split} from the Hugging Face hub ({type(err).__name__}); give a local "
                          "file, or a data folder with --data-dir / $ATPRUNE_DATA_DIR") from None


def _load_file(path: Path, split: str) -> TextSource:
    name = path.name.lower()
    if name.endswith(".raw"):
        text = "\n\n".join(wikitext_rows(path.read_text(encoding="utf-8")))
        return TextSource(path.name, split, str(path), [text], joined=True)
    if name.endswith(".txt"):
        return TextSource(path.name, split, str(path), [path.read_text(encoding="utf-8")], joined=True)
    docs = _read_records(path)
    if not docs:
        raise ConfigError(f"{path}: no text found")
    return TextSource(path.name, split, str(path), docs)


def _load_c4_hub(split: str) -> TextSource:
    from datasets import load_dataset

    ds = load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
    return TextSource("c4", split, f"hf:allenai/c4/{C4_FILES[split]}", list(ds["text"]))


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
