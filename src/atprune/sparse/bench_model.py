"""``atprune bench --model``: a pruned model, dense vs sparse in one process: gate, per-layer GEMV, prefill, decode.

The dense model is the pruned checkpoint as saved (zeros stored and multiplied); the sparse one is the same weights
with every pruned layer a :class:`SparseLinear`. Same dtype, same threads, same inputs.

* Gate: every SparseLinear against ``F.linear`` on the dense model's layer (see :func:`bench.gate_layer`), then the
  logits of the prompt's first 8 tokens (the sparse kernel's path): the largest difference must stay within
  ``tolerance x max |logit|`` (0.1 for 16-bit dtypes, whose rounding differences between two summation orders grow
  through the layers: 0.036 was seen on SmolLM2 in bf16; 1e-3 for float32). The per-layer check is the tight one. A mismatch raises
  :class:`bench.BenchMismatch` and nothing is timed.
* Per layer: for each weight shape, one pass calls every layer of that shape in the model once (torch / own dense
  kernel / sparse), best of ``repeats`` interleaved passes (:func:`bench.time_passes`).
* End to end, for each batch size ``b``: prefill of ``b`` prompts of ``prompt`` tokens (timed alone, best of
  ``runs``), then ``gen - 1`` greedy decode steps with the KV cache (one token per sequence per step), each step
  timed; the step time is the 10th percentile over all runs' steps (steps no other process interrupted; the
  median is recorded too), decode tokens/s = ``b / step``. Dense and sparse alternate run by run. The share of a dense decode step spent outside the swapped layers
  is estimated as ``1 - (sum of the per-layer times at batch b) / (decode step time)``; with it the end-to-end
  gain expected from the per-layer gain is ``1 / (outside + linear / speedup)`` (Amdahl).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict

import torch

from atprune.errors import ConfigError
from atprune.sparse import kernels
from atprune.sparse.bench import (BenchMismatch, gate_layer, layer_variants, machine, parse_dtype, summarize,
                                  time_passes)
from atprune.sparse.convert import MIN_SPARSITY, sparsify_for_inference
from atprune.sparse.linear import SparseLinear


def prompt_ids(tokenizer, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` token ids: random ids in the tokenizer's ordinary range (timing does not depend on the
    text; a fixed seed keeps runs comparable)."""
    vocab = min(len(tokenizer), 32000) if tokenizer is not None else 1000
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 1), (batch, length), generator=g)


def gate_model(dense, sparse, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """Per-layer and logits gate (see the module doc). Returns the worst per-layer excess and logits difference."""
    worst = 0.0
    for name, module in sparse.named_modules():
        if isinstance(module, SparseLinear):
            weight = _dense_weight(dense.get_submodule(name))
            worst = max(worst, gate_layer(module, weight, 1, name=name))
    with torch.no_grad():
        ref = dense(ids[:1, :8], use_cache=False).logits.float()
        got = sparse(ids[:1, :8], use_cache=False).logits.float()
    tol = 1e-3 if dtype == torch.float32 else 0.1  # 16-bit: rounding differences grow through the layers
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    if not diff <= tol * scale:
        raise BenchMismatch(f"sparse model's logits differ from the dense model's by {diff:.4g} (allowed "
                            f"{tol} x {scale:.4g}); refusing to time")
    same_argmax = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"layer_worst_excess": worst, "logits_max_abs_diff": diff, "logits_max_abs": scale,
            "logits_tolerance": tol, "argmax_agreement": same_argmax}


def _dense_weight(module) -> torch.Tensor:
    from atprune.sparse.convert import linear_weight

    return linear_weight(module)[0].detach().contiguous()


def per_layer(dense, sparse, batches: list[int], kernel_id: int | None, repeats: int) -> list[dict]:
    """Per weight shape: the model's layers of that shape cycled, torch vs own dense vs sparse, at each batch."""
    by_shape = defaultdict(list)
    for name, module in sparse.named_modules():
        if isinstance(module, SparseLinear):
            by_shape[(module.out_features, module.in_features)].append((module, _dense_weight(dense.get_submodule(name))))
    rows = []
    for shape, pairs in sorted(by_shape.items()):
        layers = [p[0] for p in pairs]
        weights = [p[1] for p in pairs]
        dense_bytes = sum(w.numel() * w.element_size() for w in weights)
        sparse_bytes = sum(lay.packed.nbytes for lay in layers)
        for b in batches:
            timed = time_passes(layer_variants(layers, weights, b, kernel_id), repeats)
            row = {"shape": list(shape), "batch": b, "layers": len(layers), "cycled_dense_bytes": dense_bytes,
                   "cycled_sparse_bytes": sparse_bytes,
                   "sparsity": 1 - sum(lay.packed.nnz for lay in layers) / (len(layers) * shape[0] * shape[1])}
            row.update(summarize(timed, len(layers), dense_bytes, sparse_bytes))
            rows.append(row)
    return rows


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument of ``model.forward`` (``cache`` in transformers >= 5.2x, earlier
    ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate_timed(model, ids: torch.Tensor, gen: int) -> tuple[float, list[float], torch.Tensor]:
    """(prefill seconds, seconds of each of the ``gen - 1`` decode steps, generated ids ``[batch, gen]``): greedy,
    KV cache."""
    from transformers import DynamicCache

    key = _cache_kwarg(model)
    with torch.no_grad():
        cache = DynamicCache()
        start = time.perf_counter()
        out = model(ids, use_cache=True, **{key: cache})
        prefill = time.perf_counter() - start
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        steps = []
        for _ in range(gen - 1):
            start = time.perf_counter()
            out = model(token, use_cache=True, **{key: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
    return prefill, steps, torch.cat(tokens, dim=1)


def end_to_end(dense, sparse, tokenizer, batches: list[int], prompt: int, gen: int, runs: int) -> list[dict]:
    """Prefill and decode timing per batch size, dense and sparse alternating, best of ``runs``."""
    rows = []
    for b in batches:
        ids = prompt_ids(tokenizer, b, prompt, seed=b)
        prefill = {"dense": float("inf"), "sparse": float("inf")}
        steps = {"dense": [], "sparse": []}
        texts = {}
        _generate_timed(dense, ids[:, : min(prompt, 16)], 2)  # warm-up (allocations, kernel build)
        _generate_timed(sparse, ids[:, : min(prompt, 16)], 2)
        for _ in range(runs):
            for name, model in (("dense", dense), ("sparse", sparse)):
                pre, times, out = _generate_timed(model, ids, gen)
                prefill[name] = min(prefill[name], pre)
                steps[name] += times
                texts[name] = out
        row = {"batch": b, "prompt": prompt, "gen": gen,
               "same_greedy_tokens": float((texts["dense"] == texts["sparse"]).float().mean())}
        for name in ("dense", "sparse"):
            ordered = sorted(steps[name])
            step = ordered[len(ordered) // 10]  # 10th percentile: steps that no other process interrupted
            row[f"{name}_prefill_s"] = prefill[name]
            row[f"{name}_prefill_tokens_per_s"] = b * prompt / prefill[name]
            row[f"{name}_decode_step_ms"] = step * 1e3
            row[f"{name}_decode_step_ms_median"] = statistics.median(ordered) * 1e3
            row[f"{name}_decode_tokens_per_s"] = b / step
        row["decode_speedup"] = row["dense_decode_step_ms"] / row["sparse_decode_step_ms"]
        row["prefill_speedup"] = row["dense_prefill_s"] / row["sparse_prefill_s"]
        rows.append(row)
    return rows


def explain(layers: list[dict], e2e: list[dict]) -> None:
    """Add the Amdahl estimate to each end-to-end row (in place): share of the dense decode step outside the
    swapped layers, and the end-to-end speedup that the per-layer times predict."""
    for row in e2e:
        mine = [r for r in layers if r["batch"] == row["batch"]]
        if not mine:
            continue
        dense_ms = sum(min(r["torch_us"], r.get("dense_us", float("inf"))) * r["layers"] for r in mine) / 1e3
        torch_ms = sum(r["torch_us"] * r["layers"] for r in mine) / 1e3
        sparse_ms = sum(r["sparse_us"] * r["layers"] for r in mine) / 1e3
        step = row["dense_decode_step_ms"]
        outside = max(0.0, step - torch_ms)  # the dense model runs torch F.linear
        row["linear_ms_dense_torch"] = torch_ms
        row["linear_ms_dense_best"] = dense_ms
        row["linear_ms_sparse"] = sparse_ms
        row["outside_linear_ms"] = outside
        row["outside_linear_share"] = outside / step if step else None
        row["predicted_decode_speedup"] = step / (outside + sparse_ms) if outside + sparse_ms else None


def bench_model(dense, tokenizer, dtype: torch.dtype, batches: list[int], prompt: int = 512, gen: int = 128,
                kernel: str = "auto", repeats: int = 5, runs: int = 2, sparse=None, source: str | None = None,
                progress=print) -> dict:
    """Benchmark the pruned model ``dense`` (on CPU, in ``dtype``) against its sparse form (``sparse``, or made
    here with :func:`sparsify_for_inference` on a deep copy). Returns the record (``gate``, ``layers``,
    ``end_to_end``, ``machine``, ...).

    Raises:
        ConfigError: bad sizes, no pruned layer, an unrunnable kernel. BenchMismatch: the gate failed.
    """
    dtype = parse_dtype(dtype)
    if prompt < 1 or gen < 2:
        raise ConfigError(f"--prompt must be >= 1 and --gen >= 2, got {prompt} and {gen}")
    kernel = kernels.resolve_kernel(kernel)
    kid = kernels.KERNEL_IDS.get(kernel)
    dense = dense.to(dtype).eval()
    report = None
    if sparse is None:
        sparse = copy.deepcopy(dense)
        report = sparsify_for_inference(sparse, min_sparsity=MIN_SPARSITY, kernel=kernel)
    ids = prompt_ids(tokenizer, 1, max(8, min(prompt, 64)))
    progress("gate: every sparse layer against F.linear, then the logits")
    gate = gate_model(dense, sparse, ids, dtype)
    progress(f"gate passed: worst layer error {gate['layer_worst_excess']:.3f} of the bound, logits max diff "
             f"{gate['logits_max_abs_diff']:.4g} (max |logit| {gate['logits_max_abs']:.3g})")
    layers = per_layer(dense, sparse, batches, kid, repeats)
    for r in layers:
        progress(f"layer {r['shape'][0]}x{r['shape'][1]} x{r['layers']} b={r['batch']}: torch {r['torch_us']:.1f} "
                 f"dense {r.get('dense_us', float('nan')):.1f} sparse {r['sparse_us']:.1f} us -> {r['speedup']:.2f}x")
    e2e = end_to_end(dense, sparse, tokenizer, batches, prompt, gen, runs)
    explain(layers, e2e)
    swapped = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    return {"mode": "model", "model": source, "machine": machine(), "dtype": str(dtype).removeprefix("torch."),
            "kernel": kernel, "repeats": repeats, "runs": runs, "swapped_layers": len(swapped),
            "dense_bytes": sum(m.packed.dense_nbytes for m in swapped),
            "sparse_bytes": sum(m.packed.nbytes for m in swapped), "sparsify_report": report and {
                k: report[k] for k in ("dense_bytes", "sparse_bytes", "bytes_saved", "kernel")},
            "gate": gate, "layers": layers, "end_to_end": e2e}
