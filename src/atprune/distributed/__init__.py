"""Several processes through :mod:`torch.distributed` (gloo on CPUs, NCCL on GPUs), launched with ``torchrun``.

- :mod:`.context`: the process group from torchrun's environment, the all-gathered agreement check of options and
  data, one-line reports of a failing rank.
- :mod:`.calibration`: data-parallel calibration: each rank runs its share of the calibration windows through the
  block; the input statistics are summed over ranks before the pruner reads them, so every rank prunes alike.
- :mod:`.solves`: a block's Hessian solves (SparseGPT, GPTQ) split over the ranks, each result broadcast from the
  rank that computed it.
- :mod:`.prune`: ``torchrun --nproc-per-node N -m atprune prune ...``; rank 0 alone evaluates and writes.
- :mod:`.trials`: ``... -m atprune search ...``: the beta search's trials in speculative rounds over the ranks.
- :mod:`.cells`: ``... -m atprune compare ...``: the comparison's cells split over the ranks, rows gathered on rank 0.

The engine and the pruning side do not import this room: they only accept hooks (the engine's ``collect``, see
:func:`atprune.engine.passes.sequential`; the block pruner's ``share``, see :func:`atprune.api.block_pruner`; the
trial runner's ``trial``, see :meth:`atprune.jobs.trials.TrialRunner.tune`; the ``parallel`` argument of the
search and compare jobs).
"""
