"""The JSON report of a run, in one place, and its short human-readable table."""

from __future__ import annotations

import math
import os
import platform
import sys
from datetime import datetime, timezone

SCHEMA = "atprune.report/1"


def _source_commit() -> str | None:
    """The git commit of the atprune source that runs, when it runs from a git checkout (None otherwise); a ``+``
    marks uncommitted changes."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", str(here.parent)],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+" if dirty else "") if commit else None


def versions() -> dict:
    """Versions of Python and the libraries that decide the numbers (tokenizers and gguf too: with transformers they
    build a GGUF model's tokenizer and dequantise its weights)."""
    import gguf
    import tokenizers
    import torch
    import transformers

    from atprune import __version__

    return {"atprune": __version__, "atprune_commit": _source_commit(), "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"), "platform": platform.platform()} | (
        # a copy of a checkout whose git metadata lags its files (the GPU machine's) can name the commit it holds
        {"atprune_commit_declared": os.environ["ATPRUNE_SOURCE_COMMIT"]} if os.environ.get("ATPRUNE_SOURCE_COMMIT")
        else {})


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_report(*, config: dict, prune_result: dict | None, evaluation: dict, timings: dict, model: dict,
                 warnings: list[str] | None = None) -> dict:
    """Assemble the report (``schema`` = ``atprune.report/1``).

    Args:
        config: the options of the run as the user gave them (plus resolved defaults, seed included).
        prune_result: :meth:`atprune.api.PruneResult.to_dict` (None for an evaluation-only run).
        evaluation: ``{"dense": ppl dict or None, "sparse": ppl dict or None}``.
        timings: seconds per phase (``load``, ``calibration_data``, ``prune``, ``eval_dense``, ...).
        model: what was loaded (spec, source kind, path, class, blocks, dtype, device).
        warnings: messages the run raised that a reader of the numbers must see.
    """
    return {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "config": config, "model": model, "pruning": prune_result,
            "evaluation": evaluation, "timings_s": timings, "warnings": warnings or []}


def _fmt_ppl(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def format_table(report: dict) -> str:
    """A short plain-text summary: per-block target/achieved sparsity, overall sparsity, ppl, times."""
    lines = []
    pr = report.get("pruning")
    if pr:
        spec = pr["spec"]
        beta = f" beta={spec['beta']:g}" if spec.get("beta") is not None else ""
        lines.append(f"method={spec['method']} pattern={spec['pattern']} allocation={spec['allocation']}{beta} "
                     f"target={spec['sparsity']:g}")
        nm = any("pattern" in b for b in pr["blocks"])  # N:M: the N:M of each block (mixed N:M: one N per block)
        lines.append(f"{'block':>5} {'target':>8} {'achieved':>9}" + (f" {'N:M':>5}" if nm else ""))
        for b in pr["blocks"]:
            lines.append(f"{b['index']:>5} {b['target']:>8.4f} {b['achieved']:>9.4f}"
                         + (f" {b.get('pattern', '-'):>5}" if nm else ""))
        cal = pr.get("calibration") or {}
        if cal:
            lines.append(f"calibration: {cal.get('dataset')} {cal.get('nsamples')} samples x {cal.get('seqlen')} tokens "
                         f"(seed {cal.get('seed', '-')})")
        lines.append(f"overall sparsity (pruned layers, parameter-weighted): {pr['overall_sparsity']:.4f} "
                     f"of {pr['pruned_params']:,} weights")
    ev = report.get("evaluation", {})
    for key in ("dense", "sparse"):
        e = ev.get(key)
        if e:
            lines.append(f"{key:>6} perplexity {e['dataset']} {e['split']}: {_fmt_ppl(e['ppl'])} "
                         f"({e['windows']}/{e['windows_total']} windows x {e['seqlen']} tokens)")
    zs = report.get("zero_shot")
    if zs and zs.get("sparse"):
        from atprune.eval.zeroshot.run import format_zero_shot

        lines.append(format_zero_shot({"dense": zs.get("dense"), "sparse": zs["sparse"]}, zs.get("gate")))
    times = " ".join(f"{k}={v:.1f}s" for k, v in report.get("timings_s", {}).items())
    lines.append(f"time: {times}")
    if report.get("peak_gpu_memory_gib") is not None:
        lines.append(f"peak GPU memory: {report['peak_gpu_memory_gib']:.2f} GiB")
    return "\n".join(lines)
