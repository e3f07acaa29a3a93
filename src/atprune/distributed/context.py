"""The process group of a ``torchrun`` launch, and the checks every rank runs before heavy work.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each process
(https://pytorch.org/docs/stable/elastic/run.html); :func:`launched` reads them and :func:`init` joins the group
with the ``env://`` rendezvous: NCCL when the run uses CUDA devices (one per local rank), gloo otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atprune.errors import ConfigError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class World:
    """This process's place in the group.

    Attributes:
        rank: 0 .. size - 1; rank 0 is the writer (reports, checkpoints).
        size: number of processes.
        device: the torch device this rank computes on (``cuda:LOCAL_RANK`` with NCCL, else the CPU).
    """

    rank: int
    size: int
    device: torch.device

    @property
    def writer(self) -> bool:
        return self.rank == 0


def init(device: str | torch.device = "cpu") -> World:
    """Join (or reuse) the default process group.

    Args:
        device: the run's device; ``cuda`` picks ``cuda:LOCAL_RANK`` and NCCL, anything else gloo.

    Raises:
        ConfigError: a CUDA run with more local ranks than visible GPUs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                              "start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(dist.get_rank(), dist.get_world_size(), device)


def digest(payload) -> str:
    """SHA-256 hex digest of ``payload``: a tensor (its dtype, shape and bytes) or anything JSON can write (sorted
    keys; other objects by ``repr``)."""
    h = hashlib.sha256()
    if isinstance(payload, torch.Tensor):
        t = payload.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(json.dumps(payload, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def check_same(what: str, payload) -> None:
    """All-gather the digest of ``payload`` and raise on every rank unless all ranks hold the same.

    Args:
        what: what the payload is, for the message (``"options"``, ``"calibration tokens"``).

    Raises:
        ConfigError: one line naming the ranks that differ from rank 0.
    """
    mine = digest(payload)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise ConfigError(f"ranks disagree on the {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0 "
                          f"(digests {every[0][:12]} vs {every[differ[0]][:12]}); start every rank with the same "
                          "command and data")


def rank_job(job):
    """Join the process group for a job of :mod:`atprune.jobs` (any dataclass with ``device`` and ``progress``):
    check that every rank holds the same options, give each rank its own GPU, keep progress output on rank 0.
    Returns ``(world, job)``.

    Raises:
        ConfigError: ranks that disagree on the options (see :func:`check_same`).
    """
    from dataclasses import asdict, replace

    from atprune.models.sources import resolve_device

    world = init(resolve_device(job.device))
    check_same("options", asdict(job))
    if world.device.type == "cuda":
        job = replace(job, device=str(world.device))
    if not world.writer:
        job = replace(job, progress=False)
    return world, job


def leave() -> None:
    """Leave the default process group if this process joined one (a process exiting with the group still up
    aborts in the backend's threads: ``terminate called without an active exception``)."""
    if dist.is_initialized():
        dist.destroy_process_group()
