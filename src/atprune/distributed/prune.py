"""``torchrun --nproc-per-node N -m atprune prune ...``: one prune job over N processes.

Every rank loads the whole model and draws the same calibration windows; before the model is loaded the ranks check
(all-gathered digest) that they run the same options, and before any block is pruned that they hold the same
calibration tokens. Each rank then runs its share of the windows through every block (see
:mod:`atprune.distributed.calibration`) and solves its share of each block's Hessian solves (SparseGPT, GPTQ: see
:mod:`atprune.distributed.solves`); all ranks end with the same pruned model, and rank 0 alone evaluates it and
writes the output folder (atomically, as a one-process run does). A rank that fails prints one line naming itself
and the error, and exits with status 1; torchrun then stops the other ranks, so no output folder is written.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace

from atprune.distributed.calibration import REDUCTIONS, DataParallelCalibration
from atprune.distributed.context import check_same, init
from atprune.errors import ConfigError


def add_distributed_args(p) -> None:
    """The options of a torchrun launch (ignored in one process)."""
    p.add_argument("--dist-reduce", choices=REDUCTIONS, default="sum",
                   help="under torchrun: how the ranks' calibration statistics are added: 'sum' (one all-reduce; "
                        "equal to one process up to float32 rounding) or 'ordered' (rank after rank, in the "
                        "one-process order: bit for bit equal, statistics passes one rank at a time)")


def run_prune_distributed(job, reduce: str = "sum"):
    """Run ``job`` (a :class:`atprune.jobs.prune.PruneJob`) as this rank of a torchrun launch.

    Returns:
        The report on rank 0; None on the other ranks.

    Raises:
        ConfigError: ranks that disagree on the options or the calibration tokens, fewer calibration batches than
            ranks, an allocator that reads calibration data, image-text calibration, ``--offload``.
    """
    from atprune.jobs.prune import run_prune_job
    from atprune.models.sources import resolve_device

    world = init(resolve_device(job.device))
    check_same("options", asdict(job) | {"dist_reduce": reduce})
    if job.offload or job.offload_activations:
        raise ConfigError("--offload is not supported under torchrun yet")
    if world.device.type == "cuda":
        job = replace(job, device=str(world.device))
    if not world.writer:  # rank 0 alone evaluates and writes
        job = replace(job, out=None, eval_data=None, zero_shot=None, caption_data=None, progress=False)
    report = run_prune_job(job, data_parallel=DataParallelCalibration(world.rank, world.size, world.device, reduce))
    return report if world.writer else None


def rank_failed(err: BaseException) -> int:
    """Print ``atprune: rank R of N failed: <Type>: <message>`` (one line) to stderr; returns the exit status 1."""
    import os

    rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"atprune: rank {rank} of {size} failed: {type(err).__name__}: {text}", file=sys.stderr, flush=True)
    return 1
