"""``evaluate_zero_shot``: score an in-memory model on zero-shot tasks through lm-eval, and the sanity gate."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from atprune.errors import ConfigError, check_positive_int
from atprune.eval.zeroshot import adapter
from atprune.eval.zeroshot.tasks import TASKS, check_task_data, parse_tasks, write_local

log = logging.getLogger(__name__)

SCHEMA = "atprune.zeroshot/1"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_zero_shot(tasks, task_data: str | Path | None = None, limit: int | None = None,
                    batch_size: int = 16) -> list[str]:
    """Validate zero-shot options without loading any model (cheap; call it before heavy work).

    Returns:
        The task names, in order.

    Raises:
        ConfigError: unknown task (lists the allowed ones), ``limit`` or ``batch_size`` < 1, ``task_data``
            missing a task's file (names file and folder), offline (``HF_DATASETS_OFFLINE`` /
            ``HF_HUB_OFFLINE``) without ``task_data``, lm-eval not installed.
    """
    names = parse_tasks(tasks)
    check_positive_int("--limit", limit, optional=True)
    check_positive_int("--batch-size", batch_size)
    if task_data is not None:
        check_task_data(names, task_data)
    elif _offline():
        raise ConfigError("zero-shot tasks download their data from the Hugging Face hub, but HF_DATASETS_OFFLINE/"
                          "HF_HUB_OFFLINE is set: give --task-data DIR with local copies (see docs/zeroshot.md)")
    adapter.lm_eval_version()
    return names


def evaluate_zero_shot(model, tokenizer, tasks="all", task_data: str | Path | None = None, *,
                       limit: int | None = None, batch_size: int = 16, max_length: int | None = None,
                       lm=None) -> dict:
    """Zero-shot accuracy of ``model`` on lm-eval's stock multiple-choice tasks.

    Each choice is scored by the summed log-likelihood of its tokens given the prompt (``acc``) and by
    that sum divided by the length of the choice text in characters (``acc_norm``); the prediction is the arg-max. The
    pruning papers (Wanda, OWL, AlphaPruning, ATP) report ``acc`` and its mean over the seven tasks.

    Args:
        model: transformers causal LM, in memory (any dtype; stays on its device; not modified).
        tokenizer: its tokenizer.
        tasks: ``"boolq,piqa"``, a list of names, or ``"all"`` (the seven tasks of :data:`PAPER_TASKS`).
        task_data: folder with the original files (``<task_data>/<task>/...``, e.g. ``shared/data``); None
            loads the stock lm-eval data sets from the Hugging Face hub.
        limit: score only the first ``limit`` examples of each task (None: the whole split).
        batch_size: loglikelihood requests per forward pass.
        max_length: context window in tokens for lm-eval (default: from the model config).
        lm: an ``HFLM`` from :func:`atprune.eval.zeroshot.adapter.make_lm` to reuse (tests).

    Returns:
        ``{"schema", "tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (None where the task
        has no acc_norm: boolq, winogrande), "n" (examples scored), "n_total" (examples in the split),
        "chance", "requests", "seconds", "note"}}, "mean_acc" (unweighted mean of acc over the tasks),
        "requests", "seconds", "requests_per_s" (loglikelihood requests per second of wall time),
        "lm_eval_version", "data" ("hub" or the folder), "limit", "batch_size",
        "at_or_below_chance_everywhere" (bool)}``. Accuracies are fractions in [0, 1]; seconds are wall time.

    Raises:
        ConfigError: see :func:`check_zero_shot`; also a data set that cannot be loaded.
    """
    names = check_zero_shot(tasks, task_data, limit, batch_size)
    if lm is None:
        lm = adapter.make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    per_task: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="atprune-zeroshot-") as tmp:
        for name in names:
            overrides = write_local(name, task_data, Path(tmp)) if task_data is not None else None
            task = adapter.build_task(name, overrides)
            out = adapter.run_task(lm, task, limit=limit)
            m = out["metrics"]
            per_task[name] = {"acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"), "acc_norm": m.get("acc_norm"),
                              "acc_norm_stderr": m.get("acc_norm_stderr"), "n": out["n"], "n_total": out["n_total"],
                              "chance": TASKS[name].chance, "requests": out["requests"],
                              "seconds": out["seconds"],
                              "note": TASKS[name].note if task_data is not None else "hub: stock lm-eval data set"}
            log.info("zero-shot %s: acc %.4f (n=%d, %d requests, %.1fs)", name, m.get("acc", float("nan")),
                     out["n"], out["requests"], out["seconds"])
    requests = sum(t["requests"] for t in per_task.values())
    seconds = sum(t["seconds"] for t in per_task.values())
    accs = [t["acc"] for t in per_task.values()]
    return {"schema": SCHEMA, "tasks": per_task, "mean_acc": sum(accs) / len(accs), "requests": requests,
            "seconds": seconds, "requests_per_s": requests / seconds if seconds > 0 else None,
            "lm_eval_version": adapter.lm_eval_version(),
            "data": "hub" if task_data is None else str(Path(task_data).expanduser().resolve()),
            "limit": limit, "batch_size": batch_size,
            "at_or_below_chance_everywhere": at_or_below_chance(per_task)}


def at_or_below_chance(per_task: dict[str, dict]) -> bool:
    """True when every task's ``acc`` is at or below its chance level (``TASKS[name].chance``)."""
    return bool(per_task) and all(t["acc"] <= TASKS[name].chance for name, t in per_task.items())


def sanity_gate(sparse: dict, dense: dict | None = None) -> dict:
    """Flag a pruned model that scores at or below chance on every task (a broken or collapsed model).

    Args:
        sparse: :func:`evaluate_zero_shot` result of the pruned model.
        dense: the same for the dense model (optional; adds per-task drops and checks the setup itself:
            a dense model at or below chance everywhere means the evaluation, not the pruning, is broken).

    Returns:
        ``{"flagged": bool, "reason": str, "dense_at_or_below_chance_everywhere": bool | None,
        "acc_drop": {task: dense acc - sparse acc} (tasks both ran)}``.
    """
    flagged = sparse["at_or_below_chance_everywhere"]
    dense_bad = dense["at_or_below_chance_everywhere"] if dense else None
    drop = {k: dense["tasks"][k]["acc"] - v["acc"] for k, v in sparse["tasks"].items()
            if dense and k in dense["tasks"]}
    reason = ("pruned model at or below chance on every task" if flagged else "pruned model above chance on some task")
    if dense_bad:
        reason += "; the DENSE model is at or below chance too: check the evaluation setup"
    return {"flagged": bool(flagged), "reason": reason, "dense_at_or_below_chance_everywhere": dense_bad,
            "acc_drop": drop}


def format_zero_shot(results: dict[str, dict], gate: dict | None = None) -> str:
    """Plain-text table: one row per task, one column pair (acc, acc_norm) per model in ``results``
    (e.g. ``{"dense": ..., "sparse": ...}``), then mean acc, n and requests/s."""
    models = {k: v for k, v in results.items() if v}
    first = next(iter(models.values()))
    head = f"{'task':<14} {'n':>6} " + " ".join(f"{k + ' acc':>12} {k + ' acc_norm':>15}" for k in models)
    lines = [head]
    for name, row in first["tasks"].items():
        cells = []
        for res in models.values():
            t = res["tasks"].get(name, {})
            cells.append(f"{_pct(t.get('acc')):>12} {_pct(t.get('acc_norm')):>15}")
        lines.append(f"{name:<14} {row['n']:>6} " + " ".join(cells))
    lines.append(f"{'mean acc':<14} {'':>6} " + " ".join(f"{_pct(r['mean_acc']):>12} {'':>15}" for r in models.values()))
    for key, res in models.items():
        lines.append(f"{key}: {res['requests']} loglikelihood requests in {res['seconds']:.0f}s "
                     f"({res['requests_per_s']:.1f}/s), lm-eval {res['lm_eval_version']}, data {res['data']}, "
                     f"limit {res['limit']}")
    if gate is not None:
        lines.append(("SANITY GATE FLAGGED: " if gate["flagged"] else "sanity gate: ") + gate["reason"])
    elif first.get("at_or_below_chance_everywhere"):
        lines.append("SANITY GATE FLAGGED: at or below chance on every task")
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
