"""Tests of the functional building blocks in ``synthmorph_nipype.ops``: rotations, the
coordinate frames of a grid, matrix functions, integration, sampling and the refinement's
optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from synthmorph_nipype.ops.grid import (
    affine_points,
    centred_to_index,
    index_to_centred,
    normalised_matrix,
    to_grid_sample,
    voxel_grid,
)
from synthmorph_nipype.ops.integrate import integrate_svf
from synthmorph_nipype.ops.linalg import rotation_exp, sqrtm
from synthmorph_nipype.ops.optim import Adam
from synthmorph_nipype.ops.rotation import axis_angle, rotation, rotation_angle
from synthmorph_nipype.ops.sampling import (
    SPLIT_POINTS,
    axis_permutation,
    grid_sample,
    resample_axis_aligned,
    sample_linear,
    sample_nearest,
)

from .helpers import apply, random_affine

# --------------------------------------------------------------------------------------
# 1. Rotations, checked against SciPy's
# --------------------------------------------------------------------------------------


def test_rotation_is_scipy_extrinsic_xyz():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-90, 90, (5, 4, 3))
    ours = rotation(angles)
    assert ours.shape == (5, 4, 3, 3)
    theirs = Rotation.from_euler("xyz", angles.reshape(-1, 3), degrees=True).as_matrix()
    np.testing.assert_allclose(ours.reshape(-1, 3, 3), theirs, atol=1e-12)
    with pytest.raises(ValueError, match="angles"):
        rotation([1.0, 2.0])


def test_axis_angle_and_rotation_exp_are_scipy_rotvec():
    rng = np.random.default_rng(1)
    for _ in range(4):
        axis, degrees = rng.normal(size=3), rng.uniform(1, 170)
        rotvec = axis / np.linalg.norm(axis) * np.deg2rad(degrees)
        theirs = Rotation.from_rotvec(rotvec).as_matrix()
        np.testing.assert_allclose(axis_angle(axis, degrees), theirs, atol=1e-12)
        np.testing.assert_allclose(rotation_exp(torch.from_numpy(rotvec)).numpy(), theirs,
                                   atol=1e-12)
        assert rotation_angle(theirs) == pytest.approx(degrees)
    with pytest.raises(ValueError, match="zero"):
        axis_angle([0, 0, 0], 10)


# --------------------------------------------------------------------------------------
# 2. Coordinate frames of a grid
# --------------------------------------------------------------------------------------


def test_to_grid_sample_is_grid_samples_frame():
    """A volume sampled through to_grid_sample by torch's own grid_sample returns the
    values at the voxel indices given (trilinear at fractional ones, checked by SciPy)."""
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(5, 7, 4))
    pts = np.stack([rng.uniform(0, n - 1, 20) for n in vol.shape], -1)
    grid = to_grid_sample(torch.from_numpy(pts), vol.shape)
    got = torch.nn.functional.grid_sample(
        torch.from_numpy(vol)[None, None], grid.view(1, 1, 1, -1, 3), align_corners=True)
    np.testing.assert_allclose(got.reshape(-1).numpy(),
                               ndimage.map_coordinates(vol, pts.T, order=1), atol=1e-12)
    # the matrix form agrees with the function and sends the corners to -1 and 1
    m = normalised_matrix(vol.shape)
    np.testing.assert_allclose(pts @ m[:3, :3].T + m[:3, 3], grid.numpy()[:, ::-1])
    np.testing.assert_allclose(m @ [4, 6, 3, 1], [1, 1, 1, 1])
    np.testing.assert_allclose(normalised_matrix((1, 2, 3)) @ [0, 0, 0, 1], [-1, -1, -1, 1])


def test_affine_points_and_voxel_grid():
    m = random_affine(np.random.default_rng(3)).numpy()
    pts = affine_points(m, (3, 4, 2), dtype=torch.float64)
    grid = voxel_grid((3, 4, 2), dtype=torch.float64)
    assert grid.shape == (3, 4, 2, 3)
    torch.testing.assert_close(grid[2, 1, 0], torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(pts[2, 3, 1].numpy(), m[:3, :3] @ [2, 3, 1] + m[:3, 3])


def test_index_to_centred_inverts():
    m = random_affine(np.random.default_rng(6))
    torch.testing.assert_close(index_to_centred(centred_to_index(m, 9), 9), m)
    torch.testing.assert_close(centred_to_index(index_to_centred(m, 9), 9), m)


# --------------------------------------------------------------------------------------
# 3. Matrix functions
# --------------------------------------------------------------------------------------


def test_sqrtm():
    rng = np.random.default_rng(4)
    m = random_affine(rng, scale=0.3)[None]
    root = sqrtm(m)
    torch.testing.assert_close(root @ root, m, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(root[0, 3], m[0, 3])  # still an affine matrix
    assert not torch.allclose(root, m, atol=1e-3)


def test_centred_to_index():
    rng = np.random.default_rng(5)
    extent = 64
    c = (extent - 1) / 2
    m = random_affine(rng)
    idx = centred_to_index(m, extent)
    # The pure centre shift: centred 0 is index c.
    shift = centred_to_index(torch.eye(4, dtype=torch.float64), extent)
    torch.testing.assert_close(shift, torch.eye(4, dtype=torch.float64))
    pts = torch.from_numpy(rng.normal(0, 10, (8, 3)))
    # idx(c + p) = c + m(p)
    torch.testing.assert_close(apply(idx, pts + c), apply(m, pts) + c)
    # The centre itself goes where m sends the centred origin.
    centre = torch.full((1, 3), c, dtype=torch.float64)
    torch.testing.assert_close(apply(idx, centre)[0], m[:3, 3] + c)
    # A pure linear map about the centre fixes the centre.
    lin = m.clone()
    lin[:3, 3] = 0
    torch.testing.assert_close(apply(centred_to_index(lin, extent), centre), centre)


# --------------------------------------------------------------------------------------
# 4. Integration of velocity fields
# --------------------------------------------------------------------------------------


def smooth_svf(shape=(20, 20, 20), amplitude=2.0, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    v = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 4.0) for _ in range(3)], -1)
    return torch.from_numpy(v * amplitude / np.abs(v).max())


def test_integrate_constant_svf():
    svf = torch.zeros((8, 9, 10, 3), dtype=torch.float64)
    svf[..., :] = torch.tensor([1.5, -0.7, 2.2], dtype=torch.float64)
    for steps in (1, 5, 7):
        torch.testing.assert_close(integrate_svf(svf, steps), svf, atol=1e-12, rtol=1e-12)


def test_integrate_zero_steps_returns_input():
    svf = smooth_svf((6, 7, 8))
    assert torch.equal(integrate_svf(svf, 0), svf)
    assert not torch.allclose(integrate_svf(svf, 7), svf, atol=1e-3)
    with pytest.raises(ValueError):
        integrate_svf(svf, -1)


def test_integrate_inverse():
    svf = smooth_svf()
    fwd = integrate_svf(svf, 7)
    inv = integrate_svf(-svf, 7)
    shape = svf.shape[:3]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=svf.dtype) for n in shape],
                                      indexing="ij"), -1)
    # (phi_-v o phi_v)(x) = x + u(x) + w(x + u(x))
    composed = fwd + sample_linear(inv, grid + fwd, boundary="clamp")
    core = (slice(4, -4),) * 3
    err = composed[core].norm(dim=-1).max()
    assert fwd.norm(dim=-1).max() > 1.0
    assert err < 0.03
    # Integrating is not just adding: the naive inverse (-u) is worse.
    naive = fwd + sample_linear(-fwd, grid + fwd, boundary="clamp")
    assert naive[core].norm(dim=-1).max() > 3 * err


# --------------------------------------------------------------------------------------
# 5. Sampling
# --------------------------------------------------------------------------------------


def test_sample_linear_matches_scipy():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(9, 10, 11))
    pts = rng.uniform(0, 1, (500, 3)) * (np.array(vol.shape) - 1)
    got = sample_linear(torch.from_numpy(vol), torch.from_numpy(pts)).numpy()
    want = ndimage.map_coordinates(vol, pts.T, order=1)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # Multi-channel volumes: per channel, with a leading batch shape.
    vol4 = rng.normal(size=(9, 10, 11, 2))
    got4 = sample_linear(torch.from_numpy(vol4), torch.from_numpy(pts.reshape(20, 25, 3)))
    assert got4.shape == (20, 25, 2)
    for ch in range(2):
        np.testing.assert_allclose(got4[..., ch].numpy().ravel(),
                                   ndimage.map_coordinates(vol4[..., ch], pts.T, order=1),
                                   atol=1e-12)


def test_sample_nearest_matches_scipy_and_keeps_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 50, size=(9, 10, 11)).astype(np.int64)
    pts = rng.uniform(0, 1, (500, 3)) * (np.array(labels.shape) - 1)
    got = sample_nearest(torch.from_numpy(labels), torch.from_numpy(pts))
    assert got.dtype == torch.int64
    want = ndimage.map_coordinates(labels, pts.T, order=0)
    np.testing.assert_array_equal(got.numpy(), want)
    out = sample_nearest(torch.from_numpy(labels), torch.tensor([[-0.6, 0.0, 0.0],
                                                                 [8.4, 9.4, 10.4],
                                                                 [8.6, 0.0, 0.0]]), fill=-1)
    assert out.tolist() == [-1, labels[8, 9, 10], -1]


def test_sample_linear_zeros_boundary():
    rng = np.random.default_rng(2)
    vol = torch.from_numpy(rng.uniform(1, 2, (5, 6, 7)))
    last = torch.tensor([[4.0, 5.0, 6.0], [4.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(sample_linear(vol, last),
                               torch.stack([vol[4, 5, 6], vol[4, 2, 3], vol[0, 0, 0]]),
                               atol=0, rtol=0)
    out = torch.tensor([[-0.01, 2.0, 3.0], [1.0, 5.01, 3.0], [1.0, 2.0, 6.5]],
                       dtype=torch.float64)
    assert sample_linear(vol, out, fill=-7.0).tolist() == [-7.0, -7.0, -7.0]
    assert sample_linear(vol, out).tolist() == [0.0, 0.0, 0.0]


def test_axis_aligned_resampling_is_trilinear_sampling():
    """The separable path gives what scipy's trilinear interpolation gives at the points
    affine_points makes, for flips, permutations, scalings and shifts that put points off
    the grid and exactly on its first and last voxels; a matrix that mixes axes is refused."""
    from synthmorph_nipype.engine.conform import conform

    rng = np.random.default_rng(4)
    vol = rng.uniform(1, 2, (7, 8, 9))
    shape = (10, 6, 12)
    for perm in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        m = np.zeros((4, 4))
        m[3, 3] = 1
        for b, a in enumerate(perm):  # from 1.5 voxels before the grid, on past its end
            m[a, b] = rng.choice([-1, 1]) * rng.uniform(0.8, 1.2)
            m[a, 3] = -1.5 if m[a, b] > 0 else vol.shape[a] + 0.5
        a = perm[0]  # one axis on the voxels, its first and last among them
        m[a, 0], m[a, 3] = (1.0, 0.0) if m[a, 0] > 0 else (-1.0, vol.shape[a] - 1.0)
        assert axis_permutation(m, shape) == perm
        pts = affine_points(m, shape).double().numpy().reshape(-1, 3)
        inside = ((pts >= 0) & (pts <= np.array(vol.shape) - 1)).all(axis=1)
        want = np.where(inside, ndimage.map_coordinates(vol, pts.T, order=1, mode="nearest"),
                        0.0).reshape(shape)
        got = resample_axis_aligned(torch.from_numpy(vol), m, shape).numpy()
        assert 0.1 < inside.mean() < 0.95  # points on and off the grid
        np.testing.assert_allclose(got, want, atol=1e-12)
        # conform takes this path; a slightly oblique matrix takes grid_sample's
        np.testing.assert_allclose(conform(vol, m, 10, normalize=False).numpy(),
                                   sample_linear(torch.from_numpy(vol).float().double(),
                                                 affine_points(m, (10,) * 3)).numpy(),
                                   atol=1e-6)
    oblique = np.eye(4)
    oblique[0, 1] = 0.01
    assert axis_permutation(oblique, shape) is None
    with pytest.raises(ValueError, match="mixes axes"):
        resample_axis_aligned(torch.from_numpy(vol), oblique, shape)


def test_sample_linear_clamp_boundary():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(5, 6, 7))
    pts = rng.uniform(-3, 10, (300, 3))
    assert ((pts < 0) | (pts > np.array(vol.shape) - 1)).any(axis=1).sum() > 100
    got = sample_linear(torch.from_numpy(vol), torch.from_numpy(pts), boundary="clamp")
    clipped = np.clip(pts, 0, np.array(vol.shape) - 1)
    want = ndimage.map_coordinates(vol, clipped.T, order=1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    # Edge replication along one axis.
    edge = sample_linear(torch.from_numpy(vol), torch.tensor([[-2.0, 1.0, 1.0],
                                                              [9.0, 1.0, 1.0]],
                                                             dtype=torch.float64),
                         boundary="clamp")
    np.testing.assert_allclose(edge.numpy(), [vol[0, 1, 1], vol[4, 1, 1]], rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        sample_linear(torch.from_numpy(vol), torch.from_numpy(pts), boundary="reflect")


def test_similarities_are_the_vocabularys():
    """ops imports nothing of the package: its table of similarities must name exactly
    the vocabulary's (which the command lines and interfaces offer)."""
    from synthmorph_nipype.ops.similarity import IMAGE_SIMILARITIES as TABLE
    from synthmorph_nipype.vocabulary import IMAGE_SIMILARITIES

    assert tuple(TABLE) == IMAGE_SIMILARITIES


def test_adam_takes_torchs_steps_under_a_schedule():
    """The refinement's Adam against torch.optim.Adam (the reference) on a non-quadratic
    loss of two tensors, the rate changed every step, one tensor without a gradient at
    times: the same parameters at every step, and a parameter without grad unmoved."""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(5, 4, generator=gen), torch.randn(3, generator=gen)]
    ours = [t.clone().requires_grad_(True) for t in start]
    ref = [t.clone().requires_grad_(True) for t in start]
    opt, opt_ref = Adam(ours, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    for step in range(40):
        opt.lr = opt_ref.param_groups[0]["lr"] = 0.05 * (1 - step / 50)
        for x, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            loss = (x[0] ** 3).sum()
            if step % 3:  # the second tensor gets no gradient every third step
                loss = loss + (x[1] * x[0][0, :3]).exp().sum()
            loss.backward()
            o.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], start[0]) and not torch.equal(ours[1], start[1])
    frozen = torch.ones(2, requires_grad=True)
    Adam([frozen], lr=1.0).step()
    assert torch.equal(frozen, torch.ones(2))


def test_grid_sample_split_across_threads_is_grid_sample():
    """A lone volume's points dealt to several threads (3: the last one padded) give
    torch's values bit for bit, and the same gradients for the volume and the points."""
    torch.manual_seed(3)
    vol = torch.rand(1, 2, 9, 10, 11, dtype=torch.float64)
    grid = torch.rand(1, SPLIT_POINTS // 64 + 1, 8, 8, 3, dtype=torch.float64) * 2.2 - 1.1
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        results = []
        for sampler in (grid_sample, torch.nn.functional.grid_sample):
            v, g = vol.clone().requires_grad_(True), grid.clone().requires_grad_(True)
            out = sampler(v, g, mode="bilinear", padding_mode="zeros", align_corners=True)
            (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            results.append((out.detach(), v.grad, g.grad))
    finally:
        torch.set_num_threads(before)
    (out, dv, dg), (ref, dv_ref, dg_ref) = results
    assert out.shape == ref.shape and torch.equal(out, ref)
    torch.testing.assert_close(dv, dv_ref)
    torch.testing.assert_close(dg, dg_ref)
