"""The options every job shares (model, calibration data, sampling, device, output) and their checks.

:class:`RunOptions` is the base of :class:`~atprune.jobs.prune.PruneJob`, :class:`~atprune.jobs.search.SearchJob`,
:class:`~atprune.jobs.compare.CompareJob` and :class:`~atprune.jobs.analysis.AnalyzeJob`; :func:`check_run_options`
validates the shared part before any model is loaded, so each job checks only what is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from atprune import data as data_mod
from atprune.errors import ConfigError, check_positive_int
from atprune.models.sources import ModelSource, num_blocks, resolve_device, resolve_dtype, resolve_model


@dataclass(kw_only=True)
class RunOptions:
    """Options shared by every job (the CLI flags, one to one).

    Attributes:
        model: alias, ``.gguf`` file, model folder or Hugging Face id.
        calib_data, eval_data: data specs (see :func:`atprune.data.load_text`); ``eval_data`` None: no evaluation.
        data_dir: local folder of the named sets.
        nsamples, seqlen, seed: calibration windows (count, tokens each, sampling seed).
        eval_windows: evaluate only the first N windows (None: all).
        batch_size: windows per forward pass, or ``"auto"``.
        dtype, device: ``float32``/``bfloat16``/``float16`` (None: by device); ``cpu``/``cuda``/``auto``.
        out, overwrite: output folder, and whether an existing one may be replaced.
        progress: progress bars.
        blocks_path: dotted path of the decoder-block ``nn.ModuleList`` (unknown layouts).
        allow_tokenizer_mismatch: a GGUF tokenizer that does not match its file (see
            :mod:`atprune.models.gguf_tokenizer`) is a warning recorded in the report instead of an error.
    """

    model: str
    calib_data: str = "c4"
    eval_data: str | None = "wikitext2"
    data_dir: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    eval_windows: int | None = None
    batch_size: int | str = "auto"
    dtype: str | None = None
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    blocks_path: str | None = None
    allow_tokenizer_mismatch: bool = False


@dataclass(frozen=True)
class Checked:
    """What :func:`check_run_options` resolved: the model source, its number of blocks, torch device and dtype."""

    source: ModelSource
    num_blocks: int
    device: torch.device
    dtype: torch.dtype

    def inputs(self) -> tuple[str, ...]:
        """Paths of the input model that an output folder must not overlap."""
        return (self.source.path,) if self.source.kind != "hub" else ()


def check_window_length(name: str, value: int | None) -> None:
    """Raise ConfigError unless ``value`` (a window length in tokens) is None or at least 2."""
    if value is not None and value < 2:
        raise ConfigError(f"--{name.replace('_', '-')} must be at least 2 tokens (a window predicts seqlen - 1 "
                          f"tokens, and a BOS may take the first place), got {value}")


def check_run_options(opts: RunOptions, *, own_checks=None) -> Checked:
    """Validate the shared options, cheapest first, then resolve the model source (no weights are loaded).

    Args:
        opts: the job's options.
        own_checks: the job's own checks, called with no argument after the shared cheap checks and before the
            model source is resolved (so a typo in a method name fails before a hub lookup).

    Raises:
        ConfigError: the first problem found, as one line.
    """
    for name in ("nsamples", "seqlen", "eval_windows"):
        check_positive_int(name.replace("_", "-"), getattr(opts, name), optional=name.startswith("eval"))
    if opts.batch_size != "auto":
        check_positive_int("batch-size", opts.batch_size, "a positive integer or 'auto'")
    check_window_length("seqlen", opts.seqlen)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if opts.data_dir and not Path(opts.data_dir).expanduser().is_dir():
        raise ConfigError(f"data folder not found: {opts.data_dir}")
    data_mod.check_available(opts.calib_data, "train", opts.data_dir)
    if opts.eval_data:
        data_mod.check_available(opts.eval_data, data_mod.eval_split(opts.eval_data), opts.data_dir)
    if own_checks is not None:
        own_checks()
    source = resolve_model(opts.model)
    return Checked(source, num_blocks(source), device, dtype)


@dataclass(kw_only=True)
class SelectionOptions:
    """Held-out selection data for choosing a knob (ATP's beta) without touching the evaluation data.

    Attributes:
        nselect: selection windows of ``seqlen`` tokens.
        select_data: a data spec (its validation split) or None: windows of the calibration source disjoint from
            the calibration samples.
        select_on_test: select on the evaluation data (the reference protocol; reports are marked).
    """

    nselect: int = 16
    select_data: str | None = None
    select_on_test: bool = False


def check_selection(opts) -> None:
    """Validate :class:`SelectionOptions` of a job that also has :class:`RunOptions`; selecting on the evaluation
    data is refused unless ``select_on_test`` says so.

    Raises:
        ConfigError: the first problem found.
    """
    check_positive_int("--nselect", opts.nselect)
    if opts.select_on_test:
        if not opts.eval_data:
            raise ConfigError("--select-on-test needs --eval-data")
        if opts.select_data:
            raise ConfigError("--select-on-test selects on the evaluation data; do not also give --select-data")
    elif opts.select_data and opts.eval_data:
        ident = data_mod.identity(opts.select_data, "validation", opts.data_dir)
        if ident == data_mod.identity(opts.eval_data, data_mod.eval_split(opts.eval_data), opts.data_dir):
            raise ConfigError("selection data is the evaluation data; choose held-out data (e.g. a validation split) "
                              "or pass --select-on-test to reproduce the reference protocol (reports are marked)")
    if opts.select_data and not opts.select_on_test:
        data_mod.check_available(opts.select_data, "validation", opts.data_dir)
