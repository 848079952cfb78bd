"""Jacobian determinant of a dense transform, the measure of folding."""

from __future__ import annotations

import torch


def jacobian_det(disp: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + disp(x)`` for a channels-last displacement
    ``(X, Y, Z, 3)`` (in the units of ``spacing``), by central differences (one-sided at
    the edges). A value <= 0 marks a fold.

    >>> disp = torch.zeros(4, 4, 4, 3); disp[..., 0] = torch.arange(4.0)[:, None, None]
    >>> float(jacobian_det(disp).mean())  # a uniform stretch by 2 along the first axis
    2.0
    """
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"expected a (X, Y, Z, 3) displacement, got {tuple(disp.shape)}")
    grads = torch.gradient(disp.double(), spacing=[float(s) for s in spacing], dim=(0, 1, 2))
    jac = torch.stack(grads, dim=-1)  # (..., component, axis)
    jac = jac + torch.eye(3, dtype=jac.dtype, device=jac.device)
    return torch.linalg.det(jac)


def folding_percent(disp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Percentage of voxels (within ``mask``) whose Jacobian determinant is <= 0."""
    det = jacobian_det(disp)
    if mask is not None:
        det = det[mask.bool()]
    return float((det <= 0).double().mean() * 100) if det.numel() else 0.0
