"""The seven zero-shot tasks of the pruning literature, and converters from local original-format files.

Each converter reads the data set's original release format (the files in ``shared/data``, see each
folder's SOURCE.md) and returns records in the schema of the Hugging Face data set that the stock lm-eval
task downloads. The stock task definition (prompt, choices, target, metrics) is then run on those records
unchanged, so the offline path builds the same prompts as the online one wherever the local text is the
same text (see ``TaskInfo.note`` for where it is not).
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from atprune.errors import ConfigError


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path, n: int, data: Path) -> list[int]:
    labels = [int(x) for x in path.read_text().split()]
    if len(labels) != n:
        raise ConfigError(f"{path} has {len(labels)} labels for {n} records in {data}")
    return labels


def convert_boolq(folder: Path) -> list[dict]:
    """BoolQ ``dev.jsonl`` (``question, title, answer: bool, passage``) -> SuperGLUE BoolQ
    (``question, passage = title + " -- " + passage, idx, label = int(answer)``)."""
    return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(_jsonl(folder / "dev.jsonl"))]


def convert_piqa(folder: Path) -> list[dict]:
    """PIQA ``valid.jsonl`` (``goal, sol1, sol2``) + ``valid-labels.lst`` (0/1 per line) -> ``goal, sol1, sol2, label``."""
    rows = _jsonl(folder / "valid.jsonl")
    labels = _labels(folder / "valid-labels.lst", len(rows), folder / "valid.jsonl")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(rows, labels)]


def convert_winogrande(folder: Path) -> list[dict]:
    """WinoGrande 1.1 ``dev.jsonl`` (``qID, sentence, option1, option2, answer: "1"|"2"``) -> the HF
    ``winogrande_xl`` schema (``sentence, option1, option2, answer`` as a string)."""
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])}
            for r in _jsonl(folder / "dev.jsonl")]


def _arc_record(r: dict) -> dict:
    q = r["question"]
    if isinstance(q, dict):  # original AI2 jsonl: question {stem, choices: [{text, label}]}
        choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
        q = q["stem"]
    else:  # HF export: question, choices {text: [...], label: [...]}
        choices = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
    return {"id": r["id"], "question": q, "choices": choices, "answerKey": r["answerKey"]}


def _read_arc(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return [_arc_record(r) for r in rows]


ARC_EASY_FILES = ("test.json", "ARC-Easy-Test.jsonl")
ARC_CHALLENGE_FILES = ("ARC-Challenge-Test.jsonl", "test.json")


def convert_arc_easy(folder: Path) -> list[dict]:
    """ARC-Easy test, HF export (JSON array) or original AI2 jsonl -> HF ``ai2_arc`` schema
    (``id, question, choices {text, label}, answerKey``)."""
    return _read_arc(_first(folder, ARC_EASY_FILES))


def convert_arc_challenge(folder: Path) -> list[dict]:
    """ARC-Challenge test, original AI2 jsonl (``question {stem, choices}``) or HF export -> HF ``ai2_arc`` schema."""
    return _read_arc(_first(folder, ARC_CHALLENGE_FILES))


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"none of {', '.join(names)} found in {folder}")


def convert_openbookqa(folder: Path) -> list[dict]:
    """OpenBookQA main ``test.jsonl`` (``id, question {stem, choices: [{text, label}]}, answerKey``) -> HF
    ``main`` schema (``id, question_stem, choices {text, label}, answerKey``)."""
    out = []
    for r in _jsonl(folder / "test.jsonl"):
        q = r["question"]
        out.append({"id": r["id"], "question_stem": q["stem"], "answerKey": r["answerKey"],
                    "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}})
    return out


def _split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Split a joined HellaSwag context into (ctx_a, ctx_b): ctx_b is the unfinished last sentence when it
    starts lower-case after ". " (ActivityNet items, e.g. "... on a roof. he"), else empty."""
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        return head + ".", tail
    return ctx, ""


def convert_hellaswag(folder: Path) -> list[dict]:
    """HellaSwag validation in llama.cpp's text format (6 lines per item: ``<activity_label>: <ctx>``, gold
    0-3, four endings; ``hellaswag_val_full.txt.bz2`` or ``.txt``) -> HF ``Rowan/hellaswag`` fields used by
    the stock task (``activity_label, ctx_a, ctx_b, ctx, endings, label`` as a string).

    The text was already preprocessed by llama.cpp and ``ctx_a``/``ctx_b`` were joined without
    capitalising ``ctx_b``; :func:`_split_hellaswag_context` recovers the split, so lm-eval's
    ``ctx_b.capitalize()`` applies as online (a heuristic, see the task note).
    """
    path = folder / "hellaswag_val_full.txt.bz2"
    text = bz2.open(path, "rt", encoding="utf-8").read() if path.exists() else \
        (folder / "hellaswag_val_full.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ConfigError(f"{path}: {len(lines)} lines, not a multiple of 6 (llama.cpp HellaSwag format)")
    out = []
    for i in range(0, len(lines), 6):
        label, _, ctx = lines[i].partition(": ")
        ctx_a, ctx_b = _split_hellaswag_context(ctx)
        out.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "endings": lines[i + 2:i + 6], "source_id": "", "split": "val", "split_type": "",
                    "label": str(int(lines[i + 1]))})
    return out


@dataclass(frozen=True)
class TaskInfo:
    """One zero-shot task: its lm-eval name, chance accuracy, local files and converter."""

    name: str
    chance: float  # accuracy of a uniform random guess (1 / number of choices)
    folder: str  # sub-folder of --task-data
    files: tuple[tuple[str, ...], ...]  # each entry: alternatives, one of which must exist
    split: str  # the split the stock task evaluates (validation or test)
    convert: Callable[[Path], list[dict]]
    note: str = ""  # where the local copy differs from what lm-eval downloads


TASKS: dict[str, TaskInfo] = {t.name: t for t in [
    TaskInfo("boolq", 0.5, "boolq", (("dev.jsonl",),), "validation", convert_boolq,
             "local: original Google BoolQ dev; lm-eval reads SuperGLUE BoolQ. Passage rebuilt as "
             "'<title> -- <passage>' (inferred SuperGLUE prefix, not byte-verified)"),
    TaskInfo("piqa", 0.5, "piqa", (("valid.jsonl",), ("valid-labels.lst",)), "validation", convert_piqa,
             "local: authors' valid.jsonl + labels, byte-exact to the HF split"),
    TaskInfo("hellaswag", 0.25, "hellaswag", (("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"),), "validation",
             convert_hellaswag,
             "local: llama.cpp text format (derived), not the original jsonl; its preprocessing matches lm-eval's "
             "except leftover [...] text, which the stock preprocess removes; ctx_a/ctx_b split recovered by a "
             "heuristic (unfinished lower-case last sentence) so that lm-eval's ctx_b.capitalize() applies"),
    TaskInfo("winogrande", 0.5, "winogrande", (("dev.jsonl",),), "validation", convert_winogrande,
             "local: WinoGrande 1.1 dev = winogrande_xl validation, byte-exact content"),
    TaskInfo("arc_easy", 0.25, "arc_easy", (ARC_EASY_FILES,), "test", convert_arc_easy,
             "local: HF ai2_arc export (same schema)"),
    TaskInfo("arc_challenge", 0.25, "arc_challenge", (ARC_CHALLENGE_FILES,), "test", convert_arc_challenge,
             "local: original AI2 jsonl, mapped to the HF schema"),
    TaskInfo("openbookqa", 0.25, "openbookqa", (("test.jsonl",),), "test", convert_openbookqa,
             "local: original AI2 release (main config), zip sha256 equal to HF's"),
]}

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")



def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"boolq,piqa"`` or a list -> validated task names (``"all"`` = the seven paper tasks), order kept.

    Raises:
        ConfigError: an empty list or an unknown task name (the message lists the allowed ones).
    """
    names = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if names == ["all"]:
        names = list(PAPER_TASKS)
    if not names:
        raise ConfigError(f"no zero-shot task given; choose from: {', '.join(TASKS)} (or all)")
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown zero-shot task {name!r}; choose from: {', '.join(TASKS)} (or all)")
    return list(dict.fromkeys(names))


def check_task_data(names: list[str], task_data: str | Path) -> None:
    """Check that ``task_data/<task folder>/`` holds each task's files, before any model is loaded.

    Raises:
        ConfigError: missing folder or file (names the file and the folder it was expected in).
    """
    root = Path(task_data).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--task-data folder not found: {task_data}")
    for name in names:
        info = TASKS[name]
        folder = root / info.folder
        for alternatives in info.files:
            if not any((folder / f).is_file() for f in alternatives):
                raise ConfigError(f"task {name}: {' or '.join(alternatives)} not found in {folder} "
                                  f"(expected {root}/{info.folder}/ with the original files)")


def write_local(name: str, task_data: str | Path, workdir: Path) -> dict:
    """Convert task ``name``'s local files into ``workdir/<name>.jsonl`` and return the lm-eval config
    overrides that make the stock task read it (``dataset_path: json``, the file as its evaluation split).

    Raises:
        ConfigError: missing or malformed files.
    """
    info = TASKS[name]
    folder = Path(task_data).expanduser() / info.folder
    check_task_data([name], task_data)
    try:
        records = info.convert(folder)
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"task {name}: cannot read the files in {folder} ({type(err).__name__}: {err})") from None
    path = workdir / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    other = "validation_split" if info.split == "test" else "test_split"
    return {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {info.split: str(path)}},
            "training_split": None, "fewshot_split": None, other: None}
