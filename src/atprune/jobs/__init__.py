"""What the CLI runs: ``prune`` (:mod:`.prune`), ``search`` (:mod:`.search`, strategies in :mod:`.strategies`),
``compare`` (:mod:`.compare`), ``analyze`` (:mod:`.analysis`), and the options they share (:mod:`.options`).
Import the job you need; this package imports nothing on its own, so ``import atprune`` stays light."""
