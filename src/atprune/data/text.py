"""Text sources for calibration and evaluation: named sets, local files and folders.

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


def check_readable(spec: str) -> str:
    """Fail fast on a data spec that names a local path that cannot be read.

    Returns:
        What the spec is: ``"named"`` (a named set such as ``c4``, resolved later), ``"folder"`` or ``"file"``.

    Raises:
        ConfigError: for a missing path, a directory without known files, or an unsupported suffix.
    """
    if spec.lower() in NAMES:
        return "named"
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"data not found: {spec} (give wikitext2, c4, a .raw/.txt/.jsonl/.json(.gz)/.parquet file or a data folder)")
    if path.is_file():
        if not path.name.lower().endswith(TEXT_SUFFIXES):
            raise ConfigError(f"unsupported data file {spec}; use one of {', '.join(TEXT_SUFFIXES)}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"data file not readable: {spec}")
        return "file"
    return "folder"


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
