"""``atprune bench``: is the sparse model right, and is it faster? Per-layer GEMV timing on random matrices
(model-free mode) or on a model's own layers, after a correctness gate; end to end in :mod:`atprune.sparse.bench_model`.

Method. Every comparison runs side by side in one process, same dtype, same threads: torch ``F.linear`` on the
dense (masked) weight, atprune's own dense kernel (the same loop structure as the sparse one, the fair
hand-written baseline) and :class:`SparseLinear`. Each timed pass calls every one of ``n`` distinct layers once,
where ``n`` is chosen so that the dense weights of a pass exceed twice the last-level cache (otherwise the timing
measures cache, not memory); the variants take turns pass by pass (so load from other processes hits them alike).
Each call is timed alone and a layer's time is its fastest of ``repeats`` calls (other load only ever adds time,
and a call of a few ms mostly escapes the time slices another process takes on a shared machine, where a whole
pass would not); the median call is recorded too. ``speedup`` = (faster of torch and own dense) / sparse.

Before anything is timed the gate compares every sparse layer's output with the reference
``F.linear`` in float32 on the dense masked weight, within the dtype's rounding plus fp32 summation bound; a
mismatch raises :class:`BenchMismatch` and nothing is timed.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from atprune.atomic import atomic_file
from atprune.errors import ConfigError
from atprune.sparse import kernels
from atprune.sparse.format import DTYPES, pack
from atprune.sparse.linear import SparseLinear

EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchMismatch(RuntimeError):
    """The sparse output differs from the dense masked output beyond rounding: the benchmark refuses to time."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``. Raises :class:`ConfigError` for anything but float32/bfloat16/float16."""
    if isinstance(name, torch.dtype) and name in DTYPES:
        return name
    if name not in DTYPE_NAMES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def parse_shapes(items: list[str]) -> list[tuple[int, int]]:
    """``["11008x4096"]`` -> ``[(11008, 4096)]`` (out x in). Raises :class:`ConfigError` on a malformed item."""
    shapes = []
    for item in items:
        parts = item.lower().split("x")
        try:
            out, inp = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--shapes takes OUTxIN, e.g. 11008x4096, got {item!r}") from None
        if out < 1 or inp < 1:
            raise ConfigError(f"--shapes takes positive OUTxIN, got {item!r}")
        shapes.append((out, inp))
    return shapes


def parse_batches(text: str | list) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; each in 1..4096. Raises :class:`ConfigError`."""
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        batches = [int(b) for b in items]
    except ValueError:
        raise ConfigError(f"--batch takes a comma list of token counts, e.g. 1,4,16, got {text!r}") from None
    if not batches or any(b < 1 or b > 4096 for b in batches):
        raise ConfigError(f"--batch values must be in 1..4096, got {text!r}")
    return batches


def machine() -> dict:
    """CPU model, cores, threads used, last-level cache, torch version and this checkout's commit (if any)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": kernels.cpu_model(), "machine": platform.machine(), "logical_cpus": _cpu_count(),
            "threads": torch.get_num_threads(), "llc_bytes": kernels.last_level_cache_bytes(),
            "torch": torch.__version__, "commit": commit, "kernels_available": kernels.cpu_kernels()}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gate_layer(layer: SparseLinear, dense: torch.Tensor, tokens: int, seed: int = 0, name: str = "") -> float:
    """Compare ``layer`` on random ``[tokens, in]`` input with float32 ``F.linear`` on ``dense`` ``[out, in]``
    (the dense masked weight); return the worst error as a fraction of the allowed bound.

    Raises:
        BenchMismatch: an output outside ``eps(dtype) |ref| + 4 (in + 2) 2^-24 (|x| |W|^T)`` (+ bias terms).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layer.in_features, generator=g).to(layer.weight_dtype)
    bias = None if layer.bias is None else layer.bias.float()
    ref = F.linear(x.float(), dense.float(), bias)
    mag = F.linear(x.float().abs(), dense.float().abs(), None if bias is None else bias.abs())
    tol = EPS[layer.weight_dtype] * ref.abs() + 4 * (layer.in_features + 2) * 2.0 ** -24 * mag + 1e-30
    with torch.no_grad():
        got = layer(x).float()
    excess = float(((got - ref).abs() / tol).max()) if ref.numel() else 0.0
    if not math.isfinite(excess) or excess > 1.0:
        raise BenchMismatch(f"sparse output of {name or 'a layer'} {layer.out_features}x{layer.in_features} differs "
                            f"from the dense masked output ({excess:.3g} x the rounding bound, {tokens} tokens); "
                            "refusing to time")
    return excess


def time_passes(variants: dict, repeats: int) -> dict:
    """``variants``: name -> list of calls, one per distinct layer. One untimed warm-up pass each, then
    ``repeats`` rounds in which every variant makes one pass over its layers in turn, each call timed alone.
    Returns name -> {"best_s": sum over layers of each layer's fastest call, "median_s": median call x layers}:
    the time of one pass over all layers. Timing each call alone (a few ms) keeps a time slice taken by another
    process on a shared machine out of most calls, where a whole pass would almost always catch one."""
    for calls in variants.values():
        for call in calls:
            call()
    times = {name: [[] for _ in calls] for name, calls in variants.items()}
    clock = time.perf_counter
    for _ in range(repeats):
        for name, calls in variants.items():
            for i, call in enumerate(calls):
                start = clock()
                call()
                times[name][i].append(clock() - start)
    return {name: {"best_s": sum(min(t) for t in per_layer),
                   "median_s": statistics.median([x for t in per_layer for x in t]) * len(per_layer)}
            for name, per_layer in times.items()}


def layer_variants(layers: list[SparseLinear], dense: list[torch.Tensor], tokens: int, kernel_id: int | None,
                   seed: int = 0) -> dict:
    """Per variant (torch F.linear, the own dense kernel when the C++ kernels are built, sparse), one call per
    layer, all on the same random ``[tokens, in]`` input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layers[0].in_features, generator=g).to(layers[0].weight_dtype)
    variants = {"torch": [lambda w=w, b=lay.bias: F.linear(x, w, b) for w, lay in zip(dense, layers)]}
    if kernel_id is not None:
        ext = kernels.extension()
        variants["dense"] = [lambda w=w, b=lay.bias: ext.dense_mm(x, w, b, kernel_id) for w, lay in zip(dense, layers)]
    variants["sparse"] = [lambda lay=lay: lay(x) for lay in layers]
    return variants


def summarize(timed: dict, n_layers: int, dense_bytes: int, sparse_bytes: int) -> dict:
    """Per-call microseconds, effective GB/s and the speedup over the faster dense variant."""
    row = {}
    for name, t in timed.items():
        nbytes = sparse_bytes if name == "sparse" else dense_bytes
        row[f"{name}_us"] = t["best_s"] / n_layers * 1e6
        row[f"{name}_median_us"] = t["median_s"] / n_layers * 1e6
        row[f"{name}_GBps"] = nbytes / t["best_s"] / 1e9
    dense_names = [n for n in ("torch", "dense") if n in timed]
    best = min(dense_names, key=lambda n: timed[n]["best_s"])
    row["baseline"] = best
    row["speedup"] = timed[best]["best_s"] / timed["sparse"]["best_s"]
    row["speedup_median"] = min(timed[n]["median_s"] for n in dense_names) / timed["sparse"]["median_s"]
    return row


def random_pruned(out: int, inp: int, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random normal ``[out, in]`` weight with each entry zeroed with probability ``sparsity``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    return w.to(dtype)


def bench_shapes(shapes: list[tuple[int, int]], sparsities: list[float], dtype: torch.dtype, batches: list[int],
                 kernel: str = "auto", repeats: int = 7, layers: int | None = None, progress=print) -> dict:
    """Model-free mode: for each shape and sparsity, ``layers`` distinct random pruned matrices (default: enough
    for twice the last-level cache, at least 4), gated, then timed at each batch size.

    Returns the record (``machine``, ``dtype``, ``kernel``, ``results``: one row per shape x sparsity x batch).

    Raises:
        ConfigError: bad sparsity, dtype or kernel. BenchMismatch: the gate failed.
    """
    for s in sparsities:
        if not 0 <= s < 1:
            raise ConfigError(f"--sparsity must be in [0, 1), got {s}")
    dtype = parse_dtype(dtype)
    kernel = kernels.resolve_kernel(kernel)
    kid = kernels.KERNEL_IDS.get(kernel)
    info = machine()
    llc = info["llc_bytes"] or 32 * 2 ** 20
    itemsize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for out, inp in shapes:
        n = layers or max(4, math.ceil(2 * llc / (out * inp * itemsize)))
        for s in sparsities:
            progress(f"building {n} layers {out}x{inp} at sparsity {s} ({dtype})")
            dense = [random_pruned(out, inp, s, dtype, seed=1000 * i + 7) for i in range(n)]
            sparse = [SparseLinear(pack(w), None, kernel=kernel, max_sparse_tokens=max(batches)) for w in dense]
            for i, (lay, w) in enumerate(zip(sparse, dense)):
                for b in sorted({1, max(batches)}):
                    gate_layer(lay, w, b, seed=i, name=f"layer {i}")
            dense_bytes = sum(w.numel() * itemsize for w in dense)
            sparse_bytes = sum(lay.packed.nbytes for lay in sparse)
            achieved = 1 - sum(lay.packed.nnz for lay in sparse) / (n * out * inp)
            for b in batches:
                timed = time_passes(layer_variants(sparse, dense, b, kid), repeats)
                row = {"shape": [out, inp], "sparsity": s, "achieved_sparsity": achieved, "batch": b, "layers": n,
                       "cycled_dense_bytes": dense_bytes, "cycled_sparse_bytes": sparse_bytes}
                row.update(summarize(timed, n, dense_bytes, sparse_bytes))
                rows.append(row)
                progress(format_row(row))
            del dense, sparse
    return {"mode": "shapes", "machine": info, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel,
            "repeats": repeats, "results": rows}


def format_row(row: dict) -> str:
    """One line: shape, sparsity, batch, the three times (best, us per layer), speedup."""
    own = f" dense {row['dense_us']:8.1f}" if "dense_us" in row else ""
    return (f"{row['shape'][0]:>6}x{row['shape'][1]:<6} s={row['sparsity']:.2f} b={row['batch']:>2}  "
            f"torch {row['torch_us']:8.1f}{own} sparse {row['sparse_us']:8.1f} us  "
            f"speedup {row['speedup']:.2f}x (median {row['speedup_median']:.2f}x)")


def header(record: dict) -> str:
    m = record["machine"]
    llc = f"{m['llc_bytes'] / 2 ** 20:.0f} MiB" if m["llc_bytes"] else "unknown"
    return (f"cpu: {m['cpu']} ({m['logical_cpus']} logical CPUs, last-level cache {llc}); threads {m['threads']}; "
            f"dtype {record['dtype']}; sparse kernel {record['kernel']}; torch {m['torch']}; commit {m['commit']}")


def write_record(path: str | Path, record: dict) -> None:
    """Write ``record`` as JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
