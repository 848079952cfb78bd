"""Where the engine runs: the torch device and the number of CPU threads."""

from __future__ import annotations

import os

import torch

from ..errors import SynthMorphError


def pick_device(gpu: bool | None = None) -> torch.device:
    """``cuda`` when asked for (an error if absent), the CPU with ``gpu=False``, and with
    ``gpu=None`` CUDA when present."""
    if gpu and not torch.cuda.is_available():
        raise SynthMorphError("GPU requested but CUDA is not available on this machine")
    if gpu is None:
        gpu = torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads (default: all cores)."""
    torch.set_num_threads(max(1, threads or len(os.sched_getaffinity(0))))
