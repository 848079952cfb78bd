"""Helpers the tests share: tiny model configurations and seeded random-weight models."""

from __future__ import annotations

import numpy as np
import torch

from synthmorph_nipype.models import AffineConfig, AffineDetector, HyperUNet, UNetConfig

TINY_AFFINE = AffineConfig(num_feat=6, enc_nf=(4, 5, 6, 7), add_nf=(7, 6, 5, 4))
TINY_UNET = UNetConfig(hyp_units=(4, 6, 8, 8), enc_nf=(4, 5, 6, 7), dec_nf=(7, 6, 5, 4),
                       add_nf=(4, 4, 3, 3))


def tiny_models(seed: int = 0, field_scale: float = 0.05):
    """Seeded random tiny models; the last U-Net layer is scaled down so that velocity
    fields stay moderate (tests that invert warps scale it down further)."""
    torch.manual_seed(seed)
    affine = AffineDetector(TINY_AFFINE).eval()
    deform = HyperUNet(TINY_UNET).eval()
    with torch.no_grad():
        last = deform.convs[-1]
        last.hyperkernel.weight.mul_(field_scale)
        last.hyperkernel.bias.mul_(field_scale)
    return affine, deform


def random_affine(rng, scale=0.2) -> torch.Tensor:
    m = np.eye(4)
    m[:3, :3] += rng.uniform(-scale, scale, (3, 3))
    m[:3, 3] = rng.uniform(-5, 5, 3)
    return torch.from_numpy(m)


def apply(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return pts @ m[:3, :3].T + m[:3, 3]
