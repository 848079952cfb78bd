"""Shared fixtures: a small template image and tiny random-weight models.

Everything is made here from what the installed packages ship (nilearn's template);
nothing is read from outside the project.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_nipype.models import AffineConfig, AffineDetector, HyperUNet, UNetConfig
from synthmorph_nipype.models.checkpoint import save_checkpoint

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


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Torch checkpoints of tiny random models: ``affine`` (detector), ``joint``
    (detector + hyper U-Net, also used for ``deform``)."""
    root = tmp_path_factory.mktemp("weights")
    affine, deform = tiny_models()
    paths = {"affine": root / "affine.pt", "joint": root / "joint.pt"}
    save_checkpoint(paths["affine"], affine=affine)
    save_checkpoint(paths["joint"], affine=affine, deform=deform)
    return paths


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """nilearn's bundled ICBM152 2009 template at 2 mm (99 x 117 x 95), float32, RAS."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    out = tmp_path_factory.mktemp("template") / "template.nii.gz"
    nb.save(nb.Nifti1Image(data, img.affine), out)
    return out
