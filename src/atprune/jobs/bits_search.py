"""``atprune search --bits-step search``: the step of ATP's bit schedule chosen on held-out selection data, like beta.

The sparsity allocation is fixed (``--beta B``: ATP at that beta; default: uniform sparsity) and the step ``t`` of
:func:`atprune.quant.bits.atp_bits` is searched by the golden strategy over ``[0, step_max]``
(:func:`atprune.quant.bits.step_max`: the largest step whose unrounded targets stay inside the allowed widths), with
the same trial budget (``--max-trials``) and the same selection windows and metric as beta's search; the first trial
is step 0 (uniform bits as far as the widths allow). Each trial prunes and quantizes from the dense weights; the
trial runner keys its cache by the bits of every block (:func:`atprune.quant.step.quant_key`), so two steps giving
the same widths are one prune pass.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path


def fixed_allocation(job) -> tuple[str, float | None]:
    """``("atp", beta)`` when the job fixes ATP's beta, else ``("uniform", None)``."""
    return ("atp", float(job.beta)) if job.beta is not None else ("uniform", None)


def bits_step_trials(job, runner, previous: list[dict], record) -> tuple[list, float, float]:
    """Run the golden search of the step (:meth:`atprune.jobs.trials.TrialRunner.tune_bits_step`); ``previous``:
    trials of a resumed ``search.json`` (not redone), ``record(trial)`` called after each new one. Returns
    ``(trials, chosen step, its metric)``.

    Raises:
        ConfigError: illegal fixed allocation (e.g. a beta outside ATP's legal range), before any trial.
    """
    allocation, beta = fixed_allocation(job)
    memo = {t["bits_step"]: t["metric"] for t in previous}
    return runner.tune_bits_step(job.method, job.sparsity, allocation, beta, max_trials=job.max_trials, memo=memo,
                                 on_trial=record)


def final_bits_prune(job, runner, step: float):
    """``(PruneResult, config entries)`` of the final model: the fixed allocation pruned and quantized with the
    chosen ``step`` (the runner's cache answers it when the model still holds that configuration)."""
    allocation, beta = fixed_allocation(job)
    spec = replace(runner.quantize, bits_step=float(step))
    final = runner.prune(job.method, job.sparsity, allocation, beta, progress=job.progress, quantize=spec)
    final.quantization = dict(final.quantization) | {"spec": spec.describe()}  # a cached prune: the same bits
    return final, {"allocation": allocation, "beta": beta, "bits_step": float(step)}


def plot_bits_search(trials: list[dict], chosen: float, metric: str, path: Path, title: str) -> None:
    """PNG of the selection metric against the bits step; step 0 and the chosen step are marked."""
    from atprune.plotting import new_figure, save_png

    pts = sorted((t["bits_step"], t["metric"]) for t in trials
                 if t["metric"] is not None and math.isfinite(t["metric"]))
    fig, ax = new_figure(6, 4)
    ax.plot([x for x, _ in pts], [v for _, v in pts], "o-", color="tab:blue", label="trials")
    for x, v in pts:
        if x == 0.0:
            ax.plot([x], [v], "s", color="tab:red", markersize=9, label="step 0 (uniform bits)")
        if x == chosen:
            ax.plot([x], [v], "*", color="tab:green", markersize=14, label=f"chosen step = {x:.4g}")
    ax.set_xlabel("bits step (bits per block)")
    ax.set_ylabel("selection perplexity" if metric == "ppl" else "KL(dense || quantized), nats/token")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)
