"""Test-time refinement: the optimisation recovers a known smooth warp on small volumes,
and ``--refine`` reaches it from the command line and the Nipype interface."""

from __future__ import annotations

import math

import nibabel as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.engine.refine import refine_svf
from synthmorph_nipype.interfaces import SynthMorphRegister
from synthmorph_nipype.ops.grid import voxel_grid
from synthmorph_nipype.ops.integrate import integrate_svf
from synthmorph_nipype.ops.sampling import sample_linear


def smooth(shape, seed, passes=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=gen)
    for _ in range(passes):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x[0, 0]


@pytest.mark.parametrize("similarity,lam", [("ncc", 0.3), ("mse", 0.05), ("mind", 0.3)])
def test_refinement_recovers_a_smooth_warp(similarity, lam):
    n = 24
    fixed = smooth((n, n, n), 0)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)  # about a voxel, varying along the other axes
    true[..., 0] = 1.5 * torch.sin(2 * math.pi * i / n)[None, :, None]
    true[..., 1] = torch.cos(2 * math.pi * i / n)[None, None, :]
    # moving sampled at grid - true: pulled back at grid + true, it is fixed again
    moving = sample_linear(fixed, voxel_grid((n, n, n)) - true)
    svf, history = refine_svf(torch.zeros(n, n, n, 3), moving, fixed, iterations=60,
                              lam=lam, similarity=similarity, lr=0.1)
    assert history[-1] < history[0]
    inner = (slice(4, -4),) * 3
    before = float(true[inner].norm(dim=-1).mean())
    after = float((integrate_svf(svf, 7) - true)[inner].norm(dim=-1).mean())
    assert after < 0.6 * before, (before, after)


def test_refine_from_the_command_line(nipype_pair, tmp_path, capsys):
    base = ["register", "-m", "joint", "-e", "192", "-j", "1", "-w",
            str(nipype_pair["weights"]), str(nipype_pair["moving"]), str(nipype_pair["fixed"])]
    assert main(base + ["-o", str(tmp_path / "plain.nii.gz")]) == 0
    assert main(base + ["--refine", "3", "--refine-similarity", "mind",
                        "-o", str(tmp_path / "refined.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "refinement (mind) loss" in out and "in 3 steps" in out
    plain = nb.load(tmp_path / "plain.nii.gz").get_fdata()
    refined = nb.load(tmp_path / "refined.nii.gz").get_fdata()
    assert not np.allclose(plain, refined)
    assert main(base[:2] + ["affine"] + base[3:] + ["--refine", "2", "-t",
                                                    str(tmp_path / "a.txt")]) == 1
    assert "--refine applies to the deformable modes" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()


def test_refine_in_the_interface(nipype_pair):
    reg = SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                             fixed_image=str(nipype_pair["fixed"]), refine=50,
                             refine_similarity="ncc")
    assert "--refine 50" in reg.cmdline and "--refine-similarity ncc" in reg.cmdline
    assert "--refine" not in SynthMorphRegister(
        moving_image=str(nipype_pair["moving"]), fixed_image=str(nipype_pair["fixed"])).cmdline
