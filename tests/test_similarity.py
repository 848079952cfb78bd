"""Image similarity objectives: their invariances, and that minimising them recovers a
known shift (within and across contrasts) by gradient descent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthmorph_nipype.ops.similarity import (
    IMAGE_SIMILARITIES,
    image_mse,
    local_ncc,
    mind,
    mind_loss,
    mutual_information,
)


def smooth_image(seed: int = 0, n: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, n, n, n, generator=gen)
    for _ in range(3):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def translate(x: torch.Tensor, shift_vox: torch.Tensor) -> torch.Tensor:
    """``x`` sampled at ``i + shift`` along the first spatial axis (linear, border)."""
    n = x.shape[2]
    theta = torch.zeros(1, 3, 4, dtype=x.dtype)
    theta[0, 0, 0] = theta[0, 1, 1] = theta[0, 2, 2] = 1.0
    # grid_sample's last coordinate indexes the first spatial axis of (D, H, W) = (X, Y, Z)
    theta = theta.clone()
    theta[0, 2, 3] = 2 * shift_vox / n
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="border")


def test_ncc_invariances_and_range():
    x, other = smooth_image(0), smooth_image(1)
    assert float(local_ncc(x, x)) == pytest.approx(-1.0, abs=1e-3)
    assert float(local_ncc(x, 0.5 * x + 2)) == pytest.approx(-1.0, abs=1e-3)
    assert float(local_ncc(x, other)) > -0.3
    assert float(local_ncc(x, translate(x, torch.tensor(2.0)))) > float(local_ncc(x, x))
    with pytest.raises(ValueError, match="odd"):
        local_ncc(x, x, window=4)


def test_mind_is_contrast_free_but_sees_misalignment():
    x = smooth_image(2)
    assert float(mind_loss(x, 1 - x)) < 1e-4
    assert float(mind_loss(x, x**2)) < float(mind_loss(x, translate(x, torch.tensor(2.0))))
    desc = mind(x)
    assert desc.shape == (1, 6, 24, 24, 24) and float(desc.max()) <= 1 + 1e-6
    assert float(image_mse(x, 1 - x)) > 0.01  # MSE, by contrast, is not contrast-free


@pytest.mark.parametrize("name,contrast", [("ncc", lambda v: 2 * v + 1),
                                           ("mse", lambda v: v),
                                           ("mind", lambda v: 1 - v),
                                           ("mi", lambda v: v)])
def test_minimising_recovers_a_known_shift(name, contrast):
    loss_fn = IMAGE_SIMILARITIES[name]
    x = smooth_image(3)
    fixed = contrast(translate(x, torch.tensor(1.5)))
    shift = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([shift], lr=0.1)
    for _ in range(80):
        opt.zero_grad()
        loss = loss_fn(contrast(translate(x, shift)), fixed)
        loss.backward()
        opt.step()
    assert float(shift.detach()) == pytest.approx(1.5, abs=0.25)


def test_mutual_information_aligns_across_a_non_monotonic_contrast():
    """MI needs only that intensities map to intensities: a shift is recovered between an
    image and a folded, inverted remapping of it (where MSE and NCC would fail), and a
    weight of zero takes voxels out of the histogram."""
    x = smooth_image(4)
    fixed = (translate(x, torch.tensor(-1.25)) - 0.6).abs()  # not monotonic in x
    assert float(mutual_information(fixed, fixed)) < float(mutual_information(x, fixed))
    shift = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([shift], lr=0.1)
    for _ in range(80):
        opt.zero_grad()
        mutual_information(translate(x, shift), fixed).backward()
        opt.step()
    assert float(shift.detach()) == pytest.approx(-1.25, abs=0.25)
    # half the grid replaced by noise: with the noise weighted out MI is that of the rest
    noisy = fixed.clone()
    lo, hi = fixed[:, :, :12].min(), fixed[:, :, :12].max()  # in the kept part's range
    noisy[:, :, 12:] = lo + (hi - lo) * torch.rand_like(noisy[:, :, 12:])
    keep = torch.zeros_like(x)
    keep[:, :, :12] = 1
    moved = translate(x, torch.tensor(-1.25))
    moved = moved.clamp(moved[:, :, :12].min(), moved[:, :, :12].max())
    inside = mutual_information(moved[:, :, :12], noisy[:, :, :12])
    assert float(mutual_information(moved, noisy, weight=keep)) == pytest.approx(
        float(inside), abs=0.05)
    assert float(mutual_information(moved, noisy)) > float(inside) + 0.1
    # a batch: the mean of its pairs' own histograms
    pair = torch.cat([moved, x]), torch.cat([noisy, fixed])
    each = [float(mutual_information(m[None], f[None])) for m, f in zip(*pair, strict=True)]
    assert float(mutual_information(*pair)) == pytest.approx(sum(each) / 2, abs=1e-5)


@pytest.mark.parametrize("name", list(IMAGE_SIMILARITIES))
def test_fixed_side_precomputation_gives_the_same_loss(name):
    """``fixed_similarity`` (what the refinement uses: the fixed side's descriptors or
    histogram memberships computed once) equals the plain loss, with and without a mask."""
    from synthmorph_nipype.ops.similarity import fixed_similarity

    moved, fixed = smooth_image(5, 12), smooth_image(6, 12)
    mask = (smooth_image(7, 12) > 0.3).float()
    loss = IMAGE_SIMILARITIES[name]
    once = fixed_similarity(name, fixed)
    assert float(once(moved)) == pytest.approx(float(loss(moved, fixed)), abs=1e-6)
    assert float(once(moved, mask)) == pytest.approx(
        float(loss(moved, fixed, weight=mask)), abs=1e-6)
