"""``atprune bench --device cuda``: the CUDA sparse kernel against cuBLAS, per layer and end to end, on one GPU.

Method (every ratio is measured side by side in one process, same dtype, same inputs):

* Per layer: for each shape ``out x in``, sparsity and batch, ``n`` distinct random weights (``n`` chosen so that
  the dense weights of a pass exceed :data:`MIN_PASS_BYTES`, several times the GPU's L2, so the time is that of
  HBM, not of the cache) are called once each per pass; one pass is captured in a CUDA graph and replayed
  ``repeats`` times between two CUDA events (no launch overhead, no host in the loop). Dense is ``F.linear`` on the
  masked weight (cuBLAS), sparse is :func:`atprune.sparse.cuda.sparse_mm` on the tiles of the same weight. A gate
  first compares the sparse output with a float32 ``F.linear`` on the masked weight (tolerance: the dtype's
  rounding times the sum of ``|x| |W|``); a mismatch raises :class:`BenchMismatch` before anything is timed.
  Effective bandwidth = bytes the kernel must read (tiles + x) / time; the copy roof is a device-to-device copy of
  1 GiB (read + write bytes / time).
* End to end: a model (e.g. a random-init LLaMA-2-7B from ``benchmarks/configs/llama2-7b.json``: the time does not
  depend on the values), its decoder linears pruned to a random mask at ``sparsity``, dense and sparse copies on
  the GPU; each prefills ``context`` tokens into a static KV cache, then one decode step is captured in a CUDA
  graph and replayed ``steps`` times (the cache position advanced in place); tokens/s = batch / step time. The two
  models alternate for ``runs`` rounds; the best round of each is kept.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from atprune.sparse import cuda
from atprune.sparse.bench import EPS, BenchMismatch

MIN_PASS_BYTES = 512 * 2 ** 20


def _events_time(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` (already warmed up), from CUDA events around ``repeats`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _graph(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_roof(nbytes: int = 2 ** 30) -> float:
    """Device-to-device copy bandwidth in TB/s (read + write bytes / time), best of 5 timings of 20 copies."""
    a = torch.empty(nbytes // 8, dtype=torch.int64, device="cuda")
    b = torch.empty_like(a)
    replay = _graph(lambda: b.copy_(a))
    return max(2 * a.numel() * 8 / _events_time(replay, 20) / 1e12 for _ in range(5))


def random_pruned(out: int, inp: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``[out, inp]`` normal weights on the GPU with a uniformly random ``sparsity`` fraction set to zero."""
    w = torch.randn(out, inp, device="cuda", dtype=torch.float32, generator=gen).to(dtype)
    w[torch.rand(out, inp, device="cuda", generator=gen) < sparsity] = 0
    return w


def gate(x: torch.Tensor, w: torch.Tensor, tiled: cuda.TiledWeight) -> float:
    """Largest |sparse - fp32 reference| over its bound; raises :class:`BenchMismatch` above 1."""
    ref = F.linear(x.float(), w.float())
    bound = EPS[w.dtype] * 4 * F.linear(x.float().abs(), w.float().abs()) + 1e-6
    ratio = float(((cuda.sparse_mm(x, tiled).float() - ref).abs() / bound).max())
    if ratio > 1:
        raise BenchMismatch(f"sparse kernel differs from the fp32 reference by {ratio:.2f}x its rounding bound "
                            f"(shape {tuple(w.shape)}, batch {x.shape[0]})")
    return ratio


def per_layer(shapes: list[tuple[int, int]], sparsities: list[float], batches: list[int], dtype: torch.dtype,
              repeats: int = 50, seed: int = 0) -> list[dict]:
    """Rows ``{shape, sparsity, batch, layers, dense_us, sparse_us, speedup, dense_tbps, sparse_tbps,
    bytes_per_weight, gate}`` (times per layer call; bandwidths in TB/s of the bytes each must read)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for out, inp in shapes:
        n = max(2, -(-MIN_PASS_BYTES // (out * inp * torch.finfo(dtype).bits // 8)))
        for s in sparsities:
            weights = [random_pruned(out, inp, s, dtype, gen) for _ in range(n)]
            tiles = [cuda.pack_tiles(w) for w in weights]
            sparse_bytes = sum(t.nbytes for t in tiles) / n
            for b in batches:
                x = torch.randn(b, inp, device="cuda", generator=gen).to(dtype)
                ratio = gate(x, weights[0], tiles[0])
                dense = _graph(lambda: [F.linear(x, w) for w in weights])
                sparse = _graph(lambda: [cuda.sparse_mm(x, t) for t in tiles])
                td, ts = [], []
                for _ in range(3):  # alternate, keep the best of each
                    td.append(_events_time(dense, repeats) / n)
                    ts.append(_events_time(sparse, repeats) / n)
                td, ts = min(td), min(ts)
                xb = x.numel() * x.element_size()
                rows.append({"shape": [out, inp], "sparsity": s, "batch": b, "layers": n,
                             "dense_us": td * 1e6, "sparse_us": ts * 1e6, "speedup": td / ts,
                             "dense_tbps": (out * inp * x.element_size() + xb) / td / 1e12,
                             "sparse_tbps": (sparse_bytes + xb) / ts / 1e12,
                             "bytes_per_weight": sparse_bytes / (out * inp), "gate": ratio})
                del dense, sparse
            del weights, tiles
            torch.cuda.empty_cache()
    return rows


def random_model(config_path: str | Path, dtype: torch.dtype):
    """A random-init causal LM on the GPU from a transformers config JSON."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prune_linears_randomly(model, sparsity: float, seed: int = 0) -> int:
    """Zero a uniformly random ``sparsity`` fraction of every decoder-block ``nn.Linear`` weight (not the embeddings
    or ``lm_head``), in place; returns the number of layers pruned."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                module.weight[torch.rand(module.weight.shape, device="cuda", generator=gen) < sparsity] = 0
                count += 1
    return count


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def rewind(cache, length: int, position: torch.Tensor) -> None:
    """Set a static cache (and the captured ``cache_position`` tensor) back to ``length`` tokens, in place, so that a
    graph captured after warm-up steps replays from there. transformers >= 5.2x keeps a per-layer device tensor
    ``cumulative_length`` that each update advances (and ignores ``cache_position`` for the write); older versions
    write at ``cache_position``."""
    position.fill_(length)
    for layer in getattr(cache, "layers", []):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def decode_step_time(model, batch: int, context: int, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds per decode step (batch ``batch``, after ``context`` prefilled tokens) with the step in a CUDA graph,
    and the logits of the first captured step (to compare dense and sparse)."""
    from transformers import StaticCache

    key = _cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda", generator=gen)
    with torch.no_grad():
        model(input_ids=ids, cache_position=torch.arange(context, device="cuda"), use_cache=True, **{key: cache})
        token = ids[:, -1:].clone()
        position = torch.tensor([context], device="cuda")
        holder = {}

        def step():
            holder["logits"] = model(input_ids=token, cache_position=position, use_cache=True, **{key: cache}).logits

        replay = _graph(step)
        rewind(cache, context, position)  # the warm-up steps advanced the cache: back to `context` tokens
        replay()
        first = holder["logits"].float().clone()

        def run():
            position.add_(1)
            replay()

        return _events_time(run, steps - 1), first


def end_to_end(dense, batches: list[int], context: int = 512, steps: int = 64, runs: int = 3,
               min_sparsity: float = 0.3) -> dict:
    """Dense vs sparse decode tokens/s under CUDA graphs (see the module doc). ``dense``: a pruned causal LM on the
    GPU (16-bit); the sparse copy swaps every linear with at least ``min_sparsity`` zeros for a SparseLinear."""
    from atprune.sparse.convert import sparsify_for_inference

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    sparse = copy.deepcopy(dense)
    info = sparsify_for_inference(sparse, min_sparsity=min_sparsity, kernel="torch")
    torch.cuda.empty_cache()
    rows = []
    for b in batches:
        td, ts, first_d, first_s = [], [], None, None
        for _ in range(runs):
            t, first_d = decode_step_time(dense, b, context, steps)
            td.append(t)
            t, first_s = decode_step_time(sparse, b, context, steps)
            ts.append(t)
        diff = float((first_d - first_s).abs().max() / first_d.abs().max())
        rows.append({"batch": b, "dense_tok_s": b / min(td), "sparse_tok_s": b / min(ts),
                     "speedup": min(td) / min(ts), "dense_step_ms": min(td) * 1e3, "sparse_step_ms": min(ts) * 1e3,
                     "logits_rel_diff": diff})
    weights = lambda m: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())  # noqa: E731
                            if t.is_cuda) + sum(l.tiles.nbytes for l in m.modules() if getattr(l, "tiles", None))
    return {"context": context, "steps": steps, "layers_swapped": len(info["swapped"]),
            "dtype": str(next(dense.parameters()).dtype).removeprefix("torch."),
            "gpu_weight_bytes_dense": weights(dense), "gpu_weight_bytes_sparse": weights(sparse),
            "memory_allocated_before_copy": before, "rows": rows}
