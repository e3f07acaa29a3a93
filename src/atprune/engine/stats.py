"""Statistics of the inputs of one Linear layer, collected over calibration tokens.

Collectors are separate from pruners so that one pass over the calibration data serves
every pruner (and later every allocator) that needs the same numbers: Wanda's input
feature norms and SparseGPT's Hessian are both built here, once.
"""

from __future__ import annotations

import torch


class InputStats:
    """Running sums over the rows ``x`` (one per token) of a Linear layer's input ``X``.

    Args:
        in_features: width of the layer input (columns of the weight matrix).
        hessian: also accumulate ``sum_t x_t x_t^T`` (needed by SparseGPT; ``in_features^2``
            floats of memory).
        device: where the sums live (default: the device of the first batch).

    Attributes:
        ntokens: number of token rows seen so far (int).
        sq_norm: ``[in_features]`` float32, ``sum_t x_tj^2``; ``sq_norm.sqrt()`` is Wanda's
            ``||X_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", Eq. 1).
        xtx: ``[in_features, in_features]`` float32, ``sum_t x_t x_t^T`` (unnormalised
            Hessian ``X X^T`` of the layer-wise least-squares problem, Frantar & Alistarh 2023,
            "SparseGPT", Sec. 3), or ``None`` when ``hessian=False``.
        total: ``[in_features]`` float32, ``sum_t x_tj`` (first moment: DSnoT's mean input, and the variance).
        windows: number of calibration windows seen (the leading dimension of a ``[batch, seqlen, in]`` input; 1
            per call for 2-D inputs); DSnoT's official code scales the mean input by tokens per window.
        cache: dict where consumers keep what they derive from these numbers once (layers reading the same
            input share one InputStats, so e.g. SparseGPT factors their common Hessian once).
    """

    #: the additive state: the tensors (None until the first input) and the counts whose field-wise sums over two
    #: objects are the statistics of both inputs together (what a data-parallel caller adds over processes); a new
    #: running sum must be listed here
    SUMS = ("sq_norm", "total", "xtx")
    COUNTS = ("ntokens", "windows")

    def __init__(self, in_features: int, hessian: bool = False, device: torch.device | None = None):
        self.in_features = in_features
        self.want_hessian = hessian
        self.device = device
        self.ntokens = 0
        self.windows = 0
        self.sq_norm: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None
        self.cache: dict = {}  # what consumers derive once per statistics (e.g. SparseGPT's inverse factor)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs.

        Args:
            x: ``[..., in_features]`` in any float dtype; every leading index is one token.

        Raises:
            ValueError: if the last dimension is not ``in_features``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        self.windows += x.shape[0] if x.dim() >= 3 else 1
        x = x.detach().reshape(-1, self.in_features)
        if self.device is not None:
            x = x.to(self.device)
        if self.sq_norm is None:
            self.sq_norm = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
            self.total = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
            if self.want_hessian:
                self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        if self.xtx is None and x.dtype in (torch.bfloat16, torch.float16):
            # one float32-accumulating reduction over the 16-bit input, no float32 copy of it
            self.sq_norm += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_()
            self.total += x.sum(dim=0, dtype=torch.float32)
        else:
            x = x.float()
            self.sq_norm += x.square().sum(dim=0)
            self.total += x.sum(dim=0)
            if self.xtx is not None:
                self.xtx.addmm_(x.t(), x)
        self.ntokens += x.shape[0]

    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` for every input feature j: ``[in_features]`` float32.

        Raises:
            RuntimeError: if no input was added.
        """
        if self.sq_norm is None:
            raise RuntimeError("no calibration input reached this layer")
        return self.sq_norm.sqrt()

    def mean(self) -> torch.Tensor:
        """``E_t[x_tj]``: ``[in_features]`` float32 (RuntimeError if no input was added)."""
        if self.total is None:
            raise RuntimeError("no calibration input reached this layer")
        return self.total / self.ntokens

    def var(self) -> torch.Tensor:
        """Population variance ``E_t[x_tj^2] - E_t[x_tj]^2`` over all tokens: ``[in_features]`` float32, >= 0."""
        mean = self.mean()
        return (self.sq_norm / self.ntokens - mean.square()).clamp_min_(0.0)

    def hessian(self, release: bool = False) -> torch.Tensor:
        """``X X^T / ntokens``: ``[in_features, in_features]`` float32.

        Args:
            release: divide the accumulator in place and hand it over (no copy; this object no longer holds a
                Hessian afterwards). Default: a new tensor.

        Raises:
            RuntimeError: if collected without ``hessian=True``, with no input, or already released.
        """
        if self.xtx is None:
            raise RuntimeError("Hessian not collected for this layer (InputStats(hessian=True) needed) or already "
                               "released")
        if not release:
            return self.xtx / max(self.ntokens, 1)
        h, self.xtx = self.xtx.div_(max(self.ntokens, 1)), None
        return h
