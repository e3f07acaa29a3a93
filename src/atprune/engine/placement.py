"""Where weights and activations live during the block-by-block pass, and how many windows go at once.

* Default: the whole model and every calibration activation on the compute device.
* ``offload``: the decoder blocks stay in CPU memory and each is moved to the compute device only while it is
  calibrated, pruned and run (everything outside the blocks -- embeddings, rotary tables, final norm, lm_head --
  stays on the device). Peak device memory is then one block plus the activations, so a model larger than the
  device can be pruned (the layer-wise offloading of the SparseGPT / Wanda reference scripts, done here for any
  decoder the :class:`atprune.models.adapter.Adapter` understands).
* ``offload_activations``: the calibration hidden states between blocks are kept in pinned CPU memory and
  streamed to the device one batch at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Placement:
    """Device placement for the sequential engine.

    Attributes:
        device: compute device.
        offload: keep decoder blocks on the CPU between uses (see module docstring).
        offload_activations: keep ``[batch, seqlen, hidden]`` activations in pinned CPU memory between blocks.
    """

    device: torch.device
    offload: bool = False
    offload_activations: bool = False
    blocks: nn.ModuleList | None = None  # set by prepare()

    def __post_init__(self):
        # block id -> [(owning module's _parameters or _buffers, name, tensor object, its CPU data)]
        self._home: dict[int, list[tuple[dict, str, torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def default_for(cls, model: nn.Module) -> "Placement":
        """Everything where the model's first parameter is (no offloading)."""
        return cls(next(model.parameters()).device)

    @property
    def _host(self) -> bool:
        return self.device.type != "cpu"

    def prepare(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Put ``model`` in place: with ``offload`` the blocks on the CPU and every other tensor on ``device``;
        otherwise the whole model on ``device``."""
        self.blocks = blocks
        if not self.offload:
            model.to(self.device)
            return
        blocks.to("cpu")
        in_blocks = {id(m) for m in blocks.modules()}
        for module in model.modules():
            if id(module) not in in_blocks:
                module._apply(lambda t: t.to(self.device), recurse=False)

    def enter(self, block: nn.Module) -> None:
        """Before ``block`` runs: move it to the compute device (offload only), remembering its CPU tensors. A block
        already on the device (entered and not left) stays as it is."""
        if self.offload and id(block) not in self._home:
            self._home[id(block)] = [(table, name, t, t.data) for m in block.modules()
                                     for table in (m._parameters, m._buffers) for name, t in table.items()
                                     if t is not None]
            block.to(self.device)

    def leave(self, block: nn.Module, modified: bool = True) -> None:
        """After ``block`` is done (offload only): its tensors get back the CPU storage they had before
        :meth:`enter`, into which the device values are copied first if ``modified`` (pruned); unmodified blocks
        (capture, evaluation) just drop the device copy, with no transfer back and no new CPU allocation."""
        if not self.offload:
            return
        home = self._home.pop(id(block), None)
        if home is None:
            block.to("cpu")
            return
        with torch.no_grad():
            for table, name, tensor, data in home:  # the same objects (.to() may have replaced them)
                current = table.get(name)
                if modified and current is not None:
                    value = current.detach()
                    if value.shape == data.shape and value.dtype == data.dtype:
                        data.copy_(value)
                    else:
                        data = value.to("cpu")
                tensor.data = data
                table[name] = tensor

    def fetch(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stored activation, on the compute device."""
        return hidden.to(self.device, non_blocking=True)

    def store(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation to keep until the next block: pinned CPU memory with ``offload_activations``."""
        if not (self.offload_activations and self._host):
            return hidden
        out = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        out.copy_(hidden, non_blocking=True)
        return out

    @contextlib.contextmanager
    def streaming(self, blocks: nn.ModuleList | None = None):
        """While active, every block (of ``blocks``, default those given to :meth:`prepare`) moves itself to the
        device when called and afterwards drops the device copy, keeping its unchanged CPU tensors (for full forward
        passes of an offloaded model that change no weight: capturing block inputs, evaluation). No-op without
        offload."""
        if not self.offload:
            yield
            return
        blocks = blocks if blocks is not None else self.blocks
        handles = []
        for block in blocks:
            handles.append(block.register_forward_pre_hook(lambda m, args: self.enter(m)))
            handles.append(block.register_forward_hook(lambda m, args, out: self.leave(m, modified=False)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for block in blocks:  # a pass that raised inside a block left it on the device
                if id(block) in self._home:
                    self.leave(block, modified=False)


def window_bytes(config, seqlen: int, logits: bool = False) -> int:
    """Estimated transient memory (bytes) of one window of ``seqlen`` tokens inside one block during a statistics or
    output pass, plus the logits of a whole-model pass with ``logits``.

    Per token: ``24 * hidden + 9 * intermediate`` values (measured peak on tiny LLaMA blocks, float32, SDPA attention:
    about ``20 * hidden + 7 * intermediate``: the norms' float32 copies, q/k/v and their rotary temporaries, the
    gate/up products, the statistics' float32 squares), plus ``4 * heads * seqlen`` with eager attention (the
    ``[heads, seqlen, seqlen]`` scores, softmax and mask), each counted at 4 bytes whatever the model's dtype (norms and
    statistics run in float32), so 16-bit runs are over-estimated by up to 2x; plus ``vocab * 12`` bytes with
    ``logits`` (the logits and their float32 log-softmax). ``tests/test_placement.py`` checks the estimate against the
    measured peak.

    Args:
        config: the model's (text) config; ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
            ``vocab_size`` and ``_attn_implementation`` are read (GPT-2 / OPT names as fallbacks).
    """
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 32
    values = 24 * hidden + 9 * inter
    if getattr(config, "_attn_implementation", None) == "eager":
        values += 4 * heads * seqlen
    per_window = seqlen * values * 4
    if logits:
        per_window += seqlen * getattr(config, "vocab_size", 32000) * 12
    return per_window


def auto_batch_size(config, seqlen: int, nsamples: int, device: torch.device, dtype: torch.dtype,
                    cap: int = 16, logits: bool = False) -> int:
    """Calibration windows per forward pass: 1 on CPU; on CUDA as many as half the free memory (the driver's free
    memory plus what PyTorch's allocator holds unused) holds, by the estimate :func:`window_bytes` of one window, at
    most ``cap`` and ``nsamples``.

    Args:
        config: the model's (text) config (see :func:`window_bytes`).
        dtype: the model's dtype (the estimate counts every value at 4 bytes; kept for callers).
    """
    if device.type != "cuda":
        return 1
    per_window = window_bytes(config, seqlen, logits)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch, reusable
    return int(max(1, min(cap, nsamples, (free // 2) // max(per_window, 1))))


@contextlib.contextmanager
def exact_tf32_for(dtype: torch.dtype):
    """Allow TF32 matmuls while accumulating statistics of ``dtype`` activations when that loses nothing.

    bfloat16 and float16 values are exactly representable in TF32 (8-bit exponent, 10-bit mantissa), so
    ``X^T X`` of such inputs cast to float32 has exact products and float32 accumulation on TF32 tensor
    cores, several times faster than full float32 on NVIDIA GPUs (tensor-core accumulation rounds slightly
    more: relative error 1.3e-6 against float64 on an H200, vs 2.5e-7 for full float32; tests/test_gpu.py).
    For float32 activations nothing changes.
    """
    if dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory on a CUDA ``device`` since the last reset, in GiB; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
