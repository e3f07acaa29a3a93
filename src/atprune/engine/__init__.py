"""The block-by-block pass: capture block 0's inputs, collect each block's input statistics, let the caller change
the block, recompute its outputs (:mod:`.passes`); the statistics (:mod:`.stats`); where blocks and activations live
and how many windows go through at once (:mod:`.placement`). The engine knows nothing of pruners or allocators."""

from atprune.engine.passes import BlockInputs, collect_stats, first_block_inputs, run_block, sequential
from atprune.engine.placement import Placement, auto_batch_size, peak_memory_gib
from atprune.engine.stats import InputStats

__all__ = ["BlockInputs", "InputStats", "Placement", "auto_batch_size", "collect_stats", "first_block_inputs",
           "peak_memory_gib", "run_block", "sequential"]
