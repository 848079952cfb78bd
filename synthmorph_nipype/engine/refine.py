"""Test-time refinement: optimise the network's velocity field on the pair itself.

The deformable network predicts a stationary velocity field (SVF) in one pass; refinement
then takes it as the starting point of ``iterations`` Adam steps on the same objective
form the network was trained with, ``(1 - lambda) * similarity + lambda * Grad-l2``, but
with an image similarity (no labels at test time), symmetrically: image 1 pulled onto
image 2 and image 2 onto image 1 through the inverse (the negated SVF).
"""

from __future__ import annotations

import torch

from ..ops.grid import voxel_grid
from ..ops.integrate import integrate_svf
from ..ops.regularity import grad_l2
from ..ops.sampling import sample_linear
from ..ops.similarity import IMAGE_SIMILARITIES


def refine_svf(svf: torch.Tensor, image_1: torch.Tensor, image_2: torch.Tensor, *,
               iterations: int, lam: float = 0.5, similarity: str = "ncc", steps: int = 7,
               lr: float = 0.05) -> tuple[torch.Tensor, list[float]]:
    """Refine a channels-last SVF ``(X, Y, Z, 3)`` (voxels) between two images ``(X, Y, Z)``
    on the same grid; returns the refined SVF and the loss before each step.

    ``integrate(svf)`` maps a point of image 2's grid to where image 1 is sampled (the
    engine's pull-back convention), ``integrate(-svf)`` the reverse.
    """
    if similarity not in IMAGE_SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}, choose from "
                         f"{', '.join(IMAGE_SIMILARITIES)}")
    sim = IMAGE_SIMILARITIES[similarity]
    grid = voxel_grid(image_1.shape, dtype=svf.dtype, device=svf.device)
    fixed_1, fixed_2 = image_1[None, None], image_2[None, None]
    velocity = svf.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([velocity], lr=lr)
    history = []
    with torch.enable_grad():
        for _ in range(iterations):
            d1, d2 = integrate_svf(velocity, steps), integrate_svf(-velocity, steps)
            moved_1 = sample_linear(image_1, grid + d1)[None, None]
            moved_2 = sample_linear(image_2, grid + d2)[None, None]
            similarity_term = 0.5 * (sim(moved_1, fixed_2) + sim(moved_2, fixed_1))
            smooth = 0.5 * (grad_l2(d1.permute(3, 0, 1, 2)[None])
                            + grad_l2(d2.permute(3, 0, 1, 2)[None]))
            loss = (1 - lam) * similarity_term + lam * smooth
            history.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return velocity.detach(), history
