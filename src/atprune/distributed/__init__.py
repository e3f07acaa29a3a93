"""Several processes through :mod:`torch.distributed` (gloo on CPUs, NCCL on GPUs), launched with ``torchrun``.

- :mod:`.context`: the process group from torchrun's environment, the all-gathered agreement check of options and
  data, one-line reports of a failing rank.
- :mod:`.calibration`: data-parallel calibration: each rank runs its share of the calibration windows through the
  block; the input statistics are summed over ranks before the pruner reads them, so every rank prunes alike.
- :mod:`.prune`: ``torchrun --nproc-per-node N -m atprune prune ...``; rank 0 alone evaluates and writes.

The engine does not import this room: it only accepts a ``collect`` function (see
:func:`atprune.engine.passes.sequential`).
"""
