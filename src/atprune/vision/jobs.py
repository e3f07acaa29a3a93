"""``atprune prune / search / compare`` on an image classifier: check, load, draw images, prune, score top-1/top-5.

Every check that can fail on user input runs in :func:`check_vision_job` before the model is loaded. Calibration
images are drawn seeded from the training split of ``calib_data``; selection images for ATP's beta search are
drawn from the same split, disjoint from them (or from ``select_data``'s validation split); evaluation uses the
a seeded random subset of ``eval_images`` images of ``eval_data``'s validation split (all by default).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from atprune.allocation import block_sizes
from atprune.allocators import ALLOCATORS, beta_max
from atprune.api import plan
from atprune.errors import ConfigError, check_positive_int
from atprune.export import check_output_dir, write_json
from atprune.export.report import build_report
from atprune.jobs.strategies import best_trial, golden_search
from atprune.models.sources import resolve_device, resolve_dtype
from atprune.vision.accuracy import accuracy
from atprune.vision.adapter import VisionAdapter
from atprune.vision.data import draw, open_images
from atprune.vision.models import check_model_spec, load_classifier
from atprune.vision.prune import block_inputs, prune_classifier


@dataclass(kw_only=True)
class VisionJob:
    """Options of a prune, search or compare run on an image classifier (the CLI flags, one to one).

    Attributes:
        model: ``timm:NAME`` or a transformers ViT / ConvNext folder; ``checkpoint`` / ``random_init`` for timm.
        calib_data, eval_data, select_data: image data specs (see :func:`atprune.vision.data.open_images`).
        nsamples, nselect, eval_images: calibration / selection images, evaluation images (None: all).
        methods, sparsities, allocations: the grid of ``compare``; ``max_trials``: the golden search of ATP's beta.
    """

    model: str
    checkpoint: str | None = None
    random_init: bool = False
    calib_data: str | None = None
    eval_data: str | None = None
    select_data: str | None = None
    nsamples: int = 4096
    nselect: int = 256
    eval_images: int | None = None
    seed: int = 0
    batch_size: int = 64
    dtype: str | None = None
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    beta: float | None = None
    allocation_options: dict | None = None
    eval_dense: bool = True
    max_trials: int = 6
    methods: list[str] = field(default_factory=lambda: ["wanda"])
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    allocations: list[str] = field(default_factory=lambda: ["uniform", "atp"])


def check_vision_job(job: VisionJob, kind: str = "prune"):
    """Validate options, image data and output folder before the model is loaded.

    Returns:
        ``(calib set or None, eval set or None, select set or None, device, dtype)``.

    Raises:
        ConfigError: the first problem found (text data for an image model, a folder without class folders, a
            missing timm, an illegal sparsity or beta, ...).
    """
    for name in ("nsamples", "nselect", "batch_size", "eval_images", "max_trials"):
        check_positive_int(name.replace("_", "-"), getattr(job, name), optional=name == "eval_images")
    if kind == "prune":
        plan(job.method, job.sparsity, 2, allocation=job.allocation, beta=0.0 if job.beta is not None else None,
             pattern=job.pattern)
    elif kind == "search":
        plan(job.method, job.sparsity, 2, allocation="atp", beta=0.0)
        if job.max_trials < 3:
            raise ConfigError(f"golden search needs --max-trials >= 3, got {job.max_trials}")
    else:
        for a in job.allocations:
            ALLOCATORS.lookup(a)
        for m in job.methods:
            for s in job.sparsities:
                plan(m, s, 2)
        if "atp" in job.allocations and job.max_trials < 3:
            raise ConfigError(f"ATP's golden search needs --max-trials >= 3, got {job.max_trials}")
        if not job.eval_data:
            raise ConfigError("compare needs --eval-data (images)")
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    if not job.calib_data:
        raise ConfigError(f"{job.model} is an image model: give --calib-data (an ImageFolder directory, a saved "
                          "datasets folder or hf:NAME)")
    calib = open_images(job.calib_data, "train")
    evals = open_images(job.eval_data, "validation") if job.eval_data else None
    select = open_images(job.select_data, "validation") if job.select_data and kind != "prune" else None
    need = job.nsamples + (job.nselect if kind != "prune" and select is None else 0)
    if need > len(calib):
        raise ConfigError(f"{job.calib_data} has {len(calib)} training images; asked for {need} "
                          f"({job.nsamples} calibration" + (f" + {job.nselect} selection)" if need > job.nsamples
                                                            else ")"))
    check_model_spec(job.model, job.checkpoint, job.random_init)
    if job.out:
        check_output_dir(job.out, job.overwrite, inputs=(job.model,) if Path(job.model).exists() else ())
    return calib, evals, select, device, dtype


class _Run:
    """What every prune of one job shares: the model, its dense weights (restored before each trial), the
    calibration images' block-0 inputs and the selection images."""

    def __init__(self, job: VisionJob, kind: str):
        self.job = job
        self.calib_set, self.eval_set, select_set, self.device, self.dtype = check_vision_job(job, kind)
        t = time.perf_counter()
        self.model, self.transform, self.model_info = load_classifier(
            job.model, checkpoint=job.checkpoint, random_init=job.random_init, device=self.device, dtype=self.dtype)
        self.adapter = VisionAdapter.for_model(self.model)
        self.timings = {"load": time.perf_counter() - t}
        t = time.perf_counter()
        counts = (job.nsamples,) if kind == "prune" or select_set is not None else (job.nsamples, job.nselect)
        drawn = draw(len(self.calib_set), counts, job.seed)
        self.calib_info = self.calib_set.info | {"nsamples": job.nsamples, "seed": job.seed}
        images = self.calib_set.load(drawn[0], self.transform)
        self.inputs = block_inputs(self.adapter, images, job.batch_size)
        del images
        self.select = None
        if kind != "prune":
            sel_set = select_set or self.calib_set
            idx = drawn[1] if select_set is None else draw(len(sel_set), (job.nselect,), job.seed)[0]
            self.select = (sel_set.load(idx, self.transform), torch.tensor([sel_set.labels[i] for i in idx]))
            self.select_info = sel_set.info | {"images": job.nselect, "disjoint_from_calibration": select_set is None}
        self.timings["calibration_data"] = time.perf_counter() - t
        self.dense = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.sizes = block_sizes(self.adapter)

    def restore(self) -> None:
        self.model.load_state_dict(self.dense)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(images.to(self.device, self.dtype)).float()

    def evaluate(self) -> dict:
        batches = self.eval_set.batches(self.transform, self.job.batch_size, self.job.eval_images)
        return accuracy(self.logits, batches) | {"dataset": self.eval_set.info["dataset"],
                                                 "split": self.eval_set.info.get("split"),
                                                 "images_total": len(self.eval_set),
                                                 "subset": None if self.job.eval_images is None else
                                                 "seeded random subset (seed 0)"}

    def selection_loss(self) -> float:
        """Mean cross-entropy (nats per image) of the current model on the selection images."""
        images, labels = self.select
        total = 0.0
        with torch.no_grad():
            for x, y in zip(images.split(self.job.batch_size), labels.split(self.job.batch_size)):
                total += float(F.cross_entropy(self.logits(x), y.to(self.device), reduction="sum"))
        return total / len(labels)

    def prune(self, method, sparsity, allocation="uniform", beta=None, options=None):
        self.restore()
        return prune_classifier(self.model, method=method, sparsity=sparsity, allocation=allocation, beta=beta,
                                pattern=self.job.pattern, allocation_options=options, inputs=self.inputs,
                                progress=self.job.progress, calib_info=self.calib_info)

    def search_beta(self, method: str, sparsity: float) -> tuple[float, list[dict]]:
        """ATP's beta by golden search over ``[0, beta_max]`` minimising the selection loss."""
        trials = []

        def f(beta):
            self.prune(method, sparsity, "atp", beta)
            loss = self.selection_loss()
            trials.append({"beta": beta, "selection_loss": loss})
            return loss if math.isfinite(loss) else float("inf")

        found = golden_search(f, beta_max(sparsity, self.sizes), self.job.max_trials)
        return best_trial(found)[0], trials

    def model_record(self) -> dict:
        return self.model_info | {"spec": self.job.model, "blocks": self.adapter.num_blocks,
                                  "family": self.adapter.family, "blocks_path": self.adapter.blocks_path}

    def save(self, report: dict) -> None:
        """Write the pruned model and ``report.json`` to ``job.out`` (built in a temporary folder beside it, then
        renamed into place)."""
        out = Path(self.job.out).expanduser().resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            if self.adapter.family.startswith("hf"):
                self.model.save_pretrained(tmp)
            else:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                          str(tmp / "model.safetensors"))
            write_json(tmp / "report.json", report)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def config(self) -> dict:
        return asdict(self.job) | {"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device)}


def run_vision_prune(job: VisionJob) -> dict:
    """Prune once and return the report (written to ``job.out/report.json`` with the model when ``out``)."""
    run = _Run(job, "prune")
    evaluation = {"dense": None, "sparse": None}
    if job.eval_data and job.eval_dense:
        t = time.perf_counter()
        evaluation["dense"] = run.evaluate()
        run.timings["eval_dense"] = time.perf_counter() - t
    result = prune_classifier(run.model, method=job.method, sparsity=job.sparsity, allocation=job.allocation,
                              beta=job.beta, pattern=job.pattern, allocation_options=job.allocation_options,
                              inputs=run.inputs, progress=job.progress, calib_info=run.calib_info)
    run.timings["prune"] = result.seconds
    if job.eval_data:
        t = time.perf_counter()
        evaluation["sparse"] = run.evaluate()
        run.timings["eval_sparse"] = time.perf_counter() - t
    report = build_report(config=run.config(), prune_result=result.to_dict(), evaluation=evaluation,
                          timings=run.timings, model=run.model_record())
    if job.out:
        run.save(report)
    return report


def run_vision_search(job: VisionJob) -> dict:
    """Choose ATP's beta on the selection images, prune with it, evaluate; returns the report (with ``search``)."""
    run = _Run(job, "search")
    t = time.perf_counter()
    beta, trials = run.search_beta(job.method, job.sparsity)
    search = {"metric": "selection cross-entropy (nats per image)", "selection": run.select_info,
              "trials": trials, "chosen_beta": beta, "seconds": time.perf_counter() - t}
    result = run.prune(job.method, job.sparsity, "atp", beta)
    evaluation = {"dense": None, "sparse": run.evaluate() if job.eval_data else None}
    report = build_report(config=run.config(), prune_result=result.to_dict(), evaluation=evaluation,
                          timings=run.timings, model=run.model_record()) | {"search": search}
    if job.out:
        run.save(report)
    return report


def run_vision_compare(job: VisionJob) -> dict:
    """Every (method, sparsity, allocation) cell from the same dense weights and calibration inputs, scored on the
    same evaluation images; ATP's beta searched per (method, sparsity) on the selection images. Writes
    ``compare.json`` (after every cell) and ``results.md`` to ``job.out``."""
    run = _Run(job, "compare")
    out = Path(job.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run.restore()
    state = {"schema": "atprune.vision-compare/1", "config": run.config(), "model": run.model_record(),
             "calibration": run.calib_info, "selection": run.select_info, "dense": run.evaluate(), "cells": []}
    for method in job.methods:
        for sparsity in job.sparsities:
            for allocation in job.allocations:
                t = time.perf_counter()
                cell = {"method": method, "sparsity": sparsity, "allocation": allocation, "beta": None}
                if allocation == "atp":
                    cell["beta"], cell["trials"] = run.search_beta(method, sparsity)
                result = run.prune(method, sparsity, allocation, cell["beta"])
                cell |= {"achieved": result.overall_sparsity, "rates": result.spec["rates"]} | run.evaluate()
                cell["seconds"] = time.perf_counter() - t
                state["cells"].append(cell)
                write_json(out / "compare.json", state)
    (out / "results.md").write_text(format_compare(state))
    return state


def format_compare(state: dict) -> str:
    """The cells of a vision compare as a Markdown table (top-1 / top-5 in percent)."""
    d = state["dense"]
    lines = [f"model {state['model']['spec']}; {d['images']} evaluation images of {d['dataset']}; "
             f"dense top-1 {d['top1']:.2f} %, top-5 {d['top5']:.2f} %", "",
             "| method | sparsity | allocation | beta | achieved | top-1 % | top-5 % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in state["cells"]:
        beta = "-" if c["beta"] is None else f"{c['beta']:.4f}"
        lines.append(f"| {c['method']} | {c['sparsity']:g} | {c['allocation']} | {beta} | {c['achieved']:.4f} | "
                     f"{c['top1']:.2f} | {c['top5']:.2f} |")
    return "\n".join(lines) + "\n"


def format_report(report: dict) -> str:
    """A short plain-text summary of a vision prune / search report."""
    pr = report["pruning"]
    spec = pr["spec"]
    beta = f" beta={spec['beta']:g}" if spec.get("beta") is not None else ""
    lines = [f"method={spec['method']} allocation={spec['allocation']}{beta} target={spec['sparsity']:g}",
             f"{'block':>5} {'target':>8} {'achieved':>9}"]
    lines += [f"{b['index']:>5} {b['target']:>8.4f} {b['achieved']:>9.4f}" for b in pr["blocks"]]
    lines.append(f"overall sparsity (pruned layers, parameter-weighted): {pr['overall_sparsity']:.4f} of "
                 f"{pr['pruned_params']:,} weights")
    for key in ("dense", "sparse"):
        e = report["evaluation"].get(key)
        if e:
            lines.append(f"{key:>6} top-1 {e['top1']:.2f} %  top-5 {e['top5']:.2f} %  ({e['images']} images of "
                         f"{e['dataset']})")
    if report.get("search"):
        lines.append(f"chosen beta {report['search']['chosen_beta']:.4f} after {len(report['search']['trials'])} trials")
    return "\n".join(lines)
