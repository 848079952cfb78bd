"""Tests of the synthetic image generator (synthesis/generator.py) on small label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_nipype.synthesis.generator import (
    SynthConfig,
    deform_labels,
    gaussian_blur,
    labels_to_image,
    random_affine,
    random_bias_field,
    random_svf,
    random_svf_warp,
    reduce_resolution,
    sample_pair,
)

SHAPE = (48, 48, 48)
LABEL_IDS = torch.tensor([0, 2, 3, 4, 7, 10, 12, 41, 42])


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_labels(batch=2, shape=SHAPE, seed=0) -> torch.Tensor:
    """Blobby label maps: argmax of smooth random noise over 8 classes, inside a ball
    (outside: background 0); ids are non-contiguous."""
    g = gen(seed)
    noise = torch.randn((batch, 8, 6, 6, 6), generator=g)
    smooth = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)
    classes = smooth.argmax(1) + 1
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) - (n - 1) / 2 for n in shape],
                                      indexing="ij"), -1)
    ball = grid.norm(dim=-1) < 0.42 * min(shape)
    return torch.where(ball, LABEL_IDS[classes], torch.zeros_like(classes))


def per_label_values(image: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(v): image[labels == v] for v in torch.unique(labels)}


def roughness(x: torch.Tensor, axis: int) -> float:
    """Mean squared difference of neighbours along a spatial axis of (..., X, Y, Z)."""
    return float(torch.diff(x, dim=x.ndim - 3 + axis).pow(2).mean())


# ----------------------------------------------------------------------------- basics

def test_reproducible_and_seed_dependent():
    labels = make_labels()
    cfg = SynthConfig()
    a = sample_pair(labels, cfg, gen(5))
    b = sample_pair(labels, cfg, gen(5))
    c = sample_pair(labels, cfg, gen(6))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("image_1", "image_2", "affine_1", "disp_2"):
        assert not torch.equal(a[key], c[key]), key


def test_shapes_dtypes_ranges():
    labels = make_labels(batch=3)
    out = sample_pair(labels, SynthConfig(), gen(1))
    b = labels.shape[0]
    for k in (1, 2):
        img = out[f"image_{k}"]
        assert img.shape == (b, 1, *SHAPE) and img.dtype == torch.float32
        assert torch.isfinite(img).all()
        assert img.min() >= 0 and img.max() <= 1
        assert float(img.amax(dim=(1, 2, 3, 4)).min()) > 0.99  # min-max normalised
        lab = out[f"labels_{k}"]
        assert lab.shape == labels.shape and lab.dtype == torch.long
        assert set(torch.unique(lab).tolist()) <= set(LABEL_IDS.tolist())
        assert out[f"affine_{k}"].shape == (b, 4, 4)
        assert out[f"disp_{k}"].shape == (b, *SHAPE, 3)
    assert out["flips"].shape == (b, 3) and out["flips"].dtype == torch.bool


def test_config_validation():
    with pytest.raises(ValueError):
        SynthConfig(flip_prob=1.5)
    with pytest.raises(ValueError):
        SynthConfig(voxel_size=(1.0, 2.0))
    assert SynthConfig(voxel_size=(1, 2, 3)).voxel_mm() == (1.0, 2.0, 3.0)


# ----------------------------------------------------------------------------- affine

def test_affine_sampler_respects_ranges():
    cfg = SynthConfig(voxel_size=2.0)
    shape = (40, 48, 56)
    mats = random_affine(3000, shape, cfg, gen(3)).double().numpy()
    assert mats.shape == (3000, 4, 4)
    np.testing.assert_array_equal(mats[:, 3], np.tile([0, 0, 0, 1], (3000, 1)))
    vs = 2.0
    linear = mats[:, :3, :3]  # isotropic voxels: the same in mm
    q, r = np.linalg.qr(linear)
    sign = np.sign(np.diagonal(r, axis1=1, axis2=2))
    q, r = q * sign[:, None, :], r * sign[:, :, None]
    assert np.allclose(np.linalg.det(q), 1.0, atol=1e-5)
    # Euler angles of Rz @ Ry @ Rx
    ay = -np.degrees(np.arcsin(np.clip(q[:, 2, 0], -1, 1)))
    ax = np.degrees(np.arctan2(q[:, 2, 1], q[:, 2, 2]))
    az = np.degrees(np.arctan2(q[:, 1, 0], q[:, 0, 0]))
    angles = np.stack([ax, ay, az], 1)
    scales = np.diagonal(r, axis1=1, axis2=2)
    shears = np.stack([r[:, 0, 1] / r[:, 0, 0], r[:, 0, 2] / r[:, 0, 0],
                       r[:, 1, 2] / r[:, 1, 1]], 1)
    eps = 1e-3
    assert np.abs(angles).max() <= 45 + eps and np.abs(angles).max() > 40
    assert np.abs(scales - 1).max() <= 0.1 + eps and np.abs(scales - 1).max() > 0.09
    assert np.abs(shears).max() <= 0.1 + eps and np.abs(shears).max() > 0.09
    # the centre goes to centre + shift, |shift| <= 30 mm = 15 voxels per axis
    centre = np.array([(n - 1) / 2 for n in shape])
    moved = mats[:, :3, :3] @ centre + mats[:, :3, 3]
    shift = moved - centre
    assert np.abs(shift).max() <= 30 / vs + eps and np.abs(shift).max() > 0.9 * 30 / vs
    assert abs(shift.mean()) < 0.5  # symmetric


def test_affine_anisotropic_voxels_and_identity():
    cfg = SynthConfig(voxel_size=(1.0, 2.0, 3.0), shift_mm=0.0)
    mats = random_affine(50, SHAPE, cfg, gen(0)).double().numpy()
    d = np.diag([1.0, 2.0, 3.0])
    mm = d @ mats[:, :3, :3] @ np.linalg.inv(d)  # the millimetre map
    # rotation * upper-triangular with scale 0.9-1.1: column norms stay bounded
    norms = np.linalg.norm(mm, axis=1)
    assert norms.min() > 0.85 and norms.max() < 1.25
    eye = random_affine(4, SHAPE, SynthConfig.identity(), gen(0))
    assert torch.equal(eye, torch.eye(4).repeat(4, 1, 1))


# ----------------------------------------------------------------------------- deformation

def test_identity_config_keeps_labels_and_constant_intensities():
    labels = make_labels()
    cfg = SynthConfig.identity()
    g = gen(2)
    affine = random_affine(2, SHAPE, cfg, g)
    disp = random_svf_warp(2, SHAPE, cfg, g)
    assert torch.equal(disp, torch.zeros_like(disp))
    assert torch.equal(deform_labels(labels, affine, disp), labels)
    assert torch.equal(deform_labels(labels, None, None), labels)
    image = labels_to_image(labels, cfg, g)
    for i in range(2):
        values = per_label_values(image[i, 0], labels[i])
        means = torch.stack([v.mean() for v in values.values()])
        for v in values.values():
            assert float(v.max() - v.min()) < 1e-6  # one intensity per label
        assert float(means.min()) == 0.0 and abs(float(means.max()) - 1) < 1e-6
        assert len(torch.unique(means.round(decimals=4))) == len(values)


def test_deform_labels_pullback_convention_and_label_set():
    labels = make_labels(batch=1)
    shift = torch.eye(4)[None].clone()
    shift[0, 0, 3] = 3.0
    out = deform_labels(labels, shift)
    assert torch.equal(out[0, :-3], labels[0, 3:])  # out(x) = in(x + 3)
    assert (out[0, -3:] == 0).all()  # off the grid: background
    shift[0, 0, 3], shift[0, 2, 3] = 2.6, -1.4  # nearest voxel: +3 and -1
    out = deform_labels(labels, shift)
    assert torch.equal(out[0, :-3, :, 1:], labels[0, 3:, :, :-1])
    g = gen(4)
    cfg = SynthConfig()
    out = deform_labels(labels, random_affine(1, SHAPE, cfg, g), random_svf_warp(1, SHAPE, cfg, g))
    assert not torch.equal(out, labels)
    assert set(torch.unique(out).tolist()) <= set(torch.unique(labels).tolist())
    assert len(torch.unique(out)) >= len(torch.unique(labels)) - 1


def test_warps_smooth_and_diffeomorphic():
    shape = (56, 56, 56)
    disp = random_svf_warp(3, shape, SynthConfig(), gen(7))
    assert torch.isfinite(disp).all()
    assert float(disp.abs().amax(dim=(1, 2, 3, 4)).min()) > 0.5  # it does deform
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    phi = disp + torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    jac = torch.stack([torch.stack(torch.gradient(phi[..., c], dim=(1, 2, 3)), -1)
                       for c in range(3)], -2)
    det = torch.linalg.det(jac)
    assert float((det > 0).float().mean()) > 0.999
    # smooth: neighbouring displacements differ far less than a voxel on average
    for a in range(3):
        assert float(torch.diff(disp, dim=1 + a).abs().mean()) < 0.3


def test_coarse_integration_close_to_full():
    cfg = SynthConfig(warp_std_mm=4.0)
    coarse = random_svf_warp(1, SHAPE, cfg, gen(20))
    full = random_svf_warp(1, SHAPE, cfg.replace(warp_downsample=1), gen(20))
    assert float(full.abs().max()) > 1.0
    assert float((coarse - full).abs().max()) < 0.05 * float(full.abs().max())


def test_svf_scales_with_voxel_size():
    a = random_svf(1, SHAPE, SynthConfig(), gen(9))
    b = random_svf(1, SHAPE, SynthConfig(voxel_size=2.0, warp_fwhm_mm=(32.0, 64.0)), gen(9))
    torch.testing.assert_close(a / 2, b)  # same control grids, displacement in voxels halved


# ----------------------------------------------------------------------------- intensities

def test_gaussian_blur_preserves_constants_and_smooths():
    x = torch.randn(2, 1, 20, 22, 24, generator=gen(0))
    const = torch.full_like(x, 3.0)
    sigma = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(gaussian_blur(const, sigma), const)
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[1], x[1])
    for a in range(3):
        assert roughness(y[0], a) < 0.7 * roughness(x[0], a)


def test_resolution_loss_removes_high_frequencies_along_one_axis():
    x = torch.randn(1, 1, 48, 48, 48, generator=gen(10))
    y = reduce_resolution(x, 1, 4.0)
    var = float(y.var())
    # white noise: neighbours independent -> mean squared difference 2 * variance
    assert roughness(y, 0) / var == pytest.approx(2.0, rel=0.1)
    assert roughness(y, 2) / var == pytest.approx(2.0, rel=0.1)
    assert roughness(y, 1) / var < 0.2
    # the spectrum along axis 1 loses (nearly) all power above the Nyquist frequency of
    # 4-voxel slices; along axis 0 it stays white
    def high(v, axis):
        spec = torch.fft.rfft(v[0, 0], dim=axis).abs().pow(2)
        spec = spec.mean(dim=tuple(a for a in range(3) if a != axis))
        return float(spec[48 // 8 + 2:].sum() / spec.sum())

    assert high(x, 1) > 0.6 and high(y, 0) > 0.6
    assert high(y, 1) < 0.1
    assert torch.equal(reduce_resolution(x, 0, 1.0), x)
    # thick slices: one sample every 4 voxels (49 = 12 * 4 + 1), linear in between
    x = torch.randn(1, 1, 20, 49, 20, generator=gen(21))
    y = reduce_resolution(x, 1, 4.0)
    curv = torch.diff(y[0, 0], n=2, dim=1).abs().amax(dim=(0, 2))  # at voxels 1..47
    knots = torch.arange(1, 48) % 4 == 0
    assert float(curv[~knots].max()) < 1e-5 * float(curv[knots].max())


def test_labels_to_image_resolution_loss_on_a_random_axis():
    labels = make_labels(batch=4, seed=3)
    base = SynthConfig.identity(noise_min=0.2, noise_max=0.2, res_min_mm=6.0, res_max_mm=6.0)
    sharp = labels_to_image(labels, base, gen(11))
    thick = labels_to_image(labels, base.replace(res_prob=1.0), gen(11))
    axes = set()
    for i in range(4):
        r_sharp = np.array([roughness(sharp[i], a) for a in range(3)])
        r_thick = np.array([roughness(thick[i], a) for a in range(3)])
        frac_sharp, frac_thick = r_sharp / r_sharp.sum(), r_thick / r_thick.sum()
        assert np.all(np.abs(frac_sharp - 1 / 3) < 0.05)
        order = np.argsort(frac_thick)
        assert frac_thick[order[0]] < 0.1 and frac_thick[order[1]] > 0.4
        axes.add(int(order[0]))
    assert len(axes) >= 2  # the axis is random


def test_bias_field_smooth_and_positive():
    cfg = SynthConfig(bias_std=0.5)
    field = random_bias_field(4, SHAPE, cfg, gen(12))
    assert field.shape == (4, 1, *SHAPE)
    assert torch.isfinite(field).all() and (field > 0).all()
    log = field.log()
    assert float(log.std(dim=(1, 2, 3, 4)).max()) > 0.05  # not flat
    for a in range(3):
        assert float(torch.diff(log, dim=2 + a).abs().max()) < 0.15  # smooth
    # low-pass: neighbours nearly equal relative to the spread (white noise: 2)
    centred = log - log.mean(dim=(2, 3, 4), keepdim=True)
    for i in range(4):
        assert roughness(centred[i], 0) / float(centred[i].pow(2).mean()) < 0.01
    flat = random_bias_field(2, SHAPE, SynthConfig(bias_std=0.0), gen(12))
    assert torch.equal(flat, torch.ones_like(flat))


def test_gamma_is_monotonic_per_label():
    labels = make_labels(batch=2, seed=4)
    plain = labels_to_image(labels, SynthConfig.identity(), gen(13))
    bent = labels_to_image(labels, SynthConfig.identity(gamma_std=0.5), gen(13))
    assert not torch.allclose(plain, bent)
    for i in range(2):
        p = torch.stack([v[0] for v in per_label_values(plain[i, 0], labels[i]).values()])
        b = torch.stack([v[0] for v in per_label_values(bent[i, 0], labels[i]).values()])
        assert torch.equal(torch.argsort(p), torch.argsort(b))


def test_crop_zeroes_an_end_slab():
    labels = make_labels(batch=4, seed=5)
    cfg = SynthConfig.identity(noise_min=0.1, noise_max=0.1, crop_max=0.5)
    full = labels_to_image(labels, cfg, gen(14))
    cropped = labels_to_image(labels, cfg.replace(crop_prob=1.0), gen(14))
    n_cropped = 0
    for i in range(4):
        changed = cropped[i, 0] != full[i, 0]
        assert (cropped[i, 0][changed] == 0).all()
        if not changed.any():
            continue
        n_cropped += 1
        idx = torch.nonzero(changed)
        spans = [(int(idx[:, a].min()), int(idx[:, a].max())) for a in range(3)]
        partial = [a for a in range(3) if spans[a] != (0, SHAPE[a] - 1)]
        assert len(partial) == 1  # a slab across the other two axes
        lo, hi = spans[partial[0]]
        assert lo == 0 or hi == SHAPE[partial[0]] - 1  # at one end
        axis = partial[0]
        slab = cropped[i, 0].narrow(axis, lo, hi - lo + 1)
        assert (slab == 0).all()
    assert n_cropped >= 3


# ----------------------------------------------------------------------------- pairs

def test_pair_same_anatomy_different_contrast():
    labels = make_labels(batch=2, seed=6)
    out = sample_pair(labels, SynthConfig.identity(), gen(15))
    assert torch.equal(out["labels_1"], labels) and torch.equal(out["labels_2"], labels)
    for i in range(2):
        v1 = per_label_values(out["image_1"][i, 0], labels[i])
        v2 = per_label_values(out["image_2"][i, 0], labels[i])
        m1 = torch.stack([v.mean() for v in v1.values()])
        m2 = torch.stack([v.mean() for v in v2.values()])
        assert float((m1 - m2).abs().max()) > 0.1
    # with deformation, each image has its own warp of the same map
    out = sample_pair(labels, SynthConfig(flip_prob=0.0), gen(15))
    assert not torch.equal(out["labels_1"], out["labels_2"])
    for k in (1, 2):
        expect = deform_labels(labels, out[f"affine_{k}"], out[f"disp_{k}"])
        assert torch.equal(out[f"labels_{k}"], expect)


def test_flips_consistent_for_the_pair():
    labels = make_labels(batch=4, seed=7)
    keys = ("image_1", "image_2", "labels_1", "labels_2")
    plain = sample_pair(labels, SynthConfig(flip_prob=0.0), gen(16))
    assert not plain["flips"].any()
    every = sample_pair(labels, SynthConfig(flip_prob=1.0), gen(16))
    assert every["flips"].all()
    for key in keys:
        dims = (1, 2, 3) if key.startswith("labels") else (2, 3, 4)
        assert torch.equal(every[key], torch.flip(plain[key], dims)), key
    some = sample_pair(labels, SynthConfig(flip_prob=0.5), gen(16))
    flips = some["flips"]
    assert 0 < int(flips.sum()) < flips.numel()
    for i in range(4):
        axes = [a for a in range(3) if flips[i, a]]
        for key in keys:
            first = 0 if key.startswith("labels") else 1
            expect = torch.flip(plain[key][i], [first + a for a in axes])
            assert torch.equal(some[key][i], expect), (i, key)
    for key in ("affine_1", "disp_2"):
        assert torch.equal(some[key], plain[key])


def test_skull_labels_switched_off():
    labels = make_labels(batch=2, seed=8)
    skull = (41, 42)
    on = sample_pair(labels, SynthConfig.identity(skull_labels=skull, skull_prob=0.0), gen(17))
    off = sample_pair(labels, SynthConfig.identity(skull_labels=skull, skull_prob=1.0), gen(17))
    assert torch.isin(on["labels_1"], torch.tensor(skull)).any()
    for k in (1, 2):
        assert not torch.isin(off[f"labels_{k}"], torch.tensor(skull)).any()
        stripped = torch.isin(labels, torch.tensor(skull))
        assert torch.equal(off[f"labels_{k}"][~stripped], labels[~stripped])
        assert (off[f"labels_{k}"][stripped] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    labels = make_labels(batch=2).cuda()
    cfg = SynthConfig(res_prob=1.0, crop_prob=1.0)
    out = sample_pair(labels, cfg, gen(18, "cuda"))
    again = sample_pair(labels, cfg, gen(18, "cuda"))
    for key, value in out.items():
        assert value.device.type == "cuda", key
        assert torch.equal(value, again[key]), key
    for k in (1, 2):
        img = out[f"image_{k}"]
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    # a CPU generator drives CUDA data reproducibly, like CPU data
    on_gpu = sample_pair(labels, cfg, gen(19))
    on_cpu = sample_pair(labels.cpu(), cfg, gen(19))
    torch.testing.assert_close(on_gpu["affine_1"].cpu(), on_cpu["affine_1"])
    mismatch = (on_gpu["labels_1"].cpu() != on_cpu["labels_1"]).float().mean()
    assert float(mismatch) < 0.01 and math.isfinite(float(mismatch))
