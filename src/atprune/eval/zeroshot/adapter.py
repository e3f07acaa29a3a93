"""The one module that touches lm-evaluation-harness (``lm-eval``, pinned 0.4.13).

Everything else in :mod:`atprune.eval.zeroshot` goes through the functions here, so an lm-eval API change
touches this file only. What is used: ``HFLM`` (built around an in-memory transformers model and
tokenizer), ``TaskManager`` (the stock task registry), the stock task YAML files (loaded with their
``!function`` helpers resolved) and ``simple_evaluate``.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from atprune.errors import ConfigError

log = logging.getLogger(__name__)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("zero-shot evaluation needs lm-eval: pip install 'lm-eval==0.4.13'") from None
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.api.task"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-eval version string (e.g. ``"0.4.13"``).

    Raises:
        ConfigError: lm-eval is not installed.
    """
    _import_lm_eval()
    from importlib.metadata import version

    return version("lm_eval")


@lru_cache(maxsize=1)
def _task_manager():
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes the stock task YAML files (a few seconds, once per process)


def stock_config(name: str) -> dict[str, Any]:
    """The stock lm-eval task config of ``name`` as a dict (``include`` merged, ``!function`` resolved).

    Raises:
        ConfigError: lm-eval has no task of that name.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise ConfigError(f"lm-eval {lm_eval_version()} has no task {name!r}")
    return load_yaml(entry.yaml_path, resolve_func=True)


def build_task(name: str, overrides: dict[str, Any] | None = None):
    """Build the lm-eval task ``name``: the stock config, with ``overrides`` (e.g. a local ``dataset_path``)
    merged on top; prompts, targets, choices and metrics stay the stock ones. The data set is loaded here
    (from the hub when there are no overrides).

    Raises:
        ConfigError: the data could not be loaded (offline without local data, hub unreachable), one line.
    """
    spec: str | dict = name if not overrides else stock_config(name) | overrides
    hint = "check the converted local files" if overrides else "give --task-data DIR with local copies"
    try:
        loaded = _task_manager().load([spec])
    except Exception as err:  # datasets / huggingface_hub raise their own types for offline mode and missing files
        if isinstance(err, (ConnectionError, OSError, TimeoutError)) or \
                type(err).__module__.startswith(("datasets", "huggingface_hub", "requests", "urllib3")):
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"task {name}: cannot load its data set ({type(err).__name__}: {first}); {hint}") from None
        raise
    return loaded["tasks"][name]


def task_docs(task) -> list[dict]:
    """The evaluation documents of a built task after the task's own ``process_docs`` (list of dicts)."""
    return list(task.eval_docs)


def make_lm(model, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
    """Wrap an in-memory causal LM and its tokenizer in lm-eval's ``HFLM`` (no copy, no reload).

    Args:
        model: a transformers ``PreTrainedModel`` (any dtype, on any one device; it stays where it is).
        tokenizer: its tokenizer.
        batch_size: loglikelihood requests per forward pass (lm-eval sorts them by length, so padding is small).
        max_length: context window in tokens (default: lm-eval reads it from the model config).

    Returns:
        An ``HFLM`` whose ``n_requests`` / ``seconds`` count the loglikelihood requests served and their time.
    """
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        n_requests = 0
        seconds = 0.0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            t = time.perf_counter()
            out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            self.n_requests += len(requests)
            self.seconds += time.perf_counter() - t
            return out

    kwargs = {"max_length": max_length} if max_length else {}
    return CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
                        **kwargs)


def loglikelihood(lm, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """lm-eval's loglikelihood of each ``continuation`` given ``context``, through ``lm``.

    Returns:
        ``[(sum of log-probabilities of the continuation tokens in nats, whether greedy decoding gives them)]``.
    """
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i) for i, (c, x) in enumerate(pairs)]
    return [tuple(r) for r in lm.loglikelihood(requests, disable_tqdm=True)]


def run_task(lm, task, *, limit: int | None = None) -> dict[str, Any]:
    """Run one built task zero-shot on ``lm`` with ``simple_evaluate``.

    Returns:
        ``{"metrics": {"acc": .., "acc_stderr": .., "acc_norm": .., ...}, "n": examples scored,
        "n_total": examples in the split, "requests": loglikelihood requests, "seconds": wall time}``.
    """
    from lm_eval import simple_evaluate

    n0, t0 = lm.n_requests, time.perf_counter()
    out = simple_evaluate(lm, tasks=[task], task_manager=_task_manager(), limit=limit, num_fewshot=0,
                          log_samples=False)  # acc is a mean: lm-eval's stderr is closed-form, not bootstrapped
    seconds = time.perf_counter() - t0
    name = task.config.task
    metrics = {}
    for key, value in out["results"][name].items():
        metric, _, filt = key.partition(",")
        if filt == "none" and metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            metrics[metric] = float(value) if isinstance(value, (int, float)) else None
    n = int(out["n-samples"][name]["effective"])
    return {"metrics": metrics, "n": n, "n_total": int(out["n-samples"][name]["original"]),
            "requests": lm.n_requests - n0, "seconds": seconds}
