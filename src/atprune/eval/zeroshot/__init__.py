"""Zero-shot accuracy through lm-evaluation-harness (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OpenBookQA).

Online, the stock lm-eval tasks download their data from the hub; offline, ``task_data`` points at the
original files (see :mod:`atprune.eval.zeroshot.tasks`). Only :mod:`atprune.eval.zeroshot.adapter` imports lm-eval.
"""

from atprune.eval.zeroshot.run import at_or_below_chance, check_zero_shot, evaluate_zero_shot, sanity_gate
from atprune.eval.zeroshot.tasks import PAPER_TASKS, TASKS, parse_tasks

__all__ = ["PAPER_TASKS", "TASKS", "at_or_below_chance", "check_zero_shot", "evaluate_zero_shot", "parse_tasks",
           "sanity_gate"]
