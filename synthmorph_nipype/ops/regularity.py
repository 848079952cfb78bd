"""Smoothness of displacement fields."""

from __future__ import annotations

import torch


def grad_l2(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a displacement ``(B, 3, X, Y, Z)`` over the three
    axes (VoxelMorph's ``Grad('l2')``): 0 for any translation.

    >>> float(grad_l2(torch.ones(1, 3, 4, 4, 4)))
    0.0
    >>> x = torch.arange(4.0).reshape(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4)
    >>> float(grad_l2(x))  # unit slope along the first axis only
    0.3333333432674408
    """
    diffs = [disp.diff(dim=d) for d in (2, 3, 4)]
    return sum(d.pow(2).mean() for d in diffs) / 3
