"""The block-by-block pass: capture block 0's inputs, collect each block's input statistics, let the caller change
the block, recompute its outputs (:mod:`.passes`); the statistics themselves (:mod:`.stats`, all a pruner may read);
where blocks and activations live and how many windows go through at once (:mod:`.placement`).

The engine knows nothing of pruners or allocators. This package imports nothing on its own, so a pruner importing
:mod:`.stats` does not pull in the passes.
"""
