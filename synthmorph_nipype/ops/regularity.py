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


def grad_sq(disp: torch.Tensor) -> torch.Tensor:
    """Voxel-wise squared forward differences of a displacement ``(B, 3, X, Y, Z)``, summed
    over components and averaged over the three axes: ``(B, 1, X-1, Y-1, Z-1)`` (each voxel
    with its neighbours one step up every axis). Its mean is :func:`grad_l2` up to the
    border voxels and the sum over components.

    >>> x = torch.arange(4.0).reshape(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4)
    >>> grad_sq(x).unique().tolist()  # slope 1 along one axis, in each of 3 components
    [1.0]
    """
    crop = (slice(None), slice(None), slice(None, -1), slice(None, -1), slice(None, -1))
    d = [disp.diff(dim=k)[crop[:k] + (slice(None),) + crop[k + 1:]] for k in (2, 3, 4)]
    return sum(x.pow(2).sum(1, keepdim=True) for x in d) / 3


def weighted_grad_l2(disp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``weight * |grad u|^2`` (:func:`grad_sq`), ``weight`` a ``(B, 1, X, Y, Z)``
    voxel-wise regularisation map (Chen et al.'s spatially varying penalty)."""
    return (weight[..., :-1, :-1, :-1] * grad_sq(disp)).mean()


def beta_prior(lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """Negative log-density, up to a constant, of a Beta(alpha, 1) prior on a voxel-wise
    weight map ``lam`` in (0, 1]: ``(1 - alpha) * mean(log lam)``. For alpha > 1 it pulls
    the weights up towards 1, against the penalty that pulls them down where the field
    must bend.

    >>> round(float(beta_prior(torch.full((1, 1, 2, 2, 2), 0.5), 2.0)), 4)
    0.6931
    """
    return (1 - alpha) * lam.log().mean()
