"""A registration network run as a cascade: each pass corrects what the passes before left.

The engine (``--passes``) and the trainer (``passes`` in a training config) run the same
loop, so that what a U-Net is trained for is what it is run as.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .integrate import half_way

#: one pass: the symmetric SVF ``(X, Y, Z, 3)`` (channels last, voxels) of two images and
#: anything else the network gives (returned from the first pass only)
Pass = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
#: an image warped by a displacement (channels last, voxels) on the SVF's grid
Warp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cascade(run_pass: Pass, image_1: torch.Tensor, image_2: torch.Tensor, passes: int,
            warp: Warp) -> tuple[torch.Tensor, Any]:
    """The SVF of ``passes`` runs of ``run_pass``: each run after the first sees both
    images warped half-way along the SVF so far (``warp``: image 1 by the displacement of
    ``exp(v / 2)``, image 2 by that of ``exp(-v / 2)``, so that they meet in the middle)
    and adds its own SVF, a correction of what is left (summing SVFs composes their maps
    to first order). The half-way warps carry no gradient: each pass learns from what
    the sum misses. Returns the sum and what the first pass gave besides its SVF. The
    images may live on a finer grid than the SVF (``run_pass`` pools them, ``warp``
    upsamples the displacement).

    >>> shift = lambda a, b: (torch.full((4, 4, 4, 3), 0.5 * float(a.mean() - b.mean())),
    ...                       None)
    >>> still = lambda img, disp: img
    >>> one, _ = cascade(shift, torch.ones(4, 4, 4), torch.zeros(4, 4, 4), 1, still)
    >>> two, _ = cascade(shift, torch.ones(4, 4, 4), torch.zeros(4, 4, 4), 2, still)
    >>> float(one[0, 0, 0, 0]), float(two[0, 0, 0, 0])
    (0.5, 1.0)
    """
    if passes < 1:
        raise ValueError(f"a cascade runs the network at least once, got {passes} passes")
    svf, extra = run_pass(image_1, image_2)
    for _ in range(passes - 1):
        with torch.no_grad():
            half_1, half_2 = half_way(svf.detach())
            moved_1, moved_2 = warp(image_1, half_1), warp(image_2, half_2)
        svf = svf + run_pass(moved_1, moved_2)[0]
    return svf, extra
