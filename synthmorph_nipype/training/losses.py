"""Training objectives: label overlap (field smoothness is in
:mod:`synthmorph_nipype.ops.regularity`).

All functions work on batched, channels-first tensors and return a scalar (the batch
mean), so new objectives can be combined as weighted sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hyper_loss", "label_mse", "one_hot", "soft_dice"]


def one_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(B, X, Y, Z)`` integer labels -> ``(B, L, X, Y, Z)`` float one-hot maps.

    >>> one_hot(torch.tensor([[[[0, 2]]]]), 3)[0, :, 0, 0].tolist()
    [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    """
    return F.one_hot(labels.long(), num_labels).permute(0, 4, 1, 2, 3).float()


def label_mse(moved: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared error of (soft) one-hot label maps ``(B, L, ...)``, SynthMorph's
    similarity term: 0 for identical maps, scaled so that it does not depend on ``L``.

    >>> a = one_hot(torch.tensor([[[[0, 1]]]]), 2)
    >>> float(label_mse(a, a)), float(label_mse(a, a.flip(1)))
    (0.0, 2.0)
    """
    return ((moved - fixed) ** 2).sum(1).mean()


def soft_dice(moved: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean soft Dice over labels (skipping label 0, the background), in [0, 1].

    >>> a = one_hot(torch.tensor([[[[0, 1, 1, 2]]]]), 3)
    >>> round(float(soft_dice(a, a)), 6)
    1.0
    """
    dims = tuple(range(2, moved.ndim))
    inter = (moved * fixed).sum(dims)
    total = moved.sum(dims) + fixed.sum(dims)
    dice = (2 * inter + eps) / (total + eps)
    return dice[:, 1:].mean()


def hyper_loss(moved: torch.Tensor, fixed: torch.Tensor, disp: torch.Tensor,
               lam: torch.Tensor) -> torch.Tensor:
    """SynthMorph's objective for a hypernetwork model: ``(1 - lambda) * label MSE +
    lambda * Grad-l2`` with one ``lambda`` per batch item ``(B,)``."""
    sim = ((moved - fixed) ** 2).sum(1).flatten(1).mean(1)
    smooth = sum(disp.diff(dim=d).pow(2).flatten(1).mean(1) for d in (2, 3, 4)) / 3
    return ((1 - lam) * sim + lam * smooth).mean()
