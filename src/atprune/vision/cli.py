"""The command line's vision side: ``atprune prune / search / compare`` with an image classifier as ``--model``,
and the refusal of image data for a text model. :mod:`atprune.cli` parses; this module builds the job and prints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from atprune.errors import ConfigError
from atprune.vision.data import looks_like_images
from atprune.vision.models import is_vision_model


def add_vision_args(p) -> None:
    """The flags only image classifiers read (timm weights, evaluation image count)."""
    p.add_argument("--checkpoint", default=None, help="image models: weights file for a timm:NAME model (default: "
                   "pretrained weights from the hub)")
    p.add_argument("--random-init", action="store_true", help="image models: timm:NAME with random weights "
                   "(architecture-only timing and tests)")
    p.add_argument("--eval-images", type=int, default=None, help="image models: score only the first N evaluation "
                   "images (default all)")


def _given(args, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in getattr(args, "argv_tail", []))


def check_text_data(args) -> None:
    """A text model given image data is a one-line error.

    Raises:
        ConfigError: ``--calib-data``, ``--eval-data`` or ``--select-data`` is an image folder.
    """
    for flag in ("calib_data", "eval_data", "select_data"):
        value = getattr(args, flag, None)
        if value and looks_like_images(value):
            raise ConfigError(f"--{flag.replace('_', '-')} {value} holds images, but {args.model} is a text model; "
                              "give text data (c4, wikitext2 or a text file), or an image classifier as --model "
                              "(timm:NAME or a ViT / ConvNext folder)")


def _job(args):
    from atprune.vision.jobs import VisionJob

    options = {"model": args.model, "checkpoint": args.checkpoint, "random_init": args.random_init,
               "calib_data": args.calib_data if _given(args, "--calib-data") else None,
               "eval_data": args.eval_data if _given(args, "--eval-data") and not getattr(args, "no_eval", False)
               else None,
               "seed": args.seed, "dtype": args.dtype, "device": args.device, "out": args.out,
               "overwrite": args.overwrite, "progress": not args.quiet, "eval_images": args.eval_images}
    if args.batch_size != "auto":
        options["batch_size"] = args.batch_size
    for name in ("nsamples", "nselect", "max_trials"):
        if _given(args, "--" + name.replace("_", "-")):
            options[name] = getattr(args, name)
    if getattr(args, "select_data", None):
        options["select_data"] = args.select_data
    if args.command == "prune":
        options |= {"method": args.method, "sparsity": 0.5 if args.sparsity is None else args.sparsity,
                    "pattern": args.pattern, "allocation": args.allocation, "beta": args.beta,
                    "allocation_options": getattr(args, "allocation_options", None), "eval_dense": not args.no_eval_dense}
    elif args.command == "search":
        options |= {"method": args.method, "sparsity": args.sparsity}
    else:
        options |= {"methods": args.methods, "sparsities": args.sparsities, "allocations": args.allocations}
    return VisionJob(**options)


def run_vision_command(args) -> int | None:
    """Run ``args.command`` on an image classifier; None when ``--model`` is not one (the text path runs).

    Raises:
        ConfigError: bad options or data, before the model is loaded.
    """
    if not is_vision_model(args.model):
        check_text_data(args)
        return None
    from atprune.vision.jobs import format_compare, format_report, run_vision_compare, run_vision_prune, \
        run_vision_search

    for flag in ("quantize", "refine", "structure", "attn_offset", "atp_offset"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} is for language models so far; image classifiers are pruned "
                              "only")
    job = _job(args)
    if args.command == "compare":
        print(format_compare(run_vision_compare(job)))
        print(f"saved: {os.path.abspath(args.out)} (compare.json, results.md)")
        return 0
    report = (run_vision_prune if args.command == "prune" else run_vision_search)(job)
    print(json.dumps(report, indent=2) if getattr(args, "json", False) else format_report(report))
    if args.out:
        print(f"saved: {Path(args.out).resolve()} (model, report.json)")
    return 0
