"""Distillation: the U-Net taught the answer of the test-time refinement.

On a CPU the label-overlap objective lifts the U-Net only slowly: on held-out subjects it
stays well below what twenty steps of the test-time refinement reach from its own field
(issue 13). A distillation step runs that refinement (:func:`~synthmorph_nipype.engine.
refine.refine_svf` with the settings of the engine's 4 mm level - the training grid - but
not its last steps on the 2 mm grid, on the training pair's images, inside both brains)
from the U-Net's current field, and adds the end-point error between the U-Net's
displacement and the refined one to the similarity term: a dense target the network can
learn from its own inputs, and one that moves on as the network improves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.network import (
    REFINE_CROP_MARGIN,
    REFINE_EXACT_GRADIENT,
    REFINE_INT_STEPS,
    REFINE_RATE,
)
from ..engine.refine import refine_svf
from ..ops.similarity import IMAGE_SIMILARITIES


@dataclass(frozen=True)
class Distillation:
    """When and how the U-Net is taught the refinement's field.

    ``weight`` scales the end-point error (voxels of the training grid) to the refined
    displacement inside the similarity term (so the objective gets ``(1 - net_lambda) *
    weight`` times it); a step distils with probability ``prob``, feeding the hypernetwork
    ``net_lambda`` (the engine's default); the teacher runs ``iterations`` refinement
    steps of ``(1 - lam) * similarity + lam * Grad-l2``.
    """

    weight: float = 0.0
    prob: float = 0.5
    iterations: int = 20
    similarity: str = "mind+mi"
    lam: float = 0.85
    net_lambda: float = 0.5

    def __post_init__(self):
        if self.weight < 0 or not 0 <= self.prob <= 1 or self.iterations < 1:
            raise ValueError("distillation needs weight >= 0, prob in [0, 1] and at least "
                             "one refinement iteration")
        if self.similarity not in IMAGE_SIMILARITIES:
            raise ValueError(f"unknown distillation similarity {self.similarity!r}, choose "
                             f"from {', '.join(IMAGE_SIMILARITIES)}")
        if not 0 <= self.lam < 1 or not 0 <= self.net_lambda <= 1:
            raise ValueError("the distillation lambdas must lie in [0, 1) (refinement) and "
                             "[0, 1] (network)")


def brain_mask(onehot: torch.Tensor) -> torch.Tensor:
    """The labelled voxels of a one-hot map ``(1, L, *s)`` grown by one voxel, ``(*s)``
    (all voxels when none is labelled), as a user's slightly dilated brain mask.

    >>> m = torch.zeros(1, 2, 5, 5, 5); m[0, 0] = 1; m[0, 0, 2, 2, 2] = 0; m[0, 1, 2, 2, 2] = 1
    >>> int(brain_mask(m).sum())
    27
    """
    inside = 1 - onehot[:, :1].float()
    if not bool(inside.any()):
        return torch.ones_like(inside[0, 0])
    return F.max_pool3d(inside, 3, stride=1, padding=1)[0, 0]


@torch.no_grad()
def teacher_svf(svf: torch.Tensor, image_1: torch.Tensor, image_2: torch.Tensor,
                onehot_1: torch.Tensor, onehot_2: torch.Tensor,
                settings: Distillation, steps: int = REFINE_INT_STEPS) -> torch.Tensor:
    """The refined SVF ``(*s, 3)`` from the U-Net's ``svf`` (channels last, voxels of the
    4 mm training grid) between the images ``(1, 1, *s)``, the similarity inside both
    brains (grown by one voxel: the engine's 4 mm mask dilation); ``steps`` squaring steps
    at most inside the loop, as the engine."""
    refined, _ = refine_svf(svf.detach().float(), image_1[0, 0].float(),
                            image_2[0, 0].float(), iterations=settings.iterations,
                            lam=settings.lam, similarity=settings.similarity,
                            steps=min(steps, REFINE_INT_STEPS), lr=REFINE_RATE,
                            exact_gradient=REFINE_EXACT_GRADIENT,
                            crop_margin=REFINE_CROP_MARGIN, mask_1=brain_mask(onehot_1),
                            mask_2=brain_mask(onehot_2))
    return refined
